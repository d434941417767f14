"""Prometheus metrics: parsed with the official client's parser, merged across workers, adding up."""
from __future__ import annotations

import os
import signal

import pytest

from conftest import get
from test_supervisor import echo_cfg, ops  # noqa: F401  (fixture)

prom_parser = pytest.importorskip("prometheus_client.parser")


def scrape(gw) -> dict:
    """{family name: {(sample name, frozenset(labels)): value}} and the raw families."""
    code, text = gw.admin("GET", "/metrics")
    assert code == 200
    families = {f.name: f for f in prom_parser.text_string_to_metric_families(text)}
    return families


def samples(families, family: str, suffix: str = "", **match) -> list:
    out = []
    for s in families[family].samples:
        if suffix and not s.name.endswith(suffix):
            continue
        if all(s.labels.get(k) == v for k, v in match.items()):
            out.append(s)
    return out


def route_counts(families) -> dict:
    counts: dict = {}
    for s in samples(families, "fastmesh_requests", "_total"):
        key = (s.labels["route"], s.labels["service"], s.labels["status_class"])
        counts[key] = counts.get(key, 0) + s.value
    return counts


def two_routes(echo) -> dict:
    return echo_cfg(echo, {"name": "a", "paths": ["/a"]}, {"name": "b", "paths": ["/b"]})


def test_metrics_parse_and_per_route_counts_add_up_across_workers(echo, ops):
    gw = ops(two_routes(echo), 3)
    for i in range(30):
        assert get(gw.port, "/a").status == 200
    for i in range(17):
        assert get(gw.port, "/b").status == 200
    for i in range(4):
        assert get(gw.port, "/none").status == 404
    fam = scrape(gw)
    assert route_counts(fam) == {("a", "echo", "2xx"): 30, ("b", "echo", "2xx"): 17}
    assert samples(fam, "fastmesh_received_requests")[0].value == 51
    assert samples(fam, "fastmesh_local_responses")[0].value == 4
    assert {s.labels["status_class"]: s.value for s in samples(fam, "fastmesh_responses")} == \
        {"2xx": 47, "4xx": 4}
    assert fam["fastmesh_workers"].samples[0].value == 3
    assert fam["fastmesh_request_duration_seconds"].type == "histogram"
    for family in ("fastmesh_request_duration_seconds", "fastmesh_upstream_duration_seconds",
                   "fastmesh_added_latency_seconds"):
        for route, n in (("a", 30), ("b", 17)):
            count = samples(fam, family, "_count", route=route)[0].value
            assert count == n
            buckets = samples(fam, family, "_bucket", route=route)
            values = [b.value for b in buckets]
            assert values == sorted(values)                       # cumulative
            assert buckets[-1].labels["le"] == "+Inf" and values[-1] == n
            assert samples(fam, family, "_sum", route=route)[0].value > 0
    total = samples(fam, "fastmesh_request_duration_seconds", "_sum", route="a")[0].value
    upstream = samples(fam, "fastmesh_upstream_duration_seconds", "_sum", route="a")[0].value
    added = samples(fam, "fastmesh_added_latency_seconds", "_sum", route="a")[0].value
    assert abs(total - upstream - added) < 1e-6
    head = len(b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n")       # what `get` sends
    assert samples(fam, "fastmesh_request_bytes", "_total", route="a")[0].value == 30 * head
    assert samples(fam, "fastmesh_request_bytes", "_total", route="b")[0].value == 17 * head
    assert samples(fam, "fastmesh_response_bytes", "_total", route="b")[0].value > 17 * 100
    assert samples(fam, "fastmesh_retries", "_total", route="a")[0].value == 0
    assert fam["fastmesh_upstream_target_healthy"].samples == []    # no upstreams declared
    pool = samples(fam, "fastmesh_upstream_pool_connections", target=echo.url[7:])
    assert {s.labels["state"] for s in pool} == {"active", "idle"}
    assert samples(fam, "fastmesh_upstream_connections_created")[0].value >= 1
    assert fam["fastmesh_connections"].samples[0].value >= 0


def test_counters_survive_reloads_and_count_reloads(echo, ops):
    gw = ops(two_routes(echo), 2)
    for _ in range(10):
        assert get(gw.port, "/a").status == 200
    for n in range(3):
        cfg = two_routes(echo)
        cfg["services"][0]["routes"].append({"name": f"extra{n}", "paths": [f"/extra{n}"]})
        assert gw.admin("POST", "/config", cfg)[0] == 200
        for _ in range(5):
            assert get(gw.port, "/a").status == 200
    assert gw.admin("POST", "/config", {"services": "nope"})[0] == 400
    fam = scrape(gw)
    assert route_counts(fam)[("a", "echo", "2xx")] == 25
    assert samples(fam, "fastmesh_request_duration_seconds", "_count", route="a")[0].value == 25
    head = len(b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert samples(fam, "fastmesh_request_bytes", "_total", route="a")[0].value == 25 * head
    reloads = {s.labels["result"]: s.value for s in samples(fam, "fastmesh_config_reloads")}
    assert reloads == {"success": 3, "failure": 1}
    version = gw.status()["config"]["version"]
    assert samples(fam, "fastmesh_config_info")[0].labels["version"] == version


def test_counters_do_not_go_backwards_when_a_worker_dies(echo, ops):
    gw = ops(two_routes(echo), 2)
    for _ in range(20):
        assert get(gw.port, "/a").status == 200
    before = route_counts(scrape(gw))[("a", "echo", "2xx")]
    assert before == 20
    os.kill(gw.worker_pids()[0], signal.SIGKILL)
    gw.wait_status(lambda s: s["worker_restarts"] == 1 and all(w["alive"] for w in s["workers"]))
    for _ in range(5):
        assert get(gw.port, "/a").status == 200
    fam = scrape(gw)
    assert route_counts(fam)[("a", "echo", "2xx")] == 25
    assert fam["fastmesh_worker_restarts"].samples[0].value == 1


def test_single_worker_metrics(echo, ops):
    gw = ops(two_routes(echo), 1)
    for _ in range(7):
        assert get(gw.port, "/b").status == 200
    assert route_counts(scrape(gw)) == {("b", "echo", "2xx"): 7}


def test_prometheus_buckets_from_the_log_linear_histogram():
    from fastmesh._core.histogram import Histogram
    from fastmesh.metrics import BUCKETS_SECONDS, prometheus_buckets
    h = Histogram()
    values_s = [0.00003, 0.0002, 0.0002, 0.003, 0.7, 45.0, 200.0]
    for v in values_s:
        h.add(int(v * 1e9))
    cumulative, count, total = prometheus_buckets(h)
    assert count == len(values_s) and cumulative[-1] == count
    for bound, n in zip(BUCKETS_SECONDS, cumulative):
        assert n == sum(1 for v in values_s if v <= bound), bound
    assert total == pytest.approx(sum(values_s))          # _sum is exact (values are not clamped)


def test_route_stats_fold_retired_targets_only_when_unreferenced():
    from fastmesh.config import load_config_data
    from fastmesh.metrics import RouteStats
    from fastmesh.plan import PoolRegistry, compile_plan
    cfg = load_config_data({"services": [{"name": "s", "url": "http://127.0.0.1:1",
                                          "routes": [{"name": "r", "paths": ["/"]}]}]})
    pools = PoolRegistry()
    stats = RouteStats(by_class=True)         # a sidecar's: the per-class histograms too
    edge = RouteStats()
    old = compile_plan(cfg, pools)
    old.targets[0].class_histogram(2).add(1000)
    held = old.targets[0]                     # as a connection still serving on the old Plan
    stats.retire(old)
    new = compile_plan(cfg, pools)
    del old
    snap = stats.snapshot(new)
    assert len(stats.retired) == 1 and not stats.folded
    held.class_histogram(5).add(2000)         # it can still record
    del held
    snap = stats.snapshot(new)
    assert stats.retired == [] and list(stats.folded) == [("r", "s")]
    from fastmesh._core.histogram import Histogram
    (route, service, data), = snap
    assert Histogram.loads(data["total"]).count == 2
    assert Histogram.loads(data["total_2xx"]).max_ns == 1000      # and per status class
    assert Histogram.loads(data["total_5xx"]).max_ns == 2000
    # The gateway's keeps the merged histogram only (its metrics have no status class label).
    new.targets[0].class_histogram(2).add(500)
    (_, _, data), = edge.snapshot(new)
    assert data["total"] and not any(kind.startswith("total_") for kind in data), list(data)
