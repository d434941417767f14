"""Bytes reach each socket whole and in order, whether the proxy writes them to the socket itself
or, when the socket is full, leaves them to the transport's buffer (fastmesh/_core/proxy.pyx:
_send). A slow reader on either side forces the second way midway through a body; the next
request on the same connections goes the first way again."""
from __future__ import annotations

import hashlib
import random
import socket
import time

from conftest import RawClient, config, next_request_head, service

SIZE = 24 << 20         # far more than a loopback socket's buffers hold


def pattern(seed: int, size: int = SIZE) -> bytes:
    """Bytes that differ everywhere: a reordered or repeated slice changes the digest."""
    return random.Random(seed).randbytes(size)


def route_all(url: str) -> dict:
    return config(service("s", url, [{"name": "r", "paths": ["/"]}]))


def read_exactly(sock: socket.socket, n: int, into: bytearray, slowly: bool = False) -> None:
    """`slowly`: small reads with pauses, so the writer's socket fills and drains many times
    (each time, part of a write is left to the transport while more bytes keep coming)."""
    deadline = time.monotonic() + 60
    reads = 0
    while n > 0 and time.monotonic() < deadline:
        data = sock.recv(min(n, 16384 if slowly else 1 << 20))
        if not data:
            raise AssertionError(f"connection closed with {n} bytes still expected")
        into += data
        n -= len(data)
        reads += 1
        if slowly and reads % 2 == 0:
            time.sleep(0.0002)
    assert n == 0, "body not received in time"


def test_response_body_to_a_slow_client_arrives_whole_and_in_order(scripted, gateway):
    body = pattern(1)

    def handler(conn, index):
        buf = b""
        for reply in (body, b"second"):
            got = next_request_head(conn, buf)
            if got is None:
                return
            buf = got[1]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(reply))
            for i in range(0, len(reply), 1 << 20):
                conn.sendall(reply[i:i + (1 << 20)])

    up = scripted(handler)
    gw = gateway(route_all(up.url))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.0)             # read nothing: the gateway's socket fills, bytes queue
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            assert data, "closed before the response head"
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"content-length: %d" % SIZE in head.lower()
        received = bytearray(rest)
        read_exactly(sock, SIZE - len(rest), received, slowly=True)
        assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()
        # The same client and upstream connections: written straight to the sockets again.
        sock.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
        tail = bytearray()
        deadline = time.monotonic() + 10
        while not tail.endswith(b"second") and time.monotonic() < deadline:
            data = sock.recv(65536)
            assert data, "closed before the second response"
            tail += data
        assert tail.startswith(b"HTTP/1.1 200") and tail.endswith(b"\r\n\r\nsecond"), bytes(tail)
    assert up.connections == 1


def test_request_body_to_a_slow_upstream_arrives_whole_and_in_order(scripted, gateway):
    body = pattern(2)
    digests = []

    def handler(conn, index):
        buf = b""
        while True:
            got = next_request_head(conn, buf)
            if got is None:
                return
            head, rest = got
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length > 1000:
                time.sleep(1.0)     # read nothing: the gateway's socket fills, bytes queue
            received = bytearray(rest[:length])
            read_exactly(conn, length - len(received), received, slowly=length > 1000)
            buf = rest[length:]
            digests.append(hashlib.sha256(received).hexdigest())
            answer = digests[-1].encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))

    up = scripted(handler)
    gw = gateway(route_all(up.url))
    with RawClient(gw.port, timeout=30) as client:
        client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % SIZE)
        client.send(body)
        first = client.read_response()
        assert first.status == 200, first.body
        assert first.body == hashlib.sha256(body).hexdigest().encode()
        client.send(b"POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        second = client.read_response()
        assert second.status == 200
        assert second.body == hashlib.sha256(b"hello").hexdigest().encode()
    assert up.connections == 1


def test_pipelined_responses_to_a_slow_client_keep_their_order(scripted, gateway):
    """Each response ends while the client still has the last one's tail to read, and the
    next (pipelined) request is answered at once: its head must not pass that tail."""
    count, size = 40, 300_000
    bodies = [pattern(10 + i, size) for i in range(count)]

    def handler(conn, index):
        buf = b""
        for body in bodies:
            got = next_request_head(conn, buf)
            if got is None:
                return
            buf = got[1]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)

    up = scripted(handler)
    gw = gateway(route_all(up.url))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        sock.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count)))
        stream = bytearray()
        for i, body in enumerate(bodies):
            while b"\r\n\r\n" not in stream:
                data = sock.recv(16384)
                assert data, f"closed before response {i}"
                stream += data
            head, _, rest = bytes(stream).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK"), (i, head[:80])
            received = bytearray(rest)
            if len(received) < size:
                read_exactly(sock, size - len(received), received, slowly=True)
            assert received[:size] == body, f"response {i}: body bytes out of order"
            stream = received[size:]
    assert up.connections == 1
