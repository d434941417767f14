"""The sidecar's admin API (read-only, loopback): readiness, status, the registry view, and the
east-west metrics that `fastmesh mesh status` reads.

Served by fastmesh.admin's connection handling (`AdminProtocol`) with this request handler.

| method | path | what |
| --- | --- | --- |
| GET | /ready | 200 when both listeners are up and the registry view was loaded, else 503 |
| GET | /status | the instance, both listeners (requests, statuses, upstream health), registry |
| GET | /registry | the registry view: every service and its instances |
| GET | /metrics | Prometheus text: requests and latency histograms per (source, destination, status class), added latency per pair; mTLS handshakes, certificate expiry, authorization decisions; opaque TCP relayed (interception) |
| GET | /stats | the same as JSON, histograms with their log-linear buckets (mergeable): `latency` all classes, `latency_by_status` per class |

East-west metrics come from the listeners' per-route counters (fastmesh.metrics), which the
data path keeps anyway: the outbound listener has one route per destination service, so its
routes are the (this service -> destination) pairs; the inbound listener has one route per
caller service (fastmesh.mesh.routes: routed by the caller's identity or source header), so its
routes are the (caller -> this service) pairs, and `(unknown)` -> this service for callers it
cannot name (outside the mesh). Nothing is counted twice.
"""
from __future__ import annotations

import time

from fastmesh.admin import PROMETHEUS, Answer, error
from fastmesh.metrics import STATUS_CLASSES, _Accum, _cls, _Writer, total_of_class
from fastmesh.mesh.routes import UNKNOWN, caller_of

UNKNOWN_DESTINATION = "(unknown)"   # requests for a service the registry does not know
UNKNOWN_SOURCE = "(unknown)"        # inbound requests from no known caller (outside the mesh)
DURATION = ("fastmesh_mesh_request_duration_seconds",
            "Time from the first byte of a request to the end of its response at this sidecar, "
            "by direction, (source, destination) service pair and response status class "
            "('none': no response sent); sum over status_class for all requests of a pair.")
ADDED = ("fastmesh_mesh_added_latency_seconds",
         "Latency this sidecar added (total minus upstream time), by direction and service pair.")


class SidecarAdmin:
    def __init__(self, sidecar):
        self.sidecar = sidecar

    async def handle(self, method: str, path: str, headers: list, body: bytes) -> Answer:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        routes = {"/ready": self.ready, "/status": self.status, "/registry": self.registry,
                  "/metrics": self.metrics, "/stats": self.stats}
        handler = routes.get(path)
        if handler is None:
            return error(404, f"no such endpoint: {path} (try {', '.join(routes)})")
        if method not in ("GET", "HEAD"):
            return error(405, f"{path} supports GET only", allow="GET, HEAD")
        return handler()

    def ready(self) -> Answer:
        sidecar = self.sidecar
        if sidecar.ready:
            return Answer(200, {"ready": True})
        if sidecar.stopping:
            why = "stopping"
        elif sidecar.registry is None or not sidecar.registry.ready:
            why = "registry view not loaded yet"
        else:
            why = "starting"
        return Answer(503, {"ready": False, "message": why})

    def status(self) -> Answer:
        return Answer(200, self.sidecar.status())

    def registry(self) -> Answer:
        registry = self.sidecar.registry
        return Answer(200, registry.state() if registry is not None else {})

    def metrics(self) -> Answer:
        return Answer(200, render_pairs(service_pairs(self.sidecar))
                      + render_security(self.sidecar) + render_opaque(self.sidecar),
                      content_type=PROMETHEUS)

    def stats(self) -> Answer:
        sidecar = self.sidecar
        instance = sidecar.instance
        return Answer(200, {
            "service": sidecar.options.service,
            "instance": instance.id if instance is not None else None,
            "started": sidecar.started, "time": time.time(),
            "pairs": [pair_json(direction, source, destination, acc)
                      for (direction, source, destination), acc in service_pairs(sidecar)]})


# --- (source, destination) pairs from the listeners' route counters -------------------------------

def service_pairs(sidecar) -> list[tuple[tuple[str, str, str], _Accum]]:
    """[((direction, source, destination), counts and histograms)] sorted. Inbound, the source
    is the caller's service, UNKNOWN_SOURCE when it has none."""
    pairs: dict[tuple[str, str, str], _Accum] = {}
    own = sidecar.options.service
    for direction, worker in (("outbound", sidecar.outbound), ("inbound", sidecar.inbound)):
        if worker is None or worker.gateway is None:
            continue
        for route, _service, data in worker.route_stats.snapshot(worker.gateway.plan):
            if direction == "inbound":
                key = ("inbound", caller_of(own, route) or UNKNOWN_SOURCE, own)
            else:
                key = ("outbound", own, UNKNOWN_DESTINATION if route == UNKNOWN else route)
            pairs.setdefault(key, _Accum()).add_accum(_Accum.load(data))
    return sorted(pairs.items())


def histogram_json(hist) -> dict:
    """A histogram with its sparse log-linear buckets ([gap, count, ...], as Histogram.dumps):
    two of them can be subtracted bucket by bucket, so rates and percentiles over an interval
    stay exact to the histogram's 0.78 %."""
    if hist is None:
        return {"count": 0, "sum_ns": 0, "min_ns": 0, "max_ns": 0, "buckets": []}
    import msgpack                   # here: only a /status with traffic needs it (~0.3 MiB)
    data = msgpack.unpackb(hist.dumps(), raw=False)
    return {"count": data["count"], "sum_ns": data["sum"], "min_ns": data["min"],
            "max_ns": data["max"], "buckets": data["b"]}


def pair_json(direction: str, source: str, destination: str, acc: _Accum) -> dict:
    status = {_cls(cls): acc.counts[cls] for cls in STATUS_CLASSES if acc.counts.get(cls)}
    by_status = {_cls(cls): histogram_json(acc.hists[total_of_class(cls)])
                 for cls in STATUS_CLASSES if total_of_class(cls) in acc.hists}
    return {"direction": direction, "source": source or None, "destination": destination,
            "requests": sum(status.values()), "status": status,
            "latency": histogram_json(acc.hists.get("total")),
            "latency_by_status": by_status,
            "added": histogram_json(acc.hists.get("added"))}


def render_pairs(pairs: list) -> str:
    w = _Writer()
    w.family("fastmesh_mesh_requests_total", "counter",
             "Requests by direction, source service, destination service and response status "
             "class ('none': no response sent). Inbound: source is the caller's service, "
             "'(unknown)' for callers outside the mesh.")
    for (direction, source, destination), acc in pairs:
        for cls in STATUS_CLASSES:
            if acc.counts.get(cls):
                w.sample("fastmesh_mesh_requests_total", acc.counts[cls], direction=direction,
                         source=source, destination=destination, status_class=_cls(cls))
    w.family(DURATION[0], "histogram", DURATION[1])
    for (direction, source, destination), acc in pairs:
        for cls in STATUS_CLASSES:
            hist = acc.hists.get(total_of_class(cls))
            if hist is not None:
                w.histogram(DURATION[0], hist, direction=direction, source=source,
                            destination=destination, status_class=_cls(cls))
    w.family(ADDED[0], "histogram", ADDED[1])
    for (direction, source, destination), acc in pairs:
        hist = acc.hists.get("added")
        if hist is not None:
            w.histogram(ADDED[0], hist, direction=direction, source=source,
                        destination=destination)
    return w.text()


def render_security(sidecar) -> str:
    """mTLS handshakes by outcome, the certificate's expiry, authorization decisions."""
    w = _Writer()
    tls = sidecar.tls
    service = sidecar.options.service
    if tls is not None:
        counts = tls.counts
        w.family("fastmesh_mesh_inbound_connections_total", "counter",
                 "Inbound connections by outcome: tls and plaintext accepted, refused by reason "
                 "(no_client_cert, unknown_ca, expired, bad_protocol_version, plaintext, "
                 "timeout, other).")
        w.sample("fastmesh_mesh_inbound_connections_total", counts.tls, outcome="tls",
                 reason="")
        w.sample("fastmesh_mesh_inbound_connections_total", counts.plaintext,
                 outcome="plaintext", reason="")
        for reason, n in counts.refused.items():
            w.sample("fastmesh_mesh_inbound_connections_total", n, outcome="refused",
                     reason=reason)
        cert = tls.source.status()
        w.family("fastmesh_mesh_certificate_expiry_seconds", "gauge",
                 "Seconds until this sidecar's workload certificate expires (negative: expired).")
        w.sample("fastmesh_mesh_certificate_expiry_seconds", cert.get("seconds_left") or 0,
                 identity=str(tls.identity), state=str(cert.get("state")))
        w.family("fastmesh_mesh_certificate_rotations_total", "counter",
                 "Certificates loaded after the first one (rotation).")
        w.sample("fastmesh_mesh_certificate_rotations_total", tls.rotations)
    if sidecar.tls is not None or sidecar.authz is not None:
        from fastmesh.plugins.mesh_authorization import decisions
        found = decisions(service)
        w.family("fastmesh_mesh_authorization_decisions_total", "counter",
                 "Inbound requests checked against the authorization policy, by decision.")
        w.sample("fastmesh_mesh_authorization_decisions_total", found.allowed,
                 destination=service, decision="allowed")
        w.sample("fastmesh_mesh_authorization_decisions_total", found.denied,
                 destination=service, decision="denied")
    return w.text() if w.lines else ""


# (family, type, help, [(key in relay_counts, label name, label value)])
OPAQUE_FAMILIES = (
    ("fastmesh_mesh_opaque_connections_total", "counter",
     "Intercepted connections that were not HTTP for the mesh, by outcome: relayed as TCP, "
     "the connect to their destination failed, no instance to relay to (all ejected), or "
     "refused by the authorization policy.",
     (("relayed", "outcome", "relayed"), ("connect_failures", "outcome", "connect_failed"),
      ("no_target", "outcome", "no_target"), ("refused", "outcome", "refused"))),
    ("fastmesh_mesh_opaque_mtls_connections_total", "counter",
     "Of the relayed opaque TCP connections, those carried over mTLS between sidecars.",
     (("mtls", None, None),)),
    ("fastmesh_mesh_opaque_active_connections", "gauge",
     "Opaque TCP connections being relayed now.", (("active", None, None),)),
    ("fastmesh_mesh_opaque_bytes_total", "counter",
     "Bytes relayed as opaque TCP, to the destination and back from it.",
     (("bytes_to_destination", "flow", "to_destination"),
      ("bytes_from_destination", "flow", "from_destination"))),
)


# Opaque TCP per pair of services, as fastmesh_mesh_requests_total is for HTTP.
PAIR_FAMILIES = (
    ("fastmesh_mesh_tcp_connections_total", "counter",
     "Opaque TCP connections by direction, source and destination service ((external): an "
     "address outside the mesh; (unknown): a caller neither its mTLS identity nor its address "
     "names): relayed, a connect that failed, or no instance to relay to.",
     (("relayed", "outcome", "relayed"), ("connect_failures", "outcome", "connect_failed"),
      ("no_target", "outcome", "no_target"))),
    ("fastmesh_mesh_tcp_bytes_total", "counter",
     "Bytes of opaque TCP by direction, source and destination service, to the destination "
     "and back from it.",
     (("bytes_to_destination", "flow", "to_destination"),
      ("bytes_from_destination", "flow", "from_destination"))),
)
PAIR_SIDES = (("outbound", "by_destination"), ("inbound", "by_source"))


def render_opaque(sidecar) -> str:
    """Opaque TCP relayed under interception, per direction and per pair of services
    (nothing without interception)."""
    found = sidecar.opaque_status()
    if not found:
        return ""
    w = _Writer()
    for name, kind, help_text, samples in OPAQUE_FAMILIES:
        w.family(name, kind, help_text)
        for direction, counts in found.items():
            for key, label, value in samples:
                w.sample(name, counts[key], direction=direction,
                         **({label: value} if label else {}))
    own = sidecar.options.service
    if not any(found[side][key] for side, key in PAIR_SIDES):
        return w.text()
    for name, kind, help_text, samples in PAIR_FAMILIES:
        w.family(name, kind, help_text)
        for side, key in PAIR_SIDES:
            for other, counts in found[side][key].items():
                ends = {"source": own, "destination": other} if side == "outbound" else \
                    {"source": other, "destination": own}
                for field, label, value in samples:
                    w.sample(name, counts[field], direction=side, **ends, **{label: value})
    return w.text()
