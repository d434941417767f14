"""Traffic plugins: ip-restriction, request-size-limiting, correlation-id, request-transformer query args.

Real gateway and echo processes on loopback. Client addresses other than 127.0.0.1 come from
binding the client socket to another 127/8 address (all of it is loopback on Linux), from ::1 to a
gateway listening on [::1], and from X-Forwarded-For through a trusted proxy.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import time

import pytest
from hypothesis import given, settings, strategies as st

from conftest import (ROOT, START_TIMEOUT, RawClient, config, fastmesh_cmd, free_port, get,
                      read_request_head, service, stop_process)
from conftest import config_issues as issues_of, echoed, upstream_headers as up_headers
from fastmesh.plugins.ip_restriction import PrefixSet, address, network
from fastmesh.plugins.transformers import transform_query


def svc(url, routes, **extra):
    return service("s", url, routes, **extra)


def route(name, path, *plugins, **extra):
    return {"name": name, "paths": [path], "plugins": list(plugins), **extra}


class Client(RawClient):
    """RawClient from a chosen source address, or over IPv6."""

    def __init__(self, port: int, source: str = "127.0.0.1", host: str = "127.0.0.1",
                 timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0))
        self.sock.settimeout(timeout)
        self.buf = b""


def request(port, path="/", source="127.0.0.1", host="127.0.0.1", headers=(), method="GET",
            body: bytes = b""):
    """One request; `headers` a list of (name, value) so a header may repeat."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    with Client(port, source, host) as c:
        c.send(f"{method} {path} HTTP/1.1\r\nHost: example.com\r\n{extra}\r\n".encode() + body)
        return c.read_response()


@pytest.fixture
def ipv6_gateway(tmp_path):
    """Factory: a gateway listening on [::1] (the `gateway` fixture listens on 127.0.0.1)."""
    import subprocess
    import yaml
    started: list[subprocess.Popen] = []

    def start(cfg: dict) -> int:
        path = tmp_path / f"v6-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        port = free_port()
        proc = subprocess.Popen(fastmesh_cmd("run", "--config", str(path), "--listen", f"[::1]:{port}"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with socket.create_connection(("::1", port), timeout=0.2):
                    return port
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"nothing listening on [::1]:{port}")

    yield start
    for proc in started:
        stop_process(proc)


# --- ip-restriction: the prefix structure -----------------------------------------------------

def _naive(nets: list[str], addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for text in nets:
        net = ipaddress.ip_network(text, strict=False)
        if net.version == 6 and net.prefixlen >= 96 and \
                int(net.network_address) >> 32 == 0xFFFF:     # ::ffff:a.b.c.d/n -> IPv4
            net = ipaddress.ip_network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        if net.version == ip.version and ip in net:
            return True
    return False


v4_addr = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
v6_addr = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
mapped = st.integers(0, 2**32 - 1).map(lambda n: f"::ffff:{ipaddress.IPv4Address(n)}")
v4_net = st.tuples(v4_addr, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
v6_net = st.tuples(v6_addr, st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}")
mapped_net = st.tuples(mapped, st.integers(96, 128)).map(lambda t: f"{t[0]}/{t[1]}")


@settings(max_examples=300, deadline=None)
@given(nets=st.lists(st.one_of(v4_net, v6_net, mapped_net, v4_addr, v6_addr), max_size=12),
       probes=st.lists(st.one_of(v4_addr, v6_addr, mapped), min_size=1, max_size=10),
       near=st.integers(0, 2**32 - 1))
def test_prefix_set_agrees_with_a_naive_scan(nets, probes, near):
    compiled = PrefixSet(network(n) for n in nets)
    # probes inside or at the edges of the configured networks, not only random ones
    for text in nets:
        net = ipaddress.ip_network(text, strict=False)
        probes += [str(net.network_address), str(net.broadcast_address),
                   str(net.network_address + near % net.num_addresses)]
        if int(net.network_address) > 0:
            probes.append(str(net.network_address - 1))
        if int(net.broadcast_address) < 2 ** net.max_prefixlen - 1:
            probes.append(str(net.broadcast_address + 1))
    for probe in probes:
        assert (address(probe) in compiled) == _naive(nets, probe), (nets, probe)


def test_prefix_set_merges_overlapping_and_adjacent_networks():
    compiled = PrefixSet(network(n) for n in
                         ["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "1.2.3.4", "1.2.3.6/31",
                          "2001:db8::/32", "::ffff:192.0.2.0/120"])
    ip = lambda text: int(ipaddress.ip_address(text))                         # noqa: E731
    assert compiled.ranges(4) == [(ip("1.2.3.4"), ip("1.2.3.4")), (ip("1.2.3.6"), ip("1.2.3.7")),
                                  (ip("10.0.0.0"), ip("11.255.255.255")),
                                  (ip("192.0.2.0"), ip("192.0.2.255"))]
    assert compiled.ranges(6) == [(ip("2001:db8::"), ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"))]
    assert PrefixSet([]).empty and not compiled.empty


def test_addresses_as_received_parse():
    assert address(b"1.2.3.4") == (4, 0x01020304)
    assert address(b"::ffff:1.2.3.4") == (4, 0x01020304)
    assert address("[::1]:443") == (6, 1)
    assert address(" 1.2.3.4:8080 ") == (4, 0x01020304)
    assert address("fe80::1%eth0") == (6, (0xFE80 << 112) | 1)
    for bad in (b"unknown", b"1.2.3", b"", b"::g", "[::1", b"\xff"):
        assert address(bad) is None, bad


# --- ip-restriction: end to end ---------------------------------------------------------------

def test_ip_allow_and_deny_ipv4_cidrs_deny_wins(echo, gateway):
    gw = gateway(config(svc(echo.url, [
        route("a", "/a", {"name": "ip-restriction",
                          "config": {"allow": ["127.0.0.0/30"], "deny": ["127.0.0.2"]}}),
        route("d", "/d", {"name": "ip-restriction",
                          "config": {"deny": ["127.0.0.8/29"], "status": 401, "message": "go away"}}),
        route("both", "/both", {"name": "ip-restriction",
                                "config": {"allow": ["127.0.0.0/8"], "deny": ["127.0.0.0/8"]}}),
    ])))
    assert echoed(request(gw.port, "/a", "127.0.0.1"))["path"] == "/"
    assert echoed(request(gw.port, "/a", "127.0.0.3"))["path"] == "/"
    denied = request(gw.port, "/a", "127.0.0.2")        # in the allowed /30, but denied: deny wins
    assert denied.status == 403 and denied.json() == {"message": "Your IP address is not allowed"}
    assert request(gw.port, "/a", "127.0.0.4").status == 403    # outside the allow list
    assert echoed(request(gw.port, "/d", "127.0.0.7"))["path"] == "/"
    for source in ("127.0.0.8", "127.0.0.12", "127.0.0.15"):
        resp = request(gw.port, "/d", source)
        assert resp.status == 401 and resp.json() == {"message": "go away"}, source
    assert echoed(request(gw.port, "/d", "127.0.0.16"))["path"] == "/"
    assert request(gw.port, "/both", "127.0.0.1").status == 403


def test_ip_restriction_keeps_the_connection_for_bodiless_requests(echo, gateway):
    gw = gateway(config(svc(echo.url, [
        route("a", "/a", {"name": "ip-restriction", "config": {"deny": ["127.0.0.9"]}}),
        route("ok", "/ok")])))
    with Client(gw.port, "127.0.0.9") as c:
        c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 403
        assert echoed(c.read_response())["path"] == "/"


def test_ip_restriction_over_ipv6(echo, ipv6_gateway):
    port = ipv6_gateway(config(svc(echo.url, [
        route("v6", "/v6", {"name": "ip-restriction", "config": {"allow": ["::1/128"]}}),
        route("v4", "/v4", {"name": "ip-restriction", "config": {"allow": ["127.0.0.0/8"]}}),
        route("no6", "/no6", {"name": "ip-restriction", "config": {"deny": ["::/120"]}}),
        route("net", "/net", {"name": "ip-restriction", "config": {"allow": ["::/127", "10.0.0.0/8"]}}),
    ])))
    assert echoed(request(port, "/v6", "::1", "::1"))["path"] == "/"
    assert request(port, "/v4", "::1", "::1").status == 403
    assert request(port, "/no6", "::1", "::1").status == 403
    assert echoed(request(port, "/net", "::1", "::1"))["path"] == "/"


def test_ipv4_mapped_ipv6_rules_match_ipv4_clients(echo, gateway):
    gw = gateway(config(svc(echo.url, [
        route("mapped", "/mapped", {"name": "ip-restriction",
                                    "config": {"allow": ["::ffff:127.0.0.0/104"]}}),
        route("v6only", "/v6only", {"name": "ip-restriction", "config": {"allow": ["::/0"]}}),
        route("xff", "/xff", {"name": "ip-restriction", "config": {
            "allow": ["203.0.113.0/24"], "trusted_proxies": ["::ffff:127.0.0.1"]}}),
    ])))
    assert echoed(request(gw.port, "/mapped", "127.0.0.3"))["path"] == "/"
    assert request(gw.port, "/v6only", "127.0.0.1").status == 403     # ::/0 is IPv6 only
    xff = [("X-Forwarded-For", "::ffff:203.0.113.9")]
    assert echoed(request(gw.port, "/xff", headers=xff))["path"] == "/"
    assert request(gw.port, "/xff", "127.0.0.2", headers=xff).status == 403


def test_x_forwarded_for_is_believed_only_through_trusted_proxies(echo, gateway):
    gw = gateway(config(svc(echo.url, [route("r", "/", {"name": "ip-restriction", "config": {
        "allow": ["203.0.113.0/24", "2001:db8::/32"], "deny": ["203.0.113.66"],
        "trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}})])))

    def status(xff, source="127.0.0.1"):
        headers = [("X-Forwarded-For", v) for v in ([xff] if isinstance(xff, str) else xff)]
        return request(gw.port, "/", source, headers=headers).status

    assert status("203.0.113.5") == 200
    assert status("198.51.100.1, 203.0.113.5") == 200      # only the rightmost untrusted entry counts
    assert status("203.0.113.5, 198.51.100.1") == 403      # the client wrote the left part: ignored
    assert status("198.51.100.1, 203.0.113.5, 10.1.2.3, 10.9.9.9") == 200   # trusted hops skipped
    assert status(["203.0.113.5", "198.51.100.1"]) == 403  # several lines read as one list, in order
    assert status(["198.51.100.1", "203.0.113.5"]) == 200
    assert status("2001:db8::7") == 200
    assert status("[2001:db8::7]:4711") == 200
    assert status("203.0.113.66") == 403                   # deny applies to the forwarded address
    assert status("garbage") == 403                        # fails closed
    assert status("198.51.100.1, 203.0.113.5 ,") == 200    # empty entries skipped
    assert status([]) == 403                               # no header: the proxy itself is the client
    # an untrusted peer cannot pick its address with the header
    assert status("203.0.113.5", source="127.0.0.2") == 403
    assert status("127.0.0.1, 203.0.113.5", source="127.0.0.2") == 403


# --- request-size-limiting --------------------------------------------------------------------

def size_config(url, **conf):
    return config(svc(url, [
        route("r", "/", {"name": "request-size-limiting", "config": conf}),
        route("ok", "/ok")]))


def test_content_length_over_the_limit_answers_413(echo, gateway):
    gw = gateway(size_config(echo.url, allowed_payload_size=1, size_unit="kilobytes"))
    fits = request(gw.port, "/", method="POST", headers=[("Content-Length", "1024")],
                   body=b"x" * 1024)
    assert echoed(fits)["body_size"] == 1024
    with Client(gw.port) as c:
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n" + b"x" * 1025)
        over = c.read_response()
        assert over.status == 413 and over.json() == {"message": "Request size limit exceeded"}
        assert over.header("Content-Type") == "application/json"
        assert c.is_closed()                               # the body was not read: close
    # announced but not sent: answered from the head alone
    with Client(gw.port) as c:
        c.send(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n")
        assert c.read_response().status == 413


def test_size_units_and_the_default(echo, gateway):
    gw = gateway(config(svc(echo.url, [
        route("b", "/b", {"name": "request-size-limiting",
                          "config": {"allowed_payload_size": 10, "size_unit": "bytes"}}),
        route("m", "/m", {"name": "request-size-limiting"})])))
    assert request(gw.port, "/b", method="POST", headers=[("Content-Length", "11")],
                   body=b"x" * 11).status == 413
    assert echoed(request(gw.port, "/b", method="POST", headers=[("Content-Length", "10")],
                          body=b"x" * 10))["body_size"] == 10
    assert request(gw.port, "/m", method="POST",
                   headers=[("Content-Length", str(128 * 2**20 + 1))]).status == 413
    assert echoed(request(gw.port, "/m", method="POST", headers=[("Content-Length", "3")],
                          body=b"abc"))["body_size"] == 3


def test_require_content_length_answers_411(echo, gateway):
    gw = gateway(size_config(echo.url, allowed_payload_size=10, size_unit="bytes",
                             require_content_length=True))
    missing = request(gw.port, "/")
    assert missing.status == 411
    assert missing.json() == {"message": "A valid Content-Length header is required"}
    with Client(gw.port) as c:
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        assert c.read_response().status == 411
    assert echoed(request(gw.port, "/", method="POST", headers=[("Content-Length", "2")],
                          body=b"ab"))["body_size"] == 2
    assert echoed(request(gw.port, "/ok"))["path"] == "/"    # other routes unaffected


def chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def test_chunked_body_within_the_limit_passes(echo, gateway):
    gw = gateway(size_config(echo.url, allowed_payload_size=100, size_unit="bytes"))
    with Client(gw.port) as c:
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunked(b"y" * 100, 7))
        assert echoed(c.read_response())["body_size"] == 100


def test_chunked_body_over_the_limit_answers_413(echo, gateway):
    gw = gateway(size_config(echo.url, allowed_payload_size=100, size_unit="bytes"))
    with Client(gw.port) as c:                              # all in the first packet
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunked(b"y" * 101, 50))
        resp = c.read_response()
        assert resp.status == 413 and "message" in resp.json()
        assert c.is_closed()
    with Client(gw.port) as c:                              # streamed: passes the limit later
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):                                  # 160 bytes in all
            time.sleep(0.05)
            try:
                c.send(b"20\r\n" + b"z" * 32 + b"\r\n")
            except OSError:                                 # answered and closed already
                break
        resp = c.read_response()
        assert resp.status == 413 and "message" in resp.json()
    assert echoed(request(gw.port, "/ok"))["path"] == "/"


def test_chunked_body_over_the_limit_in_the_first_packet_never_reaches_upstream(scripted, gateway):
    requests_seen: list[bytes] = []

    def handler(conn, index):
        head = read_request_head(conn)
        if head:
            requests_seen.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    up = scripted(handler)
    gw = gateway(size_config(up.url, allowed_payload_size=10, size_unit="bytes"))
    with Client(gw.port) as c:
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunked(b"q" * 64, 64))
        assert c.read_response().status == 413
    time.sleep(0.2)
    assert requests_seen == [] and up.connections == 0


# --- correlation-id ---------------------------------------------------------------------------

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def test_correlation_id_generated_kept_and_forwarded(echo, gateway):
    gw = gateway(config(svc(echo.url, [
        route("r", "/", {"name": "correlation-id"}),
        route("u", "/u", {"name": "correlation-id",
                          "config": {"generator": "uuid", "header_name": "X-Correlation-ID"}}),
        route("t", "/t", {"name": "correlation-id", "config": {"generator": "tracker"}})])))
    first = get(gw.port, "/")
    second = get(gw.port, "/")
    ids = [up_headers(r)["kong-request-id"] for r in (first, second)]
    assert all(len(v) == 1 for v in ids)
    m1, m2 = (re.fullmatch(rf"({UUID})#(\d+)", v[0]) for v in ids)
    assert m1 and m2 and m1.group(1) == m2.group(1) and int(m2.group(2)) == int(m1.group(2)) + 1
    assert first.header("Kong-Request-ID") is None          # echo_downstream is off by default
    kept = up_headers(get(gw.port, "/", headers={"Kong-Request-ID": "client-id-1"}))
    assert kept["kong-request-id"] == ["client-id-1"]
    u1 = up_headers(get(gw.port, "/u"))["x-correlation-id"]
    u2 = up_headers(get(gw.port, "/u"))["x-correlation-id"]
    assert re.fullmatch(UUID, u1[0]) and re.fullmatch(UUID, u2[0]) and u1 != u2
    tracker = up_headers(get(gw.port, "/t"))["kong-request-id"][0]
    assert re.fullmatch(r"127\.0\.0\.1-\d+-\d+-\d+\.\d{3}", tracker), tracker


def test_correlation_id_echoed_downstream(echo, gateway):
    gw = gateway(config(svc(echo.url, [route("r", "/", {
        "name": "correlation-id", "config": {"echo_downstream": True, "header_name": "X-Req"}})])))
    resp = get(gw.port, "/")
    sent = up_headers(resp)["x-req"]
    assert resp.header("X-Req") == sent[0] and "#" in sent[0]
    kept = get(gw.port, "/", headers={"X-Req": "abc-123"})
    assert kept.header_all("X-Req") == ["abc-123"]
    assert up_headers(kept)["x-req"] == ["abc-123"]
    empty = get(gw.port, "/", headers={"X-Req": ""})      # an empty id is replaced
    assert empty.header("X-Req") and up_headers(empty)["x-req"] == [empty.header("X-Req")]


# --- request-transformer: query args and path -------------------------------------------------

def test_transform_query_keeps_unrelated_args_byte_exact():
    ops = {"remove": (b"drop", b"a b"), "rename": ((b"old", b"new"),),
           "replace": ((b"rep", "x y&z"),), "add": ((b"added", "1/2"), (b"keep", "no")),
           "append": ((b"multi", "1"), (b"multi", "é"))}
    out = transform_query(b"keep=%41%2b&drop=1&a+b=2&old=v%20w&new=gone&rep=1&z&rep=2&;=;", ops)
    assert out == (b"keep=%41%2b&new=v%20w&rep=x%20y%26z&z&;=;&added=1%2F2"
                   b"&multi=1&multi=%C3%A9")
    nothing = {k: () for k in ops}
    assert transform_query(b"a=1&b", nothing) is None
    assert transform_query(b"a=1", {**nothing, "remove": (b"a",)}) == b""
    assert transform_query(b"", {**nothing, "add": ((b"n", "v"),)}) == b"n=v"


def test_request_transformer_query_args_end_to_end(echo, gateway):
    gw = gateway(config(svc(echo.url, [route("r", "/", {"name": "request-transformer", "config": {
        "remove": {"querystring": ["drop"], "headers": ["X-Drop"]},
        "rename": {"querystring": ["old:new"]},
        "replace": {"querystring": ["rep:a b"]},
        "add": {"querystring": ["added:x/y", "keep:no"], "headers": ["X-Add:1"]},
        "append": {"querystring": ["multi:1", "multi:2"]}}})])))
    resp = get(gw.port, "/items?keep=%41+1&drop=1&old=v&rep=1&z&rep=2", headers={"X-Drop": "1"})
    seen = echoed(resp)
    assert seen["path"] == "/items"
    assert seen["query"] == "keep=%41+1&new=v&rep=a%20b&z&added=x%2Fy&multi=1&multi=2"
    headers = up_headers(resp)
    assert "x-drop" not in headers and headers["x-add"] == ["1"]
    # unrelated args stay byte for byte (%7e is not normalized)
    assert echoed(get(gw.port, "/items?keep=%7e"))["query"] == "keep=%7e&added=x%2Fy&multi=1&multi=2"
    only_removed = echoed(get(gw.port, "/p?drop=1"))
    assert only_removed["query"] == "added=x%2Fy&keep=no&multi=1&multi=2"


def test_request_transformer_removing_the_last_arg_sends_no_query(echo, gateway):
    gw = gateway(config(svc(echo.url, [route("r", "/", {"name": "request-transformer", "config": {
        "remove": {"querystring": ["token"]}}})])))
    seen = echoed(get(gw.port, "/x?token=secret"))
    assert seen["target"] == "/x" and seen["query"] in ("", None)
    assert echoed(get(gw.port, "/x?token=secret&a=1"))["target"] == "/x?a=1"


def test_replace_uri_sets_the_upstream_path_verbatim(echo, gateway):
    gw = gateway(config(svc(echo.url + "/base", [
        route("r", "/api", {"name": "request-transformer", "config": {
            "replace": {"uri": "/v2/new path/é"}, "add": {"querystring": ["v:2"]}}},
              strip_path=True),
        route("plain", "/plain", strip_path=True)])))
    seen = echoed(get(gw.port, "/api/old?a=1"))
    assert seen["path"] == "/v2/new%20path/%C3%A9"          # no strip_path, no service base path
    assert seen["query"] == "a=1&v=2"
    assert echoed(get(gw.port, "/plain/x"))["path"] == "/base/x"


def test_response_transformer_keeps_working_and_refuses_query_args(echo, gateway):
    gw = gateway(config(svc(echo.url, [route("r", "/", {"name": "response-transformer", "config": {
        "add": {"headers": ["X-Resp:yes"]}}})])))
    assert get(gw.port, "/").header("X-Resp") == "yes"
    found = issues_of({"services": [], "plugins": [
        {"name": "response-transformer", "config": {"add": {"querystring": ["a:b"]}}}]})
    assert "unknown field 'querystring'" in found["plugins[0].config.add"][0]


# --- config errors ----------------------------------------------------------------------------

def test_config_errors_have_paths():
    found = issues_of({"services": [], "plugins": [
        {"name": "ip-restriction", "config": {
            "allow": ["10.0.0.0/8", "::1", "1.2.3.999", "10.0.0.0/33"], "deny": "nope",
            "trusted_proxies": [7]}},
        {"name": "ip-restriction", "route": None, "config": {"status": 99}},
        {"name": "request-size-limiting", "config": {"size_unit": "gigabytes",
                                                     "allowed_payload_size": -1,
                                                     "require_content_length": "yes"}},
        {"name": "correlation-id", "config": {"generator": "uuid4", "header_name": "Bad Name"}},
        {"name": "request-transformer", "config": {
            "add": {"querystring": ["nocolon"]}, "replace": {"uri": "relative"},
            "remove": {"querystring": [""]}, "append": {"bogus": []},
            "rename": {"querystring": ["old:"]}}},
    ]})
    assert "1.2.3.999" in found["plugins[0].config.allow[2]"][0]
    assert "10.0.0.0/33" in found["plugins[0].config.allow[3]"][0]
    assert "plugins[0].config.allow[0]" not in found and "plugins[0].config.allow[1]" not in found
    assert "nope" in found["plugins[0].config.deny[0]"][0]
    assert "found int 7" in found["plugins[0].config.trusted_proxies[0]"][0]
    assert "status must be 100..599" in found["plugins[1].config.status"][0]
    assert "megabytes" in found["plugins[2].config.size_unit"][0]
    assert ">= 0" in found["plugins[2].config.allowed_payload_size"][0]
    assert "true or false" in found["plugins[2].config.require_content_length"][0]
    assert "uuid#counter" in found["plugins[3].config.generator"][0]
    assert "header name" in found["plugins[3].config.header_name"][0]
    assert "querystring: expected 'name:value'" in found["plugins[4].config.add"][0]
    assert "uri: must start with '/'" in found["plugins[4].config.replace"][0]
    assert "must not be empty" in found["plugins[4].config.remove"][0]
    assert "unknown field 'bogus'" in found["plugins[4].config.append"][0]
    assert "with a new name" in found["plugins[4].config.rename"][0]
    only_empty = issues_of({"services": [], "plugins": [{"name": "ip-restriction"}]})
    assert "at least one of 'allow' or 'deny'" in only_empty["plugins[0].config"][0]
