"""HTTPS upstreams: verification (CA file, system bundle, names, self-signed), SNI, keep-alive
reuse of pooled TLS connections, client certificates, the peer identity check, health checks
over TLS, certificate rotation into the same context, and the config errors.

Real gateway processes on loopback in front of a real TLS upstream (TLSUpstream below: Python's
ssl in threads, keep-alive HTTP/1.1, reporting the SNI name, the client certificate and the
connection it saw). Certificates come from trustme; leaves trustme cannot make (a URI SAN, a
self-signed one) are made with `cryptography` and signed by the trustme CA's key.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import socket
import ssl
import subprocess
import threading
import time

import pytest
import yaml

from conftest import (
    ROOT, RawClient, ScriptedUpstream, config, fastmesh_cmd, free_port, get, next_request_head,
    service, wait_for_port, wait_until,
)
from test_supervisor import ops  # noqa: F401  (fixture: a gateway with its own admin port)

trustme = pytest.importorskip("trustme")
from cryptography import x509                                  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec       # noqa: E402
from cryptography.x509.oid import NameOID                      # noqa: E402

FAST = {"connect_timeout": "5s", "read_timeout": "5s"}


# --- a real TLS upstream ----------------------------------------------------------------------

class TLSUpstream(ScriptedUpstream):
    """A TLS HTTP/1.1 upstream in threads. Every request gets 200 and JSON with what it saw:
    path, SNI name, the client certificate's SANs, the connection's index and the request's
    index on it. Keep-alive unless the request says `Connection: close`."""

    def __init__(self, cert: str, key: str, client_ca: str | None = None,
                 require_client_cert: bool = False):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.load_verify_locations(cafile=client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        ctx.sni_callback = self._sni
        self.ctx = ctx
        self.sni: dict[int, str | None] = {}           # id(ssl socket) -> name sent
        self.handshakes = 0         # TLS handshakes completed
        self.failed_handshakes: list[str] = []
        self.seen: list[dict] = []  # one per request
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        super().__init__(self._serve)      # counts the TCP connections it accepts

    def _sni(self, sslobj, name, ctx):
        self.sni[id(sslobj)] = name

    def _serve(self, raw: socket.socket, index: int):
        with self.lock:
            self.open.append(raw)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self.lock:
                self.failed_handshakes.append(str(exc))
            return
        with self.lock:
            self.handshakes += 1
        sni = self.sni.get(id(conn))
        peer = conn.getpeercert() or {}
        client_san = [list(pair) for pair in peer.get("subjectAltName", ())]
        buf, request = b"", 0
        while True:
            found = next_request_head(conn, buf)
            if found is None:
                return
            head, buf = found
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            received, buf = buf[:length], buf[length:]
            seen = {"path": lines[0].split(" ")[1], "sni": sni, "client_san": client_san,
                    "connection": index, "request": request,
                    "host": headers.get("host"), "proto": headers.get("x-forwarded-proto"),
                    "body_sha256": hashlib.sha256(received).hexdigest()}
            with self.lock:
                self.seen.append(seen)
            request += 1
            body = json.dumps(seen).encode()
            if seen["path"].startswith("/big/"):     # /big/N: N bytes of a known pattern
                body = big_body(int(seen["path"][5:]))
            close = headers.get("connection", "").lower() == "close"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n%s\r\n%s"
                         % (len(body), b"Connection: close\r\n" if close else b"", body))
            if close:
                return

    def stop(self):
        """Stop accepting, then end the connections still open (the gateway's pooled ones),
        so no serving thread waits out its read timeout."""
        self.stopped.set()
        self.sock.close()
        self.accepter.join(timeout=2)
        with self.lock:
            for raw in self.open:
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        super().stop()


def big_body(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


@pytest.fixture
def tls_upstream():
    """Factory: tls_upstream(cert_file, key_file, ...) starts a TLSUpstream, stopped at teardown."""
    started: list[TLSUpstream] = []

    def start(cert: str, key: str, **options) -> TLSUpstream:
        up = TLSUpstream(cert, key, **options)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


# --- certificates -----------------------------------------------------------------------------

class Certs:
    """A trustme CA and files for the leaves the tests use, in one directory."""

    def __init__(self, directory):
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def leaf(self, name: str, *identities: str) -> tuple[str, str]:
        """(cert file, key file) of a leaf for `identities` (DNS names or IPs) from the CA."""
        leaf = self.ca.issue_cert(*identities)
        return (self._write(f"{name}.crt", b"".join(p.bytes() for p in leaf.cert_chain_pems)),
                self._write(f"{name}.key", leaf.private_key_pem.bytes()))

    def custom_leaf(self, name: str, dns: str, uri: str | None = None,
                    self_signed: bool = False) -> tuple[str, str]:
        """A leaf trustme cannot make: with a URI SAN (signed by the CA), or self-signed."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        if self_signed:
            issuer, signer = subject, key
        else:
            signer = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
            issuer = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes()).subject
        sans = [x509.DNSName(dns)] + ([x509.UniformResourceIdentifier(uri)] if uri else [])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    signer.public_key()), critical=False)
                .sign(signer, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", key_pem))


@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path)


def https_service(url: str, **tls) -> dict:
    return service("secure", url, [{"name": "all", "paths": ["/"]}], **FAST, **tls)


def seen(resp) -> dict:
    """What the TLS upstream saw (asserting the request got through)."""
    assert resp.status == 200, (resp.status, resp.body)
    return resp.json()


def message(resp) -> str:
    assert resp.status == 502, (resp.status, resp.body)
    assert resp.header("content-type") == "application/json"
    return resp.json()["message"]


# --- verification -----------------------------------------------------------------------------

def test_verified_upstream_with_tls_ca_answers_over_tls(certs, tls_upstream, gateway):
    cert, key = certs.leaf("localhost", "localhost")
    up = tls_upstream(cert, key)
    # the CA path is relative: it is read from the config file's directory
    gw = gateway(config(https_service(f"https://localhost:{up.port}/base", tls_ca="ca.pem")))
    got = seen(get(gw.port, "/x?y=1"))
    assert got["path"] == "/base/x?y=1"
    assert got["sni"] == "localhost"
    assert got["host"] == f"localhost:{up.port}"
    assert up.handshakes == 1 and not up.failed_handshakes


def test_system_ca_bundle_refuses_a_private_ca(certs, tls_upstream, gateway):
    up = tls_upstream(*certs.leaf("localhost", "localhost"))
    gw = gateway(config(https_service(f"https://localhost:{up.port}")))
    started = time.monotonic()
    text = message(get(gw.port, "/"))
    assert text == "upstream certificate rejected: unable to get local issuer certificate"
    assert time.monotonic() - started < 4.0               # refused, never a hang
    assert up.seen == []


def test_wrong_host_name_is_refused(certs, tls_upstream, gateway):
    up = tls_upstream(*certs.leaf("right", "right.test"))
    gw = gateway(config(https_service(f"https://127.0.0.1:{up.port}", tls_ca=certs.ca_file,
                                      tls_server_name="wrong.test")))
    text = message(get(gw.port, "/"))
    assert text.startswith("upstream certificate rejected: Hostname mismatch"), text
    assert "wrong.test" in text
    assert up.seen == []


def test_self_signed_is_refused_unless_tls_verify_is_false(certs, tls_upstream, gateway):
    up = tls_upstream(*certs.custom_leaf("self", "localhost", self_signed=True))
    refused = gateway(config(https_service(f"https://localhost:{up.port}", tls_ca=certs.ca_file)))
    assert message(get(refused.port, "/")) == \
        "upstream certificate rejected: self-signed certificate"
    assert up.seen == []
    insecure = gateway(config(https_service(f"https://localhost:{up.port}", tls_verify=False)))
    assert seen(get(insecure.port, "/ok"))["path"] == "/ok"
    out = insecure.stop()
    assert out.count("service secure: tls_verify is false") == 1, out


def test_an_ip_literal_host_is_checked_against_ip_sans_and_sends_no_sni(certs, tls_upstream,
                                                                         gateway):
    up = tls_upstream(*certs.leaf("ip", "127.0.0.1"))
    gw = gateway(config(https_service(f"https://127.0.0.1:{up.port}", tls_ca=certs.ca_file)))
    assert seen(get(gw.port, "/"))["sni"] is None
    wrong = tls_upstream(*certs.leaf("name-only", "localhost"))
    gw2 = gateway(config(https_service(f"https://127.0.0.1:{wrong.port}", tls_ca=certs.ca_file)))
    assert message(get(gw2.port, "/")).startswith(
        "upstream certificate rejected: IP address mismatch")


def test_a_handshake_that_never_finishes_counts_in_connect_timeout(scripted, gateway):
    def silent(conn, index):                 # accepts TCP, never answers the ClientHello
        conn.settimeout(5)
        try:
            conn.recv(65536)
            time.sleep(3)
        except OSError:
            pass
    up = scripted(silent)
    gw = gateway(config(service("stuck", f"https://localhost:{up.port}", ROUTES,
                                connect_timeout="300ms", retries=0)))
    started = time.monotonic()
    resp = get(gw.port, "/")
    took = time.monotonic() - started
    # uvloop's handshake timeout (= connect_timeout) and the gateway's connect deadline race;
    # either way the answer is a 504 that says what timed out.
    assert resp.status == 504, (resp.status, resp.body)
    assert resp.json()["message"] in ("upstream TLS handshake timed out",
                                      "upstream connect timed out")
    assert 0.25 < took < 2.0, took


def test_sni_is_the_tls_server_name_when_set(certs, tls_upstream, gateway):
    up = tls_upstream(*certs.leaf("api", "api.upstream.test"))
    gw = gateway(config(https_service(f"https://127.0.0.1:{up.port}", tls_ca=certs.ca_file,
                                      tls_server_name="API.upstream.test")))
    got = seen(get(gw.port, "/"))
    assert got["sni"] == "api.upstream.test"
    assert got["host"] == f"127.0.0.1:{up.port}"        # the Host header is not changed by it


# --- pooled connections -----------------------------------------------------------------------

def test_pooled_tls_connections_are_reused(certs, tls_upstream, ops):
    prom_parser = pytest.importorskip("prometheus_client.parser")
    up = tls_upstream(*certs.leaf("localhost", "localhost"))
    gw = ops(config(https_service(f"https://localhost:{up.port}", tls_ca=certs.ca_file)), 1)
    for i in range(40):                              # a new client connection each time
        assert seen(get(gw.port, f"/{i}"))["connection"] == 0
    with RawClient(gw.port) as client:               # and keep-alive on the client side
        for i in range(20):
            client.send(b"GET /k HTTP/1.1\r\nHost: example.com\r\n\r\n")
            assert seen(client.read_response())["request"] == 40 + i
    assert (up.connections, up.handshakes) == (1, 1)
    code, text = gw.admin("GET", "/metrics")
    assert code == 200, text
    families = {f.name: f for f in prom_parser.text_string_to_metric_families(text)}
    target = f"localhost:{up.port}"

    def sample(family: str) -> float:
        found = [s.value for s in families[family].samples
                 if s.labels.get("target") == target and not s.name.endswith("_created")]
        assert len(found) == 1, (family, families[family].samples)
        return found[0]
    assert sample("fastmesh_upstream_connections_created") == 1
    assert sample("fastmesh_upstream_connections_reused") == 59


def test_a_reload_keeps_pooled_tls_connections_while_the_tls_settings_are_equal(
        certs, tls_upstream, ops):
    up = tls_upstream(*certs.leaf("localhost", "localhost"), client_ca=certs.ca_file)
    url = f"https://localhost:{up.port}"
    gw = ops(config(https_service(url, tls_ca=certs.ca_file)), 1)
    assert seen(get(gw.port, "/"))["connection"] == 0

    def reload(cfg: dict) -> None:
        old = gw.status()["config"]["version"]
        gw.write_config(cfg)
        code, body = gw.admin("POST", "/reload")
        assert code == 200, body
        gw.wait_status(lambda s: s["config"]["version"] != old and all(
            w["config_version"] == s["config"]["version"] for w in s["workers"]))
    # another timeout, and the default server name written out: the same TLS settings
    reload(config(https_service(url, tls_ca=certs.ca_file, tls_server_name="localhost"),
                  server_timing=True))
    assert seen(get(gw.port, "/"))["connection"] == 0
    client_cert, client_key = certs.leaf("client", "client.test")
    reload(config(https_service(url, tls_ca=certs.ca_file, tls_client_cert=client_cert,
                                tls_client_key=client_key)))
    got = seen(get(gw.port, "/"))                    # new settings: a new pool, a new handshake
    assert (got["connection"], got["client_san"]) == (1, [["DNS", "client.test"]])
    assert up.handshakes == 2


def test_pools_are_keyed_by_tls_settings_and_contexts_shared_across_hosts(certs):
    from fastmesh.config import load_config_data
    from fastmesh.plan import PoolRegistry, compile_plan

    def compiled(pools: PoolRegistry, *services: dict) -> dict:
        """service name -> its route's pool"""
        cfg = load_config_data({"services": [
            {**s, "routes": [{"name": s["name"], "paths": [f"/{s['name']}"]}]} for s in services]})
        return {t.service: t.pool for t in compile_plan(cfg, pools).targets}
    pools = PoolRegistry()
    ca = {"tls_ca": certs.ca_file}
    first = compiled(pools, {"name": "a", "url": "https://a.test", **ca},
                     {"name": "b", "url": "https://b.test:8443", **ca},
                     {"name": "c", "url": "https://a.test", "tls_server_name": "c.test", **ca},
                     {"name": "d", "url": "http://a.test:443"})
    a, b, c, d = (first[n] for n in "abcd")
    assert len({id(p) for p in (a, b, c, d)}) == 4   # same host:port, other TLS: other pools
    assert a.ssl is b.ssl is c.ssl and d.ssl is None  # one context for equal verify/CA/cert
    assert (a.server_hostname, b.server_hostname, c.server_hostname) == \
        ("a.test", "b.test", "c.test")
    assert sorted(p["tls"] for p in pools.stats()) == [False, True, True, True]
    # the next Plan (other service names, equal settings) gets the very same pools
    second = compiled(pools, {"name": "x", "url": "https://A.test:443", **ca},
                      {"name": "y", "url": "https://a.test", "tls_server_name": "c.test", **ca},
                      {"name": "z", "url": "https://a.test", "tls_verify": False})
    assert second["x"] is a and second["y"] is c
    assert second["z"] not in (a, c) and second["z"].ssl is not a.ssl


# --- client certificates and the peer identity ------------------------------------------------

def test_client_certificate_is_presented_when_configured(certs, tls_upstream, gateway):
    up = tls_upstream(*certs.leaf("localhost", "localhost"), client_ca=certs.ca_file,
                      require_client_cert=True)
    client_cert, client_key = certs.leaf("client", "gateway.client.test")
    gw = gateway(config(https_service(f"https://localhost:{up.port}", tls_ca=certs.ca_file,
                                      tls_client_cert=client_cert, tls_client_key=client_key)))
    assert seen(get(gw.port, "/"))["client_san"] == [["DNS", "gateway.client.test"]]
    without = gateway(config(https_service(f"https://localhost:{up.port}", tls_ca=certs.ca_file,
                                           retries=0)))
    resp = get(without.port, "/")
    assert resp.status == 502, (resp.status, resp.body)
    assert len(up.seen) == 1                            # the second gateway's never got through
    wait_until(lambda: up.failed_handshakes, 5, "the upstream refused the handshake")


def test_peer_identity_must_be_the_certificates_uri_san(certs, tls_upstream, gateway):
    up = tls_upstream(*certs.custom_leaf("orders", "localhost", uri="spiffe://td/svc/orders"))
    url = f"https://localhost:{up.port}"
    gw = gateway(config(https_service(url, tls_ca=certs.ca_file,
                                      tls_peer_identity="spiffe://td/svc/orders")))
    assert seen(get(gw.port, "/"))["path"] == "/"
    other = gateway(config(https_service(url, tls_ca=certs.ca_file,
                                         tls_peer_identity="spiffe://td/svc/payments")))
    assert message(get(other.port, "/")) == ("upstream identity rejected: expected "
                                             "spiffe://td/svc/payments, certificate has URI SAN "
                                             "spiffe://td/svc/orders")
    assert len(up.seen) == 1
    plain = tls_upstream(*certs.leaf("plain", "localhost"))       # verified, but no URI SAN
    third = gateway(config(https_service(f"https://localhost:{plain.port}",
                                         tls_ca=certs.ca_file,
                                         tls_peer_identity="spiffe://td/svc/orders")))
    assert message(get(third.port, "/")).endswith("certificate has URI SAN none")
    assert plain.seen == []


# --- health checks ----------------------------------------------------------------------------

def test_active_health_checks_of_an_https_upstream_go_over_tls(certs, tls_upstream, ops):
    good = tls_upstream(*certs.leaf("good", "backend.test"))
    bad = tls_upstream(*certs.leaf("bad", "elsewhere.test"))   # same CA, another name
    cfg = {
        "_format_version": "1",
        "upstreams": [{
            "name": "backend",
            "targets": [{"target": f"127.0.0.1:{good.port}"}, {"target": f"127.0.0.1:{bad.port}"}],
            "healthchecks": {"active": {"path": "/healthz", "interval": "200ms", "timeout": "1s",
                                        "healthy": {"successes": 1},
                                        "unhealthy": {"failures": 1}}},
        }],
        "services": [{"name": "svc", "host": "backend", "protocol": "https",
                      "tls_ca": certs.ca_file, "tls_server_name": "backend.test", **FAST,
                      "routes": [{"name": "all", "paths": ["/"]}]}],
    }
    gw = ops(cfg, 1)

    def health() -> dict:
        code, body = gw.admin("GET", "/upstreams/backend/health")
        assert code == 200, body
        return {t["target"]: t for t in body["targets"]}
    rows = wait_until(lambda: (h := health()) and not h[f"127.0.0.1:{bad.port}"]["healthy"]
                      and h, 10, "the target with the wrong name is marked unhealthy")
    assert rows[f"127.0.0.1:{good.port}"]["healthy"]
    wait_until(lambda: [s for s in good.seen if s["path"] == "/healthz"], 5, "probes reached it")
    probe = next(s for s in good.seen if s["path"] == "/healthz")
    assert probe["sni"] == "backend.test"
    assert bad.seen == [] and bad.failed_handshakes
    for _ in range(6):                       # traffic goes to the healthy target only
        assert seen(get(gw.port, "/p"))["path"] == "/p"
    assert all(s["path"] == "/healthz" for s in bad.seen)


# --- certificate rotation (upstream_tls.refresh) ----------------------------------------------

def _handshake_client_san(up: TLSUpstream, ctx: ssl.SSLContext) -> list:
    with socket.create_connection(("127.0.0.1", up.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(b"GET /r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])["client_san"]


def test_refresh_reloads_a_rotated_client_certificate_into_the_same_context(certs, tls_upstream):
    from fastmesh.upstream_tls import UpstreamTLS, context, refresh
    up = tls_upstream(*certs.leaf("localhost", "localhost"), client_ca=certs.ca_file,
                      require_client_cert=True)
    cert_file, key_file = certs.leaf("client", "old.client.test")
    settings = UpstreamTLS(True, certs.ca_file, cert_file, key_file, "localhost", None)
    ctx = context(settings)
    assert _handshake_client_san(up, ctx) == [["DNS", "old.client.test"]]
    assert refresh() == []                                   # nothing changed on disk
    new = certs.ca.issue_cert("new.client.test")
    # a half-done rotation (new certificate, old key): refused, the old pair stays in use
    (certs.dir / "client.crt").write_bytes(b"".join(p.bytes() for p in new.cert_chain_pems))
    assert refresh() == []
    assert _handshake_client_san(up, ctx) == [["DNS", "old.client.test"]]
    (certs.dir / "client.key").write_bytes(new.private_key_pem.bytes())
    assert refresh() == [cert_file, key_file]
    assert context(settings) is ctx
    assert _handshake_client_san(up, ctx) == [["DNS", "new.client.test"]]


# --- config -----------------------------------------------------------------------------------

def load_issues(tmp_path, services: list[dict]) -> dict[str, list[str]]:
    """path -> messages from loading a real file; every issue names that file."""
    from fastmesh.config import ConfigError, load_config
    path = tmp_path / "fastmesh.yaml"
    path.write_text(yaml.safe_dump({"_format_version": "1", "services": services}))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    out: dict[str, list[str]] = {}
    for issue in info.value.issues:
        assert issue.source == str(path)
        out.setdefault(issue.path, []).append(issue.message)
    return out


ROUTES = [{"name": "r", "paths": ["/"]}]


def test_https_urls_and_protocol_default_to_port_443():
    from fastmesh.config import load_config_data
    cfg = load_config_data({"services": [
        {"name": "a", "url": "HTTPS://Example.com/base", "routes": ROUTES},
        {"name": "b", "protocol": "https", "host": "b.test"},
        {"name": "c", "url": "https://[::1]:8443"}]})
    a, b, c = cfg.services
    assert (a.protocol, a.host, a.port, a.path, a.tls_verify) == ("https", "example.com", 443,
                                                                  "/base", True)
    assert (b.protocol, b.port) == ("https", 443)
    assert (c.host, c.port) == ("::1", 8443)


def test_tls_fields_are_refused_on_an_http_service(tmp_path):
    found = load_issues(tmp_path, [{"name": "a", "url": "http://a.test", "tls_verify": False,
                                    "tls_server_name": "a.test", "routes": ROUTES}])
    assert found == {
        "services[0].tls_verify": ["'tls_verify' applies only to HTTPS upstreams: set protocol "
                                   "https (or an https:// url)"],
        "services[0].tls_server_name": ["'tls_server_name' applies only to HTTPS upstreams: set "
                                        "protocol https (or an https:// url)"]}


def test_certificate_files_are_checked_at_load(tmp_path, certs):
    cert, key = certs.leaf("client", "client.test")
    _, other_key = certs.leaf("other", "other.test")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    found = load_issues(tmp_path, [
        {"name": "a", "url": "https://a.test", "tls_ca": "missing.pem", "routes": ROUTES},
        {"name": "b", "url": "https://b.test", "tls_ca": "junk.pem"},
        {"name": "c", "url": "https://c.test", "tls_client_cert": cert},
        {"name": "d", "url": "https://d.test", "tls_client_cert": cert,
         "tls_client_key": other_key},
        {"name": "e", "url": "https://e.test", "tls_client_cert": key, "tls_client_key": key},
        {"name": "f", "url": "https://f.test", "tls_verify": False, "tls_ca": certs.ca_file,
         "tls_peer_identity": "spiffe://td/svc/f"},
        {"name": "g", "url": "https://g.test", "tls_peer_identity": "orders",
         "tls_server_name": "bad name"},
    ])
    assert found == {
        "services[0].tls_ca": [f"cannot read CA file {tmp_path}/missing.pem: "
                               "No such file or directory"],
        "services[1].tls_ca": [f"CA file {tmp_path}/junk.pem: no PEM certificate in it"],
        "services[2].tls_client_cert": ["'tls_client_cert' needs 'tls_client_key' too "
                                        "(both or neither)"],
        "services[3].tls_client_key": [f"{other_key} with {cert}: the key does not match the "
                                       "certificate"],
        "services[4].tls_client_cert": [f"certificate file {key}: no PEM certificate in it"],
        "services[5].tls_ca": ["'tls_ca' needs a verified certificate: remove it or "
                               "'tls_verify: false'"],
        "services[5].tls_peer_identity": ["'tls_peer_identity' needs a verified certificate: "
                                          "remove it or 'tls_verify: false'"],
        "services[6].tls_peer_identity": ["expected a URI such as 'spiffe://example.org/svc/"
                                          "orders' (the URI SAN the upstream's certificate must "
                                          "carry), found 'orders'"],
        "services[6].tls_server_name": ["invalid host name 'bad name': expected dot-separated "
                                        "labels of letters, digits and '-' (1-63 characters "
                                        "each)"],
    }


def test_services_sharing_an_upstream_must_agree_on_tls(tmp_path):
    from fastmesh.config import ConfigError, load_config_data
    with pytest.raises(ConfigError) as info:
        load_config_data({
            "upstreams": [{"name": "backend", "targets": [{"target": "127.0.0.1:9"}]}],
            "services": [{"name": "plain", "host": "backend", "routes": ROUTES},
                         {"name": "tls", "host": "backend", "protocol": "https"}]})
    assert [(i.path, i.message) for i in info.value.issues] == [
        ("services[1]", "service 'tls' and service 'plain' both use upstream 'backend' with "
                        "different TLS settings (protocol or tls_* fields): make them equal, or "
                        "give each its own upstream")]


def test_fastmesh_check_names_the_file_and_path(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"services": [
        {"name": "a", "url": "https://a.test", "tls_client_key": "k.pem", "routes": ROUTES}]}))
    done = subprocess.run(fastmesh_cmd("check", "--config", str(path)), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert f"{path}: services[0].tls_client_key: cannot read key file {tmp_path}/k.pem" \
        in done.stdout + done.stderr


def test_large_bodies_cross_tls_on_both_sides_intact(certs, tls_upstream, gateway):
    """Megabytes both ways, TLS client -> gateway -> TLS upstream, on one keep-alive connection:
    many TLS records per message on every side (fastmesh.tls.SSLObject reads a record at most)."""
    up = tls_upstream(*certs.leaf("up", "localhost"))
    edge_cert, edge_key = certs.leaf("edge", "localhost")
    tls_port = free_port()
    cfg = config(https_service(f"https://localhost:{up.port}", tls_ca=certs.ca_file))
    cfg["listeners"] = [{"listen": f"127.0.0.1:{tls_port}", "tls": True}]
    cfg["certificates"] = [{"cert": edge_cert, "key": edge_key}]
    wait_for_port(tls_port, gateway(cfg).proc)       # the TLS listener may open after `listen`
    client = ssl.create_default_context(cafile=certs.ca_file)
    size = 3 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw, \
            client.wrap_socket(raw, server_hostname="localhost") as conn:
        reader = conn.makefile("rb")
        for _ in range(3):
            upload = big_body(size)[::-1]
            conn.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
                         % len(upload) + upload)
            status, headers = read_head(reader)
            answer = json.loads(reader.read(int(headers["content-length"])))
            assert status == 200 and answer["body_sha256"] == hashlib.sha256(upload).hexdigest()
            conn.sendall(b"GET /big/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
            status, headers = read_head(reader)
            assert status == 200
            assert reader.read(int(headers["content-length"])) == big_body(size)
    assert up.handshakes == 1          # one pooled upstream connection carried it all


def read_head(reader) -> tuple[int, dict]:
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers

