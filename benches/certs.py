"""One bench certificate for every TLS server in a run: an ECDSA P-256 leaf and its CA.

nginx, HAProxy and fastmesh all serve the same leaf (same key type, same chain length), so the
handshake cost differs only by the server, not by the certificate. Made with `cryptography` in
the run's temp dir; nothing is installed or trusted system-wide (wrk does not verify).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAME = "localhost"


@dataclass
class BenchCert:
    """Files of one bench certificate (PEM)."""
    ca: Path             # the CA certificate (for clients that verify)
    cert: Path           # the leaf certificate
    key: Path            # the leaf's private key (0600)
    chain: Path          # leaf + key in one file (HAProxy's `crt`)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make(directory: Path, name: str = NAME) -> BenchCert:
    """A CA and one ECDSA P-256 leaf for `name` and 127.0.0.1, valid for a day."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder()
          .subject_name(_name("fastmesh bench CA")).issuer_name(_name("fastmesh bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    made = BenchCert(directory / "bench-ca.pem", directory / "bench-cert.pem",
                     directory / "bench-key.pem", directory / "bench-chain.pem")
    made.ca.write_bytes(ca.public_bytes(pem))
    made.cert.write_bytes(leaf.public_bytes(pem))
    for path, data in ((made.key, key_pem), (made.chain, leaf.public_bytes(pem) + key_pem)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return made
