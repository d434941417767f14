#!/usr/bin/env python3
"""What one Redis registry resync costs a sidecar's event loop, by registry size.

Every sidecar resyncs at least every RESYNC_INTERVAL (and on every registry event); the time
from sending the EVAL to having the view is time the loop may spend away from requests, so it
shows in the tail. Two rows per size: an unchanged registry (the common case: heartbeats only)
and one where a single instance changed since the last resync. Median and max of `--repeat`
resyncs, in microseconds, against a real redis-server started on a free loopback port.

Usage:  .venv/bin/python benches/registry_resync.py [--sizes 15,200,1000] [--repeat 40]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastmesh.mesh.redis_registry import RedisRegistry  # noqa: E402
from fastmesh.mesh.registry import Instance  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

INSTANCES_PER_SERVICE = 4


def instance(n: int, version: str = "v1") -> Instance:
    service, k = divmod(n, INSTANCES_PER_SERVICE)
    return Instance(f"svc{service}", f"i{k}", f"10.{service // 250}.{service % 250}.{k + 1}",
                    15006, zone="z1", version=version)


async def timed(reg: RedisRegistry, repeat: int, change=None) -> list[float]:
    times = []
    for round_ in range(repeat):
        if change:
            await change(round_)
        start = time.perf_counter()
        await reg._resync()
        times.append((time.perf_counter() - start) * 1e6)
    return times


async def measure(url: str, size: int, repeat: int) -> list[tuple[str, list[float]]]:
    reg = RedisRegistry(url, lambda: None, ttl=60.0)
    try:
        await reg.client.flushdb()
        for n in range(size):
            await reg._announce(instance(n))
        await reg._resync()
        assert sum(map(len, reg._view.values())) == size

        async def one_changed(round_: int) -> None:
            key = reg.instance_key(instance(0))
            await reg.client.delete(key)
            await reg._announce(instance(0, version=f"v{round_ + 2}"))

        return [("unchanged", await timed(reg, repeat)),
                ("one changed", await timed(reg, repeat, one_changed))]
    finally:
        await reg.client.flushdb()
        await reg.client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="15,200,1000")
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir)).start()
        try:
            print(f"{'instances':>9}  {'registry':<12} {'median us':>10} {'max us':>9}")
            for size in map(int, args.sizes.split(",")):
                for label, times in asyncio.run(measure(server.url, size, args.repeat)):
                    print(f"{size:>9}  {label:<12} {statistics.median(times):>10.0f} "
                          f"{max(times):>9.0f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
