#!/usr/bin/env python3
"""Compare fastmesh with nginx and HAProxy as a reverse proxy, in one interleaved run.

What it measures (the methodology of DESIGN.md section 8):

* The upstream is nginx with one worker answering ``return 200 "ok"``, so the
  upstream is never the bottleneck and every row talks to the same thing.
* Rows: ``direct`` (wrk straight to the upstream: the floor), ``fastmesh``,
  ``nginx`` (reverse proxy) and ``haproxy``; every proxy has ONE worker and
  keep-alive, pooled connections to the upstream.
* Throughput: ``wrk -t1 -c50`` -> req/s, p50, p99. Reported as a ratio to the
  nginx proxy and to direct, because absolute numbers depend on the machine.
* Latency one hop adds: ``wrk -t1 -c1`` -> p50/p99; *added latency* is the
  row's p50/p99 minus direct's p50/p99 in microseconds.
* Errors: wrk's socket errors (connect/read/write/timeout) and responses with
  status >= 400, summed over all runs; any error makes a row suspect.
* Interleaving: every round runs every row once per scenario, the order
  rotated each round, so slow drift of the machine (thermal, neighbours) hits
  all rows alike; the table shows medians over rounds.
* Memory: RSS of each proxy's processes (master + worker for nginx,
  supervisor + worker for fastmesh, one process for HAProxy) when idle after
  start and after the load runs, and the summed peak (VmHWM).
* ``--scenario routes``: fastmesh with the benchmarked route alone against
  fastmesh with it hidden among N (default 10,000) routes with distinct hosts
  and prefix paths -> the throughput cost of a big routing table.
* ``--workers N`` (default 1): every proxy runs N workers: ``fastmesh run
  --workers N`` (always passed explicitly: fastmesh's own default is one per
  CPU), nginx ``worker_processes N``, HAProxy ``nbthread N``. The upstream
  nginx gets N workers too and wrk N threads (``--upstream-workers``,
  ``--wrk-threads``), so neither caps the proxies.
* ``--scenario scaling``: the throughput run (-c50) for fastmesh and nginx
  with 1 and 2 workers, and 4, 8, ... while that many CPUs are usable
  (``--worker-counts 1,2,4`` picks them), all in one interleaved run against
  one upstream with as many workers as the largest count; prints req/s per
  worker count, fastmesh/nginx, and each one's gain over its own 1 worker.

wrk, the upstream and the proxy share the machine, as they did when the bars
in DESIGN.md were set; run on a quiet machine and compare ratios, not raw
req/s, across machines.

Usage:  python3 benches/compare.py [--rounds 3] [--duration 5] [--workers 1] [--json out.json]
        python3 benches/compare.py --scenario routes [--routes 10000]
        python3 benches/compare.py --scenario scaling [--worker-counts 1,2,4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402

ALL_TARGETS = ("direct", "fastmesh", "nginx", "haproxy")
PACKAGES = {"wrk": "wrk", "nginx": "nginx-light", "haproxy": "haproxy"}
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


@dataclass
class Target:
    """One row of the table: a server (or the upstream itself) and its results."""
    name: str
    server: servers.Server | None = None
    kind: str = ""                            # fastmesh / nginx / haproxy / direct
    workers: int = 1
    failed: str | None = None                 # "failed to start: ..." etc.
    runs: dict[str, list[dict]] = field(default_factory=dict)
    mem_idle: dict = field(default_factory=dict)
    mem_after: dict = field(default_factory=dict)


# --- setup -----------------------------------------------------------------

def add_round_options(p: argparse.ArgumentParser, warmup: str = "-c50") -> None:
    """--rounds, --duration, --warmup: how every interleaved bench measures."""
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--warmup", type=float, default=1.0,
                   help=f"seconds of unmeasured {warmup} load before each throughput run (0: none)")


def add_server_options(p: argparse.ArgumentParser) -> None:
    """--ready-timeout, --python, --json, --no-install, --keep-tmp: the servers a bench starts."""
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="seconds to wait for a server to accept connections and answer")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs fastmesh")
    p.add_argument("--json", metavar="PATH", help="also write raw runs and summary as JSON")
    p.add_argument("--no-install", action="store_true", help="never run apt-get")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("compare", "routes", "scaling"), default="compare",
                   help="compare: direct/fastmesh/nginx/haproxy; routes: fastmesh 1 vs N routes; "
                        "scaling: fastmesh and nginx throughput by worker count")
    p.add_argument("--workers", type=int, default=1,
                   help="workers of every proxy (fastmesh --workers, nginx worker_processes, "
                        "HAProxy nbthread); compare and routes scenarios")
    p.add_argument("--worker-counts", default=None,
                   help="scaling: comma-separated worker counts (default: 1,2 and 4, 8, ... "
                        "up to the usable CPUs)")
    p.add_argument("--upstream-workers", type=int, default=None,
                   help="worker_processes of the upstream nginx (default: --workers, or the "
                        "largest worker count for scaling)")
    p.add_argument("--wrk-threads", type=int, default=None,
                   help="wrk -t for the throughput runs (default: like --upstream-workers, at "
                        "most the usable CPUs); the -c1 latency runs always use one")
    add_round_options(p)
    p.add_argument("--connections", type=int, default=50, help="wrk -c for the throughput runs")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="comma-separated rows for --scenario compare (default: all)")
    p.add_argument("--routes", type=int, default=10_000,
                   help="number of routes for --scenario routes")
    p.add_argument("--route-position", type=float, default=0.7,
                   help="where the benchmarked route sits among --routes (fraction, not first)")
    add_server_options(p)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1:
        p.error("--rounds >= 1, --duration > 0 and --connections >= 1 are required")
    unknown = set(args.targets.split(",")) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; choose from {ALL_TARGETS}")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.worker_counts:
        try:
            counts = sorted({int(x) for x in args.worker_counts.split(",") if x.strip()})
        except ValueError:
            p.error("--worker-counts: comma-separated integers, e.g. 1,2,4")
        if not counts or counts[0] < 1:
            p.error("--worker-counts: at least one count, each >= 1")
    else:
        counts = default_worker_counts()
    args.worker_counts = counts
    largest = max(counts) if args.scenario == "scaling" else args.workers
    if args.upstream_workers is None:
        args.upstream_workers = largest
    if args.wrk_threads is None:
        args.wrk_threads = max(1, min(largest, usable_cpus()))
    if args.upstream_workers < 1 or args.wrk_threads < 1:
        p.error("--upstream-workers and --wrk-threads must be >= 1")
    args.wrk_threads = min(args.wrk_threads, args.connections)
    return args


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_worker_counts() -> list[int]:
    """1 and 2, then 4, 8, ... while the machine has that many usable CPUs."""
    counts, n = [1, 2], 4
    while n <= usable_cpus():
        counts.append(n)
        n *= 2
    return counts


def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for d in SBIN:
        if os.access(os.path.join(d, tool), os.X_OK):
            return os.path.join(d, tool)
    return None


def ensure_tools(no_install: bool) -> dict[str, str | None]:
    """Paths of wrk, nginx, haproxy; apt-get installs missing ones when root.

    wrk and nginx are required; without haproxy its row is reported as missing.
    """
    tools = {t: which(t) for t in PACKAGES}
    missing = [t for t, path in tools.items() if not path]
    if missing and not no_install and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = [PACKAGES[t] for t in missing]
        print(f"installing {' '.join(pkgs)} with apt-get ...", file=sys.stderr)
        if _apt_install(pkgs) != 0:
            _run_quiet(["apt-get", "update"], 300)
            _apt_install(pkgs)
        tools = {t: which(t) for t in PACKAGES}
        missing = [t for t, path in tools.items() if not path]
    required = [t for t in missing if t != "haproxy"]
    if required:
        pkgs = " ".join(PACKAGES[t] for t in missing)
        sys.exit(f"missing {', '.join(missing)}. Install them, e.g. on Debian/Ubuntu:\n"
                 f"    sudo apt-get install -y {pkgs}\n"
                 "(or build wrk from https://github.com/wg/wrk); then run this again.")
    return tools


def _apt_install(pkgs: list[str]) -> int:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return _run_quiet(["apt-get", "install", "-y", *pkgs], 600, env)


def _run_quiet(argv, timeout, env=None) -> int:
    try:
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, env=env).returncode
    except (OSError, subprocess.TimeoutExpired):
        return 1


def _version(argv, drop: str = "") -> str:
    """First line of a tool's version output, trimmed to the version words."""
    line = _first_line(argv).replace(drop, "").split(" Copyright")[0].split(" - http")[0]
    return line.strip()


def _first_line(argv) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (p.stdout + p.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def system_nginx_on_80() -> str | None:
    """A note when something (a system nginx, say) listens on :80: we leave it alone."""
    try:
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[3].endswith(":80"):
            who = cols[5] if len(cols) > 5 else "unknown process"
            return f"port 80 is in use ({who}); left alone, the benchmark uses its own ports"
    return None


def machine_info(tools: dict) -> dict:
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    git = ["git", "-C", str(servers.REPO)]
    rev = _first_line(git + ["rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(git + ["status", "--porcelain"], capture_output=True,
                           text=True, timeout=10).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "nginx": _version([tools["nginx"], "-v"], "nginx version: "),
        "haproxy": (_version([tools["haproxy"], "-v"], " version")
                    if tools.get("haproxy") else "haproxy not installed"),
        "wrk": _version([tools["wrk"], "-v"]),
        "fastmesh": f"git {rev}{' (with uncommitted changes)' if dirty else ''}",
    }


# --- starting the rows -----------------------------------------------------

def start(target: Target, server: servers.Server, timeout: float) -> None:
    """Start one proxy; a failure is recorded in the row, never raised."""
    target.server = server
    try:
        server.start(timeout)
        target.mem_idle = servers.memory(server)
    except servers.StartError as e:
        target.failed = "failed to start: " + str(e)
    except OSError as e:
        target.failed = f"failed to start: {e}"


def compare_targets(args, tools, tmp: Path, upstream: servers.Server) -> list[Target]:
    wanted = args.targets.split(",")
    up = upstream.port
    n = args.workers
    rows = []
    for name in ALL_TARGETS:
        if name not in wanted:
            continue
        t = Target(name, kind=name, workers=n if name != "direct" else args.upstream_workers)
        rows.append(t)
        if name == "direct":
            t.server = upstream
            continue
        port = servers.free_port()
        if name == "fastmesh":
            srv = servers.fastmesh_server("fastmesh", servers.fastmesh_conf(up), port, tmp,
                                          python=args.python, workers=n)
        elif name == "nginx":
            srv = servers.nginx_server("proxy", servers.nginx_proxy_conf(tmp, port, up, n),
                                       port, tmp, tools["nginx"])
        else:
            if not tools.get("haproxy"):
                t.failed = "not installed (apt-get install -y haproxy)"
                continue
            srv = servers.haproxy_server(servers.haproxy_conf(tmp, port, up, n), port, tmp,
                                         tools["haproxy"])
        start(t, srv, args.ready_timeout)
    return rows


def scaling_targets(args, tools, tmp: Path, upstream: servers.Server) -> list[Target]:
    """fastmesh and nginx, one row each per worker count (and direct: the ceiling)."""
    rows = [Target("direct", server=upstream, kind="direct", workers=args.upstream_workers)]
    for n in args.worker_counts:
        for kind in ("fastmesh", "nginx"):
            t = Target(f"{kind} ×{n}", kind=kind, workers=n)
            rows.append(t)
            port = servers.free_port()
            if kind == "fastmesh":
                srv = servers.fastmesh_server(f"fastmesh-w{n}", servers.fastmesh_conf(upstream.port),
                                              port, tmp, python=args.python, workers=n)
            else:
                srv = servers.nginx_server(
                    f"proxy-w{n}", servers.nginx_proxy_conf(tmp, port, upstream.port, n,
                                                            name=f"proxy-w{n}"),
                    port, tmp, tools["nginx"])
            start(t, srv, args.ready_timeout)
    return rows


def routes_targets(args, tmp: Path, upstream: servers.Server) -> list[Target]:
    direct = Target("direct", server=upstream)
    rows = [direct]
    for label, n in (("fastmesh 1 route", 1), (f"fastmesh {args.routes:,} routes", args.routes)):
        t = Target(label, kind="fastmesh", workers=args.workers)
        rows.append(t)
        conf = servers.fastmesh_conf(upstream.port, n_routes=n, position=args.route_position)
        srv = servers.fastmesh_server(f"fastmesh-{n}", conf, servers.free_port(), tmp,
                                      python=args.python, host_header=servers.BENCH_HOST,
                                      path=servers.BENCH_PATH, workers=args.workers)
        start(t, srv, max(args.ready_timeout, 60.0))
    return rows


# --- measuring -------------------------------------------------------------

def scenarios(args) -> list[tuple[str, int]]:
    if args.scenario == "scaling":
        return [("throughput", args.connections)]
    return [("throughput", args.connections), ("latency", 1)]


def wrk_threads(args, conns: int) -> int:
    return max(1, min(args.wrk_threads, conns))


def measure_once(t: Target, scenario: str, conns: int, args, tools) -> None:
    """One wrk run of one row; errors are stored as runs with an 'error' key."""
    srv = t.server
    if not srv.alive():
        t.runs.setdefault(scenario, []).append(
            {"error": f"process exited ({srv.proc.returncode}): {srv.stderr_tail(3)}"})
        return
    if scenario == "throughput" and args.warmup > 0:
        warm = loadgen.wrk_argv(tools["wrk"], srv.url, args.connections, args.warmup,
                                threads=wrk_threads(args, args.connections),
                                host=srv.host_header)
        try:
            loadgen.run_wrk(warm, args.warmup)
        except (RuntimeError, ValueError):
            pass                                   # the measured run will show it
    argv = loadgen.wrk_argv(tools["wrk"], srv.url, conns, args.duration,
                            threads=wrk_threads(args, conns), host=srv.host_header)
    try:
        result = loadgen.run_wrk(argv, args.duration)
    except (RuntimeError, ValueError) as e:
        result = {"error": str(e)}
    result["argv"] = argv
    t.runs.setdefault(scenario, []).append(result)


def run_rounds(rows: list[Target], args, tools) -> None:
    live = [t for t in rows if not t.failed]
    for r in range(args.rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for scenario, conns in scenarios(args):
            for t in order:
                print(f"round {r + 1}/{args.rounds} {scenario:<10} {t.name}", file=sys.stderr)
                measure_once(t, scenario, conns, args, tools)
    for t in live:
        if t.name != "direct":             # direct's server is the upstream itself
            t.mem_after = servers.memory(t.server)


# --- summarising -----------------------------------------------------------

def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if "error" not in r]
    return statistics.median(vals) if vals else None


def error_counts(t: Target, scenario_names) -> dict[str, int]:
    """Responses with status >= 400, wrk socket errors and failed runs, summed over the runs
    of some scenarios."""
    errors = {"non2xx": 0, "socket": 0, "failed_runs": 0, "runs": 0}
    for name in scenario_names:
        for r in t.runs.get(name, []):
            errors["runs"] += 1
            if "error" in r:
                errors["failed_runs"] += 1
            else:
                errors["non2xx"] += int(r["non2xx"])
                errors["socket"] += int(r["socket_errors"])
    return errors


def summarize(rows: list[Target], scenario_names: list[str]) -> dict[str, dict]:
    out = {}
    for t in rows:
        s = {"failed": t.failed, "mem_idle": t.mem_idle, "mem_after": t.mem_after}
        for name in scenario_names:
            runs = t.runs.get(name, [])
            s[name] = {k: median_of(runs, k) for k in ("rps", "p50", "p99", "p999")}
            for r in runs:
                if "error" in r:
                    s.setdefault("run_errors", []).append(r["error"])
        s["errors"] = error_counts(t, scenario_names)
        out[t.name] = s
    return out


def ratios(summary: dict, baseline: str, direct: str = "direct") -> None:
    """Add throughput ratios and added latency (vs direct) to every row."""
    def rps(name):
        return (summary.get(name) or {}).get("throughput", {}).get("rps")

    def lat(name, q):
        return (summary.get(name) or {}).get("latency", {}).get(q)

    for name, s in summary.items():
        mine = rps(name)
        s["vs_baseline"] = (mine / rps(baseline) if mine and baseline and rps(baseline)
                            else None)
        s["vs_direct"] = mine / rps(direct) if mine and rps(direct) else None
        for q in ("p50", "p99"):
            a, d = lat(name, q), lat(direct, q)
            s[f"added_{q}"] = a - d if a is not None and d is not None else None


# --- main ------------------------------------------------------------------

def _sigterm(signum, frame):
    raise KeyboardInterrupt


def workdir(prefix: str) -> Path:
    """A temp dir for the run's configs and logs, readable by nginx workers (they may run as
    another user); end_workdir removes it."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(tmp, 0o755)
    return tmp


def end_workdir(tmp: Path, keep: bool) -> None:
    """Remove the run's temp dir, or with `keep` (--keep-tmp) say where it stays."""
    if keep:
        print(f"configs and logs kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def start_upstream(tmp: Path, tools, ready_timeout: float,
                   workers: int = 1) -> servers.Server | None:
    """The nginx every row proxies to (`return 200 "ok"`, plain HTTP), started; None (said on
    stderr) when it does not become ready."""
    port = servers.free_port()
    upstream = servers.nginx_server("upstream", servers.nginx_upstream_conf(tmp, port, workers),
                                    port, tmp, tools["nginx"])
    try:
        upstream.start(ready_timeout)
    except servers.StartError as e:             # start() has stopped it
        print(f"the upstream nginx did not start: {e}", file=sys.stderr)
        return None
    except BaseException:                       # interrupted: not left running
        upstream.stop()
        raise
    return upstream


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    tools = ensure_tools(args.no_install)
    info = machine_info(tools)
    note = system_nginx_on_80()
    tmp = workdir("fastmesh-bench-")
    rows: list[Target] = []
    upstream = None
    try:
        upstream = start_upstream(tmp, tools, args.ready_timeout, args.upstream_workers)
        if upstream is None:
            return 1
        if args.scenario == "compare":
            rows = compare_targets(args, tools, tmp, upstream)
            baseline = "nginx"
        elif args.scenario == "scaling":
            rows = scaling_targets(args, tools, tmp, upstream)
            baseline = None
        else:
            rows = routes_targets(args, tmp, upstream)
            baseline = rows[1].name
        for t in rows:
            if t.failed:
                print(f"{t.name}: {t.failed}", file=sys.stderr)
        started = time.time()
        run_rounds(rows, args, tools)
        info["loadavg_end"] = os.getloadavg()
        info["measured_s"] = round(time.time() - started, 1)
        summary = summarize(rows, [s for s, _ in scenarios(args)])
        ratios(summary, baseline)
        commands = {t.name: t.server.argv for t in rows if t.server}
        text = report.markdown(args, info, rows, summary, baseline, commands, note, tmp)
        print(text)
        if args.json:
            write_json(args.json, args, info, rows, summary, commands)
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping servers", file=sys.stderr)
        return 130
    finally:
        for t in rows:
            if t.server is not None and t.server is not upstream:
                t.server.stop()
        if upstream is not None:
            upstream.stop()
        end_workdir(tmp, args.keep_tmp)


def write_json(path, args, info, rows, summary, commands) -> None:
    doc = {
        "settings": vars(args),
        "machine": info,
        "commands": commands,
        "summary": summary,
        "runs": {t.name: t.runs for t in rows},
    }
    Path(path).write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
