"""Retries happen only where safe, go to another target, and are bounded by the budget."""
from __future__ import annotations

import time

from conftest import RawClient, config, get, read_request_head, service


def upstream_config(targets, **service_extra) -> dict:
    return {
        "_format_version": "1",
        "upstreams": [{"name": "backend", "targets": [{"target": t} for t in targets]}],
        "services": [{"name": "svc", "host": "backend", "port": 80, **service_extra,
                      "routes": [{"name": "all", "paths": ["/"]}]}],
    }


def scripted_upstream(scripted, behaviour, log):
    """behaviour(method) -> bytes to answer, or None to hang (never answer)."""
    def handler(conn, index):
        while True:
            head = read_request_head(conn)
            if not head:
                return
            method = head.split(b" ", 1)[0].decode()
            log.append(method)
            answer = behaviour(method)
            if answer is None:
                time.sleep(2)
                return
            conn.sendall(answer)
    return scripted(handler)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"


def test_5xx_from_one_target_is_retried_on_the_other_for_idempotent_methods(scripted, gateway):
    bad_log, good_log = [], []
    bad = scripted_upstream(scripted, lambda m: UNAVAILABLE, bad_log)
    good = scripted_upstream(scripted, lambda m: OK, good_log)
    gw = gateway(upstream_config([f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"],
                                 retry_on=["connect-failure", "timeout", "5xx"]))
    statuses = [get(gw.port).status for _ in range(6)]
    assert statuses == [200] * 6
    assert bad_log and good_log


def test_5xx_is_not_retried_for_post(scripted, gateway):
    bad_log, good_log = [], []
    bad = scripted_upstream(scripted, lambda m: UNAVAILABLE, bad_log)
    good = scripted_upstream(scripted, lambda m: OK, good_log)
    gw = gateway(upstream_config([f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"],
                                 retry_on=["connect-failure", "timeout", "5xx"]))
    statuses = []
    for _ in range(4):
        with RawClient(gw.port) as c:
            c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            statuses.append(c.read_response().status)
    assert sorted(statuses) == [200, 200, 503, 503]
    assert len(bad_log) + len(good_log) == 4      # nothing was sent twice


def test_5xx_is_relayed_when_retries_are_not_configured_for_it(scripted, gateway):
    log = []
    bad = scripted_upstream(scripted, lambda m: UNAVAILABLE, log)
    gw = gateway(config(service("s", bad.url, [{"name": "r", "paths": ["/"]}])))
    resp = get(gw.port)
    assert resp.status == 503 and resp.body == b"busy"
    assert log == ["GET"]


def test_timeout_on_one_target_is_retried_on_another(scripted, gateway):
    slow_log, fast_log = [], []
    slow = scripted_upstream(scripted, lambda m: None, slow_log)
    fast = scripted_upstream(scripted, lambda m: OK, fast_log)
    gw = gateway(upstream_config([f"127.0.0.1:{slow.port}", f"127.0.0.1:{fast.port}"],
                                 read_timeout="300ms"))
    start = time.monotonic()
    assert [get(gw.port).status for _ in range(2)] == [200, 200]
    assert time.monotonic() - start < 3
    assert slow_log and fast_log


def test_retry_budget_bounds_extra_load(scripted, gateway):
    """Every request fails with 503: retries stay within the budget (20 % plus a burst of 10)."""
    log = []
    bad = scripted_upstream(scripted, lambda m: UNAVAILABLE, log)
    gw = gateway(config(service("s", bad.url, [{"name": "r", "paths": ["/"]}],
                                retry_on=["5xx"], retries=5)))
    n = 60
    with RawClient(gw.port) as c:
        for _ in range(n):
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.read_response().status == 503
    extra = len(log) - n
    assert 0 < extra <= 10 + 0.2 * n + 1, extra


def test_get_that_hits_a_reset_is_retried_on_another_target(scripted, gateway):
    def resetter(conn, index):
        read_request_head(conn)        # read the request, then close without answering
    dead_log, good_log = [], []
    bad = scripted(resetter)
    good = scripted_upstream(scripted, lambda m: OK, good_log)
    gw = gateway(upstream_config([f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"]))
    for _ in range(4):
        resp = get(gw.port)
        assert resp.status == 200 and resp.body == b"ok"
    assert bad.connections >= 1


def test_post_that_hits_a_reset_is_not_retried(scripted, gateway):
    def resetter(conn, index):
        read_request_head(conn)
    bad = scripted(resetter)
    gw = gateway(config(service("s", bad.url, [{"name": "r", "paths": ["/"]}])))
    with RawClient(gw.port) as c:
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        assert c.read_response().status == 502
    time.sleep(0.3)
    assert bad.connections == 1
