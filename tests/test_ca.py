"""The mesh's built-in CA: `fastmesh ca init/issue/token/show/serve` run as real processes, real
TLS handshakes with what it issues, real HTTP to the signing service, and the sidecar's
CertificateSource in both modes (watched files, CSRs to the signing service)."""
from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import logging
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import ROOT, Proc, free_port
from fastmesh.mesh.ca import CA, peer_identity
from fastmesh.mesh.workload_cert import CertificateError, CertificateSource

FASTMESH = str(Path(sys.executable).parent / "fastmesh")     # the installed console script
TD = "example.org"
ORDERS = f"spiffe://{TD}/svc/orders"


def ca_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([FASTMESH, "ca", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    if check:
        assert done.returncode == 0, done.stderr + done.stdout
    return done


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def load_cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture
def ca_dir(tmp_path) -> Path:
    directory = tmp_path / "ca"
    ca_cli("init", "--trust-domain", TD, "--dir", str(directory))
    return directory


@pytest.fixture
def signing(ca_dir):
    """Factory: signing(*extra) runs `fastmesh ca serve` on a free loopback port."""
    started: list[Proc] = []

    def start(*extra: str) -> Proc:
        port = free_port()
        proc = Proc(["ca", "serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{port}",
                     *extra], port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


async def until(check, timeout: float, message: str, interval: float = 0.05):
    """Poll `check` on the running loop until it returns something true, at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"{message} (waited {timeout}s)")


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              server_hostname: str | None = None) -> tuple[dict | None, dict]:
    """One TLS handshake over loopback TCP; (what the server saw of the client's certificate,
    what the client saw of the server's). Raises the client's ssl error on refusal."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    seen: dict = {}

    def serve():
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(2) == b"ok"
                return seen.get("peer"), tls.getpeercert()
    finally:
        thread.join(timeout=5)
        listener.close()


def server_context(workload: Path, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(workload / "cert.pem", workload / "key.pem")
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(workload / "ca.pem")
    return ctx


def client_context(bundle: Path, workload: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False          # a mesh peer is checked by its SPIFFE id, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(bundle)
    if workload is not None:
        ctx.load_cert_chain(workload / "cert.pem", workload / "key.pem")
    return ctx


def post(port: int, body: bytes | dict, tls: ssl.SSLContext | None = None) -> tuple[int, dict]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    if tls is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    try:
        conn.request("POST", "/v1/sign", body=payload, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.getheader("Content-Type") == "application/json"
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def new_csr(*names: x509.GeneralName) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "admin")]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    csr = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    return key, csr.decode()


# --- init ---------------------------------------------------------------------------------------

def test_init_creates_a_p256_root_with_private_files(ca_dir):
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca-key.pem") == 0o600
    assert mode(ca_dir / "token-secret") == 0o600
    secret = (ca_dir / "token-secret").read_text().strip()
    assert len(secret) == 64 and bytes.fromhex(secret)
    meta = json.loads((ca_dir / "ca.json").read_text())
    assert meta["trust_domain"] == TD
    created = datetime.datetime.fromisoformat(meta["created"])
    assert abs((now_utc() - created).total_seconds()) < 120

    root = load_cert(ca_dir / "ca.pem")
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(root.public_key().curve, ec.SECP256R1)
    root.verify_directly_issued_by(root)                       # self-signed
    basic = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    lifetime = root.not_valid_after_utc - now_utc()
    assert 3640 <= lifetime.days <= 3651                         # ten years
    assert root.not_valid_before_utc < now_utc()
    key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    assert key.public_key().public_numbers() == root.public_key().public_numbers()


def test_init_refuses_to_overwrite_an_existing_ca_unless_forced(ca_dir):
    before = (ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca-key.pem").read_bytes()
    refused = ca_cli("init", "--trust-domain", TD, "--dir", str(ca_dir), check=False)
    assert refused.returncode == 1
    assert "already holds a CA" in refused.stderr and "--force" in refused.stderr
    assert ((ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca-key.pem").read_bytes()) == before

    ca_cli("init", "--trust-domain", "other.example", "--dir", str(ca_dir), "--force")
    assert (ca_dir / "ca.pem").read_bytes() != before[0]
    assert json.loads((ca_dir / "ca.json").read_text())["trust_domain"] == "other.example"


def test_init_refuses_a_bad_trust_domain(tmp_path):
    done = ca_cli("init", "--trust-domain", "spiffe://x/y", "--dir", str(tmp_path / "ca"),
                  check=False)
    assert done.returncode == 1 and "trust domain" in done.stderr
    assert not (tmp_path / "ca").exists()


# --- issue --------------------------------------------------------------------------------------

def test_issue_writes_a_short_lived_leaf_named_only_by_its_spiffe_id(ca_dir, tmp_path):
    out = tmp_path / "orders"
    started = now_utc()
    done = ca_cli("issue", "--dir", str(ca_dir), "--service", "orders", "--out", str(out),
                  "--ttl", "2h")
    assert ORDERS in done.stdout
    assert "PRIVATE KEY" not in done.stdout + done.stderr
    assert mode(out / "key.pem") == 0o600
    assert sorted(os.listdir(out)) == ["ca.pem", "cert.pem", "key.pem"]   # no temp files left
    assert (out / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert (out / "cert.pem").read_text().count("BEGIN CERTIFICATE") == 1  # the leaf only

    leaf = load_cert(out / "cert.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(ORDERS)]          # and nothing else
    assert not any(attr.oid == x509.NameOID.COMMON_NAME for attr in leaf.subject)
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ttl = (leaf.not_valid_after_utc - started).total_seconds()
    assert 2 * 3600 - 5 <= ttl <= 2 * 3600 + 60
    skew = (started - leaf.not_valid_before_utc).total_seconds()
    assert 50 <= skew <= 70                                     # a minute in the past
    leaf.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()


def test_issue_defaults_to_24_hours(ca_dir, tmp_path):
    ca_cli("issue", "--dir", str(ca_dir), "--service", "orders", "--out", str(tmp_path / "w"))
    leaf = load_cert(tmp_path / "w" / "cert.pem")
    left = (leaf.not_valid_after_utc - now_utc()).total_seconds()
    assert 86400 - 120 <= left <= 86400 + 1


def test_issue_refuses_a_service_name_that_is_not_a_host_name(ca_dir, tmp_path):
    for bad in ("orders/../admin", "a b", "orders/x", ""):
        done = ca_cli("issue", "--dir", str(ca_dir), "--service", bad, "--out",
                      str(tmp_path / "w"), check=False)
        assert done.returncode == 2, bad
    assert not (tmp_path / "w").exists()


def test_issued_certificates_verify_in_a_tls_handshake_and_carry_the_identity(ca_dir, tmp_path):
    for service in ("orders", "frontend"):
        ca_cli("issue", "--dir", str(ca_dir), "--service", service, "--out",
               str(tmp_path / service))
    orders, frontend = tmp_path / "orders", tmp_path / "frontend"

    # server with the leaf, client CERT_REQUIRED with ca.pem
    _, server_cert = handshake(server_context(orders), client_context(frontend / "ca.pem"))
    assert peer_identity(server_cert) == ORDERS

    # mutual: each side verifies the other against the root and reads its SPIFFE id
    client_seen, server_seen = handshake(server_context(orders, require_client=True),
                                         client_context(frontend / "ca.pem", frontend))
    assert peer_identity(server_seen) == ORDERS
    assert peer_identity(client_seen) == f"spiffe://{TD}/svc/frontend"


def test_a_certificate_from_another_ca_is_refused(ca_dir, tmp_path):
    other = tmp_path / "other-ca"
    ca_cli("init", "--trust-domain", TD, "--dir", str(other))
    ca_cli("issue", "--dir", str(other), "--service", "orders", "--out", str(tmp_path / "rogue"))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(tmp_path / "rogue"), client_context(ca_dir / "ca.pem"))


def test_the_root_only_vouches_for_its_own_trust_domain(ca_dir, tmp_path):
    """Name constraints: even a leaf signed with the root's key for another trust domain does
    not verify."""
    root = load_cert(ca_dir / "ca.pem")
    root_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = now_utc()
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([])).issuer_name(root.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://evil.example/svc/orders")]), critical=True)
            .sign(root_key, hashes.SHA256()))
    out = tmp_path / "evil"
    out.mkdir()
    (out / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(out), client_context(ca_dir / "ca.pem"))


def test_python_api_names_and_a_leaf_for_a_given_public_key(ca_dir):
    from fastmesh.config.schema import Invalid
    from fastmesh.mesh.ca import cert_expiry, service_name, spiffe_id
    assert spiffe_id("Example.ORG", "Orders") == ORDERS
    for bad in ("a/b", "", "..", "x y"):
        with pytest.raises(Invalid):
            service_name(bad)
    ca = CA.load(str(ca_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem, key_pem = ca.issue("orders", ttl=600, public_key=key.public_key())
    assert key_pem is None                                   # the caller holds the key
    leaf = x509.load_pem_x509_certificate(cert_pem)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert_expiry(cert_pem) == leaf.not_valid_after_utc.timestamp()
    assert 590 <= cert_expiry(cert_pem) - time.time() <= 601
    assert peer_identity({}) is None
    assert peer_identity({"subjectAltName": (("DNS", "orders"), ("URI", "https://x"),
                                             ("URI", ORDERS))}) == ORDERS
    assert "BEGIN" not in repr(ca) and ca.make_token("orders") not in repr(ca)


# --- tokens and show ----------------------------------------------------------------------------

def test_token_is_bound_to_one_service(ca_dir):
    token = ca_cli("token", "--dir", str(ca_dir), "--service", "orders").stdout.strip()
    assert len(token) == 64
    again = ca_cli("token", "--dir", str(ca_dir), "--service", "orders").stdout.strip()
    assert again == token
    ca = CA.load(str(ca_dir))
    assert ca.check_token(token, "orders")
    assert not ca.check_token(token, "frontend")
    assert not ca.check_token(token[:-1] + ("0" if token[-1] != "0" else "1"), "orders")
    assert not ca.check_token("", "orders") and not ca.check_token("é" * 64, "orders")
    assert ca.make_token("frontend") != token


def test_show_prints_trust_domain_fingerprint_and_expiry(ca_dir):
    shown = json.loads(ca_cli("show", "--dir", str(ca_dir), "--json").stdout)
    root = load_cert(ca_dir / "ca.pem")
    assert shown["trust_domain"] == TD
    assert shown["fingerprint_sha256"].replace(":", "").lower() == \
        root.fingerprint(hashes.SHA256()).hex()
    assert shown["not_after"] == root.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    text = ca_cli("show", "--dir", str(ca_dir)).stdout
    assert TD in text and shown["fingerprint_sha256"] in text
    missing = ca_cli("show", "--dir", str(ca_dir / "nope"), check=False)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


# --- the signing service ------------------------------------------------------------------------

def test_signing_service_issues_for_the_token_s_service_only(ca_dir, signing):
    server = signing()
    token = ca_cli("token", "--dir", str(ca_dir), "--service", "orders").stdout.strip()
    frontend_token = ca_cli("token", "--dir", str(ca_dir), "--service", "frontend").stdout.strip()
    # the CSR asks for other names: they are ignored
    key, csr = new_csr(x509.UniformResourceIdentifier(f"spiffe://{TD}/svc/admin"),
                       x509.DNSName("admin.example.org"))

    status, answer = post(server.port, {"service": "orders", "csr": csr, "token": token})
    assert status == 200, answer
    leaf = x509.load_pem_x509_certificate(answer["certificate"].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(ORDERS)]
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME) == []
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert answer["ca"] == (ca_dir / "ca.pem").read_text()
    assert abs(answer["not_after"] - leaf.not_valid_after_utc.timestamp()) < 1
    leaf.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))

    wrong = post(server.port, {"service": "orders", "csr": csr, "token": "0" * 64})
    assert wrong[0] == 403 and "token" in wrong[1]["message"]
    foreign = post(server.port, {"service": "orders", "csr": csr, "token": frontend_token})
    assert foreign[0] == 403
    assert post(server.port, {"service": "frontend", "csr": csr, "token": token})[0] == 403

    assert post(server.port, b"garbage")[0] == 400
    assert post(server.port, b"[1, 2]")[0] == 400
    assert post(server.port, {"service": "orders", "token": token})[0] == 400
    assert post(server.port, {"service": "orders/x", "csr": csr, "token": token})[0] == 400
    bad_csr = post(server.port, {"service": "orders", "csr": "-----BEGIN CERTIFICATE REQUEST"
                                 "-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                                 "token": token})
    assert bad_csr[0] == 400 and "csr" in bad_csr[1]["message"]

    # a CSR whose signature does not verify (last byte of the signature flipped)
    der = bytearray(x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    import base64
    forged = ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)).decode()
              + "-----END CERTIFICATE REQUEST-----\n")
    refused = post(server.port, {"service": "orders", "csr": forged, "token": token})
    assert refused[0] == 400 and "signature" in refused[1]["message"]

    output = server.stop()
    assert f"signed {ORDERS}" in output
    assert token not in output and frontend_token not in output and "PRIVATE" not in output


def test_signing_service_bounds_what_it_reads(signing):
    server = signing()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: ca\r\nContent-Length: 10000000\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: ca\r\nX-Pad: " + b"a" * 20000)
        answer = sock.recv(4096)
    assert answer.split(b" ")[1] in (b"431", b"400")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/sign HTTP/1.1\r\nHost: ca\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 405 ")


def test_signing_service_over_tls_is_verified_with_the_mesh_root(ca_dir, signing, tmp_path):
    server = signing("--tls")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)          # host name checked: 127.0.0.1
    ctx.load_verify_locations(ca_dir / "ca.pem")
    token = ca_cli("token", "--dir", str(ca_dir), "--service", "orders").stdout.strip()
    _, csr = new_csr()
    status, answer = post(server.port, {"service": "orders", "csr": csr, "token": token}, tls=ctx)
    assert status == 200, answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert ("URI", f"spiffe://{TD}/ca") in tls.getpeercert()["subjectAltName"]
    untrusting = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        post(server.port, {"service": "orders", "csr": csr, "token": token}, tls=untrusting)


def test_signing_service_refuses_plain_http_beyond_loopback(ca_dir):
    done = subprocess.run([FASTMESH, "ca", "serve", "--dir", str(ca_dir), "--listen",
                           f"0.0.0.0:{free_port()}"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--tls" in done.stdout + done.stderr


# --- CertificateSource ----------------------------------------------------------------------------

def test_from_dir_picks_up_a_reissued_certificate(ca_dir, tmp_path):
    out = tmp_path / "w"
    ca_cli("issue", "--dir", str(ca_dir), "--service", "orders", "--out", str(out), "--ttl", "1h")

    async def scenario():
        source = CertificateSource.from_dir(str(out), poll_interval=0.1)
        changes = []
        await source.start(lambda: changes.append(source.expires_at))
        try:
            assert source.identity == ORDERS and source.service == "orders"
            assert source.cert_file == str(out / "cert.pem") and source.key_file == str(out / "key.pem")
            assert source.ca_file == str(out / "ca.pem")
            first = source.expires_at
            assert abs(first - load_cert(out / "cert.pem").not_valid_after_utc.timestamp()) < 1
            assert source.status()["state"] == "ok"
            await asyncio.sleep(0.3)
            assert changes == []                       # nothing changed, nothing reported
            await asyncio.to_thread(ca_cli, "issue", "--dir", str(ca_dir), "--service", "orders",
                                    "--out", str(out), "--ttl", "2h")
            await until(lambda: changes, 10, "on_change after the re-issue")
            assert source.expires_at > first + 3000
            # what on_change announces is a complete, matching pair
            server_context(out)
            assert len(changes) == 1
        finally:
            await source.stop()

    asyncio.run(scenario())


def test_from_dir_waits_a_bounded_time_and_says_why(ca_dir, tmp_path):
    async def scenario():
        empty = CertificateSource.from_dir(str(tmp_path / "nothing"), start_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(CertificateError, match="no valid workload certificate"):
            await empty.start(lambda: None)
        assert time.monotonic() - started < 3

        await asyncio.to_thread(ca_cli, "issue", "--dir", str(ca_dir), "--service", "frontend",
                                "--out", str(tmp_path / "f"))
        wrong = CertificateSource.from_dir(str(tmp_path / "f"), "orders", start_timeout=0.3)
        with pytest.raises(CertificateError, match="not for service 'orders'"):
            await wrong.start(lambda: None)

    asyncio.run(scenario())


def test_from_ca_server_writes_the_files_and_renews(ca_dir, signing, tmp_path):
    server = signing("--ttl", "6s")
    token = ca_cli("token", "--dir", str(ca_dir), "--service", "orders").stdout.strip()
    out = tmp_path / "w"

    async def scenario():
        source = CertificateSource.from_ca_server(f"http://127.0.0.1:{server.port}", token,
                                                  "orders", str(out))
        changes = []
        await source.start(lambda: changes.append(load_cert(out / "cert.pem")))
        try:
            assert mode(out / "key.pem") == 0o600
            first = load_cert(out / "cert.pem")
            first_key = (out / "key.pem").read_bytes()
            san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert list(san) == [x509.UniformResourceIdentifier(ORDERS)]
            assert (out / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
            assert source.identity == ORDERS and source.status()["state"] == "ok"
            assert abs(source.expires_at - first.not_valid_after_utc.timestamp()) < 1
            server_context(out, require_client=True)

            await until(lambda: changes, 15, "a renewed certificate")
            second = changes[0]
            assert second.not_valid_after_utc > first.not_valid_after_utc
            assert second.serial_number != first.serial_number
            assert (out / "key.pem").read_bytes() != first_key      # a new key each time
            assert source.expires_at == second.not_valid_after_utc.timestamp()
            assert source.status()["renewals"] >= 1 and source.status()["last_error"] is None
            server_context(out, require_client=True)
        finally:
            await source.stop()

    asyncio.run(scenario())
    output = server.stop()
    assert output.count(f"signed {ORDERS}") >= 2
    assert token not in output


def test_from_ca_server_over_tls(ca_dir, signing, tmp_path):
    server = signing("--tls")
    token = ca_cli("token", "--dir", str(ca_dir), "--service", "orders").stdout.strip()

    async def scenario():
        source = CertificateSource.from_ca_server(
            f"https://127.0.0.1:{server.port}", token, "orders", str(tmp_path / "w"),
            server_ca=str(ca_dir / "ca.pem"))
        await source.start(lambda: None)
        try:
            assert source.identity == ORDERS
        finally:
            await source.stop()
        blind = CertificateSource.from_ca_server(
            f"https://127.0.0.1:{server.port}", token, "orders", str(tmp_path / "x"),
            start_timeout=1)
        with pytest.raises(CertificateError, match="ca.pem"):
            await blind.start(lambda: None)

    asyncio.run(scenario())


def test_from_ca_server_refuses_a_token_of_another_service(ca_dir, signing, tmp_path):
    server = signing()
    token = ca_cli("token", "--dir", str(ca_dir), "--service", "frontend").stdout.strip()

    async def scenario():
        source = CertificateSource.from_ca_server(f"http://127.0.0.1:{server.port}", token,
                                                  "orders", str(tmp_path / "w"))
        started = time.monotonic()
        with pytest.raises(CertificateError, match="403"):
            await source.start(lambda: None)
        assert time.monotonic() - started < 5              # a refusal is final: no retries
        assert not (tmp_path / "w" / "cert.pem").exists()

    asyncio.run(scenario())


def test_from_ca_server_gives_up_after_a_bounded_wait_when_nothing_answers(tmp_path):
    async def scenario():
        source = CertificateSource.from_ca_server(f"http://127.0.0.1:{free_port()}", "t" * 64,
                                                  "orders", str(tmp_path / "w"), start_timeout=1)
        started = time.monotonic()
        with pytest.raises(CertificateError, match="cannot reach"):
            await source.start(lambda: None)
        assert time.monotonic() - started < 5

    asyncio.run(scenario())


def test_status_and_logs_for_a_nearly_expired_certificate(ca_dir, tmp_path, caplog):
    out = tmp_path / "w"
    ca_cli("issue", "--dir", str(ca_dir), "--service", "orders", "--out", str(out), "--ttl", "6s")
    caplog.set_level(logging.INFO, logger="fastmesh")

    async def scenario():
        source = CertificateSource.from_dir(str(out), poll_interval=0.1)
        await source.start(lambda: None)
        try:
            first = source.status()
            assert first["identity"] == ORDERS and first["last_error"] is None
            assert 0 < first["seconds_left"] <= 6
            # under a quarter of the 6 s lifetime left (1.5 s): expiring, then expired
            await until(lambda: source.status()["state"] == "expiring", 10, "state expiring")
            assert source.status()["seconds_left"] < 1.6
            await until(lambda: source.status()["state"] == "expired", 5, "state expired")
            assert source.status()["seconds_left"] <= 0
            await asyncio.sleep(0.5)                   # more monitor rounds: no more logging
        finally:
            await source.stop()

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.name == "fastmesh" and r.levelno == logging.WARNING
                and "expires in" in r.getMessage()]
    errors = [r for r in caplog.records if r.name == "fastmesh" and r.levelno == logging.ERROR
              and "EXPIRED" in r.getMessage()]
    assert len(warnings) == 1 and ORDERS in warnings[0].getMessage()
    assert len(errors) == 1
