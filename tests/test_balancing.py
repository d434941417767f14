"""Upstreams through the real gateway: balancing, retries to another target, health, breaker."""
from __future__ import annotations

import collections
import time

from conftest import free_port, get, read_request_head


def named_upstream(scripted, name: str, status: int = 200, health_status: int = 200):
    """A scripted upstream answering its own name (and `health_status` on /healthz)."""
    def handler(conn, index):
        while True:
            head = read_request_head(conn)
            if not head:
                return
            code = health_status if head.startswith(b"GET /healthz ") else status
            body = name.encode()
            conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (code, len(body), body))
    return scripted(handler)


def upstream_config(targets: list[str], **upstream) -> dict:
    return {
        "_format_version": "1",
        "upstreams": [{"name": "backend", "targets": [{"target": t} for t in targets], **upstream}],
        "services": [{"name": "svc", "host": "backend", "port": 80,
                      "routes": [{"name": "all", "paths": ["/"]}]}],
    }


def addr(up) -> str:
    return f"127.0.0.1:{up.port}"


def test_round_robin_spreads_requests_evenly(scripted, gateway):
    a, b = named_upstream(scripted, "a"), named_upstream(scripted, "b")
    gw = gateway(upstream_config([addr(a), addr(b)]))
    counts = collections.Counter(get(gw.port).body for _ in range(20))
    assert counts == {b"a": 10, b"b": 10}


def test_host_header_upstream_is_the_upstream_name(scripted, gateway):
    seen = []

    def handler(conn, index):
        head = read_request_head(conn)
        seen.append(head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    up = scripted(handler)
    gw = gateway(upstream_config([addr(up)]))
    assert get(gw.port).status == 200
    assert b"\r\nHost: backend\r\n" in seen[0]


def test_dead_target_is_skipped_with_zero_client_errors(scripted, gateway):
    live = named_upstream(scripted, "live")
    dead = f"127.0.0.1:{free_port()}"
    gw = gateway(upstream_config([dead, addr(live)],
                                 healthchecks={"passive": {"unhealthy": {"failures": 2}, "ejection_time": "30s"}}))
    statuses = [get(gw.port).status for _ in range(30)]
    assert statuses == [200] * 30


def test_all_targets_down_is_503_json(gateway):
    gw = gateway(upstream_config([f"127.0.0.1:{free_port()}"],
                                 healthchecks={"passive": {"unhealthy": {"failures": 1}, "ejection_time": "30s"}}))
    assert get(gw.port).status == 502          # the connect failure itself
    resp = get(gw.port)                        # now ejected: nothing can be tried
    assert resp.status == 503
    assert "no healthy target" in resp.json()["message"]


def test_consistent_hashing_on_a_header_is_sticky(scripted, gateway):
    ups = [named_upstream(scripted, n) for n in "abc"]
    gw = gateway(upstream_config([addr(u) for u in ups], algorithm="consistent-hashing",
                                 hash_on="header", hash_on_header="x-user"))
    for user in ("alice", "bob", "carol", "dave"):
        answers = {get(gw.port, headers={"X-User": user}).body for _ in range(5)}
        assert len(answers) == 1, (user, answers)


def test_active_health_check_takes_a_failing_target_out(scripted, gateway):
    good = named_upstream(scripted, "good")
    sick = named_upstream(scripted, "sick", health_status=500)
    gw = gateway(upstream_config([addr(good), addr(sick)], healthchecks={"active": {
        "path": "/healthz", "interval": "100ms", "timeout": "500ms",
        "unhealthy": {"http_failures": 1}}}))
    time.sleep(1.0)
    assert {get(gw.port).body for _ in range(10)} == {b"good"}


def test_circuit_breaker_rejects_over_max_requests(scripted, gateway):
    def slow(conn, index):
        read_request_head(conn)
        time.sleep(1.0)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    up = scripted(slow)
    gw = gateway(upstream_config([addr(up)], circuit_breaker={"max_requests": 1}))
    import socket
    first = socket.create_connection(("127.0.0.1", gw.port))
    first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    resp = get(gw.port)
    assert resp.status == 503 and "circuit breaker" in resp.json()["message"]
    first.close()


def test_circuit_breaker_caps_upstream_connections(scripted, gateway):
    """max_connections: one upstream connection busy, a second request gets 503 at once."""
    import socket

    def slow(conn, index):
        while read_request_head(conn):
            time.sleep(1.0)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    up = scripted(slow)
    gw = gateway(upstream_config([addr(up)], circuit_breaker={"max_connections": 1}))
    first = socket.create_connection(("127.0.0.1", gw.port))
    first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    start = time.monotonic()
    resp = get(gw.port)
    assert resp.status == 503 and "connection limit" in resp.json()["message"]
    assert time.monotonic() - start < 0.5
    first.settimeout(3)
    assert first.recv(100).startswith(b"HTTP/1.1 200")
    first.close()
    # the busy connection went back to the pool: the next request reuses it
    assert get(gw.port).status == 200
    assert up.connections == 1
