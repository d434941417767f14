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

from fastmesh._core.histogram import BUCKETS, Histogram, bucket_value

BUCKETS_SECONDS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def total_of_class(cls: str) -> str:
    """The histogram kind of the total time of responses of status class `cls` ("2xx")."""
    return "total_" + cls


# "total" is all classes merged (what the gateway's per-route metrics export); the mesh's
# (source, destination) metrics export the per-class ones (fastmesh.mesh.admin).
HISTOGRAMS = ("total", "upstream", "added") + tuple(total_of_class(c) for c in STATUS_CLASSES)


# --- worker side ------------------------------------------------------------------------------

ROUTE_TOTALS = ("bytes_in", "bytes_out", "retried")     # RouteTarget counters beside `counts()`
TARGET_COUNTERS = ("requests", "failures", "ejections")  # balancer Target counters
UPSTREAM_COUNTERS = ("rejected", "no_target")           # Balancer counters
STATE_SEVERITY = {"healthy": 0, "half-open": 1, "probing": 2, "ejected": 3}


def _add(into: dict, counts: dict) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


class _Accum:
    """Counts and histograms of one (route, service), summed over targets and/or workers."""

    __slots__ = ("counts", "hists", "totals")

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.hists: dict[str, Histogram] = {}
        self.totals: dict[str, int] = {}       # ROUTE_TOTALS

    def add_counts(self, counts: dict) -> None:
        _add(self.counts, counts)

    def add_hist(self, kind: str, hist: Histogram) -> None:
        if not hist.count:
            return
        mine = self.hists.get(kind)
        if mine is None:
            self.hists[kind] = hist.copy()
        else:
            mine.merge(hist)

    def add_target(self, target, by_class: bool = False) -> None:
        """Add a RouteTarget's numbers; `by_class`: also its total-time histogram per status
        class (the mesh exports them; the gateway's per-route metrics only the merged one)."""
        self.add_counts(target.counts())
        _add(self.totals, {k: getattr(target, k) for k in ROUTE_TOTALS if getattr(target, k)})
        for cls, hist in target.totals_by_class().items():
            self.add_hist("total", hist)
            if by_class:
                self.add_hist(total_of_class(cls), hist)
        self.add_hist("upstream", target.h_upstream)
        self.add_hist("added", target.h_added)

    def add_accum(self, other: "_Accum") -> None:
        self.add_counts(other.counts)
        _add(self.totals, other.totals)
        for kind, hist in other.hists.items():
            self.add_hist(kind, hist)

    def dump(self) -> dict:
        return {"counts": self.counts, "totals": self.totals,
                **{k: h.dumps() for k, h in self.hists.items()}}

    @classmethod
    def load(cls, data: dict) -> "_Accum":
        acc = cls()
        acc.counts = dict(data.get("counts") or {})
        acc.totals = dict(data.get("totals") or {})
        for kind in HISTOGRAMS:
            if data.get(kind):
                acc.hists[kind] = Histogram.loads(data[kind])
        return acc


class RouteStats:
    """A worker's per-route counters across Plan swaps (see the module docstring). `by_class`:
    keep the per-status-class histograms too (a sidecar's listeners; see _Accum.add_target)."""

    def __init__(self, by_class: bool = False):
        self.by_class = by_class
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
            self.folded.setdefault(key, _Accum()).add_target(target, self.by_class)
        self.retired = keep

    def snapshot(self, plan) -> list:
        """[[route, service, {"counts": .., "total": bytes, ..}], ...] for every route with data."""
        self._fold_unreferenced()
        merged: dict[tuple[str, str], _Accum] = {}
        for key, acc in self.folded.items():
            merged.setdefault(key, _Accum()).add_accum(acc)
        for target in list(plan.targets if plan is not None else ()) + self.retired:
            merged.setdefault((target.name, target.service), _Accum()).add_target(
                target, self.by_class)
        return [[route, service, acc.dump()] for (route, service), acc in merged.items()
                if acc.counts or acc.hists or acc.totals]


class UpstreamStats:
    """A worker's upstream (balancer) counters across Plan swaps.

    Each Plan has its own Balancers. A new Balancer inherits its targets' `requests`, `failures`
    and `ejections` from the previous Plan's one (same upstream, same host:port) when it is
    compiled, and the old Balancer may keep counting for requests that started on the old Plan.
    So each Balancer's contribution is its counts minus what it held when it became active (its
    baseline, taken by `retire` at the swap, before it served anything); retired Balancers are
    added in until nothing references them, then folded into per-key accumulators, like
    `RouteStats`. `rejected` and `no_target` are not inherited (baseline 0).

    Whatever swaps Plans should call `retire(old, new)`. A swap it was not told about is noticed
    at the next snapshot (unknown Balancers): the Balancers it knew are retired, and the new ones
    are counted from their values then (those that could have inherited) or from 0 (the rest),
    so counts never go backwards nor double; only what the new ones served before that snapshot
    is missed.
    """

    def __init__(self):
        self.baselines: dict[int, dict[str, tuple]] = {}     # id(active/retired Balancer) -> ..
        self.active: list = []                               # the current Plan's Balancers
        self.retired: list = []
        self.folded_targets: dict[tuple[str, str], dict[str, int]] = {}
        self.folded_upstreams: dict[str, dict[str, int]] = {}

    @staticmethod
    def _values(balancer) -> dict[str, tuple]:
        return {t.address: tuple(getattr(t, k) for k in TARGET_COUNTERS) for t in balancer.targets}

    def _switch(self, plan) -> None:
        new_active = list(plan.balancers.values()) if plan is not None else []
        keep = {id(b) for b in new_active}
        self.retired.extend(b for b in self.active if id(b) not in keep)
        self.active = new_active

    def _track(self, plan) -> None:
        """Adopt `plan`'s Balancers if they are new to us (the first Plan, or an untold swap)."""
        if plan is None:
            return
        unseen = [b for b in plan.balancers.values() if id(b) not in self.baselines]
        if not unseen:
            return
        known = {b.name for b in self.active}
        for balancer in unseen:
            self.baselines[id(balancer)] = self._values(balancer) if balancer.name in known else {}
        self._switch(plan)

    def retire(self, old, new) -> None:
        """`new` replaces `old` (Worker.commit), before `new` serves anything."""
        self._track(old)
        if new is not None:
            for balancer in new.balancers.values():
                self.baselines[id(balancer)] = self._values(balancer)
        self._switch(new)

    def _contribution(self, balancer, targets: dict, upstreams: dict) -> None:
        base = self.baselines.get(id(balancer), {})
        for t in balancer.targets:
            start = base.get(t.address, (0,) * len(TARGET_COUNTERS))
            delta = {k: getattr(t, k) - start[i] for i, k in enumerate(TARGET_COUNTERS)}
            _add(targets.setdefault((balancer.name, t.address), {}), delta)
        _add(upstreams.setdefault(balancer.name, {}),
             {k: getattr(balancer, k) for k in UPSTREAM_COUNTERS})

    def _fold_unreferenced(self) -> None:
        keep = []
        retired, self.retired = self.retired, []
        while retired:
            balancer = retired.pop()
            # References now: the local and getrefcount's argument (see RouteStats).
            if sys.getrefcount(balancer) > 2:
                keep.append(balancer)
                continue
            self._contribution(balancer, self.folded_targets, self.folded_upstreams)
            self.baselines.pop(id(balancer), None)
        self.retired = keep

    def counters(self, plan) -> dict:
        """{"targets": [[upstream, target, {requests, failures, ejections}]],
        "upstreams": [[upstream, {rejected, no_target}]]}: this worker's totals since start."""
        self._track(plan)
        self._fold_unreferenced()
        targets = {k: dict(v) for k, v in self.folded_targets.items()}
        upstreams = {k: dict(v) for k, v in self.folded_upstreams.items()}
        for balancer in self.active + self.retired:
            self._contribution(balancer, targets, upstreams)
        return {"targets": [[u, t, c] for (u, t), c in targets.items()],
                "upstreams": [[u, c] for u, c in upstreams.items()]}

    def health(self, plan, counters: dict) -> dict:
        """The current Plan's balancers: {name: {"stats": Balancer.stats(), "targets": rows}}.

        Rows are `Balancer.health()` with requests/failures/ejections replaced by this worker's
        totals (which survive reloads), plus `state` and `active_ok`."""
        totals = {(u, t): c for u, t, c in counters["targets"]}
        out = {}
        for name, balancer in (plan.balancers.items() if plan is not None else ()):
            rows = []
            for row in balancer.health():
                row = dict(row)
                row["state"] = row["passive"]
                row["active_ok"] = row["active"] == "healthy"
                row.update(totals.get((name, row["target"]), {}))
                rows.append(row)
            out[name] = {"stats": balancer.stats(), "targets": rows}
        return out


# --- supervisor side --------------------------------------------------------------------------

class Aggregate:
    """Snapshots of all workers merged into one view (plus workers that are gone)."""

    COUNTERS = ("requests", "local_responses", "send_timeouts")

    def __init__(self):
        self.gone_routes: dict[tuple[str, str], _Accum] = {}
        self.gone_counters: dict[str, int] = {}
        self.gone_status: dict[str, int] = {}
        self.gone_targets: dict[tuple[str, str], dict[str, int]] = {}
        self.gone_upstreams: dict[str, dict[str, int]] = {}
        self.gone_tls: dict[str, int] = {}

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
        counters = snapshot.get("upstream_counters") or {}
        for upstream, target, counts in counters.get("targets") or ():
            _add(self.gone_targets.setdefault((upstream, target), {}), counts)
        for upstream, counts in counters.get("upstreams") or ():
            _add(self.gone_upstreams.setdefault(upstream, {}), counts)
        _add(self.gone_tls, snapshot.get("tls_handshakes") or {})

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
        targets = {k: dict(v) for k, v in self.gone_targets.items()}
        upstreams = {k: dict(v) for k, v in self.gone_upstreams.items()}
        healthy: dict[tuple[str, str], bool] = {}      # live workers only: healthy on every one
        tls = tls_handshakes(snapshots, self.gone_tls)
        for snap in snapshots:
            balancing = snap.get("upstream_counters") or {}
            for upstream, target, counts in balancing.get("targets") or ():
                _add(targets.setdefault((upstream, target), {}), counts)
            for upstream, counts in balancing.get("upstreams") or ():
                _add(upstreams.setdefault(upstream, {}), counts)
            for upstream, view in (snap.get("upstreams") or {}).items():
                for row in view["targets"]:
                    key = (upstream, row["target"])
                    healthy[key] = healthy.get(key, True) and bool(row["healthy"])
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
                "status": status, "upstream_targets": targets, "upstream_counters": upstreams,
                "upstream_healthy": healthy, "tls_handshakes": tls, **counters}


def tls_handshakes(snapshots: list[dict], gone: dict | None = None) -> dict[str, int]:
    """TLS listeners' handshakes by outcome ("ok" or a fastmesh.tls.HANDSHAKE_FAILURES
    reason), summed over workers; {} when no worker has a TLS listener."""
    total = dict(gone or {})
    for snap in snapshots:
        _add(total, snap.get("tls_handshakes") or {})
    return total


def merge_upstream_health(snapshots: list[dict], upstream) -> dict:
    """`GET /upstreams/{name}/health`: one upstream (a config Upstream) over the live workers.

    Merged conservatively: a target is `healthy` (and `active_ok`) only when it is on every
    worker that reports it; `state` is the worst one (ejected > probing > half-open > healthy);
    `in_flight`, `requests`, `failures`, `ejections` are summed; `ewma_ms` and `ejected_for_s`
    are the largest. `workers` lists each worker's own view of the target.
    """
    name = upstream.name
    views = [(snap.get("index"), snap["upstreams"][name]) for snap in snapshots
             if name in (snap.get("upstreams") or {})]
    declared = [{"target": _address(t.host, t.port), "weight": t.weight} for t in upstream.targets]
    answer = {"upstream": name, "algorithm": upstream.algorithm, "in_use": bool(views),
              "workers": len(views),
              "merge": "healthy only when healthy on every worker; state: the worst; "
                       "counts: summed; ewma_ms: the largest"}
    if not views:
        answer.update(healthy_targets=None, targets_total=len(declared), failing_open=None, targets=[
            {**t, "healthy": None, "state": "unused"} for t in declared])
        return answer
    rows: dict[str, dict] = {}
    order: list[str] = []
    for index, view in views:
        for row in view["targets"]:
            address = row["target"]
            merged = rows.get(address)
            if merged is None:
                order.append(address)
                merged = rows[address] = {
                    "target": address, "weight": row["weight"], "healthy": True,
                    "state": "healthy", "active_ok": True, "in_flight": 0, "requests": 0,
                    "failures": 0, "ejections": 0, "ewma_ms": 0.0, "ejected_for_s": 0.0,
                    "workers": []}
            merged["healthy"] = merged["healthy"] and bool(row["healthy"])
            merged["active_ok"] = merged["active_ok"] and bool(row["active_ok"])
            if STATE_SEVERITY.get(row["state"], 0) > STATE_SEVERITY.get(merged["state"], 0):
                merged["state"] = row["state"]
            for key in ("in_flight", "requests", "failures", "ejections"):
                merged[key] += row.get(key, 0)
            merged["ewma_ms"] = max(merged["ewma_ms"], row["ewma_ms"])
            merged["ejected_for_s"] = max(merged["ejected_for_s"], round(row["ejected_for_s"], 3))
            merged["workers"].append({
                "worker": index, "healthy": bool(row["healthy"]), "state": row["state"],
                "active_ok": bool(row["active_ok"]), "in_flight": row["in_flight"],
                "requests": row.get("requests", 0), "failures": row.get("failures", 0),
                "ejections": row.get("ejections", 0), "ewma_ms": row["ewma_ms"],
                "ejected_for_s": round(row["ejected_for_s"], 3)})
    targets = [rows[a] for a in order]
    stats = [view["stats"] for _, view in views]
    answer.update(
        algorithm=stats[0]["algorithm"],
        healthy_targets=sum(1 for t in targets if t["healthy"]),
        targets_total=len(targets),
        failing_open=any(s["failing_open"] for s in stats),
        active_requests=sum(s["active_requests"] for s in stats),
        connections=sum(s["connections"] for s in stats),
        pending=sum(s["pending"] for s in stats),
        targets=targets)
    return answer


def upstream_summaries(snapshots: list[dict], upstreams) -> list[dict]:
    """`GET /upstreams` beside the declared entities: algorithm and target counts per upstream."""
    out = []
    for upstream in upstreams:
        merged = merge_upstream_health(snapshots, upstream)
        out.append({"name": upstream.name, "algorithm": merged["algorithm"],
                    "in_use": merged["in_use"], "targets": len(merged["targets"]),
                    "healthy_targets": merged["healthy_targets"],
                    "failing_open": merged["failing_open"]})
    return out


def _address(host: str, port: int) -> str:
    if not port:                    # an SRV name: its ports come from DNS
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    import msgpack                   # here: only a /metrics scrape needs it
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


_LE_LABELS = [_num(b) for b in BUCKETS_SECONDS] + ["+Inf"]     # a histogram's le="..." labels


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_num(value)}")

    def histogram(self, name: str, hist: Histogram, **labels: str) -> None:
        """One histogram's _bucket (BUCKETS_SECONDS, +Inf), _count and _sum samples."""
        cumulative, count, total = prometheus_buckets(hist)
        for le, n in zip(_LE_LABELS, cumulative):
            self.sample(f"{name}_bucket", n, **labels, le=le)
        self.sample(f"{name}_count", count, **labels)
        self.sample(f"{name}_sum", total, **labels)

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
    w.family("fastmesh_client_send_timeouts_total", "counter",
             "Client connections cut off for accepting no response bytes for send_timeout.")
    w.sample("fastmesh_client_send_timeouts_total", merged["send_timeouts"])
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
    for key, name, help_text in ROUTE_TOTAL_FAMILIES:
        w.family(name, "counter", help_text)
        for (route, service), acc in routes:
            w.sample(name, acc.totals.get(key, 0), route=route, service=service)
    for kind, name, help_text in HISTOGRAM_FAMILIES:
        w.family(name, "histogram", help_text)
        for (route, service), acc in routes:
            hist = acc.hists.get(kind)
            if hist is None:
                continue
            w.histogram(name, hist, route=route, service=service)

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
    _render_upstreams(w, merged)
    if merged.get("tls_handshakes"):
        w.family("fastmesh_tls_handshakes_total", "counter",
                 "TLS handshakes on the TLS listeners, by result: ok, or why one failed.")
        for result, n in sorted(merged["tls_handshakes"].items()):
            w.sample("fastmesh_tls_handshakes_total", n, result=result)
    return w.text()


ROUTE_TOTAL_FAMILIES = (
    ("bytes_in", "fastmesh_request_bytes_total",
     "Request bytes received from clients (head and body), by route."),
    ("bytes_out", "fastmesh_response_bytes_total",
     "Response bytes sent to clients (head and body), by route."),
    ("retried", "fastmesh_retries_total",
     "Requests resent to another upstream target, by route."),
)


def _render_upstreams(w: _Writer, merged: dict) -> None:
    healthy = sorted(merged.get("upstream_healthy", {}).items())
    w.family("fastmesh_upstream_target_healthy", "gauge",
             "1 when the upstream target is healthy (eligible for picks) on every worker, else 0.")
    for (upstream, target), ok in healthy:
        w.sample("fastmesh_upstream_target_healthy", 1 if ok else 0,
                 upstream=upstream, target=target)
    targets = sorted(merged.get("upstream_targets", {}).items())
    for key, name, help_text in (
            ("requests", "fastmesh_upstream_requests_total",
             "Requests (tries, retries included) sent to an upstream target."),
            ("failures", "fastmesh_upstream_failures_total",
             "Failed tries to an upstream target (connect failure, timeout, reset, or a "
             "response status passive health counts as a failure)."),
            ("ejections", "fastmesh_upstream_ejections_total",
             "Times an upstream target was ejected by passive health (failed probes included).")):
        w.family(name, "counter", help_text)
        for (upstream, target), counts in targets:
            w.sample(name, counts.get(key, 0), upstream=upstream, target=target)
    upstreams = sorted(merged.get("upstream_counters", {}).items())
    for key, name, help_text in (
            ("rejected", "fastmesh_upstream_circuit_breaker_rejections_total",
             "Requests answered 503 because the upstream was over its circuit breaker limits."),
            ("no_target", "fastmesh_upstream_no_target_total",
             "Picks that found no healthy target: a 503, or a retry with no other target.")):
        w.family(name, "counter", help_text)
        for upstream, counts in upstreams:
            w.sample(name, counts.get(key, 0), upstream=upstream)


def _cls(cls: str) -> str:
    return "none" if cls == "0xx" else cls
