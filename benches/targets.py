"""Balancer cost with the number of targets: fastmesh throughput over 1, 10 and 100 targets.

One nginx (`return 200`, one worker) listens on 100 loopback ports; fastmesh balances over the
first N of them with each algorithm. The balancer's pick must not grow with N for round-robin,
consistent hashing and p2c-ewma (least-connections scans its targets). Rows are interleaved per
round and the medians printed with the ratio to the 1-target row of the same algorithm.

    python3 benches/targets.py [--rounds 3] [--duration 4] [--counts 1,10,100]
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (  # noqa: E402
    _nginx_common, _nginx_http_common, fastmesh_server, free_port, nginx_server,
)

ALGORITHMS = ("round-robin", "p2c-ewma", "consistent-hashing", "least-connections")


def many_ports_upstream(tmp: Path, ports: list[int]) -> str:
    listens = "\n".join(f"        listen 127.0.0.1:{p} backlog=4096;" for p in ports)
    return _nginx_common(tmp, "upstream") + f"""
http {{{_nginx_http_common(tmp, "upstream")}
    server {{
{listens}
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def fastmesh_targets_conf(ports: list[int], algorithm: str) -> str:
    targets = ", ".join(f'{{target: "127.0.0.1:{p}"}}' for p in ports)
    hashing = "\n    hash_on: ip" if algorithm == "consistent-hashing" else ""
    return f"""_format_version: "1"
upstreams:
  - name: backend
    algorithm: {algorithm}{hashing}
    targets: [{targets}]
services:
  - name: bench
    host: backend
    port: 80
    routes: [{{name: all, paths: [/]}}]
"""


def wrk_rps(url: str, duration: int) -> float:
    out = subprocess.run(["wrk", "-t1", "-c50", f"-d{duration}s", url],
                         capture_output=True, text=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--counts", default="1,10,100")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    algorithms = args.algorithms.split(",")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    root = Path(tempfile.mkdtemp(prefix="fastmesh-targets-"))
    servers = []
    try:
        ports = [free_port() for _ in range(max(counts))]
        up = nginx_server("upstream", many_ports_upstream(root, ports), ports[0], root, nginx)
        up.start(10)
        servers.append(up)
        rows = {}
        for algorithm in algorithms:
            for n in counts:
                work = root / f"{algorithm}-{n}"
                work.mkdir()
                gw = fastmesh_server(f"fm-{algorithm}-{n}", fastmesh_targets_conf(ports[:n], algorithm),
                                     free_port(), work)
                gw.start(20)
                servers.append(gw)
                rows[(algorithm, n)] = (gw, [])
        for r in range(args.rounds):
            keys = list(rows)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in keys:
                gw, results = rows[key]
                print(f"round {r + 1}/{args.rounds} {key[0]} x{key[1]}", file=sys.stderr)
                wrk_rps(gw.url, 1)
                results.append(wrk_rps(gw.url, args.duration))
        print("| algorithm | " + " | ".join(f"{n} target{'s' if n > 1 else ''} req/s" for n in counts)
              + " | " + " | ".join(f"{n} vs 1" for n in counts[1:]) + " |")
        print("|---|" + "---:|" * (2 * len(counts) - 1))
        for algorithm in algorithms:
            medians = [statistics.median(rows[(algorithm, n)][1]) for n in counts]
            ratios = [f"{m / medians[0]:.2f}×" if medians[0] else "–" for m in medians[1:]]
            print(f"| {algorithm} | " + " | ".join(f"{m:,.0f}" for m in medians) + " | "
                  + " | ".join(ratios) + " |")
        print(f"\nwrk -t1 -c50 -d{args.duration}s, {args.rounds} interleaved rounds, medians; "
              "one nginx upstream on all ports; fastmesh one worker")
        return 0
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
