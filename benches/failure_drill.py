"""Failure drill: kill one of three upstreams under wrk load and count what the clients saw.

fastmesh balances over three nginx upstreams (`return 200`, one worker each) with passive
health checks and its default retries. Mid-run one upstream is killed with SIGKILL (no
graceful close: in-flight connections are reset). The drill reports the requests wrk sent,
non-2xx responses and socket errors (goal: zero for these idempotent GETs), and how long
after the kill the admin API showed the dead target as no longer healthy.

    python3 benches/failure_drill.py [--duration 10] [--kill-at 3] [--connections 20]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import fastmesh_server, free_port, nginx_server, nginx_upstream_conf  # noqa: E402

STATS_LUA = Path(__file__).resolve().parent / "stats.lua"


def fastmesh_config(ports: list[int], admin_port: int, access_log: Path | None) -> str:
    targets = ", ".join(f'{{target: "127.0.0.1:{p}"}}' for p in ports)
    return f"""_format_version: "1"
gateway:
  admin: {{listen: "127.0.0.1:{admin_port}"}}
  access_log: {json.dumps(str(access_log)) if access_log else "off"}
upstreams:
  - name: backend
    algorithm: round-robin
    targets: [{targets}]
    healthchecks:
      passive: {{unhealthy: {{failures: 2, timeouts: 2}}, ejection_time: 60s}}
services:
  - name: drill
    host: backend
    port: 80
    connect_timeout: 1s
    read_timeout: 5s
    routes: [{{name: all, paths: [/]}}]
"""


def target_health(admin_port: int, port: int) -> str | None:
    """The dead target's state from GET /upstreams/backend/health, or None if unavailable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/upstreams/backend/health",
                                    timeout=1) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    text = json.dumps(data)
    # Find the entry for our target whatever the exact shape (per worker or merged).
    for entry in _entries(data):
        if str(port) in str(entry.get("target", entry.get("address", ""))) or entry.get("port") == port:
            if entry.get("healthy") is False:
                return "unhealthy"
            return str(entry.get("state", "healthy"))
    return None if f":{port}" not in text else "healthy"


def _entries(data):
    if isinstance(data, dict):
        if "healthy" in data and ("target" in data or "port" in data or "address" in data):
            yield data
        for value in data.values():
            yield from _entries(value)
    elif isinstance(data, list):
        for value in data:
            yield from _entries(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk load")
    parser.add_argument("--kill-at", type=float, default=3.0, help="seconds into the load")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--access-log", action="store_true",
                        help="log requests and print every non-2xx one at the end")
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="fastmesh-drill-"))
    servers = []
    try:
        ports = [free_port() for _ in range(3)]
        for i, port in enumerate(ports):
            work = root / f"up{i}"
            work.mkdir()
            up = nginx_server(f"up{i}", nginx_upstream_conf(work, port), port, work, nginx)
            up.start(10)
            servers.append(up)
        admin_port, gw_port = free_port(), free_port()
        log_path = root / "access.log" if args.access_log else None
        gw = fastmesh_server("fastmesh", fastmesh_config(ports, admin_port, log_path), gw_port, root)
        gw.start(15)
        servers.append(gw)

        victim = servers[0]
        result: dict = {}

        def kill_and_watch():
            time.sleep(args.kill_at)
            # nginx runs master + worker in its own session: kill the whole session at once.
            subprocess.run(["pkill", "-KILL", "-s", str(victim.proc.pid)], check=False)
            killed = time.monotonic()
            result["killed"] = killed
            while time.monotonic() - killed < args.duration:
                state = target_health(admin_port, ports[0])
                if state is None:
                    result["ejected_after"] = None
                    return
                if state != "healthy":
                    result["ejected_after"] = time.monotonic() - killed
                    result["state"] = state
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=kill_and_watch, daemon=True)
        watcher.start()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "5s",
             "-s", str(STATS_LUA), f"http://127.0.0.1:{gw_port}/"],
            capture_output=True, text=True).stdout
        watcher.join(timeout=args.duration)
        stats = dict(re.findall(r"(\w+)=([\d.]+)", out.split("FMBENCH", 1)[-1]))
        socket_errors = sum(int(stats.get(k, 0)) for k in ("connect", "read", "write", "timeout"))
        ejected = result.get("ejected_after")
        print("| what | value |\n|---|---:|")
        print(f"| requests sent (wrk -c{args.connections}, {args.duration} s) | {int(stats.get('requests', 0)):,} |")
        print(f"| non-2xx responses | {int(stats.get('status', 0))} |")
        print(f"| socket errors | {socket_errors} |")
        print(f"| p99 latency µs | {float(stats.get('p99', 0)):.0f} |")
        print(f"| dead target shown unhealthy after | "
              f"{f'{ejected * 1000:.0f} ms' if ejected is not None else 'n/a (admin view unavailable)'} |")
        if log_path is not None:
            time.sleep(0.3)
            for line in log_path.read_text().splitlines():
                record = json.loads(line)
                if not 200 <= record["status"] < 300:
                    print("non-2xx:", line)
        print(f"\nupstream killed with SIGKILL {args.kill_at:.0f} s into the load; "
              "passive health: eject after 2 consecutive failures; retries: defaults")
        return 0
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
