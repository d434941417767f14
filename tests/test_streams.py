"""L4 `streams`: TCP proxying and TLS passthrough by SNI, through real gateway processes.

Upstreams are raw TCP servers in threads (conftest's ScriptedUpstream); TLS backends terminate TLS
themselves with certificates from `trustme`, and clients verify them, which proves that the
gateway only relays bytes.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
import trustme
import uvloop
import yaml

from conftest import (
    RawClient, config_issues, fastmesh_cmd, free_port, wait_for_port, wait_until,
)

IO_TIMEOUT = 10.0


# --- upstreams ----------------------------------------------------------------------------------

def echo(conn: socket.socket, index: int) -> None:
    """Echo every byte until the client's EOF, then close."""
    while data := conn.recv(65536):
        conn.sendall(data)


def tagged(tag: bytes):
    """Echo prefixed with `tag`, answering an HTTP health probe (GET /healthz) with 200."""
    def handler(conn: socket.socket, index: int) -> None:
        data = conn.recv(65536)
        if data.startswith(b"GET /healthz"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        while data:
            conn.sendall(tag + data)
            data = conn.recv(65536)
    return handler


def stream_config(streams: list[dict], upstreams: list[dict] | None = None) -> dict:
    return {"_format_version": "1", "upstreams": upstreams or [], "streams": streams}


def start(gateway, cfg: dict, *extra: str):
    """A gateway with `cfg`; returns once every stream port accepts connections."""
    proc = gateway(cfg, *extra)
    for stream in cfg.get("streams", ()):
        wait_for_port(int(stream["listen"].rpartition(":")[2]), proc.proc)
    return proc


def reload(proc, cfg: dict) -> None:
    """Write `cfg` over the gateway's config file and signal it to reload (SIGHUP)."""
    proc.config_path.write_text(yaml.safe_dump(cfg))
    os.kill(proc.pid, signal.SIGHUP)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def exchange(port: int, payload: bytes) -> bytes:
    """Send `payload`, half-close, read until the other side closes."""
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the other side closes (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def client_closed(port: int, timeout: float = 5.0) -> bool:
    """Connect and send nothing: True when the stream closes the connection within `timeout`."""
    with connect(port) as sock:
        return closed_by_peer(sock, timeout)


# --- plain TCP ------------------------------------------------------------------------------------

def test_tcp_bytes_are_relayed_both_ways(gateway, scripted):
    up = scripted(echo)
    port = free_port()
    start(gateway, stream_config([{"name": "plain", "listen": f"127.0.0.1:{port}",
                                   "address": f"127.0.0.1:{up.port}"}]))
    assert exchange(port, b"hello over L4") == b"hello over L4"
    with connect(port) as sock:                   # several round trips on one connection
        for i in range(20):
            sock.sendall(b"ping %d" % i)
            assert sock.recv(100) == b"ping %d" % i


def test_round_robin_over_two_targets(gateway, scripted):
    a, b = scripted(tagged(b"A:")), scripted(tagged(b"B:"))
    port = free_port()
    start(gateway, stream_config(
        [{"name": "rr", "listen": f"127.0.0.1:{port}", "upstream": "pair"}],
        [{"name": "pair", "targets": [{"target": f"127.0.0.1:{a.port}"},
                                      {"target": f"127.0.0.1:{b.port}"}]}]))
    seen = [exchange(port, b"x")[:2] for _ in range(6)]
    assert sorted(seen) == [b"A:"] * 3 + [b"B:"] * 3
    assert all(seen[i] != seen[i + 1] for i in range(5)), seen


def test_a_target_that_refuses_connections_is_skipped(gateway, scripted):
    live = scripted(tagged(b"L:"))
    dead = free_port()                                    # nothing listens there
    port = free_port()
    start(gateway, stream_config(
        [{"name": "failover", "listen": f"127.0.0.1:{port}", "upstream": "half",
          "connect_timeout": "1s"}],
        [{"name": "half", "targets": [{"target": f"127.0.0.1:{dead}"},
                                      {"target": f"127.0.0.1:{live.port}"}]}]))
    for i in range(6):
        assert exchange(port, b"%d" % i) == b"L:%d" % i


def test_all_targets_down_closes_the_client(gateway):
    port = free_port()
    start(gateway, stream_config(
        [{"name": "down", "listen": f"127.0.0.1:{port}", "upstream": "none"}],
        [{"name": "none", "targets": [{"target": f"127.0.0.1:{free_port()}"},
                                      {"target": f"127.0.0.1:{free_port()}"}]}]))
    assert client_closed(port)


def test_active_health_check_ejects_and_restores_a_target(gateway, scripted):
    state = {"healthy": True}

    def flaky(conn, index):
        data = conn.recv(65536)
        if data.startswith(b"GET /healthz"):
            status = b"200 OK" if state["healthy"] else b"503 Service Unavailable"
            conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            return
        while data:
            conn.sendall(b"F:" + data)
            data = conn.recv(65536)

    good, bad = scripted(tagged(b"G:")), scripted(flaky)
    state["healthy"] = False
    port = free_port()
    start(gateway, stream_config(
        [{"name": "checked", "listen": f"127.0.0.1:{port}", "upstream": "checked"}],
        [{"name": "checked",
          "targets": [{"target": f"127.0.0.1:{good.port}"}, {"target": f"127.0.0.1:{bad.port}"}],
          "healthchecks": {"active": {"path": "/healthz", "interval": "100ms", "timeout": "1s",
                                      "healthy": {"successes": 1},
                                      "unhealthy": {"http_failures": 1}}}}]))
    # the flaky target accepts TCP but its check fails: once ejected, every connection goes to G
    wait_until(lambda: all(exchange(port, b"?")[:2] == b"G:" for _ in range(4)), 10,
               "the failing target was never ejected")
    assert {exchange(port, b"%d" % i)[:2] for i in range(8)} == {b"G:"}
    state["healthy"] = True                       # its check passes again: back in rotation
    wait_until(lambda: b"F:" in {exchange(port, b"?")[:2] for _ in range(4)}, 10,
               "the recovered target never got traffic again")


def test_idle_timeout_closes_both_sides(gateway, scripted):
    upstream_closed = threading.Event()

    def watch(conn, index):
        conn.settimeout(10)
        while data := conn.recv(65536):
            conn.sendall(data)
        upstream_closed.set()

    up = scripted(watch)
    port = free_port()
    start(gateway, stream_config([{"name": "idle", "listen": f"127.0.0.1:{port}",
                                   "address": f"127.0.0.1:{up.port}", "idle_timeout": "400ms"}]))
    with connect(port) as sock:
        for _ in range(4):                        # traffic keeps it open past the timeout
            time.sleep(0.2)
            sock.sendall(b"tick")
            assert sock.recv(10) == b"tick"
        last_byte = time.monotonic()
        assert closed_by_peer(sock, 3.0)
        quiet = time.monotonic() - last_byte
    assert 0.38 <= quiet <= 1.5, quiet
    assert upstream_closed.wait(3.0)


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A port whose server never accepts, with its accept queue filled: a SYN to it gets no
    answer, so a connect there hangs until its timeout (no unrouted address needed)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(8):                            # listen(0) queues one or two; the rest hang
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(server.getsockname())
        pytest.skip("this kernel answers a full accept queue: no blackhole to test with")
    except (socket.timeout, TimeoutError):
        pass
    finally:
        probe.close()
    return server, fillers


def test_connect_timeout_closes_the_client(gateway):
    server, fillers = blackhole()
    try:
        port = free_port()
        start(gateway, stream_config([{"name": "slow", "listen": f"127.0.0.1:{port}",
                                       "address": f"127.0.0.1:{server.getsockname()[1]}",
                                       "connect_timeout": "600ms"}]))
        with connect(port) as sock:
            started = time.monotonic()
            assert closed_by_peer(sock, 5.0)
            waited = time.monotonic() - started
        assert 0.5 <= waited <= 2.5, waited
    finally:
        for sock in [server, *fillers]:
            sock.close()


def test_half_close_keeps_the_other_direction_open(gateway, scripted):
    def count_then_answer(conn, index):
        total = 0
        while data := conn.recv(65536):           # until the client's EOF arrives through
            total += len(data)
        time.sleep(0.2)                           # the reply comes well after that EOF
        conn.sendall(b"got %d bytes" % total)

    up = scripted(count_then_answer)
    port = free_port()
    start(gateway, stream_config([{"name": "half", "listen": f"127.0.0.1:{port}",
                                   "address": f"127.0.0.1:{up.port}"}]))
    assert exchange(port, b"z" * 100_000) == b"got 100000 bytes"


def test_a_reader_that_stops_pauses_the_sender(gateway, scripted):
    """Flow control: while the upstream reads nothing, the gateway stops reading the client, so
    the client can send only what the socket buffers and one high-water mark hold."""
    release = threading.Event()
    received: list[int] = []

    def stalled(conn, index):
        release.wait(IO_TIMEOUT)
        total = 0
        while data := conn.recv(1 << 20):
            total += len(data)
        received.append(total)

    up = scripted(stalled)
    port = free_port()
    start(gateway, stream_config([{"name": "stall", "listen": f"127.0.0.1:{port}",
                                   "address": f"127.0.0.1:{up.port}"}]))
    chunk = b"s" * 65536
    sent = 0
    with connect(port) as sock:
        sock.settimeout(0.1)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except socket.timeout:
                pass
        # loopback socket buffers hold a few MB per hop; without backpressure the gateway would
        # have read everything the client could send in 2 s (hundreds of MB)
        assert 0 < sent < 48 * 1024 * 1024, sent
        release.set()
        sock.settimeout(IO_TIMEOUT)
        sock.shutdown(socket.SHUT_WR)
        # (the start-up port probe was a connection too: it carried nothing)
        wait_until(lambda: sent in received, IO_TIMEOUT, "the upstream never got every byte")
    assert [n for n in received if n] == [sent]


def test_large_transfer_both_ways_is_intact(gateway, scripted):
    up = scripted(echo)
    port = free_port()
    start(gateway, stream_config([{"name": "bulk", "listen": f"127.0.0.1:{port}",
                                   "address": f"127.0.0.1:{up.port}"}]))
    payload = os.urandom(8 * 1024 * 1024)
    with connect(port) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload),
                                                  sock.shutdown(socket.SHUT_WR)), daemon=True)
        sender.start()
        received = read_all(sock)
        sender.join(IO_TIMEOUT)
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


# --- TLS passthrough ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


class TLSBackend:
    """A TLS server in a thread that terminates TLS itself and answers `<tag>:<sni>:<data>`."""

    def __init__(self, ca: trustme.CA, tag: str, *names: str):
        self.tag = tag
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*names).configure_cert(self.context)
        self.seen_sni: list[str | None] = []
        self.context.sni_callback = lambda sock, name, ctx: self.seen_sni.append(name)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        conn.settimeout(IO_TIMEOUT)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                data = tls.recv(65536)
                tls.sendall(f"{self.tag}:{self.seen_sni[-1]}:".encode() + data)
        except (OSError, ssl.SSLError):
            conn.close()

    def stop(self):
        self.stopped.set()
        self.sock.close()
        self.thread.join(2)


@pytest.fixture
def backends(ca):
    started: list[TLSBackend] = []

    def make(tag: str, *names: str) -> TLSBackend:
        backend = TLSBackend(ca, tag, *names)
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.stop()


def tls_request(ca: trustme.CA, port: int, sni: str, payload: bytes = b"hi") -> bytes:
    """Connect with TLS to the stream, verifying the certificate for `sni` against the CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(payload)
            return tls.recv(65536)


def passthrough_gateway(gateway, backends, default: bool = False):
    a = backends("A", "a.example.com")
    wild = backends("W", "*.example.com")
    other = backends("D", "fallback.test")
    port = free_port()
    stream = {"name": "sni", "listen": f"127.0.0.1:{port}", "hello_timeout": "1s",
              "tls_passthrough": [
                  {"snis": ["a.example.com"], "address": f"127.0.0.1:{a.port}"},
                  {"snis": ["*.example.com"], "upstream": "wild"}]}
    if default:
        stream["default"] = {"address": f"127.0.0.1:{other.port}"}
    start(gateway, stream_config([stream], [{"name": "wild", "targets": [
        {"target": f"127.0.0.1:{wild.port}"}]}]))
    return port, a, wild, other


def test_tls_passthrough_routes_by_sni_without_terminating(gateway, backends, ca):
    port, a, wild, _ = passthrough_gateway(gateway, backends)
    # the client verified backend A's own certificate for a.example.com: no TLS in between
    assert tls_request(ca, port, "a.example.com", b"one") == b"A:a.example.com:one"
    assert a.seen_sni == ["a.example.com"]


def test_tls_passthrough_wildcard_matches_one_label(gateway, backends, ca):
    port, a, wild, _ = passthrough_gateway(gateway, backends)
    assert tls_request(ca, port, "b.example.com") == b"W:b.example.com:hi"
    assert tls_request(ca, port, "api.example.com") == b"W:api.example.com:hi"
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_request(ca, port, "deep.b.example.com")     # two labels: no route, no default
    assert a.seen_sni == []


def test_unknown_sni_is_closed_without_a_default(gateway, backends, ca):
    port, a, wild, other = passthrough_gateway(gateway, backends)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_request(ca, port, "fallback.test")
    assert other.seen_sni == [] and a.seen_sni == [] and wild.seen_sni == []


def test_unknown_sni_goes_to_the_default(gateway, backends, ca):
    port, a, wild, other = passthrough_gateway(gateway, backends, default=True)
    assert tls_request(ca, port, "fallback.test") == b"D:fallback.test:hi"
    assert tls_request(ca, port, "a.example.com") == b"A:a.example.com:hi"


def test_non_tls_client_on_a_passthrough_listener_is_closed(gateway, backends):
    port, a, wild, other = passthrough_gateway(gateway, backends, default=True)
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        started = time.monotonic()
        assert closed_by_peer(sock, 3.0)
        assert time.monotonic() - started < 0.9       # at once, not at hello_timeout (1s)
    with connect(port) as sock:                       # silent client: closed at hello_timeout
        assert closed_by_peer(sock, 3.0)
    assert other.seen_sni == [] and a.seen_sni == []


def test_client_hello_split_over_segments_is_routed(gateway, backends, ca):
    port, a, wild, _ = passthrough_gateway(gateway, backends)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="a.example.com")
    with connect(port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        for start_at in range(0, len(hello), 50):     # 50-byte segments, 20 ms apart
            sock.sendall(hello[start_at:start_at + 50])
            time.sleep(0.02)
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:            # finish the handshake through the relay
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    sock.sendall(pending)
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        tls.write(b"split")
        sock.sendall(outgoing.read())
        while True:
            try:
                answer = tls.read(100)
                break
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
    assert answer == b"A:a.example.com:split"


# --- reload and config ----------------------------------------------------------------------------

def test_reload_adds_a_stream_and_keeps_the_unchanged_one(gateway, scripted):
    up = scripted(tagged(b"E:"))
    first, second = free_port(), free_port()
    cfg = stream_config([{"name": "one", "listen": f"127.0.0.1:{first}",
                          "address": f"127.0.0.1:{up.port}"}])
    proc = start(gateway, cfg)
    with connect(first) as kept:
        kept.sendall(b"before")
        assert kept.recv(100) == b"E:before"
        cfg["streams"].append({"name": "two", "listen": f"127.0.0.1:{second}",
                               "address": f"127.0.0.1:{up.port}"})
        reload(proc, cfg)
        wait_for_port(second, proc.proc)
        assert exchange(second, b"new") == b"E:new"
        kept.sendall(b"after")                        # the unchanged stream kept its connection
        assert kept.recv(100) == b"E:after"
    assert exchange(first, b"still") == b"E:still"
    del cfg["streams"][0]                             # removing a stream closes its listener
    reload(proc, cfg)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", first), timeout=0.2).close()
            return False
        except OSError:
            return True
    wait_until(refused, 10, "the removed stream still listens")
    assert exchange(second, b"left") == b"E:left"


def test_stream_config_errors_name_their_path():
    issues = config_issues({
        "gateway": {"listen": "127.0.0.1:8000"},
        "upstreams": [{"name": "pool", "targets": [{"target": "127.0.0.1:9000"}]}],
        "streams": [
            {"name": "a", "listen": "127.0.0.1:8000", "upstream": "nope"},
            {"name": "b", "listen": "0.0.0.0:7000", "address": "no-port"},
            {"name": "c", "listen": "127.0.0.1:7000", "upstream": "pool"},
            {"name": "d", "listen": "127.0.0.1:7001", "upstream": "pool",
             "address": "127.0.0.1:1"},
            {"name": "e", "listen": "127.0.0.1:7002", "tls_passthrough": [
                {"snis": ["x.example.com"], "address": "127.0.0.1:1"},
                {"snis": ["x.example.com", "a.*.com"], "upstream": "pool"}]},
        ]})
    assert any("unknown upstream 'nope'" in m for m in issues["streams[0].upstream"])
    assert any("already used by gateway.listen" in m for m in issues["streams[0].listen"])
    assert any("expected 'host:port'" in m for m in issues["streams[1].address"])
    assert any("already used by streams[1].listen" in m for m in issues["streams[2].listen"])
    assert any("exactly one of" in m for m in issues["streams[3]"])
    assert any("already routed by streams[4].tls_passthrough[0].snis[0]" in m
               for m in issues["streams[4].tls_passthrough[1].snis[0]"])
    assert "streams[4].tls_passthrough[1].snis[1]" in issues


def test_a_valid_stream_config_loads():
    from fastmesh.config import load_config_data
    config = load_config_data(stream_config(
        [{"name": "pg", "listen": "127.0.0.1:15432", "upstream": "pg", "connect_timeout": "2s",
          "idle_timeout": "1h"}],
        [{"name": "pg", "targets": [{"target": "10.0.0.5:5432"}]}]))
    stream, = config.streams
    assert (stream.connect_timeout, stream.idle_timeout) == (2.0, 3600.0)
    assert stream.destination.upstream == "pg"


def test_reload_changing_a_destination_keeps_the_listener_and_its_connections(gateway, scripted):
    old, new = scripted(tagged(b"O:")), scripted(tagged(b"N:"))
    port = free_port()
    cfg = stream_config([{"name": "moving", "listen": f"127.0.0.1:{port}",
                          "address": f"127.0.0.1:{old.port}"}])
    proc = start(gateway, cfg)
    with connect(port) as kept:
        kept.sendall(b"a")
        assert kept.recv(10) == b"O:a"
        cfg["streams"][0]["address"] = f"127.0.0.1:{new.port}"
        reload(proc, cfg)
        wait_until(lambda: exchange(port, b"b") == b"N:b", 10, "new connections never moved")
        kept.sendall(b"c")                            # the open one stays where it was
        assert kept.recv(10) == b"O:c"


def test_reload_with_a_busy_stream_port_is_refused(gateway, scripted):
    up = scripted(tagged(b"E:"))
    first, admin = free_port(), free_port()
    busy = socket.socket()                            # no SO_REUSEPORT: the gateway cannot share it
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cfg = stream_config([{"name": "one", "listen": f"127.0.0.1:{first}",
                              "address": f"127.0.0.1:{up.port}"}])
        proc = start(gateway, cfg, "--admin", f"127.0.0.1:{admin}")
        wait_for_port(admin, proc.proc)
        cfg["streams"].append({"name": "two", "listen": f"127.0.0.1:{busy.getsockname()[1]}",
                               "address": f"127.0.0.1:{up.port}"})
        proc.config_path.write_text(yaml.safe_dump(cfg))
        with RawClient(admin) as client:
            client.send(b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")
            answer = client.read_response()
        assert answer.status == 400, answer.body
        assert b"stream two: cannot listen" in answer.body, answer.body
        assert exchange(first, b"served") == b"E:served"   # the running config goes on
    finally:
        busy.close()


def test_a_busy_stream_port_stops_the_start_with_its_name(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    path = tmp_path / "busy.yaml"
    port = busy.getsockname()[1]
    path.write_text(yaml.safe_dump(stream_config([{"name": "taken", "listen": f"127.0.0.1:{port}",
                                                   "address": "127.0.0.1:9"}])))
    try:
        for workers in ("1", "2"):
            result = subprocess.run(
                fastmesh_cmd("run", "--config", str(path), "--listen", f"127.0.0.1:{free_port()}",
                             "--admin", "off", "--workers", workers),
                capture_output=True, text=True, timeout=60)
            assert result.returncode == 1, result.stdout
            assert f"stream taken: cannot listen on 127.0.0.1:{port}" in result.stderr, \
                result.stderr
    finally:
        busy.close()


def listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (/proc/net/tcp, state 0A)."""
    count = 0
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and local == f"0100007F:{port:04X}":
            count += 1
    return count


def test_each_worker_has_its_own_stream_listener(gateway, scripted):
    up = scripted(echo)
    port = free_port()
    start(gateway, stream_config([{"name": "multi", "listen": f"127.0.0.1:{port}",
                                   "address": f"127.0.0.1:{up.port}"}]), "--workers", "2")
    wait_until(lambda: listening_sockets(port) == 2, 10, "two workers, two SO_REUSEPORT sockets")
    for i in range(20):
        assert exchange(port, b"w%d" % i) == b"w%d" % i


def in_process(cfg: dict, scenario):
    """Run the StreamSet a worker runs, in this process on uvloop, with `cfg`: `scenario(streams)`
    is awaited with it started; it is stopped afterwards."""
    from fastmesh.config import load_config_data
    from fastmesh.streams import StreamSet
    config = load_config_data(cfg)

    async def main():
        streams = StreamSet(asyncio.get_running_loop())
        await streams.start(config)
        try:
            return await scenario(streams)
        finally:
            await streams.stop()
    return uvloop.run(main())


async def settled(streams) -> dict[str, dict]:
    """The snapshot rows by name once no connection is open or connecting (bounded wait)."""
    for _ in range(100):
        rows = {row["name"]: row for row in streams.snapshot()}
        if all(row["connections"] == 0 and row["connecting"] == 0 for row in rows.values()):
            return rows
        await asyncio.sleep(0.02)
    raise AssertionError(f"connections still open: {rows}")


def test_stream_counters_in_the_worker_snapshot(scripted):
    from fastmesh.streams import merge_snapshots
    up = scripted(echo)
    ok, down = free_port(), free_port()

    async def scenario(streams):
        assert await asyncio.to_thread(exchange, ok, b"x" * 1000) == b"x" * 1000
        assert await asyncio.to_thread(client_closed, down)
        return await settled(streams)

    rows = in_process(stream_config([
        {"name": "ok", "listen": f"127.0.0.1:{ok}", "address": f"127.0.0.1:{up.port}"},
        {"name": "down", "listen": f"127.0.0.1:{down}", "address": f"127.0.0.1:{free_port()}"}]),
        scenario)
    assert rows["ok"]["accepted"] == 1
    assert (rows["ok"]["bytes_in"], rows["ok"]["bytes_out"]) == (1000, 1000)
    assert rows["ok"]["connect_failures"] == 0
    assert rows["down"]["accepted"] == 1 and rows["down"]["connect_failures"] == 1
    merged = {row["name"]: row for row in merge_snapshots([{"streams": list(rows.values())}] * 2)}
    assert merged["ok"]["bytes_in"] == 2000 and merged["ok"]["workers"] == 2


def test_passive_health_ejects_a_target_that_refuses(scripted):
    live = scripted(tagged(b"L:"))
    port, dead = free_port(), free_port()

    async def scenario(streams):
        for i in range(8):
            assert await asyncio.to_thread(exchange, port, b"%d" % i) == b"L:%d" % i
        return await settled(streams)

    rows = in_process(stream_config(
        [{"name": "p", "listen": f"127.0.0.1:{port}", "upstream": "u"}],
        [{"name": "u", "targets": [{"target": f"127.0.0.1:{dead}"},
                                   {"target": f"127.0.0.1:{live.port}"}],
          "healthchecks": {"passive": {"unhealthy": {"failures": 1}, "ejection_time": "30s"}}}]),
        scenario)
    # one failed connect ejected the dead target: it was not tried again
    assert rows["p"]["connect_failures"] == 1
    health = {t["target"]: t for t in rows["p"]["upstreams"]["u"]}
    assert health[f"127.0.0.1:{dead}"]["passive"] == "ejected"
    assert health[f"127.0.0.1:{live.port}"]["healthy"]


def test_circuit_breaker_limits_open_connections(scripted):
    up = scripted(echo)
    port = free_port()

    async def scenario(streams):
        def held_and_refused() -> None:
            with connect(port) as first:
                first.sendall(b"one")
                assert first.recv(10) == b"one"          # open: the breaker's one connection
                assert client_closed(port)               # the second is closed at once
        await asyncio.to_thread(held_and_refused)
        await settled(streams)                           # the first one is over: room again
        assert await asyncio.to_thread(exchange, port, b"two") == b"two"
        return await settled(streams)

    rows = in_process(stream_config(
        [{"name": "cb", "listen": f"127.0.0.1:{port}", "upstream": "u"}],
        [{"name": "u", "targets": [{"target": f"127.0.0.1:{up.port}"}],
          "circuit_breaker": {"max_connections": 1}}]), scenario)
    assert rows["cb"]["no_target"] == 1 and rows["cb"]["accepted"] == 3


def test_consistent_hashing_keeps_a_client_ip_on_one_target(gateway, scripted):
    a, b = scripted(tagged(b"A:")), scripted(tagged(b"B:"))
    port = free_port()
    start(gateway, stream_config(
        [{"name": "sticky", "listen": f"127.0.0.1:{port}", "upstream": "pair"}],
        [{"name": "pair", "algorithm": "consistent-hashing",
          "targets": [{"target": f"127.0.0.1:{a.port}"}, {"target": f"127.0.0.1:{b.port}"}]}]))
    assert len({exchange(port, b"x")[:2] for _ in range(8)}) == 1
