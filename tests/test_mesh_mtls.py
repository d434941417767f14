"""Sidecar-to-sidecar mTLS, the caller's identity at the app, and authorization policies.

Real sidecar processes (the fixtures of test_mesh_sidecar.py: a real redis-server or a registry
file), real apps (threads of this process answering what they saw), certificates from the
built-in CA through its CLI (`fastmesh ca init/issue/serve`), and raw TLS clients made with the
ssl module for the refusals. Every process is stopped, every loop bounded.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography import x509

from conftest import Proc, fastmesh_cmd, free_port, wait_until
from test_mesh_sidecar import (  # noqa: F401  (mesh, file_mesh: fixtures)
    Mesh, ThreadedApp, admin_get, answer_json, file_mesh, mesh, outbound_call,
)

TD = "example.org"


def spiffe(service: str) -> str:
    return f"spiffe://{TD}/svc/{service}"


# -- certificates: the built-in CA through its CLI ---------------------------------------------

def ca_run(*args: str) -> str:
    done = subprocess.run(fastmesh_cmd("ca", *args), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class CA:
    def __init__(self, directory: Path, trust_domain: str = TD):
        self.dir = directory
        ca_run("init", "--trust-domain", trust_domain, "--dir", str(directory))

    def issue(self, service: str, out: Path, ttl: str | None = None) -> Path:
        ca_run("issue", "--dir", str(self.dir), "--service", service, "--out", str(out),
               *(("--ttl", ttl) if ttl else ()))
        return out

    @property
    def root(self) -> str:
        return str(self.dir / "ca.pem")


@pytest.fixture
def ca(tmp_path):
    return CA(tmp_path / "ca")


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


# -- apps that say what reached them ------------------------------------------------------------

class PeerApp(ThreadedApp):
    """Answers {"service", "method", "path", "host", "peer", "xfcc", "proto"} to any method; with
    `calls` = (service, outbound port) it first calls that service through its sidecar and
    nests the answer under "next"."""

    def __init__(self, service: str, calls: tuple[str, int] | None = None):
        app = self
        self.calls = calls

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                answer = {"service": service, "method": self.command, "path": self.path,
                          "host": self.headers.get("Host"),
                          "peer": self.headers.get("X-Fastmesh-Peer"),
                          "xfcc": self.headers.get("X-Forwarded-Client-Cert"),
                          "proto": self.headers.get("X-Forwarded-Proto")}
                status = 200
                if app.calls is not None:
                    name, port = app.calls
                    status, answer["next"] = outbound_call(port, name, self.path)
                answer_json(self, status, answer)

            do_GET = do_POST = do_DELETE = do_PUT = _answer

            def log_message(self, *args):
                pass

        self.serve(Handler)


def pod(mesh_: Mesh, service: str, *extra: str, calls=None, outbound=None, **kw):
    app = PeerApp(service, calls)
    mesh_.apps.append(app)
    return mesh_.sidecar(service, app, "--instance-id", f"{service}1", *extra,
                         outbound=outbound, **kw)


# -- raw clients ---------------------------------------------------------------------------------

def client_context(ca_file: str, cert_dir: Path | None = None, version=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False              # mesh certificates name a SPIFFE id, no host
    ctx.load_verify_locations(ca_file)
    if cert_dir is not None:
        ctx.load_cert_chain(str(cert_dir / "cert.pem"), str(cert_dir / "key.pem"))
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def read_all(sock, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionError):
            break
        if not chunk:
            break
        data += chunk
    return data


def tls_request(port: int, ctx: ssl.SSLContext, method: str = "GET", path: str = "/",
                headers: dict | None = None) -> tuple[int | None, dict | None, dict | None]:
    """(status, JSON body, server certificate) over a fresh TLS connection; (None, None, None)
    when the server refused (a handshake failure or a closed connection, no HTTP answer)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            sock = ctx.wrap_socket(raw)
        except (ssl.SSLError, ConnectionError):
            return None, None, None
        cert = sock.getpeercert()
        try:
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n"
                         f"Content-Length: 0\r\n\r\n".encode())
        except (ssl.SSLError, ConnectionError):
            return None, None, None
        data = read_all(sock)
    finally:
        raw.close()
    if not data:
        return None, None, None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else None, cert


def plain_request(port: int, path: str = "/", headers: dict | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
                     .encode())
        return read_all(sock)


def handshakes(sidecar) -> dict:
    return sidecar.status()["mtls"]["handshakes"]


# -- the chain -----------------------------------------------------------------------------------

def test_mtls_chain_forwards_the_callers_verified_identity_to_the_app(mesh, ca, tmp_path):
    b = pod(mesh, "b", "--mtls", "strict", "--tls-dir", str(ca.issue("b", tmp_path / "b")))
    a_out = free_port()
    a = pod(mesh, "a", "--mtls", "permissive", "--tls-dir", str(ca.issue("a", tmp_path / "a")),
            calls=("b", a_out), outbound=a_out)
    wait_until(lambda: "b" in a.status()["destinations"], 5, "a never saw b")
    assert b.status()["instance"]["metadata"]["fastmesh.mtls"] == "strict"

    # client -> A's inbound (plaintext: A is permissive) -> app A -> A's outbound -> mTLS ->
    # B's inbound -> app B, which sees A's SPIFFE id; a client's own copy never gets through.
    body = json.loads(plain_request(a.inbound, "/orders/7", {
        "X-Fastmesh-Peer": spiffe("admin"), "X-Forwarded-Client-Cert": "By=spiffe://x"})
        .partition(b"\r\n\r\n")[2])
    assert body["peer"] is None and body["xfcc"] is None
    assert body["next"]["service"] == "b"
    assert body["next"]["peer"] == spiffe("a")
    assert body["next"]["proto"] == "https"
    assert body["next"]["path"] == "/orders/7"
    assert body["next"]["host"] == "b"          # as in plaintext: no ":443" for the TLS hop

    for _ in range(20):                         # pooled: one handshake for many calls
        status, answer = outbound_call(a_out, "b", "/again")
        assert status == 200 and answer["peer"] == spiffe("a")
    counts = handshakes(b)
    assert counts["tls"] == 1, counts
    assert counts["plaintext"] == 0 and not any(counts["refused"].values()), counts
    assert handshakes(a)["plaintext"] == 1

    status = a.status()["mtls"]
    assert status["mode"] == "permissive" and status["identity"] == spiffe("a")
    assert status["certificate"]["state"] == "ok" and status["certificate"]["not_after"] > time.time()
    _, metrics = admin_text(b.admin, "/metrics")
    assert 'fastmesh_mesh_inbound_connections_total{outcome="tls",reason=""} 1' in metrics
    assert "fastmesh_mesh_certificate_expiry_seconds{" in metrics


def admin_text(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


# -- refusals ------------------------------------------------------------------------------------

def test_strict_inbound_refuses_every_bad_client_and_counts_why(mesh, ca, tmp_path):
    b = pod(mesh, "b", "--mtls", "strict", "--tls-dir", str(ca.issue("b", tmp_path / "b")))
    a_dir = ca.issue("a", tmp_path / "a")
    other = CA(tmp_path / "other-ca")              # same trust domain, another root
    stranger = other.issue("a", tmp_path / "stranger")
    expired = ca.issue("a", tmp_path / "expired", ttl="1s")
    wait_until(lambda: time.time() > x509.load_pem_x509_certificate(
        (expired / "cert.pem").read_bytes()).not_valid_after_utc.timestamp() + 0.2, 5,
        "the short-lived certificate never expired")

    good = client_context(ca.root, a_dir)
    status, body, cert = tls_request(b.inbound, good)
    assert status == 200 and body["peer"] == spiffe("a")
    assert ("URI", spiffe("b")) in cert["subjectAltName"]        # B presents its own identity

    cases = [("no_client_cert", client_context(ca.root)),
             ("unknown_ca", client_context(ca.root, stranger)),
             ("expired", client_context(ca.root, expired))]
    offered_old = []
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        try:
            ctx = client_context(ca.root, a_dir, version)
        except ssl.SSLError:
            continue                         # this OpenSSL cannot even offer it
        cases.append(("bad_protocol_version", ctx))
        offered_old.append(version)
    expected = dict.fromkeys(("no_client_cert", "unknown_ca", "expired", "bad_protocol_version",
                              "plaintext", "timeout", "closed", "other"), 0)
    for reason, ctx in cases:
        assert tls_request(b.inbound, ctx)[0] is None, reason
        expected[reason] += 1
        wait_until(lambda: handshakes(b)["refused"] == expected, 5,
                   f"{reason} not counted: {handshakes(b)}")
    assert plain_request(b.inbound, "/", {"X-Fastmesh-Peer": spiffe("a")}) == b""
    expected["plaintext"] += 1
    wait_until(lambda: handshakes(b)["refused"] == expected, 5, "plaintext not counted")
    assert handshakes(b)["tls"] == 1
    # The local OpenSSL offered TLS 1.0/1.1 (else there is nothing to refuse): say which.
    print("TLS versions offered and refused:", [v.name for v in offered_old])
    _, metrics = admin_text(b.admin, "/metrics")
    assert 'fastmesh_mesh_inbound_connections_total{outcome="refused",reason="expired"} 1' \
        in metrics


def test_outbound_refuses_an_instance_that_is_not_the_service_meant(file_mesh, ca, tmp_path):
    # An instance listed as "b" whose sidecar holds c's certificate (a stolen address, a
    # misrouted registration): A's outbound sees the wrong SPIFFE id and answers 502.
    impostor = pod(file_mesh, "c", "--mtls", "strict",
                   "--tls-dir", str(ca.issue("c", tmp_path / "c")))
    a = pod(file_mesh, "a", "--mtls", "strict", "--tls-dir", str(ca.issue("a", tmp_path / "a")))
    file_mesh.path.write_text(json.dumps({"services": {"b": [{
        "address": f"127.0.0.1:{impostor.inbound}", "metadata": {"fastmesh.mtls": "strict"}}]}}))
    wait_until(lambda: "b" in a.status()["destinations"], 5, "a never saw b")
    status, body = outbound_call(a.outbound, "b")
    assert status == 502
    assert "identity rejected" in body["message"] and spiffe("b") in body["message"]
    assert handshakes(impostor)["tls"] >= 1             # the handshake itself was fine


def test_permissive_takes_plaintext_and_mtls_and_strips_a_spoofed_identity(mesh, ca, tmp_path):
    b = pod(mesh, "b", "--mtls", "permissive", "--tls-dir", str(ca.issue("b", tmp_path / "b")))
    data = plain_request(b.inbound, "/p", {"X-Fastmesh-Peer": spiffe("admin"),
                                           "x-fastmesh-peer": "again",
                                           "X-Forwarded-Client-Cert": "Hash=1;URI=" + spiffe("x")})
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    answer = json.loads(body)
    assert answer["peer"] is None and answer["xfcc"] is None and answer["proto"] == "http"

    status, answer, _ = tls_request(b.inbound, client_context(ca.root, ca.issue("a", tmp_path / "a")),
                                    headers={"X-Fastmesh-Peer": spiffe("admin")})
    assert status == 200 and answer["peer"] == spiffe("a") and answer["proto"] == "https"
    counts = handshakes(b)
    assert (counts["tls"], counts["plaintext"]) == (1, 1) and not any(counts["refused"].values())
    # a client without a certificate is still refused: TLS to the mesh port means mTLS
    assert tls_request(b.inbound, client_context(ca.root))[0] is None
    wait_until(lambda: handshakes(b)["refused"]["no_client_cert"] == 1, 5, "not counted")


def test_mtls_disabled_still_strips_a_spoofed_identity(mesh):
    b = pod(mesh, "b")
    answer = json.loads(plain_request(b.inbound, "/", {"X-Fastmesh-Peer": spiffe("admin")})
                        .partition(b"\r\n\r\n")[2])
    assert answer["peer"] is None
    assert b.status()["mtls"] == {"mode": "disabled"}
    assert "fastmesh.mtls" not in b.status()["instance"]["metadata"]


# -- authorization -------------------------------------------------------------------------------

POLICY = {"authorization": [
    {"to": "b", "from": [spiffe("a")], "methods": ["GET", "POST"], "paths": ["/orders"]},
    {"to": "b", "paths": ["/health"]},               # any authenticated caller
    {"to": "other", "from": ["*"]},                   # another service's rule: not b's business
]}


def write_policy(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data))
    os.replace(tmp, path)


def test_authorization_allows_and_denies_by_identity_method_and_path(mesh, ca, tmp_path):
    policy = tmp_path / "policy.yaml"
    write_policy(policy, POLICY)
    b = pod(mesh, "b", "--mtls", "strict", "--tls-dir", str(ca.issue("b", tmp_path / "b")),
            "--policy", str(policy))
    as_a = client_context(ca.root, ca.issue("a", tmp_path / "a"))
    as_c = client_context(ca.root, ca.issue("c", tmp_path / "c"))

    def status_of(ctx, method, path):
        status, body, _ = tls_request(b.inbound, ctx, method, path)
        if status == 403:
            assert body == {"message": "Forbidden by the mesh authorization policy"}
        return status

    allowed = [(as_a, "GET", "/orders"), (as_a, "POST", "/orders/7"), (as_a, "GET", "/orders/"),
               (as_c, "GET", "/health"), (as_a, "DELETE", "/health/x")]
    denied = [(as_a, "DELETE", "/orders/7"),          # method
              (as_a, "GET", "/admin"),                # path
              (as_a, "GET", "/ordersx"),              # a prefix is whole segments
              (as_a, "GET", "/orders/../admin"),      # dot segments match no path rule
              (as_a, "GET", "/orders/%2e%2e/admin"),
              (as_a, "get", "/orders"),               # methods are case-sensitive
              (as_c, "GET", "/orders/7")]             # identity
    assert [status_of(*case) for case in allowed] == [200] * len(allowed)
    assert [status_of(*case) for case in denied] == [403] * len(denied)
    authz = b.status()["authorization"]
    assert authz["enforced"] and authz["rules"] == 2
    assert authz["decisions"] == {"allowed": len(allowed), "denied": len(denied)}
    _, metrics = admin_text(b.admin, "/metrics")
    assert ('fastmesh_mesh_authorization_decisions_total{destination="b",decision="denied"} '
            f'{len(denied)}') in metrics

    # A change is applied without a restart; a broken one keeps the rules in force.
    write_policy(policy, {"authorization": [{"to": "b", "from": [spiffe("c")]}]})
    wait_until(lambda: status_of(as_c, "GET", "/orders/7") == 200, 10, "the new policy never applied")
    assert status_of(as_a, "GET", "/orders") == 403
    write_policy(policy, "authorization:\n  - {to: b, methods: [\"bad method\"]}\n")
    wait_until(lambda: b.status()["authorization"]["error"], 10, "the broken policy was not seen")
    assert "authorization[0].methods[0]" in b.status()["authorization"]["error"]
    assert status_of(as_c, "GET", "/orders/7") == 200 and status_of(as_a, "GET", "/") == 403
    # no rule names b any more: open again
    write_policy(policy, {"authorization": [{"to": "other"}]})
    wait_until(lambda: status_of(as_a, "GET", "/anything") == 200, 10, "b never opened")
    assert not b.status()["authorization"]["enforced"]


def test_star_allows_plaintext_callers_and_omitted_from_does_not(mesh, ca, tmp_path):
    policy = tmp_path / "policy.json"
    write_policy(policy, {"authorization": [{"to": "b", "from": ["*"], "paths": ["/public"]},
                                            {"to": "b", "paths": ["/private"]}]})
    b = pod(mesh, "b", "--mtls", "permissive", "--tls-dir", str(ca.issue("b", tmp_path / "b")),
            "--policy", str(policy))
    assert plain_request(b.inbound, "/public/x").startswith(b"HTTP/1.1 200")
    assert plain_request(b.inbound, "/private").startswith(b"HTTP/1.1 403")
    as_a = client_context(ca.root, ca.issue("a", tmp_path / "a"))
    assert tls_request(b.inbound, as_a, "GET", "/private")[0] == 200


def test_identity_patterns_allow_a_trust_domain_or_a_prefix(mesh, ca, tmp_path):
    policy = tmp_path / "policy.json"
    write_policy(policy, {"authorization": [
        {"to": "b", "from": [f"spiffe://{TD}/*"], "methods": ["GET"]},
        {"to": "b", "from": ["spiffe://partner.example/*", spiffe("c")], "methods": ["POST"]},
        {"to": "b", "from": [f"spiffe://{TD}/svc/*"], "paths": ["/svc"]},
        {"to": "b", "from": [f"spiffe://{TD}/jobs/*"], "paths": ["/jobs"]}]})
    b = pod(mesh, "b", "--mtls", "permissive", "--tls-dir", str(ca.issue("b", tmp_path / "b")),
            "--policy", str(policy))
    as_a = client_context(ca.root, ca.issue("a", tmp_path / "a"))
    as_c = client_context(ca.root, ca.issue("c", tmp_path / "c"))
    cases = {(as_a, "GET", "/x"): 200,              # spiffe://example.org/* covers every service
             (as_a, "POST", "/x"): 403,             # another trust domain's pattern: not a's
             (as_c, "POST", "/x"): 200,             # an exact id beside a pattern
             (as_a, "DELETE", "/svc/1"): 200,       # a longer prefix
             (as_a, "DELETE", "/jobs"): 403}        # a prefix nobody's id has
    assert {case: tls_request(b.inbound, *case)[0] for case in cases} == cases
    # A plaintext caller (permissive mode) has no identity: no pattern covers it.
    assert plain_request(b.inbound, "/x").startswith(b"HTTP/1.1 403")
    assert b.status()["authorization"]["decisions"] == {"allowed": 3, "denied": 3}


def test_an_invalid_policy_file_stops_the_sidecar_naming_file_and_path(mesh, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("authorization:\n  - to: b\n    from: [frontend, 'spiffe://example.org/s*']"
                      "\n    methods: []\n")
    app = PeerApp("b")
    mesh.apps.append(app)
    done = subprocess.run(fastmesh_cmd(
        "sidecar", "--service", "b", "--app-port", str(app.port), "--registry", mesh.registry,
        "--inbound", f"127.0.0.1:{free_port()}", "--outbound", f"127.0.0.1:{free_port()}",
        "--admin", "off", "--policy", str(policy)), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    err = done.stderr
    assert f"{policy}: authorization[0].from[0]: expected a SPIFFE id" in err
    assert (f"{policy}: authorization[0].from[1]: '*' stands only as a whole last segment "
            "('spiffe://example.org/*', 'spiffe://example.org/svc/*'), found "
            "'spiffe://example.org/s*'") in err
    assert f"{policy}: authorization[0].methods: must not be empty" in err


def test_mtls_flags_are_checked_before_anything_starts(mesh, ca, tmp_path):
    app = PeerApp("b")
    mesh.apps.append(app)

    def run(*extra):
        return subprocess.run(fastmesh_cmd(
            "sidecar", "--service", "b", "--app-port", str(app.port), "--registry",
            mesh.registry, "--inbound", f"127.0.0.1:{free_port()}",
            "--outbound", f"127.0.0.1:{free_port()}", "--admin", "off", *extra),
            capture_output=True, text=True, timeout=30)

    done = run("--mtls", "strict")
    assert done.returncode == 1 and "needs a certificate: --tls-dir" in done.stderr
    done = run("--mtls", "sometimes")
    assert done.returncode == 2 and "expected one of strict, permissive, disabled" in done.stderr
    done = run("--ca-url", "http://127.0.0.1:9")
    assert done.returncode == 1 and "--ca-url needs --ca-token" in done.stderr


def test_certificate_from_the_signing_service(mesh, ca, tmp_path):
    port = free_port()
    server = Proc(["ca", "serve", "--dir", str(ca.dir), "--listen", f"127.0.0.1:{port}"], port)
    try:
        token = ca_run("token", "--dir", str(ca.dir), "--service", "b").strip()
        app = PeerApp("b")
        mesh.apps.append(app)
        b = mesh.sidecar("b", app, "--mtls", "strict", "--ca-url", f"http://127.0.0.1:{port}",
                         "--ca-token", token)
        cert = b.status()["mtls"]["certificate"]
        assert cert["identity"] == spiffe("b") and cert["mode"] == "ca-server"
        status, body, _ = tls_request(b.inbound, client_context(ca.root, ca.issue("a", tmp_path / "a")))
        assert status == 200 and body["peer"] == spiffe("a")
    finally:
        server.stop()


# -- rotation ------------------------------------------------------------------------------------

def test_rotation_under_load_has_no_errors_and_new_connections_see_the_new_cert(mesh, ca, tmp_path):
    b_dir = ca.issue("b", tmp_path / "b")
    b = pod(mesh, "b", "--mtls", "strict", "--tls-dir", str(b_dir))
    a_dir = ca.issue("a", tmp_path / "a")
    a = pod(mesh, "a", "--mtls", "strict", "--tls-dir", str(a_dir))
    wait_until(lambda: "b" in a.status()["destinations"], 5, "a never saw b")
    old_serial = serial_of(b_dir / "cert.pem")
    as_a = client_context(ca.root, a_dir)
    assert int(tls_request(b.inbound, as_a)[2]["serialNumber"], 16) == old_serial

    results = {"ok": 0, "errors": []}
    stop = threading.Event()

    def load():
        deadline = time.monotonic() + 30                   # bounded even if never stopped
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                status, body = outbound_call(a.outbound, "b", "/load")
                if status == 200 and body["peer"] == spiffe("a"):
                    results["ok"] += 1
                else:
                    results["errors"].append((status, body))
            except Exception as exc:                       # noqa: BLE001  (counted, asserted)
                results["errors"].append(repr(exc))

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: results["ok"] > 50, 10, "no load")
        ca.issue("b", b_dir)                               # re-issued in place (atomic)
        ca.issue("a", a_dir)
        new_serial = serial_of(b_dir / "cert.pem")
        assert new_serial != old_serial

        def fresh_serial():
            cert = tls_request(b.inbound, as_a)[2]
            return cert is not None and int(cert["serialNumber"], 16) == new_serial
        wait_until(fresh_serial, 15, "a new connection never saw the new certificate")
        wait_until(lambda: a.status()["mtls"]["rotations"] >= 1, 15, "a never rotated")
        before = results["ok"]
        wait_until(lambda: results["ok"] > before + 50, 10, "load stopped after the rotation")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=15)
    assert results["errors"] == []
    assert b.status()["mtls"]["rotations"] >= 1
    assert b.status()["mtls"]["last_error"] is None and a.status()["mtls"]["last_error"] is None
    print(f"requests through the chain during rotation: {results['ok']}, errors: 0")


# -- opaque TCP over mTLS: the caller's identity check (fastmesh.mesh.opaque_mtls) ----------------

def test_opaque_relay_over_mtls_checks_the_destination_identity_before_any_byte(ca, tmp_path):
    # A server-first destination: what it sends right after the handshake must never reach the
    # caller's app when the certificate names another service (only a valid chain).
    import asyncio

    from fastmesh.mesh.mtls import server_context
    from fastmesh.mesh.opaque_mtls import OPAQUE_ALPN, Dialer, IdentityRejected, connect
    from fastmesh.mesh.routes import MeshTLSFiles
    caller = ca.issue("b", tmp_path / "b")
    files = MeshTLSFiles(TD, str(caller / "ca.pem"), str(caller / "cert.pem"),
                         str(caller / "key.pem"))

    class Side(asyncio.Protocol):
        def __init__(self):
            self.data = b""
            self.got = asyncio.Event()

        def data_received(self, data):
            self.data += data
            self.got.set()

    async def attempt(serving: str, wanted: str):
        tls_dir = ca.issue(serving, tmp_path / serving)
        ctx = server_context(str(tls_dir / "cert.pem"), str(tls_dir / "key.pem"), ca.root)
        alpn = []

        async def banner(reader, writer):
            alpn.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
            writer.write(b"banner from " + serving.encode())
            await writer.drain()
            await asyncio.sleep(0.5)
            writer.close()

        server = await asyncio.start_server(banner, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        side = Side()
        try:
            transport = await connect(asyncio.get_running_loop(), side, "127.0.0.1", port,
                                      Dialer(files).dial(wanted), 5)
        except IdentityRejected as exc:
            await asyncio.sleep(0.2)            # anything the server sent would be here now
            return str(exc), side.data, alpn
        finally:
            server.close()
        await asyncio.wait_for(side.got.wait(), 5)
        transport.close()
        return None, side.data, alpn

    rejected, data, _ = asyncio.run(attempt("x", "c"))
    assert rejected == ("identity rejected: expected spiffe://example.org/svc/c, certificate "
                        "has URI SAN spiffe://example.org/svc/x")
    assert data == b""
    assert asyncio.run(attempt("c", "c")) == (None, b"banner from c", [OPAQUE_ALPN])
