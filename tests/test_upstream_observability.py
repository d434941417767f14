"""Upstream observability: `GET /upstreams/{name}/health`, `GET /upstreams`, and the upstream,
byte and retry metrics, with real gateways (1 and 2 workers) and scripted upstreams."""
from __future__ import annotations

import socket
import time

import pytest

from conftest import free_port, get, raw_exchange, read_request_head
from test_balancing import addr, named_upstream, upstream_config
from test_supervisor import ops  # noqa: F401  (fixture)

prom_parser = pytest.importorskip("prometheus_client.parser")


def scrape(gw) -> dict:
    code, text = gw.admin("GET", "/metrics")
    assert code == 200, text
    return {f.name: f for f in prom_parser.text_string_to_metric_families(text)}


def value(families, family: str, **labels) -> float:
    """The one sample of `family` (a counter's `_total` sample) matching `labels`."""
    found = [s for s in families[family].samples
             if not s.name.endswith("_created") and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, families[family].samples)
    return found[0].value


def by_target(health: dict) -> dict:
    return {t["target"]: t for t in health["targets"]}


PASSIVE = {"passive": {"unhealthy": {"failures": 1}, "ejection_time": "30s"}}


def test_health_endpoint_merges_workers_conservatively(scripted, ops):
    live = named_upstream(scripted, "live")
    dead = f"127.0.0.1:{free_port()}"
    gw = ops(upstream_config([dead, addr(live)], healthchecks=PASSIVE), 2)
    for _ in range(20):                      # a new connection each: the kernel spreads them
        assert get(gw.port).status == 200    # the connect failure is retried on `live`
    code, health = gw.admin("GET", "/upstreams/backend/health")
    assert code == 200, health
    assert health["upstream"] == "backend" and health["algorithm"] == "round-robin"
    assert health["in_use"] is True and health["workers"] == 2
    assert health["targets_total"] == 2 and health["healthy_targets"] == 1
    targets = by_target(health)
    d, ok = targets[dead], targets[addr(live)]
    assert [t["target"] for t in health["targets"]] == [dead, addr(live)]   # declaration order
    assert ok["healthy"] is True and ok["state"] == "healthy" and ok["active_ok"] is True
    assert ok["requests"] == 20 and ok["failures"] == 0 and ok["in_flight"] == 0
    assert ok["weight"] == 100 and ok["ewma_ms"] > 0
    # ejected on at least one worker: not healthy, and the worst state is shown
    assert d["healthy"] is False and d["state"] == "ejected"
    assert d["ejections"] >= 1 and d["failures"] == d["requests"] >= 1
    assert 0 < d["ejected_for_s"] <= 30
    assert d["ejections"] == sum(w["ejections"] for w in d["workers"])
    assert sorted(w["worker"] for w in d["workers"]) == [0, 1]
    for w in d["workers"]:                   # each worker's own view
        assert w["healthy"] == (w["state"] == "healthy")
        assert w["state"] in ("healthy", "ejected")
    assert any(w["state"] == "ejected" for w in d["workers"])


def test_health_endpoint_errors_and_upstream_list(scripted, ops):
    a = named_upstream(scripted, "a")
    cfg = upstream_config([addr(a)], algorithm="least-connections")
    cfg["upstreams"].append({"name": "spare", "algorithm": "p2c-ewma",
                             "targets": [{"target": "127.0.0.1:1", "weight": 5},
                                         {"target": "127.0.0.1:2"}]})
    gw = ops(cfg, 1)
    code, body = gw.admin("GET", "/upstreams/nope/health")
    assert code == 404 and "nope" in body["message"]
    code, body = gw.admin("POST", "/upstreams/backend/health", {})
    assert code == 405
    code, spare = gw.admin("GET", "/upstreams/spare/health")      # declared, no service uses it
    assert code == 200 and spare["in_use"] is False and spare["algorithm"] == "p2c-ewma"
    assert spare["targets"] == [
        {"target": "127.0.0.1:1", "weight": 5, "healthy": None, "state": "unused"},
        {"target": "127.0.0.1:2", "weight": 100, "healthy": None, "state": "unused"}]
    code, listing = gw.admin("GET", "/upstreams")
    assert code == 200
    assert [u["name"] for u in listing["data"]] == ["backend", "spare"]     # declared entities
    assert listing["health"] == [
        {"name": "backend", "algorithm": "least-connections", "in_use": True, "targets": 1,
         "healthy_targets": 1, "failing_open": False},
        {"name": "spare", "algorithm": "p2c-ewma", "in_use": False, "targets": 2,
         "healthy_targets": None, "failing_open": None}]
    # the entity itself is unchanged (a GET of one upstream is still what PUT takes)
    code, entity = gw.admin("GET", "/upstreams/backend")
    assert code == 200 and entity == cfg["upstreams"][0]


def exchange(port: int, path: str, body: bytes = b"") -> tuple[int, int]:
    """(request bytes sent, response bytes received) for one request on its own connection."""
    req = (f"POST {path} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    resp = raw_exchange(port, req)
    assert resp.startswith(b"HTTP/1.1 200 "), resp[:200]
    return len(req), len(resp)


def test_byte_retry_and_upstream_metrics_add_up(scripted, ops):
    live = named_upstream(scripted, "live")
    dead = f"127.0.0.1:{free_port()}"
    gw = ops(upstream_config([dead, addr(live)], healthchecks=PASSIVE), 2)
    sent = received = 0
    for i in range(12):
        n_in, n_out = exchange(gw.port, "/x", b"y" * (i * 100))
        sent += n_in
        received += n_out
    fam = scrape(gw)
    route = {"route": "all", "service": "svc"}
    assert value(fam, "fastmesh_request_bytes", **route) == sent
    assert value(fam, "fastmesh_response_bytes", **route) == received
    dead_tries = value(fam, "fastmesh_upstream_requests", upstream="backend", target=dead)
    assert dead_tries >= 1
    assert value(fam, "fastmesh_retries", **route) == dead_tries     # each was resent to `live`
    assert value(fam, "fastmesh_upstream_requests", upstream="backend", target=addr(live)) == 12
    assert value(fam, "fastmesh_upstream_failures", upstream="backend", target=dead) == dead_tries
    assert value(fam, "fastmesh_upstream_ejections", upstream="backend", target=dead) == dead_tries
    assert value(fam, "fastmesh_upstream_ejections", upstream="backend", target=addr(live)) == 0
    assert value(fam, "fastmesh_upstream_target_healthy", upstream="backend", target=dead) == 0
    assert value(fam, "fastmesh_upstream_target_healthy", upstream="backend",
                 target=addr(live)) == 1
    assert value(fam, "fastmesh_upstream_no_target", upstream="backend") == 0
    assert value(fam, "fastmesh_upstream_circuit_breaker_rejections", upstream="backend") == 0
    assert fam["fastmesh_upstream_target_healthy"].type == "gauge"
    assert fam["fastmesh_upstream_ejections"].type == "counter"


def test_no_target_and_circuit_breaker_counters(scripted, ops):
    dead = f"127.0.0.1:{free_port()}"

    def slow(conn, index):
        read_request_head(conn)
        time.sleep(1.0)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    up = scripted(slow)
    cfg = upstream_config([dead], healthchecks=PASSIVE)
    cfg["upstreams"].append({"name": "slow", "targets": [{"target": addr(up)}],
                             "circuit_breaker": {"max_requests": 1}})
    cfg["services"].append({"name": "slow-svc", "host": "slow",
                            "routes": [{"name": "slow-route", "paths": ["/slow"]}]})
    gw = ops(cfg, 1)
    assert get(gw.port).status == 502              # the connect failure ejects the only target
    # (its retry found no other target: that pick counts too)
    after_502 = value(scrape(gw), "fastmesh_upstream_no_target", upstream="backend")
    assert after_502 in (0, 1)
    for _ in range(3):
        assert get(gw.port).status == 503          # nothing left to pick
    first = socket.create_connection(("127.0.0.1", gw.port))
    first.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    for _ in range(2):
        resp = get(gw.port, "/slow")
        assert resp.status == 503 and "circuit breaker" in resp.json()["message"]
    first.close()
    fam = scrape(gw)
    assert value(fam, "fastmesh_upstream_no_target", upstream="backend") == after_502 + 3
    assert value(fam, "fastmesh_upstream_circuit_breaker_rejections", upstream="slow") == 2
    assert value(fam, "fastmesh_upstream_circuit_breaker_rejections", upstream="backend") == 0
    assert value(fam, "fastmesh_upstream_target_healthy", upstream="backend", target=dead) == 0
    assert value(fam, "fastmesh_upstream_ejections", upstream="backend", target=dead) == 1
    code, health = gw.admin("GET", "/upstreams/backend/health")
    assert health["healthy_targets"] == 0 and by_target(health)[dead]["state"] == "ejected"


def test_upstream_counters_survive_reloads(scripted, ops):
    live = named_upstream(scripted, "live")
    dead = f"127.0.0.1:{free_port()}"
    cfg = upstream_config([dead, addr(live)], healthchecks=PASSIVE)
    gw = ops(cfg, 2)
    sent = live_before = 0
    for _ in range(60):                           # until both workers have ejected `dead`
        sent += exchange(gw.port, "/x")[0]        # (the kernel picks the worker per connection)
        live_before += 1
        workers = by_target(gw.admin("GET", "/upstreams/backend/health")[1])[dead]["workers"]
        if len(workers) == 2 and all(w["state"] == "ejected" for w in workers):
            break
    else:
        pytest.fail(f"`dead` not ejected on both workers after 60 requests: {workers}")
    before = scrape(gw)
    dead_before = value(before, "fastmesh_upstream_requests", upstream="backend", target=dead)
    for n in range(3):                            # each reload compiles new balancers
        cfg["services"][0]["routes"].append({"name": f"extra{n}", "paths": [f"/extra{n}"]})
        assert gw.admin("POST", "/config", cfg)[0] == 200
        for _ in range(4):
            sent += exchange(gw.port, "/x")[0]
    fam = scrape(gw)
    assert value(fam, "fastmesh_upstream_requests", upstream="backend",
                 target=addr(live)) == live_before + 12
    # still ejected after the reloads (health is inherited), so no new tries went to `dead`
    assert value(fam, "fastmesh_upstream_requests", upstream="backend", target=dead) == dead_before
    assert value(fam, "fastmesh_upstream_ejections", upstream="backend",
                 target=dead) == dead_before
    assert value(fam, "fastmesh_request_bytes", route="all", service="svc") == sent
    assert value(fam, "fastmesh_retries", route="all", service="svc") == dead_before
    code, health = gw.admin("GET", "/upstreams/backend/health")
    assert by_target(health)[addr(live)]["requests"] == live_before + 12


def test_upstream_stats_count_old_balancers_after_the_swap():
    """In-process: requests that finish on the old Plan's balancer after the new one inherited
    its counts are neither lost nor counted twice."""
    from fastmesh.config import load_config_data
    from fastmesh.metrics import UpstreamStats
    from fastmesh.plan import PoolRegistry, compile_plan
    cfg = load_config_data(upstream_config(["127.0.0.1:1", "127.0.0.1:2"]))
    pools = PoolRegistry()
    stats = UpstreamStats()
    old = compile_plan(cfg, pools)

    def serve(plan, n, status=200):
        balancer = plan.balancers["backend"]
        for _ in range(n):
            t = balancer.pick_py()
            balancer.begin_py(t)
            balancer.end_py(t, 1000, "response", status)

    serve(old, 10)
    held = old.balancers["backend"]                  # as an in-flight request would
    new = compile_plan(cfg, pools, old)              # prepare: inherits 10
    serve(old, 2)                                    # still finishing on the old Plan
    stats.retire(old, new)                           # commit
    del old
    serve(new, 5)
    counters = stats.counters(new)
    assert len(stats.retired) == 1                   # `held` keeps it unfolded
    total = sum(c["requests"] for _, _, c in counters["targets"])
    assert total == 17
    del held
    counters = stats.counters(new)
    assert stats.retired == [] and len(stats.baselines) == 1
    assert sum(c["requests"] for _, _, c in counters["targets"]) == 17
    rows = stats.health(new, counters)["backend"]["targets"]
    assert sum(r["requests"] for r in rows) == 17
    # a swap nobody told UpstreamStats about is noticed at the next snapshot
    newer = compile_plan(cfg, pools, new)
    serve(new, 1)
    del new
    assert sum(c["requests"] for _, _, c in stats.counters(newer)["targets"]) == 18
    serve(newer, 3)
    counters = stats.counters(newer)
    assert sum(c["requests"] for _, _, c in counters["targets"]) == 21
    assert stats.retired == [] and len(stats.baselines) == 1


def test_upstream_counters_do_not_go_backwards_when_a_worker_dies(scripted, ops):
    import os
    import signal
    live = named_upstream(scripted, "live")
    gw = ops(upstream_config([addr(live)]), 2)
    for _ in range(10):
        assert get(gw.port).status == 200
    route = {"route": "all", "service": "svc"}
    fam = scrape(gw)                 # a SIGKILLed worker's counts are those of its last scrape
    assert value(fam, "fastmesh_upstream_requests", upstream="backend", target=addr(live)) == 10
    bytes_before = value(fam, "fastmesh_response_bytes", **route)
    os.kill(gw.worker_pids()[0], signal.SIGKILL)
    gw.wait_status(lambda s: s["worker_restarts"] == 1 and all(w["alive"] for w in s["workers"]))
    for _ in range(5):
        assert get(gw.port).status == 200
    fam = scrape(gw)
    assert value(fam, "fastmesh_upstream_requests", upstream="backend", target=addr(live)) == 15
    assert value(fam, "fastmesh_response_bytes", **route) == bytes_before * 1.5
    assert value(fam, "fastmesh_upstream_target_healthy", upstream="backend",
                 target=addr(live)) == 1
