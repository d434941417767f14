#!/usr/bin/env python3
"""How long a config takes to become a Plan: reading and validating it, then compiling it.

A gateway does this at start and on every reload, a sidecar whenever a service name appears in
or leaves the registry (its inbound config has a route per caller service); either way the
event loop is blocked meanwhile. Two shapes, each at the sizes given:

* ``edge``: N services of one route each (a host and a path), a key-auth entry on every other
  service and a global correlation-id entry;
* ``inbound``: a sidecar's inbound config with N caller routes, each with the
  mesh-authorization entry (fastmesh.mesh.routes.inbound_config), read, compiled and swapped
  in on a running worker, as fastmesh.mesh.sidecar does.

Prints the median of `--repeat` runs per row, in milliseconds. In-process, no servers, no load:
run it on a quiet machine and compare rows of one run.

Usage:  python3 benches/config_compile.py [--sizes 1000,10000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastmesh.config import load_config_data  # noqa: E402
from fastmesh.discovery import Discovery  # noqa: E402
from fastmesh.mesh.routes import inbound_config  # noqa: E402
from fastmesh.plan import PoolRegistry, compile_plan  # noqa: E402
from fastmesh.server import Worker  # noqa: E402


def edge_document(n: int) -> dict:
    return {"_format_version": "1",
            "services": [{"name": f"s{i}", "url": f"http://127.0.0.1:{1000 + i % 50000}",
                          "routes": [{"name": f"r{i}", "paths": [f"/r{i}"],
                                      "hosts": [f"h{i}.example.com"]}]} for i in range(n)],
            "plugins": [{"name": "correlation-id"}] +
                       [{"name": "key-auth", "service": f"s{i}"} for i in range(0, n, 2)]}


async def edge(n: int) -> tuple[float, float]:
    started = time.perf_counter()
    config = load_config_data(edge_document(n))
    loaded = time.perf_counter()
    compile_plan(Discovery(asyncio.get_running_loop(), lambda: None).prepare(config),
                 PoolRegistry(), None)
    return loaded - started, time.perf_counter() - loaded


def callers(n: int) -> list[str]:
    return [f"svc{i}" for i in range(n)]


async def inbound(n: int, worker: Worker, generation: int) -> tuple[float, float]:
    rules = [{"from": ["*"]}]
    started = time.perf_counter()
    config = inbound_config("orders", "127.0.0.1", 8080, 2.0, 60.0, rules,
                            callers=callers(n + generation))
    loaded = time.perf_counter()
    problem = worker.prepare(config)
    if problem:
        raise SystemExit(problem)
    worker.commit(config.version)
    return loaded - started, time.perf_counter() - loaded


async def run(sizes: list[int], repeat: int) -> list[tuple]:
    rows = []
    for n in sizes:
        runs = [await edge(n) for _ in range(repeat)]
        rows.append(("edge", n, runs))
        worker = Worker(0)
        await worker.start(inbound_config("orders", "127.0.0.1", 8080, 2.0, 60.0,
                                          [{"from": ["*"]}], callers=callers(n)),
                           "127.0.0.1", 0)
        runs = [await inbound(n, worker, k + 1) for k in range(repeat)]
        worker.server.close()
        rows.append(("inbound", n, runs))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000",
                   help="routes (edge) and caller services (inbound), comma-separated")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows = asyncio.run(run(sizes, args.repeat))
    print("| config | size | read + validate ms | compile (+ swap) ms | total ms |")
    print("|---|---:|---:|---:|---:|")
    for kind, n, runs in rows:
        read = statistics.median(r[0] for r in runs) * 1000
        build = statistics.median(r[1] for r in runs) * 1000
        print(f"| {kind} | {n:,} | {read:,.0f} | {build:,.0f} | {read + build:,.0f} |")
    print(f"\nmedians of {args.repeat} run(s); Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
