"""What plugins cost: fastmesh with no plugins vs. a typical edge chain vs. one Python plugin.

Rows (one fastmesh worker each, the same nginx `return 200` upstream, interleaved rounds):

* ``no plugins``                     the route alone;
* ``key-auth + rate-limiting + cors`` the issue's edge chain, all native: a key in a header,
  a local rate limit far above the offered load (so every request is counted, none refused),
  CORS headers added for the request's Origin;
* ``one Python plugin``              benches/bench_plugin.py: an access phase that adds a header.

Every request carries the same headers (apikey, Origin) so the rows differ only in the chain.
Printed: median req/s at -c50 and its ratio to ``no plugins``; the -c1 p50 latency and the
difference to ``no plugins``, which is the plugins' cost per request on the critical path.

    python3 benches/plugins.py [--rounds 5] [--duration 4]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from servers import fastmesh_server, free_port, nginx_server, nginx_upstream_conf  # noqa: E402

KEY = "bench-key-0123456789"
HEADERS = [f"apikey: {KEY}", "Origin: https://app.example"]


def conf(upstream_port: int, plugins: str) -> str:
    return f"""_format_version: "1"
consumers:
  - username: bench
    keyauth_credentials: [{{key: {KEY}}}]
services:
  - name: bench
    url: http://127.0.0.1:{upstream_port}
    routes:
      - name: all
        paths: [/]
        plugins: {plugins}
"""


ROWS = {
    "no plugins": "[]",
    "key-auth + rate-limiting + cors": (
        "[{name: key-auth}, {name: rate-limiting, config: {second: 100000000, policy: local}}, "
        "{name: cors, config: {origins: ['https://app.example']}}]"),
    "one Python plugin": "[{name: touch, module: benches.bench_plugin}]",
}


def wrk(url: str, conns: int, duration: float) -> dict:
    argv = loadgen.wrk_argv(shutil.which("wrk") or "wrk", url, conns, duration)
    for header in HEADERS:
        argv[-1:-1] = ["-H", header]
    return loadgen.run_wrk(argv, duration)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4)
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    root = Path(tempfile.mkdtemp(prefix="fastmesh-plugins-"))
    started = []
    try:
        up_port = free_port()
        upstream = nginx_server("upstream", nginx_upstream_conf(root, up_port, 1), up_port, root, nginx)
        upstream.start(10)
        started.append(upstream)
        rows = {}
        for i, (label, chain) in enumerate(ROWS.items()):
            gw = fastmesh_server(f"fm{i}", conf(up_port, chain), free_port(), root)
            gw.path = f"/?apikey={KEY}"          # readiness probe: the key in the query
            gw.start(30)
            started.append(gw)
            rows[label] = (gw, {"rps": [], "p50": [], "p99": [], "errors": 0})
        for r in range(args.rounds):
            labels = list(rows)
            labels = labels[r % len(labels):] + labels[:r % len(labels)]
            for label in labels:
                gw, res = rows[label]
                url = f"http://127.0.0.1:{gw.port}/"
                print(f"round {r + 1}/{args.rounds} {label}", file=sys.stderr)
                wrk(url, 50, 1)
                thr = wrk(url, 50, args.duration)
                lat = wrk(url, 1, args.duration)
                res["rps"].append(thr["rps"])
                res["p50"].append(lat["p50"])
                res["p99"].append(lat["p99"])
                res["errors"] += int(thr["socket_errors"] + thr["non2xx"] + lat["socket_errors"] + lat["non2xx"])
        base = {k: statistics.median(v) for k, v in rows["no plugins"][1].items() if k != "errors"}
        print("| chain | req/s (-c50) | vs no plugins | p50 µs (-c1) | added p50 µs | p99 µs (-c1) | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, (gw, res) in rows.items():
            rps, p50, p99 = (statistics.median(res[k]) for k in ("rps", "p50", "p99"))
            print(f"| {label} | {rps:,.0f} | {rps / base['rps']:.2f}× | {p50:.0f} | "
                  f"{p50 - base['p50']:+.0f} | {p99:.0f} | {res['errors']} |")
        print(f"\nwrk -t1, {args.duration:g}s runs, {args.rounds} interleaved rounds, medians; "
              "one fastmesh worker per row; nginx `return 200` upstream; headers: "
              + ", ".join(HEADERS))
        return 0
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
