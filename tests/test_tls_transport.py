"""fastmesh._core.tls_transport, server side, through real TLS clients on loopback: bytes intact
both ways at every size, close_notify either way, the handshake's outcome and its timeout. Each
case runs twice: records handed to OpenSSL directly (`native`) and through the ssl module's own
methods (FASTMESH_TLS_NATIVE=0), so the fallback stays correct too. Gateway-level TLS (edge,
upstreams, mesh mTLS) is covered by test_tls_edge, test_tls_upstream and test_mesh_mtls.
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trustme

from conftest import ROOT

HANDSHAKE_TIMEOUT = 0.5


class EchoServer:
    def __init__(self, cert, key, native: bool):
        env = dict(os.environ, PYTHONPATH=str(ROOT), FASTMESH_TLS_NATIVE="1" if native else "0")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "tls_echo.py"), cert, key,
             str(HANDSHAKE_TIMEOUT)],
            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        first = self.line()
        self.port, self.native = first["port"], first["native"]

    def line(self, timeout: float = 10.0) -> dict:
        """The server's next report line (bounded wait)."""
        import selectors
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError("the echo server reported nothing")
        text = self.proc.stdout.readline()
        assert text, "the echo server exited"
        return json.loads(text)

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls-transport")
    ca = trustme.CA()
    leaf = ca.issue_cert("echo.test")
    cert, key = directory / "cert.pem", directory / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return str(cert), str(key), client


def libssl_is_shared() -> bool:
    from fastmesh._core.tls_transport import _libssl_path
    return _libssl_path() is not None


@pytest.fixture(params=["native", "python"])
def server(request, pem):
    native = request.param == "native"
    srv = EchoServer(pem[0], pem[1], native)
    try:
        if native and sys.implementation.name == "cpython" and libssl_is_shared():
            assert srv.native, "OpenSSL's functions were not found: records take the slow path"
        if not native:
            assert not srv.native
        srv.client = pem[2]
        yield srv
    finally:
        srv.stop()


def connect(server, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return server.client.wrap_socket(raw, server_hostname="echo.test")


def read_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_bytes_cross_intact_at_every_size(server):
    with connect(server) as tls:
        assert server.line() == {"handshake": "ok"}
        sent = 0
        for size in (1, 100, 16383, 16384, 16385, 70000, 3 * 1024 * 1024):
            payload = os.urandom(size)
            tls.sendall(payload)
            assert read_exactly(tls, size) == payload, size
            sent += size
        tls.unwrap()                        # our close_notify: the app's eof_received
    end = server.line()
    assert end == {"native": server.native, "eof": True, "bytes": sent}


def test_echo_to_a_client_that_does_not_read_arrives_whole_and_in_order(server):
    """The server's records outgrow the socket while the client only sends: the sends that
    the kernel takes in part, and every record after them, go through the socket transport's
    buffer in order (the direct send() path must not overtake it)."""
    size = 8 * 1024 * 1024
    payload = b"".join(b"%08d" % i for i in range(size // 8))
    with connect(server, timeout=30) as tls:
        assert server.line() == {"handshake": "ok"}
        for off in range(0, size, 65536):   # nothing read until everything is sent
            tls.sendall(payload[off:off + 65536])
        got = read_exactly(tls, size)
        assert len(got) == size
        assert got == payload, next(i for i in range(size) if got[i] != payload[i])
        tls.unwrap()
    assert server.line() == {"native": server.native, "eof": True, "bytes": size}


def test_many_small_writes_in_one_read_are_all_delivered(server):
    with connect(server) as tls:
        server.line()
        for i in range(200):
            tls.sendall(b"%05d" % i)
        assert read_exactly(tls, 1000) == b"".join(b"%05d" % i for i in range(200))


def test_a_server_close_sends_close_notify(server):
    with connect(server) as tls:
        server.line()
        tls.sendall(b"ping")
        assert read_exactly(tls, 4) == b"ping"
        tls.unwrap()                        # both close_notify's: the server answers with its own
    assert server.line()["eof"] is True


def test_a_tcp_close_without_close_notify_ends_the_connection(server):
    tls = connect(server)
    server.line()
    tls.sendall(b"abc")
    assert read_exactly(tls, 3) == b"abc"
    tls.close()                             # no unwrap: a bare FIN
    end = server.line()
    assert end["bytes"] == 3 and end["eof"] is True


def test_a_failed_handshake_is_reported_and_the_socket_closed(server):
    wrong = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)          # trusts nothing: refuses the server
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        wrong.wrap_socket(raw, server_hostname="echo.test")
    raw.close()
    assert server.line()["handshake"] in ("SSLError", "ConnectionResetError")
    # plaintext to the TLS port: OpenSSL says so, and the socket is closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    assert server.line() == {"handshake": "SSLError"}


def test_a_silent_client_is_closed_after_the_handshake_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        try:
            data = sock.recv(1)             # no ClientHello
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - started
    assert data == b"" and HANDSHAKE_TIMEOUT * 0.8 < waited < 4, waited
    assert server.line() == {"handshake": "HandshakeTimeout"}
