"""The mesh's built-in certificate authority: one root per trust domain, short-lived workload
certificates whose only name is a SPIFFE id, and bootstrap tokens bound to one service.

A CA directory (`fastmesh ca init`):

| file | what |
| --- | --- |
| ca.pem | the self-signed root (ECDSA P-256, CA:true pathlen 0, 10 years by default) |
| ca-key.pem | its private key (0600; the directory is 0700) |
| ca.json | {"trust_domain": ..., "created": ...} |
| token-secret | 32 random bytes, hex (0600): the HMAC key of bootstrap tokens |

A workload directory (`fastmesh ca issue`, or a sidecar talking to `fastmesh ca serve`) holds
key.pem (0600), ca.pem (the trust bundle) and cert.pem (the leaf alone), written in that order,
each by temp file and rename, so whoever watches cert.pem never sees it before its key.

Keys, CSRs and certificates are made by `cryptography`; nothing here implements crypto. Private
keys never leave the process that made them except into their 0600 file.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import tempfile
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastmesh.config.schema import Invalid, hostname
from fastmesh.mesh.registry import (  # noqa: F401 (re-exported: what reads certificates)
    BUNDLE_FILE, CERT_FILE, CLOCK_SKEW, KEY_FILE, SPIFFE_SCHEME, lifetime_of, peer_identity,
    service_name, service_of,
)

__all__ = ["CA", "CAError", "spiffe_id", "service_name", "trust_domain", "write_workload",
           "peer_identity", "cert_expiry", "generate_key", "private_key_pem", "make_csr"]

ROOT_VALIDITY = 10 * 365 * 86400.0
LEAF_TTL = 86400.0                      # workload certificates: 24 h unless asked otherwise
MAX_LEAF_TTL = 366 * 86400.0
CA_CERT, CA_KEY, CA_META, TOKEN_SECRET = "ca.pem", "ca-key.pem", "ca.json", "token-secret"
TOKEN_CONTEXT = b"fastmesh-ca bootstrap token v1\x00"
CSR_KEY_TYPES = "ECDSA P-256/P-384 or RSA >= 2048 bits"


class CAError(Exception):
    """A CA operation refused or failed; the message says why (and never holds key material)."""


# --- names -------------------------------------------------------------------------------------

def trust_domain(value: str) -> str:
    """A SPIFFE trust domain: a lower-cased host name (no scheme, port, path or user)."""
    if not isinstance(value, str) or not value:
        raise Invalid("trust domain must not be empty")
    return hostname(value)


def spiffe_id(trust_domain_name: str, service: str) -> str:
    """`spiffe://<trust-domain>/svc/<service>`, both parts validated (so no '/' can sneak in)."""
    return f"{SPIFFE_SCHEME}{trust_domain(trust_domain_name)}/svc/{service_name(service)}"


def _ttl(value: float) -> float:
    try:
        ttl = float(value)
    except (TypeError, ValueError):
        raise CAError(f"ttl must be a number of seconds, found {value!r}") from None
    if not 1.0 <= ttl <= MAX_LEAF_TTL:
        raise CAError(f"ttl must be 1 s .. {MAX_LEAF_TTL / 86400:.0f} days, found {ttl:g} s")
    return ttl


def _service(value: str) -> str:
    try:
        return service_name(value)
    except Invalid as exc:
        raise CAError(exc.message) from None


# --- keys and files ----------------------------------------------------------------------------

def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_csr(key, identity: str | None = None) -> bytes:
    """A CSR signed by `key` (the CA takes only its public key and signature from it)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if identity:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write `data` to a temp file beside `path` with `mode`, fsync, rename over `path`."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _private_dir(directory: str) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)


def write_workload(out_dir: str, cert_pem: bytes | str, key_pem: bytes | str | None,
                   ca_pem: bytes | str) -> None:
    """Write a workload's files: key.pem (0600) first, then ca.pem, cert.pem last (key_pem
    None: keep the key that is there, e.g. a certificate for the same key)."""
    _private_dir(out_dir)
    if key_pem is not None:
        _write_atomic(os.path.join(out_dir, KEY_FILE), _bytes(key_pem), 0o600)
    _write_atomic(os.path.join(out_dir, BUNDLE_FILE), _bytes(ca_pem), 0o644)
    _write_atomic(os.path.join(out_dir, CERT_FILE), _bytes(cert_pem), 0o644)


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


# --- reading certificates ----------------------------------------------------------------------

def load_cert(pem: bytes | str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_bytes(pem))
    except ValueError as exc:
        raise CAError(f"not a PEM certificate: {exc}") from None


def cert_expiry(pem: bytes | str) -> float:
    """notAfter of a PEM certificate, in epoch seconds."""
    return load_cert(pem).not_valid_after_utc.timestamp()


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def cert_identity(cert: x509.Certificate) -> str | None:
    """The first spiffe:// URI SAN of a certificate."""
    return next((uri for uri in uri_sans(cert) if uri.startswith(SPIFFE_SCHEME)), None)


def lifetime(cert: x509.Certificate) -> tuple[float, float]:
    """(issued, not_after) in epoch seconds; `issued` undoes the CA's clock-skew backdating."""
    return lifetime_of(cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, as colon-separated hex (what `openssl x509 -fingerprint` shows)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _public_key_ok(key) -> bool:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1))
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size >= 2048
    return False


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)


# --- the CA ------------------------------------------------------------------------------------

class CA:
    """A loaded CA directory: the root, its key and the token secret."""

    def __init__(self, directory: str, trust_domain_name: str, cert: x509.Certificate, key,
                 secret: bytes, created: str = ""):
        self.directory = directory
        self.trust_domain = trust_domain_name
        self.cert = cert
        self._key = key
        self._secret = secret
        self.created = created
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:              # never the key or the secret
        return f"CA({self.directory!r}, trust_domain={self.trust_domain!r})"

    @property
    def not_after(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @classmethod
    def init(cls, directory: str, trust_domain_name: str, force: bool = False,
             validity: float = ROOT_VALIDITY) -> "CA":
        """Create a root in `directory`; refuses when a CA is there already unless `force`."""
        try:
            domain = trust_domain(trust_domain_name)
        except Invalid as exc:
            raise CAError(f"trust domain: {exc.message}") from None
        existing = [name for name in (CA_CERT, CA_KEY, CA_META, TOKEN_SECRET)
                    if os.path.exists(os.path.join(directory, name))]
        if existing and not force:
            raise CAError(f"{directory} already holds a CA ({', '.join(existing)}); "
                          "use --force to replace it (every certificate it issued stops "
                          "being trusted)")
        if not validity > 0:
            raise CAError(f"validity must be > 0 seconds, found {validity!r}")
        key = generate_key()
        now = time.time()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fastmesh"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"fastmesh mesh root {domain}")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - CLOCK_SKEW))
            .not_valid_after(_utc(now + validity))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            # Only names of this trust domain can chain to this root, whoever holds its key.
            .add_extension(x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(domain)],
                excluded_subtrees=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
        created = _utc(now).isoformat(timespec="seconds")
        secret = secrets.token_bytes(32)
        _private_dir(directory)
        _write_atomic(os.path.join(directory, CA_KEY), private_key_pem(key), 0o600)
        _write_atomic(os.path.join(directory, TOKEN_SECRET), secret.hex().encode() + b"\n", 0o600)
        _write_atomic(os.path.join(directory, CA_META), json.dumps(
            {"trust_domain": domain, "created": created}, indent=2).encode() + b"\n", 0o644)
        _write_atomic(os.path.join(directory, CA_CERT),
                      cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(directory, domain, cert, key, secret, created)

    @classmethod
    def load(cls, directory: str) -> "CA":
        def read(name: str) -> bytes:
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    return f.read()
            except OSError as exc:
                raise CAError(f"cannot read {os.path.join(directory, name)}: {exc.strerror} "
                              f"(made by 'fastmesh ca init --dir {directory}')") from None
        try:
            meta = json.loads(read(CA_META))
            domain = trust_domain(meta["trust_domain"])
        except (ValueError, KeyError, TypeError, Invalid) as exc:
            raise CAError(f"{os.path.join(directory, CA_META)}: not a CA description "
                          f"({type(exc).__name__})") from None
        cert = load_cert(read(CA_CERT))
        try:
            key = serialization.load_pem_private_key(read(CA_KEY), password=None)
        except (ValueError, TypeError):
            raise CAError(f"{os.path.join(directory, CA_KEY)}: not an unencrypted PEM private "
                          "key") from None
        if key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) != \
                cert.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CAError(f"{directory}: {CA_KEY} does not belong to {CA_CERT}")
        try:
            secret = bytes.fromhex(read(TOKEN_SECRET).decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            secret = b""
        if len(secret) < 16:
            raise CAError(f"{os.path.join(directory, TOKEN_SECRET)}: expected hex of at least "
                          "16 random bytes")
        return cls(directory, domain, cert, key, secret, str(meta.get("created", "")))

    # --- issuing ---

    def issue(self, service: str, ttl: float = LEAF_TTL,
              public_key=None) -> tuple[bytes, bytes | None]:
        """A leaf for `service`: (cert PEM, key PEM) with a new key, or (cert PEM, None) for the
        given `public_key`."""
        key = None
        if public_key is None:
            key = generate_key()
            public_key = key.public_key()
        cert = self._leaf(spiffe_id(self.trust_domain, _service(service)), public_key, _ttl(ttl))
        return cert, (private_key_pem(key) if key is not None else None)

    def sign_csr(self, csr_pem: bytes | str, service: str, ttl: float = LEAF_TTL) -> bytes:
        """Sign a CSR for `service`: only its public key is used (after checking its signature);
        whatever names it asks for are ignored, the leaf gets the SPIFFE id of `service`."""
        identity = spiffe_id(self.trust_domain, _service(service))
        ttl = _ttl(ttl)
        try:
            csr = x509.load_pem_x509_csr(_bytes(csr_pem))
            valid = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, TypeError, InvalidSignature, x509.UnsupportedGeneralNameType) as exc:
            raise CAError(f"not a PEM certificate signing request ({type(exc).__name__})") from None
        if not valid:
            raise CAError("the CSR's signature does not verify with its own public key")
        if not _public_key_ok(public_key):
            raise CAError(f"unsupported key in the CSR: expected {CSR_KEY_TYPES}")
        return self._leaf(identity, public_key, ttl)

    def _leaf(self, identity: str, public_key, ttl: float) -> bytes:
        now = time.time()
        not_after = min(now + ttl, self.not_after)
        if not_after <= now:
            raise CAError(f"the CA's root expired at {_utc(self.not_after).isoformat()}")
        cert = (
            self._below_root(public_key, now, not_after, [x509.UniformResourceIdentifier(identity)],
                             [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def server_cert(self, names: list[str], ttl: float = LEAF_TTL) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for the signing service itself: SAN spiffe://<td>/ca plus the
        given IP addresses / DNS names, so clients verify it with ca.pem and their usual host
        name check."""
        key = generate_key()
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"{SPIFFE_SCHEME}{self.trust_domain}/ca")]
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = time.time()
        cert = (
            self._below_root(key.public_key(), now, min(now + _ttl(ttl), self.not_after), sans,
                             [ExtendedKeyUsageOID.SERVER_AUTH])
            .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)

    def _below_root(self, public_key, now: float, not_after: float, sans: list,
                    usages: list) -> x509.CertificateBuilder:
        """What every leaf this CA signs has: subject O=fastmesh, OU=<trust domain>, a
        random serial, valid from CLOCK_SKEW before `now`, no CA rights, a signature-only key,
        these names and extended key usages, and the root's key id."""
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fastmesh"),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                        self.trust_domain)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - CLOCK_SKEW))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False))

    # --- bootstrap tokens ---

    def make_token(self, service: str) -> str:
        """The bootstrap token of `service`: HMAC-SHA256 of its name under token-secret."""
        name = _service(service)
        return hmac.new(self._secret, TOKEN_CONTEXT + name.encode(), hashlib.sha256).hexdigest()

    def check_token(self, token: str, service: str) -> bool:
        """Does `token` grant `service` (and only it)? Compared in constant time."""
        if not isinstance(token, str):
            return False
        try:
            expected = self.make_token(service)
        except CAError:
            return False
        return hmac.compare_digest(expected.encode(), token.encode("utf-8", "replace"))
