"""What plugins cost: fastmesh with no plugins vs. a typical edge chain vs. one Python plugin.

Rows (one fastmesh worker each, the same nginx `return 200` upstream, interleaved rounds):

* ``no plugins``                     the route alone;
* ``key-auth + rate-limiting + cors`` the issue's edge chain, all native: a key in a header,
  a local rate limit far above the offered load (so every request is counted, none refused),
  CORS headers added for the request's Origin;
* ``one Python plugin``              benches/bench_plugin.py: an access phase that adds a header.

Every request carries the same headers (apikey, Origin) so the rows differ only in the chain.
Printed: median req/s at -c50 and its ratio to ``no plugins``; the gateway's CPU time per request
in that run (CPU time of its processes, schedstat, / requests: less sensitive than req/s to other load on
the machine, since a busy neighbour steals time but not much work); the -c1 p50 latency and the
difference to ``no plugins``, which is the plugins' cost per request on the critical path; and
the spread of the per-round ratios (each round's chain req/s over that round's no-plugins req/s:
rounds run back to back, so a round's ratio is less noisy than a ratio of medians).

On a shared machine other load only ever slows a run down, so the best round of each row (highest
req/s, lowest CPU/request) is the closest to a quiet machine: printed too, with "best vs best"
and the "CPU-bound ratio" (no-plugins CPU/request over the row's, from the lowest of each, and
per round): the req/s ratio where the gateway's one worker is the bottleneck.

``--baseline DIR`` runs the same rows a second time from another fastmesh tree (a copy with its
``fastmesh`` package built, e.g. ``git worktree add /tmp/before HEAD~1`` and a build there) in the
same interleaved rounds: before/after in one run, on one machine state.

    python3 benches/plugins.py [--rounds 5] [--duration 4] [--rows none,edge] [--baseline DIR]
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
from servers import (  # noqa: E402
    Server, fastmesh_env, fastmesh_server, free_port, nginx_server, nginx_upstream_conf,
    server_cpu_seconds)

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
ROW_KEYS = {"none": "no plugins", "edge": "key-auth + rate-limiting + cors", "python": "one Python plugin"}
BASELINE = " [baseline]"


def wrk(url: str, conns: int, duration: float) -> dict:
    argv = loadgen.wrk_argv(shutil.which("wrk") or "wrk", url, conns, duration)
    for header in HEADERS:
        argv[-1:-1] = ["-H", header]
    return loadgen.run_wrk(argv, duration)


def baseline_server(name: str, conf: str, port: int, workdir: Path, tree: Path) -> Server:
    """Like fastmesh_server, but the `fastmesh` package (and benches/) come from `tree`."""
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(conf)
    argv = [sys.executable, "-m", "fastmesh", "run", "--config", str(cfg),
            "--listen", f"127.0.0.1:{port}", "--workers", "1", "--admin", "off"]
    return Server(name, argv, port, workdir, env=fastmesh_env(tree), cwd=tree)


def summary(rows: dict, base_label: str, labels: list) -> list:
    base = rows[base_label][1]
    base_rps = statistics.median(base["rps"])
    base_p50 = statistics.median(base["p50"])
    out = []
    for label in labels:
        res = rows[label][1]
        rps, p50, p99 = (statistics.median(res[k]) for k in ("rps", "p50", "p99"))
        per_round = [a / b for a, b in zip(res["rps"], base["rps"])]
        cpu_ratio = [b / a for a, b in zip(res["cpu"], base["cpu"])]
        out.append(f"| {label} | {rps:,.0f} | {rps / base_rps:.2f}× | "
                   f"{min(per_round):.2f}–{max(per_round):.2f} | "
                   f"{max(res['rps']):,.0f} | {max(res['rps']) / max(base['rps']):.2f}× | "
                   f"{min(res['cpu']):.1f} | {min(base['cpu']) / min(res['cpu']):.2f}× | "
                   f"{statistics.median(cpu_ratio):.2f}× ({min(cpu_ratio):.2f}–{max(cpu_ratio):.2f}) | "
                   f"{p50:.0f} | {p50 - base_p50:+.0f} | {p99:.0f} | {res['errors']} |")
    return out


HEADER = ("| chain | req/s (-c50) | vs no plugins | per-round ratio | best req/s | best vs best "
          "| CPU µs/req (min) | CPU-bound ratio (mins) | CPU-bound ratio per round | p50 µs (-c1) "
          "| added p50 µs | p99 µs (-c1) | errors |\n" + "|---" + "|---:" * 12 + "|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--rows", default="none,edge,python",
                        help="comma list of: " + ", ".join(ROW_KEYS) + " (none is always run)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another fastmesh tree to run the same rows from, interleaved")
    args = parser.parse_args()
    keys = [k for k in args.rows.split(",") if k]
    unknown = [k for k in keys if k not in ROW_KEYS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROW_KEYS)}")
    chosen = [label for key, label in ROW_KEYS.items() if key == "none" or key in keys]
    if args.baseline is not None and not (args.baseline / "fastmesh" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no fastmesh package there")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    root = Path(tempfile.mkdtemp(prefix="fastmesh-plugins-"))
    started = []
    try:
        up_port = free_port()
        upstream = nginx_server("upstream", nginx_upstream_conf(root, up_port, 1), up_port, root, nginx)
        upstream.start(10)
        started.append(upstream)
        rows = {}
        trees = [None] if args.baseline is None else [None, args.baseline.resolve()]
        for t, tree in enumerate(trees):
            for i, label in enumerate(chosen):
                name, conf_text = f"fm{t}{i}", conf(up_port, ROWS[label])
                if tree is None:
                    gw = fastmesh_server(name, conf_text, free_port(), root)
                else:
                    gw = baseline_server(name, conf_text, free_port(), root, tree)
                    label += BASELINE
                gw.path = f"/?apikey={KEY}"          # readiness probe: the key in the query
                gw.start(30)
                started.append(gw)
                rows[label] = (gw, {"rps": [], "p50": [], "p99": [], "cpu": [], "errors": 0})
        for r in range(args.rounds):
            labels = list(rows)
            labels = labels[r % len(labels):] + labels[:r % len(labels)]
            for label in labels:
                gw, res = rows[label]
                url = f"http://127.0.0.1:{gw.port}/"
                print(f"round {r + 1}/{args.rounds} {label}", file=sys.stderr)
                wrk(url, 50, 1)
                cpu0 = server_cpu_seconds(gw)
                thr = wrk(url, 50, args.duration)
                cpu1 = server_cpu_seconds(gw)
                lat = wrk(url, 1, args.duration)
                res["rps"].append(thr["rps"])
                res["p50"].append(lat["p50"])
                res["p99"].append(lat["p99"])
                res["cpu"].append((cpu1 - cpu0) * 1e6 / max(thr["requests"], 1))
                res["errors"] += int(thr["socket_errors"] + thr["non2xx"] + lat["socket_errors"] + lat["non2xx"])
        print(HEADER)
        lines = summary(rows, "no plugins", chosen)
        if args.baseline is not None:
            lines += summary(rows, "no plugins" + BASELINE, [label + BASELINE for label in chosen])
        print("\n".join(lines))
        if args.baseline is not None:
            print("\n| chain | req/s this tree / baseline (median of per-round ratios) |")
            print("|---|---:|")
            for label in chosen:
                per_round = [a / b for a, b in zip(rows[label][1]["rps"], rows[label + BASELINE][1]["rps"])]
                print(f"| {label} | {statistics.median(per_round):.2f}× "
                      f"({min(per_round):.2f}–{max(per_round):.2f}) |")
        print(f"\nwrk -t1, {args.duration:g}s runs, {args.rounds} interleaved rounds, medians; "
              "one fastmesh worker per row; nginx `return 200` upstream; headers: "
              + ", ".join(HEADERS)
              + (f"; baseline tree: {args.baseline}" if args.baseline is not None else ""))
        return 0
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
