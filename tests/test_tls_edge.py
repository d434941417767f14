"""Edge TLS: listeners with certificates chosen by SNI, TLS 1.2+ only, ALPN http/1.1, session
resumption, certificates reloaded without dropping connections, and HTTPS-only routes.

Real gateway processes on loopback, certificates from a `trustme` CA, clients from the standard
library's ssl module (OpenSSL), raw sockets where the bytes matter.
"""
from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings

import pytest
import trustme
import yaml

from conftest import (
    ROOT, RawClient, config, config_issues, fastmesh_cmd, free_port, get, service,
    upstream_headers, wait_for_port,
)
from test_supervisor import ops  # noqa: F401  (fixture: gateways with an admin API)

NAMES = {"api": ["api.example.com"], "wild": ["*.example.com"], "default": ["default.test"]}


# --- certificates and clients -----------------------------------------------------------------

class PKI:
    """A trustme CA and PEM files for leaf certificates, by label."""

    def __init__(self, directory):
        self.dir = directory
        self.ca = trustme.CA()
        self.files: dict[str, tuple[str, str]] = {}
        for label, names in NAMES.items():
            self.issue(label, *names)

    def issue(self, label: str, *names: str, ca: trustme.CA | None = None) -> tuple[str, str]:
        leaf = (ca or self.ca).issue_cert(*names)
        cert, key = self.dir / f"{label}.pem", self.dir / f"{label}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        self.files[label] = (str(cert), str(key))
        return str(cert), str(key)

    def entry(self, label: str, *snis: str) -> dict:
        cert, key = self.files[label]
        out = {"cert": cert, "key": key}
        if snis:
            out["snis"] = list(snis)
        return out

    def client(self, **versions) -> ssl.SSLContext:
        """A client context trusting the CA; names are checked by the tests, not by ssl."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        ctx.check_hostname = False
        for attr, version in versions.items():
            setattr(ctx, attr, version)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


class TLSClient(RawClient):
    """RawClient over TLS: one handshake, then exact control of the bytes."""

    def __init__(self, port: int, ctx: ssl.SSLContext, sni: str | None = "api.example.com",
                 session: ssl.SSLSession | None = None, timeout: float = 5.0):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=sni, session=session)
        except BaseException:
            raw.close()
            raise
        self.sock.settimeout(timeout)
        self.buf = b""

    def names(self) -> list[str]:
        """The DNS names of the certificate the server presented."""
        return [v for k, v in self.sock.getpeercert()["subjectAltName"] if k == "DNS"]

    def request(self, path: str = "/", host: str = "api.example.com"):
        self.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return self.read_response()


def served_names(port: int, ctx: ssl.SSLContext, sni: str | None) -> list[str]:
    with TLSClient(port, ctx, sni) as c:
        return c.names()


def tls_config(pki: PKI, echo, tls_port: int, *certificates: dict, routes=None, **gateway) -> dict:
    cfg = config(service("echo", echo.url, routes or [{"name": "all", "paths": ["/"]}]),
                 **gateway)
    cfg["listeners"] = [{"listen": f"127.0.0.1:{tls_port}", "tls": True}]
    cfg["certificates"] = list(certificates) or [
        pki.entry("api", "api.example.com"), pki.entry("wild", "*.example.com"),
        pki.entry("default")]
    return cfg


@pytest.fixture
def tls_gateway(gateway, echo, pki):
    """Factory: a one-worker gateway with a TLS listener (its port as .tls_port)."""
    def start(*certificates: dict, routes=None, **gateway_settings):
        tls_port = free_port()
        proc = gateway(tls_config(pki, echo, tls_port, *certificates, routes=routes,
                                  **gateway_settings))
        wait_for_port(tls_port, proc.proc)
        proc.tls_port = tls_port
        return proc
    return start


def run_fastmesh(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(fastmesh_cmd(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# --- certificate selection, ALPN, protocol versions ------------------------------------------

def test_sni_picks_exact_then_wildcard_then_the_default_certificate(tls_gateway, pki):
    gw = tls_gateway()
    ctx = pki.client()
    # api.example.com is also covered by *.example.com: the exact name wins
    assert served_names(gw.tls_port, ctx, "api.example.com") == ["api.example.com"]
    assert served_names(gw.tls_port, ctx, "API.Example.COM") == ["api.example.com"]
    assert served_names(gw.tls_port, ctx, "www.example.com") == ["*.example.com"]
    # a wildcard covers one label only; unknown names get the default (the one without snis)
    assert served_names(gw.tls_port, ctx, "a.b.example.com") == ["default.test"]
    assert served_names(gw.tls_port, ctx, "example.com") == ["default.test"]
    assert served_names(gw.tls_port, ctx, "unknown.org") == ["default.test"]


def test_a_client_without_sni_gets_the_default_certificate(tls_gateway, pki):
    gw = tls_gateway()
    assert served_names(gw.tls_port, pki.client(), None) == ["default.test"]
    # without a certificate that has no snis, the first one is the default
    gw2 = tls_gateway(pki.entry("wild", "*.example.com"), pki.entry("api", "api.example.com"))
    assert served_names(gw2.tls_port, pki.client(), None) == ["*.example.com"]
    assert served_names(gw2.tls_port, pki.client(), "api.example.com") == ["api.example.com"]


def test_alpn_negotiates_http1_only(tls_gateway, pki):
    gw = tls_gateway()
    ctx = pki.client()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with TLSClient(gw.tls_port, ctx) as c:
        assert c.sock.selected_alpn_protocol() == "http/1.1"
        assert c.request("/alpn").status == 200
    only_h2 = pki.client()
    only_h2.set_alpn_protocols(["h2"])
    with TLSClient(gw.tls_port, only_h2) as c:       # no common protocol: none is selected
        assert c.sock.selected_alpn_protocol() is None


def old_protocol_client() -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only (and every cipher, to be sure it can)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def test_tls_1_0_and_1_1_are_refused(tls_gateway, pki):
    gw = tls_gateway()
    # Control: this machine's OpenSSL can speak TLS 1.1 with a server that allows it, so the
    # refusal below comes from the gateway, not from the client.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*pki.files["api"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
    server_ctx.set_ciphers("ALL:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))
    control: list = []

    def accept_once():
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                control.append(tls.version())
        except (ssl.SSLError, OSError) as exc:
            control.append(exc)

    thread = threading.Thread(target=accept_once, daemon=True)
    thread.start()
    try:
        with TLSClient(listener.getsockname()[1], old_protocol_client(), None) as c:
            offered = c.sock.version()
    finally:
        thread.join(timeout=5)
        listener.close()
    assert offered == "TLSv1.1" and control == ["TLSv1.1"]

    with pytest.raises((ssl.SSLError, ConnectionError)):
        TLSClient(gw.tls_port, old_protocol_client(), "api.example.com")
    # the gateway keeps serving modern clients
    with TLSClient(gw.tls_port, pki.client()) as c:
        assert c.sock.version() == "TLSv1.3"
        assert c.request().status == 200


def test_tls_1_2_gets_forward_secret_aead_ciphers_only(tls_gateway, pki):
    gw = tls_gateway()
    tls12 = pki.client(maximum_version=ssl.TLSVersion.TLSv1_2)
    with TLSClient(gw.tls_port, tls12) as c:
        name, version, _ = c.sock.cipher()
        assert version == "TLSv1.2" and name.startswith("ECDHE-") \
            and ("GCM" in name or "CHACHA20" in name), name
        assert c.request().status == 200
    cbc_only = pki.client(maximum_version=ssl.TLSVersion.TLSv1_2)
    # CBC with forward secrecy: in Python's default server cipher list, not in fastmesh's
    cbc_only.set_ciphers("ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TLSClient(gw.tls_port, cbc_only)


# --- requests over TLS ------------------------------------------------------------------------

def test_keep_alive_requests_over_tls_reach_the_upstream_as_https(tls_gateway, pki):
    gw = tls_gateway()
    with TLSClient(gw.tls_port, pki.client()) as c:
        for i in range(5):
            resp = c.request(f"/r{i}?n={i}")
            seen = upstream_headers(resp)
            assert seen["x-forwarded-proto"] == ["https"]
            assert seen["x-forwarded-port"] == [str(gw.tls_port)]
            assert resp.json()["path"] == f"/r{i}"
        assert not c.is_closed(timeout=0.2)
    # the plain listener still answers plain HTTP, forwarded as http
    assert upstream_headers(get(gw.port, "/plain"))["x-forwarded-proto"] == ["http"]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_is_resumed_on_a_new_connection(tls_gateway, pki, version):
    gw = tls_gateway()
    ctx = pki.client(maximum_version=version, minimum_version=version)
    with TLSClient(gw.tls_port, ctx) as first:
        assert first.request().status == 200    # TLS 1.3 tickets arrive after the handshake
        assert not first.sock.session_reused
        session = first.sock.session
    with TLSClient(gw.tls_port, ctx, session=session) as second:
        assert second.sock.session_reused
        assert second.names() == ["api.example.com"]
        assert second.request().status == 200


def test_a_stalled_handshake_is_closed_after_header_timeout(tls_gateway, pki):
    gw = tls_gateway(limits={"header_timeout": "500ms"})
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5) as sock:
        started = time.monotonic()
        sock.settimeout(5)
        try:
            data = sock.recv(1)                  # never send a ClientHello
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - started
    assert data == b"" and 0.3 < waited < 4, waited
    assert served_names(gw.tls_port, pki.client(), "api.example.com") == ["api.example.com"]


# --- HTTPS-only routes ------------------------------------------------------------------------

HTTPS_ROUTES = [
    {"name": "refuse", "paths": ["/refuse"], "protocols": ["https"]},
    {"name": "moved", "paths": ["/moved"], "protocols": ["https"],
     "https_redirect_status_code": 301},
    {"name": "plain", "paths": ["/plain"], "protocols": ["http"]},
    {"name": "both", "paths": ["/"]},
]


def test_an_https_only_route_refuses_or_redirects_plain_http(tls_gateway, pki):
    gw = tls_gateway(routes=HTTPS_ROUTES)
    refused = get(gw.port, "/refuse", host="api.example.com")
    assert refused.status == 426
    assert refused.header("upgrade") == "TLS/1.2, HTTP/1.1"
    assert refused.json() == {"message": "this route requires HTTPS"}
    moved = get(gw.port, "/moved/x?y=1", host="api.example.com:8080")
    assert moved.status == 301
    assert moved.header("location") == f"https://api.example.com:{gw.tls_port}/moved/x?y=1"
    assert get(gw.port, "/plain", host="api.example.com").status == 200
    assert get(gw.port, "/other", host="api.example.com").status == 200
    with TLSClient(gw.tls_port, pki.client()) as c:     # the same routes over TLS are served
        for path in ("/refuse", "/moved/x?y=1", "/plain", "/other"):
            resp = c.request(path)
            assert upstream_headers(resp)["x-forwarded-proto"] == ["https"], path


# --- several workers, reloads -----------------------------------------------------------------

def tls_ops(ops, pki, echo, workers: int, *certificates: dict):
    tls_port = free_port()
    gw = ops(tls_config(pki, echo, tls_port, *certificates), workers)
    wait_for_port(tls_port, gw.proc)
    gw.tls_port = tls_port
    return gw


def test_a_multi_worker_tls_gateway_serves_on_every_worker(ops, pki, echo):
    gw = tls_ops(ops, pki, echo, 2)
    assert gw.status()["listeners"] == [f"https://127.0.0.1:{gw.tls_port}"]
    ctx = pki.client()
    for i in range(40):                             # a new connection (and handshake) each
        with TLSClient(gw.tls_port, ctx, "www.example.com") as c:
            assert c.names() == ["*.example.com"]
            assert c.request(f"/w{i}").status == 200
    served = [w["requests"] for w in gw.status()["workers"]]
    assert sum(served) == 40 and all(served), served


def test_handshakes_are_counted_by_outcome_in_status_and_metrics(ops, pki, echo):
    gw = tls_ops(ops, pki, echo, 2)
    for _ in range(3):
        with TLSClient(gw.tls_port, pki.client()) as c:
            assert c.request().status == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TLSClient(gw.tls_port, old_protocol_client(), "api.example.com")
    with RawClient(gw.tls_port) as plain:               # HTTP to the TLS port: a clear 400
        plain.send(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        answer = plain.read_response()
        assert answer.status == 400 and b"TLS port" in answer.body
        assert plain.is_closed()
    deadline = time.monotonic() + 5
    while True:                     # the server side may log its failure after the client's
        counts = gw.status()["tls_handshakes"]
        if counts.get("plaintext") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # "closed": the harness's own readiness probe (a connect, then a close)
    assert counts == {"ok": 3, "bad_protocol_version": 1, "plaintext": 1, "closed": 1,
                      "no_client_cert": 0, "unknown_ca": 0, "expired": 0, "timeout": 0,
                      "other": 0}, counts
    code, text = gw.admin("GET", "/metrics")
    assert code == 200
    assert 'fastmesh_tls_handshakes_total{result="ok"} 3' in text
    assert 'fastmesh_tls_handshakes_total{result="bad_protocol_version"} 1' in text


def swap_in_new_api_certificate(pki: PKI, target: tuple[str, str]) -> None:
    """Replace the files at `target` with a fresh certificate for api.example.com."""
    cert, key = pki.issue("api-new", "api.example.com")
    shutil.copyfile(cert, target[0])
    shutil.copyfile(key, target[1])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_swaps_a_certificate_without_dropping_connections(ops, pki, echo, tmp_path,
                                                                   workers):
    cert, key = tmp_path / "api.pem", tmp_path / "api.key"
    shutil.copyfile(pki.files["api"][0], cert)
    shutil.copyfile(pki.files["api"][1], key)
    entry = {"cert": str(cert), "key": str(key), "snis": ["api.example.com"]}
    gw = tls_ops(ops, pki, echo, workers, entry)
    ctx = pki.client()
    kept = TLSClient(gw.tls_port, ctx)
    try:
        old_serial = kept.sock.getpeercert()["serialNumber"]
        assert kept.request("/before").status == 200
        version = gw.status()["config"]["version"]
        swap_in_new_api_certificate(pki, (str(cert), str(key)))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_status(lambda s: s["config"]["version"] != version and all(
            w["config_version"] == s["config"]["version"] for w in s["workers"]))
        # the open connection keeps working on its handshake; new handshakes get the new cert
        for i in range(3):
            assert kept.request(f"/after{i}").status == 200
        for _ in range(2 * workers):
            with TLSClient(gw.tls_port, ctx) as fresh:
                assert fresh.sock.getpeercert()["serialNumber"] != old_serial
                assert fresh.names() == ["api.example.com"]
                assert fresh.request("/fresh").status == 200
    finally:
        kept.close()
    assert gw.status()["reloads"] == {"success": 1, "failure": 0}


def test_a_reload_with_a_broken_certificate_is_refused_and_the_old_one_served(ops, pki, echo,
                                                                             tmp_path):
    gw = tls_ops(ops, pki, echo, 2, pki.entry("api", "api.example.com"))
    with TLSClient(gw.tls_port, pki.client()) as c:
        old_serial = c.sock.getpeercert()["serialNumber"]
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate\n")
    cfg = tls_config(pki, echo, gw.tls_port,
                     {"cert": str(broken), "key": pki.files["api"][1], "snis": ["api.example.com"]})
    gw.write_config(cfg)
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_status(lambda s: s["reloads"]["failure"] == 1)
    with TLSClient(gw.tls_port, pki.client()) as c:
        assert c.sock.getpeercert()["serialNumber"] == old_serial
        assert c.request().status == 200
    out = gw.stop()
    assert f"{gw.config_path}: certificates[0].cert: {broken} is not a PEM certificate" in out


def test_a_reload_may_not_change_the_listeners(ops, pki, echo):
    gw = tls_ops(ops, pki, echo, 1)
    cfg = tls_config(pki, echo, gw.tls_port)
    cfg["listeners"].append({"listen": f"127.0.0.1:{free_port()}"})
    code, body = gw.admin("POST", "/config", cfg)
    assert code == 400, body
    assert "listeners: changing listeners needs a restart" in str(body)
    assert served_names(gw.tls_port, pki.client(), "api.example.com") == ["api.example.com"]


# --- refused at start and by `fastmesh check` -------------------------------------------------

def test_a_mismatched_certificate_and_key_refuse_to_start(pki, echo, tmp_path):
    path = tmp_path / "bad.yaml"
    cfg = tls_config(pki, echo, free_port(),
                     {"cert": pki.files["api"][0], "key": pki.files["wild"][1]})
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    result = run_fastmesh("run", "--config", str(path), "--listen", f"127.0.0.1:{port}",
                          "--admin", "off")
    assert result.returncode == 1
    assert (f"{path}: certificates[0]: the private key {pki.files['wild'][1]} does not belong "
            f"to the certificate {pki.files['api'][0]}") in result.stderr
    with pytest.raises(OSError):                    # nothing was left listening
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    check = run_fastmesh("check", "--config", str(path))
    assert check.returncode == 1
    assert "certificates[0]: the private key" in check.stdout + check.stderr


def test_a_missing_key_file_refuses_to_start_naming_the_file_and_the_path(pki, echo, tmp_path):
    path = tmp_path / "missing.yaml"
    cfg = tls_config(pki, echo, free_port(), {"cert": pki.files["api"][0], "key": "nope.key"})
    path.write_text(yaml.safe_dump(cfg))
    result = run_fastmesh("run", "--config", str(path), "--listen", f"127.0.0.1:{free_port()}",
                          "--admin", "off")
    assert result.returncode == 1
    assert (f"{path}: certificates[0].key: cannot read private key file "
            f"{tmp_path / 'nope.key'}: No such file or directory") in result.stderr


def test_listen_overlapping_a_tls_listener_refuses_to_start(pki, echo, tmp_path):
    tls_port = free_port()
    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump(tls_config(pki, echo, tls_port)))
    result = run_fastmesh("run", "--config", str(path), "--listen", f"127.0.0.1:{tls_port}",
                          "--admin", "off")
    assert result.returncode == 1
    assert f"is also listeners[0].listen (127.0.0.1:{tls_port})" in result.stderr


def test_config_errors_name_the_path(pki):
    base = {"services": [{"name": "s", "url": "http://127.0.0.1:1", "routes": [
        {"name": "r", "paths": ["/"], "protocols": ["https", "ftp"],
         "https_redirect_status_code": 302},
        {"name": "r2", "paths": ["/x"], "protocols": [], "https_redirect_status_code": 303}]}]}
    issues = config_issues({**base, "listeners": [
        {"listen": "0.0.0.0:8443", "tls": True}, {"listen": "127.0.0.1:8443"},
        {"listen": "127.0.0.1:8000"}, {"listen": "nowhere"}, {"listen": "127.0.0.1:9", "tsl": 1}]})
    assert issues["listeners[0].tls"] == [
        "a TLS listener needs a certificate: add one under 'certificates' (cert, key, snis)"]
    assert issues["listeners[1].listen"] == [
        "address 127.0.0.1:8443 is already used by listeners[0].listen"]
    assert issues["listeners[2].listen"] == [
        "address 127.0.0.1:8000 is already used by gateway.listen"]
    assert "expected 'host:port'" in issues["listeners[3].listen"][0]
    assert issues["listeners[4].tsl"] == ["unknown field 'tsl' (did you mean 'tls'?)"]
    assert issues["services[0].routes[0].protocols[1]"] == ["expected http or https, found 'ftp'"]
    assert issues["services[0].routes[1].protocols"] == [
        "expected at least one of http, https, found an empty list"]
    (status_problem,) = issues["services[0].routes[1].https_redirect_status_code"]
    assert status_problem.startswith("expected 426 (refuse) or 301, 302, 307, 308 (redirect)")

    cert, key = pki.files["api"]
    issues = config_issues({**base, "certificates": [
        {"cert": cert, "key": key, "snis": ["api.example.com", "*.example.com", "a.*.com"]},
        {"cert": cert, "key": key, "snis": ["API.example.com"]},
        {"cert": key, "key": cert},
        {"key": key}]})
    assert issues["certificates[0].snis[2]"] == [
        "a wildcard is allowed only as the leading label, as in '*.example.com', found 'a.*.com'"]
    assert issues["certificates[1].snis[0]"] == [
        "SNI 'api.example.com' is already served by the certificate at certificates[0].snis[0]"]
    assert issues["certificates[2].cert"] == [
        f"{key} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----')"]
    assert issues["certificates[3]"] == ["missing required field 'cert'"]


def test_certificate_paths_are_relative_to_the_config_file(pki, tmp_path):
    from fastmesh.config import load_config
    (tmp_path / "certs").mkdir()
    shutil.copyfile(pki.files["api"][0], tmp_path / "certs" / "api.pem")
    shutil.copyfile(pki.files["api"][1], tmp_path / "certs" / "api.key")
    path = tmp_path / "gw.yaml"
    cfg = {"services": [{"name": "s", "url": "http://127.0.0.1:1", "routes": [
        {"name": "r", "paths": ["/"], "protocols": ["https"]}]}],
        "listeners": [{"listen": "127.0.0.1:8443", "tls": True}],
        "certificates": [{"cert": "certs/api.pem", "key": "certs/api.key",
                          "snis": ["API.example.com"]}]}
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(str(path))
    (entry,) = loaded.certificates
    assert entry.cert == str(tmp_path / "certs" / "api.pem")
    assert entry.snis == ("api.example.com",)
    assert loaded.routes[0].protocols == ("https",)
    assert loaded.routes[0].https_redirect_status_code == 426
    # replacing the certificate file in place is a new config version
    shutil.copyfile(pki.issue("api-v2", "api.example.com")[0], tmp_path / "certs" / "api.pem")
    shutil.copyfile(pki.files["api-v2"][1], tmp_path / "certs" / "api.key")
    assert load_config(str(path)).version != loaded.version
