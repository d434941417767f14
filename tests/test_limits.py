"""Per-connection and per-worker limits are enforced and answered properly."""
from __future__ import annotations

import socket
import time

from conftest import RawClient, config, get, read_request_head, service


def route_all(url: str, **limits) -> dict:
    return config(service("s", url, [{"name": "r", "paths": ["/"]}]), limits=limits)


def test_connection_closes_after_max_requests(echo, gateway):
    gw = gateway(route_all(echo.url, max_requests_per_connection=3))
    with RawClient(gw.port) as c:
        for i in range(3):
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = c.read_response()
            assert resp.status == 200
        assert resp.header("connection") == "close"
        assert c.is_closed()


def test_connections_over_the_limit_are_refused_with_503(echo, gateway):
    gw = gateway(route_all(echo.url, max_connections=2))
    held = [RawClient(gw.port), RawClient(gw.port)]
    try:
        time.sleep(0.2)
        with RawClient(gw.port) as extra:
            resp = extra.read_response()
            assert resp.status == 503
            assert "too many connections" in resp.json()["message"]
        # the held connections still work
        held[0].send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].read_response().status == 200
    finally:
        for c in held:
            c.close()
    time.sleep(0.2)
    assert get(gw.port).status == 200


def test_stalled_request_body_gets_408_not_a_gateway_timeout(echo, gateway):
    gw = gateway(route_all(echo.url, body_timeout="500ms"))
    with RawClient(gw.port) as c:
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        start = time.monotonic()
        resp = c.read_response()
        assert resp.status == 408
        assert time.monotonic() - start < 2
        assert c.is_closed()


def test_oversized_upstream_response_head_is_502(scripted, gateway):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 5000 + b"\r\n\r\n")
    up = scripted(handler)
    gw = gateway(route_all(up.url, max_response_head_size="4k"))
    resp = get(gw.port)
    assert resp.status == 502


def test_absolute_form_target_never_reaches_the_named_host(scripted, gateway):
    """Not an open proxy: the request goes to the route's service, whatever the target names."""
    seen = []

    def handler(conn, index):
        while True:
            head = read_request_head(conn)
            if not head:
                return
            seen.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    up = scripted(handler)
    gw = gateway(config(service("s", up.url, [{"name": "r", "hosts": ["api.example.com"]}])))
    with RawClient(gw.port) as c:
        c.send(b"GET http://evil.example.net/steal HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        assert c.read_response().status == 404
        c.send(b"GET http://api.example.com/ok?q=1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        assert c.read_response().status == 200
    assert len(seen) == 1
    assert seen[0].startswith(b"GET /ok?q=1 HTTP/1.1\r\n")


def test_body_size_limit_per_route_overrides_the_global_one(echo, gateway):
    gw = gateway(config(service("s", echo.url, [
        {"name": "small", "paths": ["/small"], "max_body_size": 10},
        {"name": "big", "paths": ["/big"]},
    ]), limits={"max_body_size": "1k"}))
    for path, size, status in (("/small", 11, 413), ("/small", 10, 200), ("/big", 500, 200), ("/big", 2000, 413)):
        with RawClient(gw.port) as c:
            c.send(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), size)
                   + b"a" * size)
            assert c.read_response().status == status, (path, size)
    # chunked bodies are counted as they stream
    with RawClient(gw.port) as c:
        c.send(b"POST /small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" + b"b" * 32
               + b"\r\n0\r\n\r\n")
        assert c.read_response().status == 413
