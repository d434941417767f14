"""Bodies stream through in both directions: chunked, 100-continue, upgrades, huge bodies."""
from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time

import pytest

from conftest import RawClient, config, read_request_head, service

GiB = 1 << 30


def route_all(url: str, **svc) -> dict:
    return config(service("s", url, [{"name": "r", "paths": ["/"]}], **svc))


def test_chunked_request_body_reaches_the_upstream_intact(echo, gateway):
    gw = gateway(route_all(echo.url))
    with RawClient(gw.port) as c:
        c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n")
        time.sleep(0.05)
        c.send(b"6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n")
        body = c.read_response().json()
        assert body["body"] == "hello world"
        # and the connection stays usable
        c.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().json()["path"] == "/next"


def test_chunked_response_with_trailers_is_relayed(scripted, gateway):
    def handler(conn, index):
        while read_request_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                         b"3\r\nabc\r\n")
            time.sleep(0.02)
            conn.sendall(b"4\r\ndefg\r\n0\r\nX-Sum: 7\r\n\r\n")
    up = scripted(handler)
    gw = gateway(route_all(up.url))
    with RawClient(gw.port) as c:
        for _ in range(3):
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = c.read_response()
            assert resp.header("transfer-encoding") == "chunked"
            assert resp.body == b"abcdefg"
    assert up.connections == 1


def test_response_without_framing_is_relayed_until_close(scripted, gateway):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nstream until close")
    up = scripted(handler)
    gw = gateway(route_all(up.url))
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.body == b"stream until close"
        assert resp.header("connection") == "close"


def test_expect_100_continue_gets_interim_response_before_body(echo, gateway):
    gw = gateway(route_all(echo.url))
    with RawClient(gw.port) as c:
        c.send(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = c.read_response()
        assert interim.status == 100
        c.send(b"data")
        final = c.read_response()
        assert final.status == 200 and final.json()["body"] == "data"


def test_websocket_upgrade_is_tunneled_both_ways(gateway):
    pytest.importorskip("websockets")
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    # The WebSocket upstream runs in its own thread with its own loop.
    ready = threading.Event()
    state = {}
    stop = threading.Event()

    def run_server():
        async def main():
            async def echo_ws(ws):
                async for message in ws:
                    await ws.send(f"echo:{message}")
            async with serve(echo_ws, "127.0.0.1", 0) as server:
                state["port"] = list(server.sockets)[0].getsockname()[1]
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)
        asyncio.run(main())

    t = threading.Thread(target=run_server, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        gw = gateway(route_all(f"http://127.0.0.1:{state['port']}"))

        async def client():
            async with connect(f"ws://127.0.0.1:{gw.port}/ws", open_timeout=5) as ws:
                replies = []
                for i in range(3):
                    await ws.send(f"m{i}")
                    replies.append(await asyncio.wait_for(ws.recv(), 5))
                return replies

        assert asyncio.run(client()) == ["echo:m0", "echo:m1", "echo:m2"]
    finally:
        stop.set()
        t.join(timeout=5)


# -- large bodies and memory ------------------------------------------------------------

def _send_upload(port: int, size: int) -> bytes:
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            sock.sendall(chunk[:n])
            sent += n
        sock.settimeout(120)
        buf = b""
        while b"}" not in buf:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
        return buf


@pytest.mark.slow
def test_one_gib_upload_streams_with_flat_memory(echo, gateway):
    gw = gateway(route_all(echo.url))
    before = gw.rss_kb()
    reply = _send_upload(gw.port, GiB)
    assert b'"body_size":1073741824' in reply
    expected = hashlib.sha256(b"x" * (1 << 20))
    for _ in range(1023):
        expected.update(b"x" * (1 << 20))
    assert expected.hexdigest().encode() in reply
    grown_mb = (gw.rss_kb("VmHWM") - before) / 1024
    assert grown_mb < 20, f"gateway RSS grew by {grown_mb:.1f} MB"


@pytest.mark.slow
def test_one_gib_download_streams_with_flat_memory(scripted, gateway):
    chunk = b"y" * (1 << 20)

    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {GiB}\r\n\r\n".encode())
        for _ in range(GiB // len(chunk)):
            conn.sendall(chunk)

    up = scripted(handler)
    gw = gateway(route_all(up.url))
    before = gw.rss_kb()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        received = len(rest)
        buf = bytearray(1 << 20)
        while received < GiB:
            n = sock.recv_into(buf)
            if not n:
                break
            received += n
    assert received == GiB
    grown_mb = (gw.rss_kb("VmHWM") - before) / 1024
    assert grown_mb < 20, f"gateway RSS grew by {grown_mb:.1f} MB"


def test_slow_client_pauses_the_upstream_instead_of_buffering(scripted, gateway):
    """A client that does not read: the gateway must not swallow the whole response."""
    size = 256 << 20
    sent = {"n": 0}
    chunk = b"z" * (1 << 20)

    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        conn.settimeout(3)
        try:
            while sent["n"] < size:
                conn.sendall(chunk)
                sent["n"] += len(chunk)
        except OSError:
            pass

    up = scripted(handler)
    gw = gateway(route_all(up.url))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(4)   # do not read
        assert sent["n"] < 64 << 20, f"upstream pushed {sent['n'] >> 20} MB into a client that reads nothing"
        assert gw.rss_kb() < 120 * 1024
