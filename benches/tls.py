#!/usr/bin/env python3
"""Edge TLS: fastmesh, nginx and HAProxy terminating HTTPS, in one interleaved run.

What it measures (DESIGN.md section 8, with TLS in front):

* One upstream for all: nginx, one worker, ``return 200 "ok"`` over plain HTTP. Every proxy has
  one worker (one thread for HAProxy) and pooled keep-alive connections to it, as in compare.py.
* Rows: ``direct`` (wrk straight to the upstream over plain HTTP: the ceiling), ``fastmesh``,
  ``nginx`` and ``haproxy``, each terminating TLS with the same ECDSA P-256 certificate
  (benches/certs.py) and the same pinned TLS 1.3 suite and group (servers.TLS_*: in each
  server's config and in an OPENSSL_CONF every TLS process gets; fastmesh has no cipher setting
  of its own, its policy is fastmesh.tls.harden's). ``openssl s_client`` checks once per server
  what is negotiated; the check table shows it.
* Keep-alive throughput: ``wrk -t1 -c50`` -> req/s, ratio to nginx and to direct.
* Keep-alive latency: ``wrk -t1 -c1`` -> p50/p99; added = row minus direct (plain), and the row's
  added p50 minus nginx's.
* New handshakes: ``wrk -t1 -c50 -H "Connection: close"``: every request is a new TCP + TLS
  connection -> handshakes/s. wrk *does* resume TLS sessions when the server lets it (it keeps
  the session across SSL_clear on reconnect), so this runs twice against two instances of every
  proxy: ``full`` (resumption off for all: no session tickets, no session cache; every handshake
  signs with the certificate's key) and ``resumed`` (tickets and a session cache on, as usually
  deployed). A Python client checks each instance (a second connection offers the first one's
  session: reused or not), and HAProxy's own counter (SslFrontendSessionReuse_pct) shows what
  wrk did.
* CPU µs per request, every scenario: CPU time (schedstat, every thread) of the server's processes over
  the measured run divided by its requests. wrk's side of a handshake runs on the same cores and
  can cap handshakes/s; this column does not depend on it.
* Interleaving: every round runs every row once per scenario, the order rotated each round;
  medians over rounds. Errors: wrk socket errors and status >= 400, summed over all runs.

wrk, the upstream and the proxy share the machine; compare ratios within one run.

Usage:  python3 benches/tls.py [--rounds 3] [--duration 5] [--json out.json]
        python3 benches/tls.py --rounds 1 --duration 2          # quick check
        python3 benches/tls.py --targets direct,nginx,haproxy
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import certs  # noqa: E402
import compare  # noqa: E402
import loadgen  # noqa: E402
import servers  # noqa: E402
from report import DASH, _cell, _errors, _num, _ratio, _signed, memory_table  # noqa: E402

ALL_TARGETS = ("direct", "fastmesh", "nginx", "haproxy")
# (scenario, which instance of a proxy, connections: None = --connections, extra wrk headers)
SCENARIOS = (("throughput", "full", None, ()),
             ("latency", "full", 1, ()),
             ("handshake", "full", None, ("Connection: close",)),
             ("resumed", "resume", None, ("Connection: close",)))


class Row(compare.Target):
    """compare.Target plus the proxy's second instance (session resumption on) and checks."""

    def __init__(self, name: str, **kw):
        super().__init__(name, kind=name, **kw)
        self.resume: servers.Server | None = None
        self.checks: dict[str, dict] = {}          # instance -> negotiated / resumption

    def instance(self, which: str) -> servers.Server:
        return self.resume if which == "resume" and self.resume is not None else self.server


# --- setup -----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_round_options(p, warmup="keep-alive")
    p.add_argument("--connections", type=int, default=50,
                   help="wrk -c for the throughput and handshake runs")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="comma-separated rows (default: all; direct is always measured)")
    p.add_argument("--handshake-threads", type=int, default=1,
                   help="wrk -t for the handshake runs (default 1, as for the others): wrk's "
                        "own handshake work can cap these rows; see the CPU µs columns")
    compare.add_server_options(p)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1 or \
            args.handshake_threads < 1:
        p.error("--rounds >= 1, --duration > 0, --connections >= 1 and --handshake-threads "
                ">= 1 are required")
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}; choose from {', '.join(ALL_TARGETS)}")
    args.target_names = [n for n in ALL_TARGETS if n in names or n == "direct"]
    return args


def make_server(kind: str, which: str, tmp: Path, cert: certs.BenchCert, up: int, tools,
                args) -> servers.Server:
    """One TLS instance of a proxy: `full` (no resumption) or `resume`."""
    resumption = which == "resume"
    openssl = servers.openssl_conf(tmp, resumption)
    port, name = servers.free_port(), f"{kind}-{which}"
    if kind == "fastmesh":
        return servers.fastmesh_tls_server(
            name, servers.fastmesh_tls_conf(up, port, cert.cert, cert.key), port, tmp, openssl,
            python=args.python)
    if kind == "nginx":
        conf = servers.nginx_tls_proxy_conf(tmp, port, up, cert.cert, cert.key, name=name,
                                            resumption=resumption)
        return servers.nginx_tls_server(name, conf, port, tmp, tools["nginx"], openssl)
    conf = servers.haproxy_tls_conf(tmp, port, up, cert.chain, name=name, resumption=resumption)
    return servers.haproxy_tls_server(name, conf, port, tmp, tools["haproxy"], openssl)


def start_rows(args, tools, tmp: Path, cert: certs.BenchCert,
               upstream: servers.Server) -> list[Row]:
    rows = []
    for name in args.target_names:
        row = Row(name)
        rows.append(row)
        if name == "direct":
            row.server = upstream
            continue
        if name == "haproxy" and not tools.get("haproxy"):
            row.failed = "not installed (apt-get install -y haproxy)"
            continue
        compare.start(row, make_server(name, "full", tmp, cert, upstream.port, tools, args),
                      args.ready_timeout)
        if row.failed:
            continue
        resume = make_server(name, "resume", tmp, cert, upstream.port, tools, args)
        try:
            resume.start(args.ready_timeout)
            row.resume = resume
        except (servers.StartError, OSError) as exc:
            row.failed = f"resumption instance failed to start: {exc}"
    return rows


# --- checks: what is negotiated, whether sessions resume ---------------------------------------

def s_client(openssl: str | None, port: int, ca: Path) -> dict:
    """Protocol, suite, group, signature and verification as `openssl s_client` reports them."""
    if not openssl:
        return {"error": "openssl not installed"}
    try:
        done = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
             certs.NAME, "-CAfile", str(ca), "-verify_return_error", "-brief"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    found = {}
    for line in (done.stdout + done.stderr).splitlines():
        key, _, value = line.partition(":")
        found[key.strip()] = value.strip()
    return {"protocol": found.get("Protocol version"), "suite": found.get("Ciphersuite"),
            "group": (found.get("Server Temp Key") or "").split(",")[0] or None,
            "signature": found.get("Signature type"),
            "verified": "Verification" in found and found["Verification"] == "OK"}


def resumption(port: int, ca: Path) -> dict:
    """Two connections, the second offering the first one's session: was it resumed?"""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False                     # checked by s_client; here: sessions only
    session = None
    result = {}
    try:
        for attempt in ("first", "second"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=certs.NAME, session=session) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                while tls.recv(65536):               # the whole answer: tickets come with it
                    pass
                session = tls.session
                result[attempt] = tls.session_reused
    except OSError as exc:
        return {"error": str(exc) or type(exc).__name__}
    return {"resumed": bool(result.get("second"))}


def haproxy_info(server: servers.Server) -> dict:
    """HAProxy's `show info` counters (its stats socket in the run's temp dir)."""
    sock = server.workdir / f"{server.name}.sock"
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"show info\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return {}
    info = dict(line.split(": ", 1) for line in data.decode(errors="replace").splitlines()
                if ": " in line)
    return {k: info[k] for k in ("CumSslConns", "SslFrontendSessionReuse_pct") if k in info}


def check(rows: list[Row], cert: certs.BenchCert, openssl: str | None) -> None:
    for row in rows:
        if row.failed or row.name == "direct":
            continue
        for which, server in (("full", row.server), ("resume", row.resume)):
            row.checks[which] = {**s_client(openssl, server.port, cert.ca),
                                 **resumption(server.port, cert.ca)}


# --- measuring -------------------------------------------------------------------------------

def wrk_argv(tools, url: str, conns: int, duration: float, headers=(),
             threads: int = 1) -> list[str]:
    argv = loadgen.wrk_argv(tools["wrk"], url, conns, duration, threads=min(threads, conns))
    for header in headers:
        argv[-1:-1] = ["-H", header]
    return argv


def measure_once(row: Row, scenario: str, which: str, conns: int, headers, args, tools) -> None:
    server = row.instance(which)
    if not server.alive():
        row.runs.setdefault(scenario, []).append(
            {"error": f"process exited ({server.proc.returncode}): {server.stderr_tail(3)}"})
        return
    if scenario == "throughput" and args.warmup > 0:
        try:
            loadgen.run_wrk(wrk_argv(tools, server.url, conns, args.warmup), args.warmup)
        except (RuntimeError, ValueError):
            pass                                  # the measured run will show it
    argv = wrk_argv(tools, server.url, conns, args.duration, headers,
                    threads=args.handshake_threads if headers else 1)
    cpu = servers.server_cpu_seconds(server)
    try:
        result = loadgen.run_wrk(argv, args.duration)
    except (RuntimeError, ValueError) as exc:
        result = {"error": str(exc)}
    else:
        cpu = servers.server_cpu_seconds(server) - cpu
        result["server_cpu_s"] = cpu
        result["cpu_us"] = cpu / result["requests"] * 1e6 if result["requests"] else None
    result["argv"] = argv
    if row.name == "haproxy":
        result["haproxy"] = haproxy_info(server)
    row.runs.setdefault(scenario, []).append(result)


def run_rounds(rows: list[Row], args, tools) -> None:
    live = [r for r in rows if not r.failed]
    for n in range(args.rounds):
        order = live[n % len(live):] + live[:n % len(live)] if live else []
        for scenario, which, conns, headers in SCENARIOS:
            for row in order:
                if row.name == "direct" and scenario == "resumed":
                    continue                      # plain TCP: the same as "handshake"
                print(f"round {n + 1}/{args.rounds} {scenario:<10} {row.name}", file=sys.stderr)
                measure_once(row, scenario, which, conns or args.connections, headers, args,
                             tools)
    for row in live:
        if row.name != "direct":
            row.mem_after = servers.memory(row.server)


# --- summary and report ----------------------------------------------------------------------

def summarize(rows: list[Row]) -> dict:
    summary = compare.summarize(rows, [s for s, *_ in SCENARIOS])
    compare.ratios(summary, "nginx" if "nginx" in summary else None)
    nginx = summary.get("nginx", {})
    for name, s in summary.items():
        row = next(r for r in rows if r.name == name)
        for scenario, *_ in SCENARIOS:
            cpu = [r["cpu_us"] for r in row.runs.get(scenario, [])
                   if "error" not in r and r.get("cpu_us") is not None]
            if scenario in s:
                s[scenario]["cpu_us"] = statistics.median(cpu) if cpu else None
        for scenario in ("handshake", "resumed"):
            mine = (s.get(scenario) or {}).get("rps")
            base = (nginx.get(scenario) or {}).get("rps")
            s[f"{scenario}_vs_nginx"] = mine / base if mine and base else None
        mine, base = s.get("added_p50"), nginx.get("added_p50")
        s["added_p50_vs_nginx"] = mine - base if mine is not None and base is not None else None
        s["checks"] = row.checks
        reuse = [r.get("haproxy", {}).get("SslFrontendSessionReuse_pct")
                 for r in row.runs.get("resumed", []) if "error" not in r]
        s["haproxy_reuse_pct"] = [int(x) for x in reuse if x is not None]
    return summary


def _table(rows: list[Row], summary: dict, head: list[str], cells) -> list[str]:
    """A markdown table, a line a row: `cells(row, its summary)`, or for a row that did not
    start, why not."""
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for row in rows:
        s = summary[row.name]
        if s["failed"]:
            out.append(f"| {row.name} | {_cell(s['failed'])} |" + " |" * (len(head) - 2))
        else:
            out.append("| " + " | ".join(cells(row, s)) + " |")
    return out


def keepalive_table(rows: list[Row], summary: dict, conns: int) -> list[str]:
    head = ["target", f"req/s (-c{conns})", "vs nginx", "vs direct", "CPU µs/req",
            "-c1 p50 µs", "-c1 p99 µs", "added p50 µs", "added p99 µs",
            "added p50 vs nginx µs", "errors"]

    def cells(row: Row, s: dict) -> list[str]:
        tp, lat = s.get("throughput") or {}, s.get("latency") or {}
        direct = row.name == "direct"
        return [row.name + (" (plain HTTP)" if direct else " (HTTPS)"),
                _num(tp.get("rps")), _ratio(s["vs_baseline"]), _ratio(s["vs_direct"]),
                _num(tp.get("cpu_us"), "{:,.1f}"), _num(lat.get("p50")), _num(lat.get("p99")),
                DASH if direct else _signed(s["added_p50"]),
                DASH if direct else _signed(s["added_p99"]),
                DASH if direct else _signed(s["added_p50_vs_nginx"]),
                _errors(compare.error_counts(row, ("throughput", "latency")))]
    return _table(rows, summary, head, cells)


def handshake_table(rows: list[Row], summary: dict, conns: int) -> list[str]:
    head = ["target", f"full handshakes/s (-c{conns})", "vs nginx", "CPU µs/handshake",
            "resumed handshakes/s", "vs nginx", "CPU µs/resumed", "errors"]

    def cells(row: Row, s: dict) -> list[str]:
        hs, rs = s.get("handshake") or {}, s.get("resumed") or {}
        if row.name == "direct":
            values = ["direct (plain HTTP: new TCP connections)", _num(hs.get("rps")), DASH,
                      _num(hs.get("cpu_us"), "{:,.1f}"), DASH, DASH, DASH]
        else:
            values = [f"{row.name} (HTTPS)", _num(hs.get("rps")), _ratio(s["handshake_vs_nginx"]),
                      _num(hs.get("cpu_us"), "{:,.1f}"), _num(rs.get("rps")),
                      _ratio(s["resumed_vs_nginx"]), _num(rs.get("cpu_us"), "{:,.1f}")]
        return values + [_errors(compare.error_counts(row, ("handshake", "resumed")))]
    return _table(rows, summary, head, cells)


def checks_table(rows: list[Row], summary: dict) -> list[str]:
    out = ["| target | instance | protocol | suite | group | signature | certificate verified "
           "| second connection resumed |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for which, c in summary[row.name]["checks"].items():
            if "error" in c and "protocol" not in c:
                out.append(f"| {row.name} | {which} | {_cell(c['error'])} | | | | | |")
                continue
            out.append("| " + " | ".join([
                row.name, which, c.get("protocol") or DASH, c.get("suite") or DASH,
                c.get("group") or DASH, c.get("signature") or DASH,
                "yes" if c.get("verified") else "no",
                _cell(c["error"]) if "resumed" not in c and "error" in c
                else ("yes" if c.get("resumed") else "no")]) + " |")
    return out


def markdown(args, info, rows, summary, cert, tmp) -> str:
    lines = ["## Edge TLS: fastmesh vs nginx vs HAProxy (one worker each)", ""]
    lines += ["Keep-alive (wrk -t1; the -c1 run is the latency one hop of TLS termination adds):",
              ""] + keepalive_table(rows, summary, args.connections)
    lines += ["", "New connections (wrk `-H \"Connection: close\"`: one TCP + TLS handshake per "
              f"request, wrk -t{args.handshake_threads}); full = no session resumption "
              "possible, resumed = tickets on (wrk resumes):", ""]
    lines += handshake_table(rows, summary, args.connections)
    lines += ["", "CPU µs: CPU time (schedstat) of the server's processes during the measured "
              "run, divided by its requests (the upstream's for direct); unlike req/s it does "
              "not depend on how fast wrk, on the same cores, can do its side."]
    lines += ["", f"Negotiated (openssl s_client, once per instance; pinned: {servers.TLS_PROTOCOL} "
              f"{servers.TLS_SUITE}, group {servers.TLS_GROUP}, ECDSA P-256 leaf):", ""]
    lines += checks_table(rows, summary)
    reuse = summary.get("haproxy", {}).get("haproxy_reuse_pct")
    if reuse:
        lines += ["", f"wrk resumes sessions when allowed: HAProxy's resumption instance counted "
                      f"{', '.join(f'{x} %' for x in reuse)} of its handshakes as resumed "
                      "(SslFrontendSessionReuse_pct after each resumed run); the full rows "
                      "allow none (checked above)."]
    lines += ["", "Memory (the full instance of each proxy):", ""] + memory_table(rows, summary)
    la0, la1 = info["loadavg_start"], info.get("loadavg_end", (0, 0, 0))
    lines += ["", "### How this was measured", "",
              f"- machine: {info['nproc']} CPUs ({info['cpus_usable']} usable), {info['cpu']}, "
              f"Linux {info['kernel']}; load average at start {la0[0]:.2f} {la0[1]:.2f} "
              f"{la0[2]:.2f}, at end {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}; measured for "
              f"{info.get('measured_s')} s",
              f"- versions: {info['nginx']}; {info['haproxy']}; {info['wrk']}; "
              f"{ssl.OPENSSL_VERSION} (Python {info['python']}); fastmesh {info['fastmesh']}",
              f"- {args.rounds} interleaved round(s) (row order rotated each round), medians; "
              f"{args.duration:g} s per wrk run, wrk -t1, {args.warmup:g} s unmeasured warm-up "
              "before each keep-alive throughput run",
              "- upstream: nginx, 1 worker, `return 200 \"ok\"`, plain HTTP; every proxy: 1 worker "
              "(HAProxy nbthread 1), pooled keep-alive upstream connections",
              f"- TLS: one ECDSA P-256 leaf for all ({cert.cert.name}, CA {cert.ca.name}); "
              f"{servers.TLS_PROTOCOL} only, {servers.TLS_SUITE}, {servers.TLS_GROUP}, ALPN "
              "http/1.1; nginx `ssl_protocols`/`ssl_conf_command Ciphersuites`/`ssl_ecdh_curve`, "
              "HAProxy `ssl-default-bind-*`, and an OPENSSL_CONF (MinProtocol, Ciphersuites, "
              "Groups) for every TLS process, fastmesh included",
              "- full instances: no session resumption (nginx `ssl_session_cache off`, "
              "`ssl_session_tickets off`; HAProxy `no-tls-tickets`, `tune.ssl.cachesize 0`; "
              "OPENSSL_CONF `NumTickets = 0` for all); resume instances: tickets on (nginx also "
              "`ssl_session_cache shared`), fastmesh as it ships",
              "- errors: wrk socket errors (connect/read/write/timeout) and responses with "
              "status ≥ 400, all runs", "",
              "```"]
    for row in rows:
        for server in (row.server, row.resume):
            if server is not None and (row.name != "direct" or server is row.server):
                lines.append(f"# {server.name}\n{shlex.join(server.argv)}")
    c = args.connections
    lines += [f"wrk -t1 -c{c} -d{args.duration:g}s --timeout 2s -s benches/stats.lua URL"
              "    # keep-alive throughput",
              f"wrk -t1 -c1 -d{args.duration:g}s --timeout 2s -s benches/stats.lua URL"
              "    # keep-alive latency",
              f"wrk -t1 -c{c} -d{args.duration:g}s --timeout 2s -s benches/stats.lua "
              "-H 'Connection: close' URL    # handshakes (full and resume instances)", "```"]
    for row in rows:
        for e in (summary[row.name].get("run_errors") or [])[:2]:
            lines.append(f"- {row.name} run error: {_cell(e)}")
    if args.keep_tmp:
        lines.append(f"- configs and logs kept in {tmp}")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, compare._sigterm)
    tools = compare.ensure_tools(args.no_install)
    info = compare.machine_info(tools)
    tmp = compare.workdir("fastmesh-tls-bench-")
    rows: list[Row] = []
    upstream = None
    try:
        cert = certs.make(tmp)
        upstream = compare.start_upstream(tmp, tools, args.ready_timeout)
        if upstream is None:
            return 1
        rows = start_rows(args, tools, tmp, cert, upstream)
        for row in rows:
            if row.failed:
                print(f"{row.name}: {row.failed}", file=sys.stderr)
        check(rows, cert, compare.which("openssl"))
        started = time.time()
        run_rounds(rows, args, tools)
        info["loadavg_end"] = os.getloadavg()
        info["measured_s"] = round(time.time() - started, 1)
        summary = summarize(rows)
        print(markdown(args, info, rows, summary, cert, tmp))
        if args.json:
            doc = {"settings": vars(args), "machine": info, "summary": summary,
                   "commands": {s.name: s.argv for r in rows for s in (r.server, r.resume)
                                if s is not None},
                   "runs": {r.name: r.runs for r in rows}}
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
            print(f"wrote {args.json}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping servers", file=sys.stderr)
        return 130
    finally:
        for row in rows:
            for server in (row.server, row.resume):
                if server is not None and server is not upstream:
                    server.stop()
        if upstream is not None:
            upstream.stop()
        compare.end_workdir(tmp, args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main())
