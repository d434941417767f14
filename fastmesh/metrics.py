"""Metrics: per-worker snapshots, merging them across workers, and the Prometheus text format.

Worker side (`RouteStats`): the data path counts into each Plan's RouteTargets. A reload makes new
RouteTargets, so a worker keeps the targets of older Plans ("retired") and adds them in until no
connection holds them any more; then their counts are folded into a per-route accumulator and the
target is dropped. Route counters therefore never go backwards across reloads.

Supervisor side (`Aggregate`): each worker's snapshot (msgpack; histograms as `Histogram.dumps()`)
is merged with `Histogram.merge`; the last snapshot of a worker that exits is kept in a "gone"
accumulator so cluster-wide counters stay monotonic when a worker is replaced.

Histograms: the log-linear Cython histograms (2048 buckets, <= 0.78 % error) are exported as
Prometheus histograms with the fixed buckets in `BUCKETS_SECONDS`. A recorded value counts toward
`le=b` when the midpoint of its log-linear bucket is <= b, i.e. the `le` boundaries are exact to
within 0.78 %. `_sum` and `_count` are exact.
"""
from __future__ import annotations

import bisect
import sys

import msgpack

from fastmesh._core.histogram import BUCKETS, Histogram, bucket_value

HISTOGRAMS = ("total", "upstream", "added")
BUCKETS_SECONDS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


# --- worker side ------------------------------------------------------------------------------

class _Accum:
    """Counts and histograms of one (route, service), summed over targets and/or workers."""

    __slots__ = ("counts", "hists")

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.hists: dict[str, Histogram] = {}

    def add_counts(self, counts: dict) -> None:
        for cls, n in counts.items():
            self.counts[cls] = self.counts.get(cls, 0) + n

    def add_hist(self, kind: str, hist: Histogram) -> None:
        if not hist.count:
            return
        mine = self.hists.get(kind)
        if mine is None:
            self.hists[kind] = hist.copy()
        else:
            mine.merge(hist)

    def add_target(self, target) -> None:
        self.add_counts(target.counts())
        self.add_hist("total", target.h_total)
        self.add_hist("upstream", target.h_upstream)
        self.add_hist("added", target.h_added)

    def add_accum(self, other: "_Accum") -> None:
        self.add_counts(other.counts)
        for kind, hist in other.hists.items():
            self.add_hist(kind, hist)

    def dump(self) -> dict:
        return {"counts": self.counts, **{k: h.dumps() for k, h in self.hists.items()}}

    @classmethod
    def load(cls, data: dict) -> "_Accum":
        acc = cls()
        acc.counts = dict(data.get("counts") or {})
        for kind in HISTOGRAMS:
            if data.get(kind):
                acc.hists[kind] = Histogram.loads(data[kind])
        return acc


class RouteStats:
    """A worker's per-route counters across Plan swaps (see the module docstring)."""

    def __init__(self):
        self.retired: list = []                       # RouteTargets of Plans no longer active
        self.folded: dict[tuple[str, str], _Accum] = {}

    def retire(self, plan) -> None:
        if plan is not None:
            self.retired.extend(plan.targets)

    def _fold_unreferenced(self) -> None:
        keep = []
        retired, self.retired = self.retired, []
        while retired:
            target = retired.pop()
            # References now: the local `target` and getrefcount's argument. More means a
            # connection (or a Plan still alive) can still record into it.
            if sys.getrefcount(target) > 2:
                keep.append(target)
                continue
            key = (target.name, target.service)
            self.folded.setdefault(key, _Accum()).add_target(target)
        self.retired = keep

    def snapshot(self, plan) -> list:
        """[[route, service, {"counts": .., "total": bytes, ..}], ...] for every route with data."""
        self._fold_unreferenced()
        merged: dict[tuple[str, str], _Accum] = {}
        for key, acc in self.folded.items():
            merged.setdefault(key, _Accum()).add_accum(acc)
        for target in list(plan.targets if plan is not None else ()) + self.retired:
            merged.setdefault((target.name, target.service), _Accum()).add_target(target)
        return [[route, service, acc.dump()] for (route, service), acc in merged.items()
                if acc.counts or acc.hists]


# --- supervisor side --------------------------------------------------------------------------

class Aggregate:
    """Snapshots of all workers merged into one view (plus workers that are gone)."""

    COUNTERS = ("requests", "local_responses")

    def __init__(self):
        self.gone_routes: dict[tuple[str, str], _Accum] = {}
        self.gone_counters: dict[str, int] = {}
        self.gone_status: dict[str, int] = {}

    def forget_worker(self, snapshot: dict | None) -> None:
        """A worker exited: keep its last counters so totals do not go backwards."""
        if not snapshot:
            return
        for route, service, data in snapshot.get("routes") or ():
            self.gone_routes.setdefault((route, service), _Accum()).add_accum(_Accum.load(data))
        for key in self.COUNTERS:
            self.gone_counters[key] = self.gone_counters.get(key, 0) + snapshot.get(key, 0)
        for cls, n in (snapshot.get("status") or {}).items():
            self.gone_status[cls] = self.gone_status.get(cls, 0) + n

    def merge(self, snapshots: list[dict]) -> dict:
        routes: dict[tuple[str, str], _Accum] = {}
        for key, acc in self.gone_routes.items():
            routes.setdefault(key, _Accum()).add_accum(acc)
        counters = dict.fromkeys(self.COUNTERS, 0)
        for key, n in self.gone_counters.items():
            counters[key] += n
        status = dict(self.gone_status)
        pools: dict[str, dict] = {}
        connections = 0
        for snap in snapshots:
            connections += snap.get("connections", 0)
            for key in self.COUNTERS:
                counters[key] += snap.get(key, 0)
            for cls, n in (snap.get("status") or {}).items():
                status[cls] = status.get(cls, 0) + n
            for route, service, data in snap.get("routes") or ():
                routes.setdefault((route, service), _Accum()).add_accum(_Accum.load(data))
            for pool in snap.get("pools") or ():
                mine = pools.setdefault(pool["target"], {"active": 0, "idle": 0, "created": 0,
                                                         "reused": 0, "expired": 0})
                for key in mine:
                    mine[key] += pool.get(key, 0)
        return {"routes": routes, "pools": pools, "connections": connections,
                "status": status, **counters}


# --- Prometheus text format (0.0.4) -----------------------------------------------------------

_MIDPOINTS: list[int] | None = None
_BUCKET_OF: list[int] | None = None      # log-linear index -> index into BUCKETS_SECONDS (+Inf last)


def _tables() -> tuple[list[int], list[int]]:
    global _MIDPOINTS, _BUCKET_OF
    if _BUCKET_OF is None:
        bounds = [round(b * 1e9) for b in BUCKETS_SECONDS]
        _MIDPOINTS = [bucket_value(i) for i in range(BUCKETS)]
        _BUCKET_OF = [bisect.bisect_left(bounds, mid) for mid in _MIDPOINTS]
    return _MIDPOINTS, _BUCKET_OF


def prometheus_buckets(hist: Histogram) -> tuple[list[int], int, float]:
    """(cumulative counts for each of BUCKETS_SECONDS then +Inf, count, sum in seconds)."""
    _, bucket_of = _tables()
    per = [0] * (len(BUCKETS_SECONDS) + 1)
    data = msgpack.unpackb(hist.dumps(), raw=False)
    pairs = data["b"]
    index = 0
    for k in range(0, len(pairs), 2):
        index += pairs[k]
        per[bucket_of[index]] += pairs[k + 1]
    cumulative, running = [], 0
    for n in per:
        running += n
        cumulative.append(running)
    return cumulative, hist.count, hist.sum_ns / 1e9


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return f"{value:.1f}"
    return repr(value)


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


HISTOGRAM_FAMILIES = (
    ("total", "fastmesh_request_duration_seconds",
     "Time from the first byte of a request to the end of its response, by route."),
    ("upstream", "fastmesh_upstream_duration_seconds",
     "Time from sending the request upstream to the end of the upstream response, by route."),
    ("added", "fastmesh_added_latency_seconds",
     "Latency the gateway itself added: total minus upstream time, by route."),
)


def render(merged: dict, info: dict) -> str:
    """The Prometheus exposition text of a merged view plus supervisor facts (`info`)."""
    w = _Writer()
    w.family("fastmesh_build_info", "gauge", "fastmesh version (always 1).")
    w.sample("fastmesh_build_info", 1, version=info["version"])
    w.family("fastmesh_start_time_seconds", "gauge", "Unix time the gateway started.")
    w.sample("fastmesh_start_time_seconds", float(info["started"]))
    w.family("fastmesh_workers", "gauge", "Worker processes serving traffic.")
    w.sample("fastmesh_workers", info["workers"])
    w.family("fastmesh_worker_restarts_total", "counter", "Workers restarted after exiting unexpectedly.")
    w.sample("fastmesh_worker_restarts_total", info["restarts"])
    w.family("fastmesh_config_info", "gauge", "Version (hash) of the active config (always 1).")
    w.sample("fastmesh_config_info", 1, version=info["config_version"])
    w.family("fastmesh_config_reloads_total", "counter",
             "Config changes (signal, `fastmesh reload`, admin API), by result.")
    for result in ("success", "failure"):
        w.sample("fastmesh_config_reloads_total", info["reloads"].get(result, 0), result=result)
    w.family("fastmesh_connections", "gauge", "Open client connections, all workers.")
    w.sample("fastmesh_connections", merged["connections"])
    w.family("fastmesh_received_requests_total", "counter",
             "Request heads received, routed or not.")
    w.sample("fastmesh_received_requests_total", merged["requests"])
    w.family("fastmesh_local_responses_total", "counter",
             "Responses the gateway answered itself (no route, bad request, upstream errors).")
    w.sample("fastmesh_local_responses_total", merged["local_responses"])
    w.family("fastmesh_responses_total", "counter",
             "Responses to clients by status class, routed or not ('none': no response sent).")
    for cls in STATUS_CLASSES:
        if merged["status"].get(cls):
            w.sample("fastmesh_responses_total", merged["status"][cls], status_class=_cls(cls))

    routes = sorted(merged["routes"].items())
    w.family("fastmesh_requests_total", "counter",
             "Routed requests by route, service and response status class "
             "('none': the client got no response).")
    for (route, service), acc in routes:
        for cls in STATUS_CLASSES:
            if acc.counts.get(cls):
                w.sample("fastmesh_requests_total", acc.counts[cls], route=route, service=service,
                         status_class=_cls(cls))
    bounds = [_num(b) for b in BUCKETS_SECONDS] + ["+Inf"]
    for kind, name, help_text in HISTOGRAM_FAMILIES:
        w.family(name, "histogram", help_text)
        for (route, service), acc in routes:
            hist = acc.hists.get(kind)
            if hist is None:
                continue
            cumulative, count, total = prometheus_buckets(hist)
            for le, n in zip(bounds, cumulative):
                w.sample(f"{name}_bucket", n, route=route, service=service, le=le)
            w.sample(f"{name}_count", count, route=route, service=service)
            w.sample(f"{name}_sum", total, route=route, service=service)

    pools = sorted(merged["pools"].items())
    w.family("fastmesh_upstream_pool_connections", "gauge",
             "Upstream connections by target and state (active: serving a request; idle: pooled).")
    for target, p in pools:
        for state in ("active", "idle"):
            w.sample("fastmesh_upstream_pool_connections", p[state], target=target, state=state)
    for key, help_text in (("created", "Upstream connections opened."),
                           ("reused", "Requests sent on a pooled (reused) upstream connection."),
                           ("expired", "Idle upstream connections closed by idle expiry.")):
        name = f"fastmesh_upstream_connections_{key}_total"
        w.family(name, "counter", help_text + " By target.")
        for target, p in pools:
            w.sample(name, p[key], target=target)
    return w.text()


def _cls(cls: str) -> str:
    return "none" if cls == "0xx" else cls
