"""The gateway forwards requests correctly: routing, path rewriting, headers, keep-alive."""
from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from conftest import (
    ROOT, Proc, RawClient, config, free_port, get, read_request_head, service, stop_process,
)


def echoed(resp):
    assert resp.status == 200, (resp.status, resp.body)
    return resp.json()


def headers_of(description) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in description["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_embedded_default_routes_every_path_to_the_echo_upstream():
    port = free_port()
    proc = Proc(["run", "--listen", f"127.0.0.1:{port}"], port)
    try:
        resp = requests.get(f"{proc.url}/hello?name=fastmesh", timeout=5)
        assert resp.status_code == 200
        body = resp.json()
        assert body["path"] == "/hello"
        assert body["query"] == "name=fastmesh"
        assert "gateway;dur=" in resp.headers["Server-Timing"]
    finally:
        out = proc.stop()
    assert "curl" in out


def test_version_flag_prints_version():
    out = subprocess.run([sys.executable, "-m", "fastmesh", "--version"], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0
    assert out.stdout.startswith("fastmesh ")


def test_workers_must_be_a_positive_count():
    # Running with N workers is covered in test_supervisor.py.
    for bad in ("0", "-1", "two"):
        out = subprocess.run([sys.executable, "-m", "fastmesh", "run", "--workers", bad],
                             capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert out.returncode == 2
        assert "--workers" in out.stderr


def test_strip_path_joins_service_path_with_one_slash_and_keeps_query(echo, gateway):
    gw = gateway(config(service("orders", f"{echo.url}/api", [
        {"name": "orders", "paths": ["/orders"], "strip_path": True},
        {"name": "keep", "paths": ["/keep"], "strip_path": False},
    ])))
    assert echoed(get(gw.port, "/orders/1?x=1&y=2"))["target"] == "/api/1?x=1&y=2"
    assert echoed(get(gw.port, "/orders"))["target"] == "/api"
    assert echoed(get(gw.port, "/orders/"))["target"] == "/api/"
    assert echoed(get(gw.port, "/keep/a"))["target"] == "/api/keep/a"


def test_route_without_service_path_keeps_leading_slash(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/v1"]}])))
    assert echoed(get(gw.port, "/v1"))["target"] == "/"
    assert echoed(get(gw.port, "/v1/x?q"))["target"] == "/x?q"


def test_routing_prefers_exact_path_then_longest_prefix_then_regex(echo, gateway):
    gw = gateway(config(
        service("exact", f"{echo.url}/exact", [{"name": "e", "paths": ["=/items/special"], "strip_path": False}]),
        service("prefix", f"{echo.url}/prefix", [{"name": "p", "paths": ["/items"], "strip_path": False}]),
        service("longer", f"{echo.url}/longer", [{"name": "l", "paths": ["/items/long"], "strip_path": False}]),
        service("regex", f"{echo.url}/regex", [{"name": "x", "paths": ["~/items/\\d+$"], "strip_path": False}]),
        service("host", f"{echo.url}/host", [{"name": "h", "hosts": ["api.example.com"], "paths": ["/items"],
                                              "strip_path": False}]),
    ))
    assert echoed(get(gw.port, "/items/special"))["path"].startswith("/exact/")
    assert echoed(get(gw.port, "/items/long/1"))["path"].startswith("/longer/")
    assert echoed(get(gw.port, "/items/7"))["path"].startswith("/prefix/")   # prefix beats regex
    assert echoed(get(gw.port, "/items", host="api.example.com"))["path"].startswith("/host/")
    assert get(gw.port, "/nothing").status == 404


def test_methods_and_headers_filter_routes(echo, gateway):
    gw = gateway(config(
        service("writes", f"{echo.url}/w", [{"name": "w", "paths": ["/r"], "methods": ["POST"]}]),
        service("v2", f"{echo.url}/v2", [{"name": "v2", "paths": ["/r"], "headers": {"x-version": ["2"]}}]),
        service("any", f"{echo.url}/any", [{"name": "a", "paths": ["/r"]}]),
    ))
    assert echoed(get(gw.port, "/r", method="GET"))["path"] == "/any"
    assert echoed(get(gw.port, "/r", headers={"X-Version": "2"}))["path"] == "/v2"
    with RawClient(gw.port) as c:
        c.send(b"POST /r HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        body = echoed(c.read_response())
        assert body["path"] == "/w" and body["body"] == "hi"


def test_wildcard_host_routes(echo, gateway):
    gw = gateway(config(
        service("wild", f"{echo.url}/wild", [{"name": "w", "hosts": ["*.orders.internal"]}]),
        service("exact", f"{echo.url}/exact", [{"name": "e", "hosts": ["a.orders.internal"]}]),
    ))
    assert echoed(get(gw.port, "/x", host="b.orders.internal"))["path"] == "/wild/x"
    assert echoed(get(gw.port, "/", host="A.Orders.Internal:8000"))["path"] == "/exact/"
    assert get(gw.port, "/", host="orders.internal").status == 404


def test_forwarded_headers_are_added_and_hop_by_hop_headers_removed(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}])))
    resp = get(gw.port, "/h", host="api.example.com:8080", headers={
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "must not pass",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Connection": "keep-alive",
        "X-Forwarded-For": "203.0.113.9",
        "Via": "1.0 edge",
        "X-End-To-End": "kept",
    })
    h = headers_of(echoed(resp))
    for hop in ("connection", "x-secret-hop", "keep-alive", "te", "proxy-connection"):
        assert hop not in h, hop
    assert h["x-end-to-end"] == ["kept"]
    assert h["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == ["api.example.com:8080"]
    assert h["x-forwarded-port"] == [str(gw.port)]
    assert h["via"] == ["1.0 edge, 1.1 fastmesh"]
    assert h["host"] == [f"127.0.0.1:{echo.port}"]
    assert "fastmesh" in resp.header("via")


def test_preserve_host_sends_the_client_host(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"], "preserve_host": True}])))
    h = headers_of(echoed(get(gw.port, "/", host="api.example.com")))
    assert h["host"] == ["api.example.com"]


def test_keepalive_reuses_one_upstream_connection(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}])))
    remotes = set()
    with RawClient(gw.port) as c:
        for i in range(20):
            c.send(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            remotes.add(echoed(c.read_response())["remote"])
    assert len(remotes) == 1
    # a second client connection reuses the pooled upstream connection too
    remotes.add(echoed(get(gw.port, "/again"))["remote"])
    assert len(remotes) == 1


def test_pipelined_requests_are_answered_in_order(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}])))
    with RawClient(gw.port) as c:
        c.send(b"".join(
            f"POST /p{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{i}".encode() for i in range(5))
            + b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
        for i in range(5):
            body = echoed(c.read_response())
            assert (body["path"], body["body"]) == (f"/p{i}", str(i))
        assert echoed(c.read_response())["path"] == "/last"


def test_http10_client_gets_connection_close_by_default(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}])))
    with RawClient(gw.port) as c:
        c.send(b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
        assert c.is_closed()


def test_http10_client_gets_a_chunked_upstream_response_decoded(scripted, gateway):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    up = scripted(handler)
    gw = gateway(config(service("s", up.url, [{"name": "r", "paths": ["/"]}])))
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.header("transfer-encoding") is None
        assert resp.body == b"hello world"


def test_server_timing_is_off_by_default_and_on_per_service(echo, gateway):
    gw = gateway(config(
        service("quiet", echo.url, [{"name": "q", "paths": ["/q"]}]),
        service("timed", echo.url, [{"name": "t", "paths": ["/t"]}], server_timing=True),
    ))
    assert get(gw.port, "/q").header("server-timing") is None
    timing = get(gw.port, "/t").header("server-timing")
    assert timing.startswith("gateway;dur=") and ", upstream;dur=" in timing


def test_head_response_keeps_content_length_without_a_body(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}])))
    with RawClient(gw.port) as c:
        c.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_response(head_request=True)
        assert resp.status == 200
        assert int(resp.header("content-length")) > 0
        # the connection is still in sync: the next request works
        c.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        assert echoed(c.read_response())["path"] == "/next"


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_relay_without_body(scripted, gateway, status):
    def handler(conn, index):
        while read_request_head(conn):
            conn.sendall(f"HTTP/1.1 {status} X\r\nETag: \"1\"\r\n\r\n".encode())
    up = scripted(handler)
    gw = gateway(config(service("s", up.url, [{"name": "r", "paths": ["/"]}])))
    with RawClient(gw.port) as c:
        for _ in range(3):
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = c.read_response()
            assert resp.status == status and resp.body == b""
            assert resp.header("etag") == '"1"'
    assert up.connections == 1
