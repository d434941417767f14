"""Upstream failures get a short JSON answer with the right status, never a hang."""
from __future__ import annotations

import socket
import time

import pytest

from conftest import RawClient, config, free_port, get, read_request_head, service


def route_all(url: str, **svc) -> dict:
    return config(service("s", url, [{"name": "r", "paths": ["/"]}], **svc))


def assert_json_error(resp, status: int, words: str):
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("content-type") == "application/json"
    assert words in resp.json()["message"]


def test_unknown_route_is_404_json_and_keeps_the_connection(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/only"]}])))
    with RawClient(gw.port) as c:
        c.send(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_json_error(c.read_response(), 404, "no route")
        c.send(b"GET /only HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200


def test_unknown_route_with_a_body_closes_after_404(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/only"]}])))
    with RawClient(gw.port) as c:
        c.send(b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert_json_error(c.read_response(), 404, "no route")
        assert c.is_closed()


def test_refused_connection_is_502(gateway):
    gw = gateway(route_all(f"http://127.0.0.1:{free_port()}"))
    assert_json_error(get(gw.port), 502, "refused")


def test_invalid_upstream_response_is_502(scripted, gateway):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 2OO OK\r\n\r\n")
    up = scripted(handler)
    gw = gateway(route_all(up.url))
    assert_json_error(get(gw.port), 502, "invalid response")


def test_upstream_closing_before_responding_is_502(scripted, gateway):
    def handler(conn, index):
        read_request_head(conn)
    up = scripted(handler)
    gw = gateway(route_all(up.url))
    assert_json_error(get(gw.port), 502, "closed the connection")


def test_read_timeout_is_504(scripted, gateway):
    def handler(conn, index):
        read_request_head(conn)
        time.sleep(3)
    up = scripted(handler)
    gw = gateway(route_all(up.url, read_timeout="300ms", retries=0))
    start = time.monotonic()
    resp = get(gw.port)
    assert_json_error(resp, 504, "timed out")
    assert time.monotonic() - start < 2.0


@pytest.fixture
def unaccepting_listener():
    """A loopback listener whose accept queue is full: new connects hang in SYN."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(srv.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.2)
    yield srv.getsockname()[1]
    for s in fillers:
        s.close()
    srv.close()


def test_connect_timeout_is_504_when_the_upstream_never_accepts(gateway, unaccepting_listener):
    gw = gateway(route_all(f"http://127.0.0.1:{unaccepting_listener}", connect_timeout="300ms",
                           retries=0))
    start = time.monotonic()
    assert_json_error(get(gw.port), 504, "connect timed out")
    assert time.monotonic() - start < 2.0


def test_upstream_dying_mid_response_closes_the_client_connection(scripted, gateway):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    up = scripted(handler)
    gw = gateway(route_all(up.url))
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionError):
            c.read_response()


def test_stale_pooled_connection_is_retried_transparently(scripted, gateway):
    """The upstream closes an idle keep-alive connection; the next request must not see a 502."""
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(0.2)   # then close without saying so (keep-alive race)
    up = scripted(handler)
    gw = gateway(route_all(up.url))
    assert get(gw.port).status == 200
    time.sleep(0.5)
    for _ in range(3):
        assert get(gw.port).status == 200
        time.sleep(0.4)


def test_gateway_survives_bad_upstreams_and_keeps_serving(scripted, echo, gateway):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"\x00\x01garbage\r\n\r\n")
    up = scripted(handler)
    gw = gateway(config(
        service("bad", up.url, [{"name": "bad", "paths": ["/bad"]}]),
        service("good", echo.url, [{"name": "good", "paths": ["/good"]}]),
    ))
    for _ in range(5):
        assert get(gw.port, "/bad").status == 502
    assert get(gw.port, "/good").status == 200
