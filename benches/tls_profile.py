#!/usr/bin/env python3
"""Where the TLS time of one fastmesh hop goes: CPU per request, plaintext vs TLS on each side.

Latency on a shared 2-core box is noisy; the CPU time a proxy process spends per request is
not (much). So every case here is measured as the CPU time of its fastmesh processes (all
threads of each server's session, supervisor and worker; the kernel's schedstat, user and
system) over a wrk run, divided by the requests wrk completed. Cases, all against nginx
`return 200 "ok"` upstreams (one worker):

* ``plain``     wrk http  -> fastmesh -> nginx http             (the keep-alive hop)
* ``edge``      wrk https -> fastmesh (TLS listener) -> nginx http
* ``upstream``  wrk http  -> fastmesh -> nginx https            (verified, pooled TLS)
* ``both``      wrk https -> fastmesh -> nginx https
* ``hop``       wrk http  -> sidecar s1 outbound -> sidecar s2 inbound -> nginx   (CPU of both)
* ``hop-mtls``  the same pair in strict mTLS (certificates from ``fastmesh ca``)

Also per request: minor page faults of the same processes (an allocation that goes to mmap
shows up here), CPU share (CPU seconds per wall second) and wrk's p50.

``--tree NAME=PATH`` (repeatable) runs every case once per source tree (PYTHONPATH and cwd =
PATH, each tree with its own built extensions), all started at once and measured interleaved:
every round runs every (tree, case) once, the order rotated each round; medians and min..max
over rounds. That is how a change is measured: before and after in one run. ``--suite`` pins
the TLS 1.3 suite of every fastmesh process (an OPENSSL_CONF, as benches/tls.py does);
``--tree NAME=PATH:SUITE`` pins it for one tree only (the same tree twice, two suites: a cipher
comparison in one interleaved run); SUITE ``TLSv1.2`` (or ``TLSv1.2:<cipher list>``) caps the
protocol at TLS 1.2 instead.

``--perf DIR`` adds one profiled run per (tree, case) after the rounds: ``perf record -g`` on the
case's fastmesh processes while wrk runs, then ``perf report`` by shared object and by symbol
(self time) and by symbol with callees included, written to DIR/<tree>-<case>-{dso,sym,incl}.txt,
with wrk's request count in DIR/<tree>-<case>-requests.txt (perf's event count is CPU ns: divide).
``--counts`` adds one run per case under ``perf stat``: syscalls, context switches, migrations
and wake-ups per request (exact counts, not samples).
Needs perf and root (or a low kernel.perf_event_paranoid). ``--micro N`` measures only the SSL
object path in-process (no servers): fastmesh.tls.SSLObject vs the ssl module's, and AEADs.

Why the CPU here is what it is, and what was changed, is in fastmesh/tls.py (SSLObject).

Usage:  python3 benches/tls_profile.py [--rounds 3] [--duration 5] [--connections 1]
        python3 benches/tls_profile.py --tree before=/tmp/base --tree after=. --cases plain,edge
        python3 benches/tls_profile.py --perf /tmp/prof --rounds 1
        python3 benches/tls_profile.py --micro 20000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import certs  # noqa: E402
import loadgen  # noqa: E402
import mesh_chain  # noqa: E402
import servers  # noqa: E402

CASES = ("plain", "edge", "upstream", "both", "hop", "hop-mtls")


def usage(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of `pids`, all their threads; exited ones count 0."""
    faults = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                faults += int(f.read().rpartition(")")[2].split()[7])
        except (OSError, ValueError, IndexError):
            continue
    return servers.cpu_seconds(pids), faults


def nginx_tls_upstream_conf(tmp: Path, port: int, cert: certs.BenchCert) -> str:
    return servers._nginx_common(tmp, "upstream-tls") + f"""
http {{{servers._nginx_http_common(tmp, "upstream-tls")}
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def gateway_conf(upstream: str, cert: certs.BenchCert, tls_port: int | None) -> str:
    """One route to `upstream` (an http:// or https:// url); a TLS listener when tls_port."""
    listener = "" if tls_port is None else (
        f'listeners:\n  - {{listen: "127.0.0.1:{tls_port}", tls: true}}\n'
        f"certificates:\n  - {{cert: {json.dumps(str(cert.cert))}, "
        f"key: {json.dumps(str(cert.key))}}}\n")
    tls = f"    tls_ca: {json.dumps(str(cert.ca))}\n" if upstream.startswith("https") else ""
    return f"""_format_version: "1"
{listener}services:
  - name: bench
    url: {upstream}
{tls}    routes:
      - name: all
        paths: [/]
"""


class Case:
    """One (tree, case): its fastmesh servers (whose CPU counts) and the URL wrk calls."""

    def __init__(self, tree: str, name: str):
        self.tree, self.name = tree, name
        self.servers: list[servers.Server] = []
        self.url = ""
        self.host: str | None = None
        self.runs: list[dict] = []
        self.failed: str | None = None
        self.counts: dict[str, float] = {}

    @property
    def label(self) -> str:
        return f"{self.tree}/{self.name}"

    def pids(self) -> list[int]:
        return [pid for s in self.servers if s.proc for pid in servers.session_pids(s.proc.pid)]


def env_for(path: Path, openssl_conf: Path | None) -> dict:
    env = servers.fastmesh_env(path)
    if openssl_conf is not None:
        env["OPENSSL_CONF"] = str(openssl_conf)
    return env


def build_case(tree: str, path: Path, name: str, home: Path, cert: certs.BenchCert,
               ups: dict, python: str, openssl_conf: Path | None) -> Case:
    case = Case(tree, name)
    env = env_for(path, openssl_conf)
    work = home / f"{tree}-{name}"
    work.mkdir()
    if name in ("plain", "edge", "upstream", "both"):
        tls_port = servers.free_port() if name in ("edge", "both") else None
        upstream = ups["https"] if name in ("upstream", "both") else ups["http"]
        port = servers.free_port()
        cfg = work / "fastmesh.yaml"
        cfg.write_text(gateway_conf(upstream, cert, tls_port))
        argv = [python, "-m", "fastmesh", "run", "--config", str(cfg), "--listen",
                f"127.0.0.1:{port}", "--workers", "1", "--admin", "off"]
        server = servers.Server(name, argv, tls_port or port, work, env=env, cwd=path,
                                tls=tls_port is not None)
        case.servers.append(server)
        case.url = server.url
        return case
    # a sidecar pair: s1's outbound -> s2's inbound -> s2's app (the plain upstream)
    pods = [mesh_chain.Pod(*(servers.free_port() for _ in range(4))) for _ in range(2)]
    pods[0].app_port = pods[1].app_port = ups["http_port"]
    mtls = name == "hop-mtls"
    dirs = mesh_chain.issue_certificates(work, python, 2) if mtls else []
    (work / "mesh.yaml").write_text(mesh_chain.registry_file(pods, "strict" if mtls else None))
    for i in (1, 0):
        pod = pods[i]
        argv = [python, "-m", "fastmesh", "sidecar", "--service", mesh_chain.service(i),
                "--app-port", str(pod.app_port), "--registry", f"file:{work / 'mesh.yaml'}",
                "--inbound", f"127.0.0.1:{pod.inbound}", "--outbound", f"127.0.0.1:{pod.outbound}",
                "--admin", f"127.0.0.1:{pod.admin}", "--instance-id", f"{mesh_chain.service(i)}-1"]
        if mtls:
            argv += ["--mtls", "strict", "--tls-dir", str(dirs[i])]
        case.servers.insert(0, servers.Server(f"sidecar-{mesh_chain.service(i)}", argv,
                                              pod.admin, work, env=env, cwd=path, path="/ready"))
    case.url = f"http://127.0.0.1:{pods[0].outbound}/"
    case.host = mesh_chain.service(1)
    return case


def start_case(case: Case, timeout: float) -> None:
    try:
        for server in reversed(case.servers):
            server.start(timeout)
        status, deadline = None, time.monotonic() + timeout
        while time.monotonic() < deadline:         # the whole path answers (registry, pools)
            status = probe(case)
            if status == 200:
                return
            time.sleep(0.2)
        raise servers.StartError(f"{case.url} answered {status}")
    except (servers.StartError, OSError) as exc:
        case.failed = str(exc)


def probe(case: Case) -> int | str:
    import http.client
    import ssl
    host, _, port = case.url.split("/")[2].partition(":")
    if case.url.startswith("https"):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, int(port), timeout=3, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=3)
    try:
        conn.request("GET", "/", headers={"Host": case.host} if case.host else {})
        return conn.getresponse().status
    except OSError as exc:
        return str(exc) or type(exc).__name__
    finally:
        conn.close()


def wrk(case: Case, args, duration: float) -> dict:
    argv = loadgen.wrk_argv(args.wrk, case.url, args.connections, duration, host=case.host)
    return loadgen.run_wrk(argv, duration)


def measure(case: Case, args) -> None:
    dead = [s.name for s in case.servers if not s.alive()]
    if dead:
        case.runs.append({"error": f"{dead[0]} exited"})
        return
    try:
        wrk(case, args, args.warmup)                  # pooled connections open, caches warm
        pids = case.pids()
        (cpu0, faults0), t0 = usage(pids), time.monotonic()
        result = wrk(case, args, args.duration)
        cpu1, faults1 = usage(pids)
        cpu, faults = cpu1 - cpu0, faults1 - faults0
        wall = time.monotonic() - t0
    except (RuntimeError, ValueError) as exc:
        case.runs.append({"error": str(exc)})
        return
    ok = result["requests"] - result["non2xx"]
    case.runs.append({"requests": result["requests"], "errors": result["socket_errors"] +
                      result["non2xx"], "rps": result["rps"], "p50": result.get("p50"),
                      "cpu_s": cpu, "cpu_share": cpu / wall,
                      "cpu_us": cpu * 1e6 / ok if ok else None,
                      "faults": faults / ok if ok else None})


def under_perf(case: Case, args, pids: list[int], perf_args: list[str]) -> tuple[float, str]:
    """One wrk run while `perf <perf_args> -p <pids>` watches: wrk's request count (0 when it
    failed) and what perf wrote to stderr. perf starts first and stops a little after wrk, so
    it sees every request (and a moment of idle processes, which do next to nothing)."""
    proc = subprocess.Popen(["perf", *perf_args, "-p", ",".join(map(str, pids)), "--",
                             "sleep", str(args.duration + 1)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    try:
        requests = wrk(case, args, args.duration)["requests"]
    except (RuntimeError, ValueError):
        requests = 0
    try:
        _, err = proc.communicate(timeout=args.duration + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return requests, err


def profile(case: Case, args, out: Path) -> None:
    """One wrk run under perf record; reports by shared object and by symbol."""
    pids = case.pids()
    if not pids or case.failed:
        return
    data = out / f"{case.tree}-{case.name}.perf.data"
    requests, _ = under_perf(case, args, pids, ["record", "-F", "1999", "-g", "-o", str(data)])
    for sort, name, children in (("dso", "dso", "--no-children"),
                                 ("dso,sym", "sym", "--no-children"),
                                 ("sym", "incl", "--children")):
        report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", children,
                                 "-g", "none", "--percent-limit", "0.5" if children ==
                                 "--children" else "0", "--sort", sort],
                                capture_output=True, text=True, timeout=300)
        (out / f"{case.tree}-{case.name}-{name}.txt").write_text(report.stdout)
    data.unlink(missing_ok=True)
    # wrk's requests over the recorded run
    (out / f"{case.tree}-{case.name}-requests.txt").write_text(f"{requests:.0f}\n")


PARTS = (  # (part, shared object prefix, symbol pattern or None), first match wins
    ("kernel (syscalls, TCP, wakeups)", "[kernel", None),
    ("OpenSSL (libssl, libcrypto)", ("libssl", "libcrypto"), None),
    ("CPython _ssl module", "_ssl.", None),
    ("uvloop SSLProtocol", "loop.", "SSLProtocol"),
    ("uvloop (loop, TCP transport)", "loop.", None),
    ("libpython (interpreter, objects)", "libpython", None),
    ("libc malloc/free", "libc", r"malloc|free|realloc|_int_|tcache"),
    ("libc other", "libc", None),
)


COUNTED = ("raw_syscalls:sys_enter", "context-switches", "cpu-migrations", "sched:sched_wakeup")


def counts(case: Case, args) -> None:
    """Kernel events per request over one wrk run (`perf stat` on the case's processes):
    syscalls, context switches, migrations, wake-ups. Unlike CPU time these are exact, so a
    change in how a case talks to the kernel shows here whatever the machine's noise."""
    pids = case.pids()
    if not pids or case.failed:
        return
    requests, err = under_perf(case, args, pids, ["stat", "-x", ",", "-e", ",".join(COUNTED)])
    found = {}
    for line in err.splitlines():                  # value,unit,event,...
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in COUNTED and fields[0].replace(".", "").isdigit():
            found[fields[2]] = float(fields[0])
    case.counts = {k: v / requests for k, v in found.items()} if requests else {}


def counts_table(cases: list[Case]) -> list[str]:
    found = [c for c in cases if c.counts]
    if not found:
        return []
    lines = ["", "Kernel events per request (perf stat, all of the case's processes, one run):",
             "", "| event | " + " | ".join(c.label for c in found) + " |",
             "| --- |" + " --- |" * len(found)]
    for event in COUNTED:
        lines.append(f"| {event} | " + " | ".join(f"{c.counts.get(event, 0.0):.2f}"
                                                  for c in found) + " |")
    return lines


def perf_parts(out: Path, label: str) -> tuple[dict[str, float], float] | None:
    """CPU µs per request by part, from a --perf run's symbol report (self time)."""
    import re
    try:
        text = (out / f"{label}-sym.txt").read_text()
        requests = int((out / f"{label}-requests.txt").read_text())
    except (OSError, ValueError):
        return None
    total = re.search(r"# Event count \(approx.\): (\d+)", text)
    if not total or not requests:
        return None
    us = int(total.group(1)) / 1000 / requests            # cpu-clock events are nanoseconds
    parts: dict[str, float] = {}
    for m in re.finditer(r"^\s+([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*)$", text, re.M):
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
        part = next((name for name, prefix, pattern in PARTS if dso.startswith(prefix)
                     and (pattern is None or re.search(pattern, sym))), "fastmesh and the rest")
        parts[part] = parts.get(part, 0.0) + pct * us / 100
    return parts, us


def parts_table(out: Path, cases: list[Case]) -> list[str]:
    found = [(c.label, perf_parts(out, f"{c.tree}-{c.name}")) for c in cases]
    found = [(label, p) for label, p in found if p]
    if not found:
        return []
    names = [n for n, *_ in PARTS] + ["fastmesh and the rest"]
    lines = ["", "CPU µs per request by part (perf, self time, one run each):", "",
             "| part | " + " | ".join(label for label, _ in found) + " |",
             "| --- |" + " --- |" * len(found)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{p[0].get(name, 0.0):.1f}"
                                                 for _, p in found) + " |")
    lines.append("| total | " + " | ".join(f"{p[1]:.1f}" for _, p in found) + " |")
    return lines


def summary(cases: list[Case]) -> list[str]:
    def stat(runs, key, digits=1):
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            return "-"
        f = f"{{:,.{digits}f}}".format
        return f"{f(statistics.median(values))} ({f(min(values))}..{f(max(values))})"
    lines = ["| tree/case | CPU µs/request | req/s | p50 µs | CPU share | page faults/request "
             "| errors |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for case in cases:
        if case.failed:
            lines.append(f"| {case.label} | failed: {case.failed[:120]} | | | | |")
            continue
        runs = [r for r in case.runs if "error" not in r]
        errors = sum(r["errors"] for r in runs) + len(case.runs) - len(runs)
        lines.append(f"| {case.label} | {stat(runs, 'cpu_us')} | {stat(runs, 'rps')} | "
                     f"{stat(runs, 'p50')} | {stat(runs, 'cpu_share', 2)} | "
                     f"{stat(runs, 'faults', 2)} | {errors:g} |")
    return lines


# --- --micro: one record each way through the ssl module, no sockets, no event loop ----------

READ_SIZE = 256 * 1024          # what uvloop's SSL transport asks SSLObject.read for
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\n\r\n" + b"x" * 40
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\n" + b"y" * 90 + b"\r\n\r\nok"


def micro(home: Path, n: int) -> list[str]:
    """ns per request/response exchange over memory BIOs (what uvloop's transport does per
    request, minus the loop and the sockets): both ends' write + read of one small record each
    way, per SSLObject class and per cipher (TLS 1.2 suites pin the AEAD; TLS 1.3: OpenSSL's
    default suite). Batches of `n`, interleaved across the variants: best and median of 7."""
    import ssl
    from fastmesh import tls
    cert = certs.make(home)
    variants = [("ssl.SSLObject", ssl.SSLObject, None), ("fastmesh.tls.SSLObject", tls.SSLObject,
                                                         None)]
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                  "ECDHE-ECDSA-CHACHA20-POLY1305"):
        variants.append((f"fastmesh.tls.SSLObject, TLS 1.2 {suite}", tls.SSLObject, suite))
    pairs = []
    for label, cls, suite in variants:
        server = tls.load_pair(str(cert.cert), str(cert.key))
        client = tls.harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        client.load_verify_locations(cafile=str(cert.ca))
        if suite:
            client.maximum_version = ssl.TLSVersion.TLSv1_2
            client.set_ciphers(suite)
        server.sslobject_class = client.sslobject_class = cls
        bios = [ssl.MemoryBIO() for _ in range(4)]
        s = server.wrap_bio(bios[0], bios[1], server_side=True)
        c = client.wrap_bio(bios[2], bios[3], server_hostname="localhost")
        for _ in range(10):                 # handshake: shuttle bytes until both are done
            for obj in (c, s):
                try:
                    obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            bios[0].write(bios[3].read())
            bios[2].write(bios[1].read())
        pairs.append((f"{label} ({c.version()} {c.cipher()[0]})", c, s, bios))
    best: dict[str, list[float]] = {label: [] for label, *_ in pairs}
    for _ in range(7):                      # batches interleaved across variants: same load
        for label, c, s, bios in pairs:
            t0 = time.perf_counter_ns()
            for _ in range(n):
                c.write(REQUEST)
                bios[0].write(bios[3].read())
                s.read(READ_SIZE)
                s.pending()
                s.write(RESPONSE)
                bios[2].write(bios[1].read())
                c.read(READ_SIZE)
                c.pending()
            best[label].append((time.perf_counter_ns() - t0) / n)
    lines = ["| SSL object, cipher | ns per exchange, best (median) of 7 batches |",
             "| --- | --- |"]
    for label, took in best.items():
        lines.append(f"| {label} | {min(took):,.0f} ({statistics.median(took):,.0f}) |")
    return lines


def pin_suite(home: Path, suite: str) -> Path:
    """An OPENSSL_CONF offering (client) or accepting (server) only this TLS 1.3 suite, or,
    for "TLSv1.2" or "TLSv1.2:<cipher list>", TLS 1.2 at most (with those ciphers)."""
    conf = home / f"openssl-{suite.replace(':', '-')}.cnf"
    if suite.startswith("TLSv1.2"):
        ciphers = suite.partition(":")[2]
        pin = "MaxProtocol = TLSv1.2\n" + (f"CipherString = {ciphers}\n" if ciphers else "")
    else:
        pin = f"Ciphersuites = {suite}\n"
    conf.write_text("openssl_conf = pin\n[pin]\nssl_conf = pin_ssl\n[pin_ssl]\n"
                    f"system_default = pin_sys\n[pin_sys]\n{pin}")
    return conf


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--tree", action="append", default=[],
                   help="NAME=PATH: a fastmesh source tree with built extensions (repeatable; "
                        "default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds per run (wrk: whole seconds)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured seconds before each run")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--suite", help="pin the TLS 1.3 suite of the fastmesh processes, e.g. "
                                   "TLS_AES_128_GCM_SHA256, TLS_CHACHA20_POLY1305_SHA256 "
                                   "(per tree: --tree NAME=PATH:SUITE)")
    p.add_argument("--perf", metavar="DIR", help="also profile every case with perf into DIR")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", help="write the runs here")
    p.add_argument("--counts", action="store_true", help="also count syscalls, context "
                   "switches and wake-ups per request (perf stat, one run per case)")
    p.add_argument("--micro", type=int, metavar="N", help="only the in-process SSL object "
                   "micro-benchmark, N exchanges per batch (no servers)")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    trees = {}
    for spec in args.tree or [f"this={servers.REPO}"]:
        name, sep, path = spec.partition("=")
        path, _, suite = path.partition(":")   # a suite may hold ':' itself (TLSv1.2:...)
        if not sep or not name or not Path(path).is_dir():
            p.error(f"--tree wants NAME=PATH[:SUITE] with a directory, found {spec!r}")
        trees[name] = (Path(path).resolve(), suite or args.suite)
    args.trees = trees
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="fastmesh-tlsprof-"))
    os.chmod(home, 0o755)
    started: list[servers.Server] = []
    cases: list[Case] = []
    try:
        if args.micro:
            sys.path.insert(0, str(servers.REPO))
            print("\n".join(micro(home, args.micro)))
            return 0
        cert = certs.make(home)
        up, up_tls = servers.free_port(), servers.free_port()
        plain = servers.nginx_server("upstream", servers.nginx_upstream_conf(home, up), up,
                                     home, args.nginx)
        secure = servers.nginx_server("upstream-tls", nginx_tls_upstream_conf(home, up_tls, cert),
                                      up_tls, home, args.nginx)
        secure.tls = True
        for server in (plain, secure):
            server.start(args.timeout)
            started.append(server)
        ups = {"http": f"http://127.0.0.1:{up}", "https": f"https://127.0.0.1:{up_tls}",
               "http_port": up}
        for tree, (path, suite) in args.trees.items():
            conf = pin_suite(home, suite) if suite else None
            for name in args.cases:
                case = build_case(tree, path, name, home, cert, ups, args.python, conf)
                start_case(case, args.timeout)
                started += case.servers
                cases.append(case)
                print(f"{case.label}: {'FAILED ' + case.failed if case.failed else 'up'}",
                      file=sys.stderr)
        live = [c for c in cases if not c.failed]
        for r in range(args.rounds):
            shift = r % max(1, len(live))
            for case in live[shift:] + live[:shift]:
                measure(case, args)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        if args.perf:
            out = Path(args.perf)
            out.mkdir(parents=True, exist_ok=True)
            for case in live:
                profile(case, args, out)
        if args.counts:
            for case in live:
                counts(case, args)
        load = os.getloadavg()
        print(f"# CPU per request of one hop: -c{args.connections}, {args.rounds} rounds x "
              f"{args.duration:g} s, suite {args.suite or 'default'}, load {load[0]:.2f}\n")
        print("\n".join(summary(cases)))
        if args.perf:
            print("\n".join(parts_table(Path(args.perf), live)))
        print("\n".join(counts_table(live)))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {c.label: {"runs": c.runs, "failed": c.failed} for c in cases}, indent=1))
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
