"""`fastmesh mesh status`: a live table per service pair (requests/s, success rate, p50/p99).

Like `linkerd viz stat`, computed from the sidecars themselves: the registry says which
sidecars exist and where their admin API is (instance metadata `fastmesh.admin`, registered by
`fastmesh sidecar`); each admin API's `GET /stats` gives cumulative counters and histograms per
(source, destination) pair. Two snapshots `--interval` apart give the rates; histogram buckets
are subtracted, so p50/p99 describe that interval only (to the histogram's 0.78 %). A sidecar
that restarted between the snapshots counts from zero. Outbound rows are counted by the
caller's sidecar, inbound rows by the callee's: each pair of the mesh has both (their difference
is what happened on the way, e.g. connections refused); inbound `(unknown)` -> service counts
callers outside the mesh, `*` -> service a sidecar that cannot tell its callers apart.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastmesh._core.histogram import bucket_value

REGISTRY_WAIT = 3.0
ADMIN_TIMEOUT = 2.0
ANY = "*"


# --- reading the mesh --------------------------------------------------------------------------

async def _read_view(url: str, wait: float):
    from fastmesh.mesh.registry import open_registry
    registry = open_registry(url, lambda: None, 10.0)
    try:
        await registry.start(wait)
        return registry.view(), registry.ready, registry.error
    finally:
        await registry.stop()


def read_registry(url: str, wait: float = REGISTRY_WAIT):
    """(view, ready, error) of the registry at `url`; ValueError for an unsupported URL."""
    return asyncio.run(_read_view(url, wait))


@dataclass
class Sidecar:
    service: str
    id: str
    admin: str | None
    stats: dict | None = None
    error: str | None = None


def fetch_stats(sidecar: Sidecar, timeout: float = ADMIN_TIMEOUT) -> Sidecar:
    """GET /stats from the sidecar's admin API; `error` says why not."""
    if not sidecar.admin:
        sidecar.error = "no admin address registered"
        return sidecar
    host, _, port = sidecar.admin.rpartition(":")
    import http.client                   # here: a sidecar serving /status never needs it
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", "/stats")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise ValueError(f"GET /stats answered {resp.status}")
        stats = json.loads(body)
    except (OSError, ValueError) as exc:
        sidecar.error = f"admin {sidecar.admin} unreachable: {exc}"
        return sidecar
    finally:
        conn.close()
    if (stats.get("service"), stats.get("instance")) != (sidecar.service, sidecar.id):
        # e.g. a sidecar that found its admin port busy and one of another instance answered
        sidecar.error = (f"admin {sidecar.admin} answers for {stats.get('service')}/"
                         f"{stats.get('instance')}, not this instance")
        return sidecar
    sidecar.stats = stats
    return sidecar


def snapshot(view: dict, timeout: float = ADMIN_TIMEOUT) -> list[Sidecar]:
    """Every instance of `view` with its /stats (fetched in parallel) or its error."""
    sidecars = [Sidecar(i.service, i.id, i.admin) for found in view.values() for i in found]
    if not sidecars:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(sidecars))) as pool:
        return list(pool.map(lambda s: fetch_stats(s, timeout), sidecars))


# --- two snapshots -> one table ----------------------------------------------------------------

def _buckets(hist: dict) -> dict[int, int]:
    out, index, pairs = {}, 0, hist.get("buckets") or []
    for k in range(0, len(pairs) - 1, 2):
        index += pairs[k]
        out[index] = pairs[k + 1]
    return out


def percentile(buckets: dict[int, int], q: float) -> int | None:
    """Value (ns) at percentile q of a bucket -> count map; None when empty."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(q / 100.0 * total))
    seen = 0
    for index in sorted(buckets):
        seen += buckets[index]
        if seen >= rank:
            return bucket_value(index)
    return bucket_value(max(buckets))


@dataclass
class Row:
    direction: str
    source: str
    destination: str
    requests: int = 0               # in the interval
    rate: float = 0.0               # sum over the sidecars of requests_i / interval_i
    status: dict = field(default_factory=dict)
    buckets: dict = field(default_factory=dict)
    total: int = 0                  # since the sidecars started
    sidecars: int = 0

    @property
    def success(self) -> float | None:
        answered = self.requests
        if not answered:
            return None
        failed = self.status.get("5xx", 0) + self.status.get("none", 0)
        return (answered - failed) / answered

    def to_dict(self) -> dict:
        return {"direction": self.direction, "source": self.source,
                "destination": self.destination, "rps": round(self.rate, 3),
                "requests": self.requests, "status": self.status,
                "success": None if self.success is None else round(self.success, 6),
                "p50_ms": _ms(percentile(self.buckets, 50)),
                "p99_ms": _ms(percentile(self.buckets, 99)),
                "total_requests": self.total, "sidecars": self.sidecars}


def _ms(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 4)


def _pair_key(pair: dict) -> tuple[str, str, str]:
    return (pair["direction"], pair.get("source") or ANY, pair["destination"])


def compare(before: list[Sidecar], after: list[Sidecar]) -> list[Row]:
    """Rows per (direction, source, destination) for what happened between the snapshots."""
    earlier = {(s.service, s.id): s.stats for s in before if s.stats}
    rows: dict[tuple[str, str, str], Row] = {}
    for sidecar in after:
        now = sidecar.stats
        if not now:
            continue
        then = earlier.get((sidecar.service, sidecar.id))
        if then is not None and then.get("started") != now.get("started"):
            # Restarted in the interval: everything it counted happened since its start.
            then = {"time": now["started"], "pairs": ()}
        old_pairs = {_pair_key(p): p for p in (then or {}).get("pairs", ())}
        elapsed = now["time"] - then["time"] if then else None
        for pair in now.get("pairs", ()):
            key = _pair_key(pair)
            row = rows.get(key)
            if row is None:
                row = rows[key] = Row(*key)
            row.sidecars += 1
            row.total += pair["requests"]
            if then is None:
                continue                # no earlier snapshot of this sidecar: no rate yet
            old = old_pairs.get(key, {"requests": 0, "status": {}, "latency": {}})
            delta = pair["requests"] - old["requests"]
            buckets = _buckets(pair["latency"])
            for index, n in _buckets(old["latency"]).items():
                buckets[index] = buckets.get(index, 0) - n
            if delta < 0 or any(n < 0 for n in buckets.values()):
                continue                # counters went backwards: not the same process
            row.requests += delta
            if elapsed and elapsed > 0:
                row.rate += delta / elapsed
            for cls, n in pair["status"].items():
                d = n - old["status"].get(cls, 0)
                if d:
                    row.status[cls] = row.status.get(cls, 0) + d
            for index, n in buckets.items():
                if n:
                    row.buckets[index] = row.buckets.get(index, 0) + n
    order = {"outbound": 0, "inbound": 1}
    return sorted(rows.values(), key=lambda r: (order.get(r.direction, 2), r.source,
                                                r.destination))


# --- output ------------------------------------------------------------------------------------

def _latency(ns: int | None) -> str:
    if ns is None:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1000:.0f}µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f}ms"
    return f"{ns / 1e9:.2f}s"


def table(rows: list[Row], sidecars: list[Sidecar], interval: float) -> str:
    head = ("SOURCE", "DESTINATION", "DIR", "RPS", "SUCCESS", "P50", "P99", "REQUESTS")
    lines = [head]
    for r in rows:
        success = "-" if r.success is None else f"{r.success * 100:.2f}%"
        lines.append((r.source, r.destination, "in" if r.direction == "inbound" else "out",
                      f"{r.rate:.1f}", success, _latency(percentile(r.buckets, 50)),
                      _latency(percentile(r.buckets, 99)), str(r.requests)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    right = {3, 4, 5, 6, 7}
    out = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                     for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
           for line in lines]
    if len(lines) == 1:
        out.append("(no traffic recorded by any sidecar yet)")
    reached = sum(1 for s in sidecars if s.stats)
    out.append(f"{reached} of {len(sidecars)} sidecar(s) answered; rates over {interval:g}s")
    for s in sidecars:
        if s.error:
            out.append(f"  {s.service}/{s.id}: {s.error}")
    return "\n".join(out)


def as_json(rows: list[Row], sidecars: list[Sidecar], interval: float) -> str:
    return json.dumps({
        "interval": interval, "time": time.time(), "rows": [r.to_dict() for r in rows],
        "sidecars": [{"service": s.service, "id": s.id, "admin": s.admin,
                      "ok": s.stats is not None, "error": s.error} for s in sidecars]})


# --- the command -------------------------------------------------------------------------------

def _interval(value: str) -> float:
    from fastmesh.mesh.cli import _checked, _seconds
    return _checked(_seconds(0.1, 3600), "interval")(value)


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, found {value!r}")
    return int(value)


def add_parser(sub) -> None:
    mesh = sub.add_parser("mesh", help="look at the mesh: `fastmesh mesh status`",
                          description="Commands about the whole mesh (see docs/mesh.md).")
    # `fastmesh` hands "sidecar" to fastmesh.mesh.cli.main, which runs `mesh_main`.
    mesh.set_defaults(command="sidecar", mesh_main=None)
    commands = mesh.add_subparsers(dest="mesh_command", metavar="COMMAND", required=True)
    from fastmesh.mesh.cli import ENV_REGISTRY
    p = commands.add_parser(
        "status", help="live table per service pair: requests/s, success rate, p50/p99",
        description="Read the registry (which sidecars exist, where their admin API is) and "
                    "each sidecar's GET /stats twice, --interval apart; print one row per "
                    "(source, destination) service pair with requests/s, success rate "
                    "(answers other than 5xx) and p50/p99 latency over that interval, as the "
                    "caller's sidecar (out) and the callee's (in) counted it; '(unknown)' "
                    "callers are outside the mesh. Repeats until Ctrl-C, or once with --once.")
    p.add_argument("--registry", default=os.environ.get(ENV_REGISTRY, "redis://127.0.0.1:6379/0"),
                   metavar="URL", help="redis://HOST:PORT/DB[?prefix=NAME] or file:PATH "
                                       f"(default: ${ENV_REGISTRY}, else redis://127.0.0.1:6379/0)")
    p.add_argument("--interval", type=_interval, default=2.0, metavar="SECONDS",
                   help="time between the two snapshots of each table (default: 2)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--count", type=_count, metavar="N", help="print N tables and exit")
    p.add_argument("--json", action="store_true", help="one JSON object per table")
    p.add_argument("--timeout", type=_interval, default=ADMIN_TIMEOUT, metavar="SECONDS",
                   help=f"per admin API request (default: {ADMIN_TIMEOUT:g})")
    p.set_defaults(mesh_main=main)


def _say(message: str) -> None:
    print(f"fastmesh mesh status: {message}", file=sys.stderr, flush=True)


def _look(url: str, timeout: float) -> list[Sidecar] | None:
    view, ready, error = read_registry(url)
    if not ready:
        _say(f"registry {url} did not answer ({error or 'no reply'})")
        return None
    return snapshot(view, timeout)


class _Interrupt:
    """Ctrl-C, taken where it is safe: a KeyboardInterrupt raised at any point could land
    inside asyncio's or a thread pool's own bookkeeping (the registry read, the sidecars'
    reads) and leave the command hanging on its way out. So the handler raises only while the
    command sleeps between snapshots; elsewhere it notes the request, which the loop checks
    after each bounded step (a read ends within --timeout, the registry's within 3 s)."""

    requested = False
    sleeping = False

    @classmethod
    def handler(cls, signum, frame):
        cls.requested = True
        if cls.sleeping:
            raise KeyboardInterrupt

    @classmethod
    def sleep(cls, seconds: float) -> None:
        cls.sleeping = True
        try:
            if cls.requested:
                raise KeyboardInterrupt
            time.sleep(seconds)
        finally:
            cls.sleeping = False


def main(args) -> int:
    # An ignored SIGINT (started in the background) stays ignored.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _Interrupt.handler)
    tables = 1 if args.once else args.count
    try:
        return _run(args, tables)
    except KeyboardInterrupt:
        return 0


def _run(args, tables: int | None) -> int:
    try:
        before = _look(args.registry, args.timeout)
    except ValueError as exc:
        _say(str(exc))
        return 2
    if before is None:
        return 1
    printed = 0
    live = tables is None and not args.json and sys.stdout.isatty()
    while tables is None or printed < tables:
        _Interrupt.sleep(args.interval)
        after = _look(args.registry, args.timeout)
        if _Interrupt.requested:
            return 0
        if after is None:
            return 1
        rows = compare(before, after)
        if args.json:
            print(as_json(rows, after, args.interval), flush=True)
        else:
            if live:
                print("\x1b[H\x1b[2J", end="")
            stamp = time.strftime("%H:%M:%S")
            print(f"{stamp}  registry {args.registry}\n"
                  f"{table(rows, after, args.interval)}\n", flush=True)
        printed += 1
        before = after
        if after and not any(s.stats for s in after):
            return 1
    return 0
