"""The plugin contract on the data path: access phases that wait (awaitables), held requests."""
from __future__ import annotations

import json
import socket
import time

from conftest import RawClient, config, get, service


def later_gateway(echo, gateway):
    return gateway(config(service("s", echo.url, [
        {"name": "slow", "paths": ["/slow"], "plugins": [{"name": "later", "module": "tests.plugins_example"}]},
        {"name": "plain", "paths": ["/plain"]},
    ])))


def test_waiting_access_phase_admits_and_the_body_arrives_whole(echo, gateway):
    gw = later_gateway(echo, gateway)
    body = b"x" * 5000
    with RawClient(gw.port) as c:
        c.send(b"POST /slow HTTP/1.1\r\nHost: a\r\nX-Wait: 0.2\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        resp = c.read_response()
        seen = resp.json()
        assert resp.status == 200
        assert ["X-Later", "waited"] in seen["headers"]
        assert seen["body_size"] == len(body)
        # the connection is still usable afterwards
        c.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        assert c.read_response().status == 200


def test_waiting_access_phase_can_deny_and_pipelined_requests_keep_their_order(echo, gateway):
    gw = later_gateway(echo, gateway)
    with RawClient(gw.port) as c:
        c.send(b"GET /slow?n=1 HTTP/1.1\r\nHost: a\r\nX-Wait: 0.1\r\nX-Deny: 1\r\n\r\n"
               b"GET /slow?n=2 HTTP/1.1\r\nHost: a\r\nX-Wait: 0.05\r\n\r\n"
               b"GET /plain?n=3 HTTP/1.1\r\nHost: a\r\n\r\n")
        first, second, third = c.read_response(), c.read_response(), c.read_response()
    assert first.status == 403 and first.json() == {"message": "denied later"}
    assert second.status == 200 and second.json()["query"] == "n=2"
    assert third.status == 200 and third.json()["query"] == "n=3"


def test_a_failing_awaitable_answers_500_and_names_the_plugin(echo, gateway):
    gw = later_gateway(echo, gateway)
    resp = get(gw.port, "/slow", headers={"X-Wait": "0.01", "X-Boom": "1"})
    assert resp.status == 500 and resp.json()["plugin"] == "later"
    assert get(gw.port, "/slow", headers={"X-Wait": "0.01"}).status == 200
    assert "plugin 'later' failed in its access phase" in gw.stop()


def test_a_waiting_request_does_not_hold_up_other_connections(echo, gateway):
    gw = later_gateway(echo, gateway)
    slow = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Wait: 1.5\r\n\r\n")
        time.sleep(0.05)
        assert get(gw.port, "/plain").status == 200      # answered while the other one waits
        slow.setblocking(False)
        try:
            early = slow.recv(100)
        except BlockingIOError:
            early = b""
        assert early == b""                               # the slow one is still waiting
        slow.settimeout(5)
        slow.setblocking(True)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = slow.recv(65536)
            assert chunk, "closed before answering"
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")
    finally:
        slow.close()


def test_client_gone_while_waiting_leaves_the_gateway_healthy(echo, gateway):
    gw = later_gateway(echo, gateway)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Wait: 0.2\r\n\r\n")
        s.close()
    time.sleep(0.4)
    resp = get(gw.port, "/slow", headers={"X-Wait": "0"})
    assert resp.status == 200 and ["X-Later", "waited"] in json.loads(resp.body)["headers"]
    assert "Traceback" not in gw.stop()


def test_a_plugin_registered_by_an_entry_point_is_found_by_name(echo, gateway, tmp_path, monkeypatch):
    """An installed distribution's `fastmesh.plugins` entry point: no `module:` in the config."""
    (tmp_path / "shout_plugin.py").write_text(
        "from fastmesh.plugins import Plugin\n\n"
        "class Shout(Plugin):\n"
        "    name = 'shout'\n"
        "    priority = 7\n\n"
        "    def access(self, request):\n"
        "        request.set_header('X-Shout', 'HEY')\n")
    dist = tmp_path / "fastmesh_shout-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fastmesh-shout\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fastmesh.plugins]\nshout = shout_plugin:Shout\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"], "plugins": [{"name": "shout"}]}])))
    resp = get(gw.port, "/")
    assert resp.status == 200 and ["X-Shout", "HEY"] in resp.json()["headers"]


def test_a_global_rewrite_phase_runs_before_routing(echo, gateway):
    gw = gateway(config(service("s", echo.url, [
        {"name": "new", "paths": ["/new"], "strip_path": False},
        {"name": "scoped", "paths": ["/scoped"], "strip_path": False,
         "plugins": [{"name": "rewriter", "module": "tests.plugins_example", "enabled": False}]},
    ])) | {"plugins": [{"name": "rewriter", "module": "tests.plugins_example"}]})
    resp = get(gw.port, "/old/thing?x=1")
    assert resp.status == 200
    seen = resp.json()
    assert seen["path"] == "/new/thing" and seen["query"] == "x=1"
    assert ["X-Rewritten", "1"] in seen["headers"] and ["X-Seen-Path", "/new/thing"] in seen["headers"]
    assert get(gw.port, "/old/x", headers={"X-Teapot": "1"}).status == 418
    assert get(gw.port, "/nowhere").status == 404
    # rewrite is global-only; a route that disables the plugin still had its path rewritten
    # before routing, but its own access phase does not run there
    scoped = get(gw.port, "/scoped/a").json()
    assert not any(k == "X-Seen-Path" for k, _ in scoped["headers"])


def test_a_route_scoped_plugin_has_no_rewrite_phase(echo, gateway):
    gw = gateway(config(service("s", echo.url, [
        {"name": "new", "paths": ["/new"], "strip_path": False},
        {"name": "old", "paths": ["/old"], "strip_path": False,
         "plugins": [{"name": "rewriter", "module": "tests.plugins_example"}]},
    ])))
    seen = get(gw.port, "/old/thing").json()
    assert seen["path"] == "/old/thing"
    assert ["X-Seen-Path", "/old/thing"] in seen["headers"]


def body_gateway(echo, gateway):
    return gateway(config(service("s", echo.url, [
        {"name": "b", "paths": ["/b"], "plugins": [{"name": "body-check", "module": "tests.plugins_example"}]},
    ])))


def test_a_plugin_that_reads_bodies_sees_the_whole_body_and_upstream_gets_it_too(echo, gateway):
    gw = body_gateway(echo, gateway)
    with RawClient(gw.port) as c:
        # the body in three pieces after the head
        c.send(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 300\r\n\r\n" + b"a" * 100)
        time.sleep(0.05)
        c.send(b"b" * 100)
        time.sleep(0.05)
        c.send(b"c" * 100)
        resp = c.read_response()
        assert resp.status == 200
        seen = resp.json()
        assert ["X-Body-Len", "300"] in seen["headers"] and seen["body_size"] == 300
        assert seen["body"] == "a" * 100 + "b" * 100 + "c" * 100
        # chunked, then a pipelined GET behind it
        c.send(b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        chunked, plain = c.read_response(), c.read_response()
        assert ["X-Body-Len", "11"] in chunked.json()["headers"] and chunked.json()["body"] == "hello world"
        assert plain.status == 200 and not any(k == "X-Body-Len" for k, _ in plain.json()["headers"])


def test_a_body_reading_plugin_can_refuse_and_the_limit_holds(echo, gateway):
    gw = body_gateway(echo, gateway)
    with RawClient(gw.port) as c:
        c.send(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 15\r\n\r\nthis forbidden!")
        resp = c.read_response()
    assert resp.status == 403 and resp.json() == {"message": "forbidden body"}
    with RawClient(gw.port) as c:
        c.send(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n")
        assert c.read_response().status == 413
    with RawClient(gw.port) as c:
        c.send(b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
        assert c.read_response().status == 413


def test_a_body_reading_plugin_answers_expect_100_continue(echo, gateway):
    gw = body_gateway(echo, gateway)
    with RawClient(gw.port) as c:
        c.send(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = c.read_response()
        assert interim.status == 100
        c.send(b"data")
        final = c.read_response()
        while final.status == 100:           # the upstream may send its own 100 too
            final = c.read_response()
        assert final.status == 200 and final.json()["body"] == "data"


def test_a_request_is_routed_again_once_only(echo, gateway):
    gw = gateway(config(service("s", echo.url, [
        {"name": "again", "paths": ["/again"], "plugins": [{"name": "again", "module": "tests.plugins_example"}]},
        {"name": "plain", "paths": ["/plain"]},
    ])))
    with RawClient(gw.port) as c:
        # at once, and from a waiting access phase (a held request), with a request after it
        c.send(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n"
               b"GET /again HTTP/1.1\r\nHost: a\r\nX-Wait: 0.05\r\n\r\n"
               b"GET /plain?n=3 HTTP/1.1\r\nHost: a\r\n\r\n")
        first, second, third = c.read_response(), c.read_response(), c.read_response()
    for resp in (first, second):
        assert resp.status == 508
        assert resp.json() == {"message": "the request was routed again more than once"}
    assert third.status == 200 and third.json()["query"] == "n=3"

