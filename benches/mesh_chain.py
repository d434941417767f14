#!/usr/bin/env python3
"""The call-chain benchmark: what a sidecar costs per hop, fastmesh vs nginx and HAProxy.

A chain of 5 services s1 -> s2 -> s3 -> s4 -> s5. Every app is nginx (one worker): s1..s4
proxy every request to the next service (keep-alive pool, `Host: <next service>`), s5 answers
`return 200 "ok"`. wrk calls s1's app. Layouts, all running at once and measured interleaved:

* ``direct``: the apps call each other's ports directly (no sidecar): the floor;
* ``fastmesh``: each pod is its app plus ``fastmesh sidecar`` (one process, one worker); an app
  calls its own sidecar's outbound port with ``Host: <next service>``, which routes to the next
  pod's inbound listener, which relays to that app. Registry: a file (no Redis needed);
* ``nginx``: the same with nginx (one worker) as the sidecar: an inbound server in front of the
  app and an outbound server routing by ``server_name`` to every service's inbound port;
* ``haproxy``: the same with HAProxy (one thread): frontends ``in`` and ``out``, ``use_backend``
  by Host.

So each of the 4 hops (s1->s2 ... s4->s5) crosses two sidecars: the caller's outbound and the
callee's inbound. wrk itself enters at s1's app, not through a sidecar.

Reported, medians over interleaved rounds (the order rotates every round): ``wrk -c1`` p50/p99
(one request at a time: latency) and ``wrk -c50`` req/s (throughput) of the whole chain; the
latency added per hop = (layout's -c1 percentile - direct's) / 4; errors (socket errors and
status >= 400, all runs); the sidecars' CPU time per hop in the -c50 run (all the layout's
sidecar processes, every thread: a figure that the scheduling noise of a shared machine moves
much less than req/s); each sidecar's RSS (idle after start and after the load; nginx:
master + worker). By default every pod is a set of loopback ports on this host; ``--netns``
puts each pod in a network namespace of its own (fastmesh.mesh.netns: veth pairs to a bridge,
root needed) with the same ports in every pod, and runs wrk in the bridge's namespace. Every
process shares the same cores either way: compare layouts within one run, not across machines.

``--mtls`` adds the layout ``fastmesh-mtls``: the fastmesh chain with every sidecar in strict
mTLS (``fastmesh sidecar --mtls strict --tls-dir DIR``, certificates from ``fastmesh ca init`` and
``fastmesh ca issue``, a CA made for the run), measured in the same interleaved run as the
plaintext ``fastmesh`` layout (by default the layouts are then direct, fastmesh, fastmesh-mtls).
Each -c1 latency run is then preceded by an unmeasured -c1 warm-up (every layout alike) so the
pooled mTLS connections are open: the report gives the per-hop p50/p99 of both, the ratio, the
goal of issue 9 (mTLS adds <= 30 % to the plaintext per-hop p50) and each mTLS sidecar's
handshake counters from its /status.

Usage:  python3 benches/mesh_chain.py [--rounds 3] [--duration 5] [--json out.json]
        python3 benches/mesh_chain.py --layouts fastmesh,nginx --rounds 1 --duration 2
        python3 benches/mesh_chain.py --mtls [--layouts fastmesh,fastmesh-mtls,nginx]
        sudo python3 benches/mesh_chain.py --netns       # one network namespace per pod
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import shutil
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
import loadgen  # noqa: E402
import servers  # noqa: E402
from report import DASH, _cell, _errors, _mib, _num, _ratio  # noqa: E402

SERVICES = 5
HOPS = SERVICES - 1
ALL_LAYOUTS = ("direct", "fastmesh", "nginx", "haproxy")
MTLS = "fastmesh-mtls"                  # --mtls: the fastmesh chain in strict mTLS
MTLS_LAYOUTS = ("direct", "fastmesh", MTLS)
TRUST_DOMAIN = "bench.fastmesh.local"


def service(i: int) -> str:
    return f"s{i + 1}"


@dataclass
class Pod:
    app_port: int
    inbound: int
    outbound: int
    admin: int
    host: str = "127.0.0.1"         # where the other pods reach this one
    netns: str | None = None        # --netns: the pod's network namespace

    @property
    def bind(self) -> str:
        """Listeners other pods (or wrk) connect to: on the pod's address."""
        return "0.0.0.0" if self.netns else "127.0.0.1"


class PodServer(servers.Server):
    """A server started in a pod's namespace (`ip netns exec`): it is probed from inside it."""

    netns: str = ""
    host: str = "127.0.0.1"
    port_local: bool = False            # listens on the pod's loopback only (the admin API)

    def start(self, ready_timeout: float) -> None:
        self.stderr_path = self.workdir / f"{self.name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *self.argv], stdin=subprocess.DEVNULL,
                stdout=err, stderr=err, cwd=self.cwd or self.workdir, env=self.env,
                start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive():
                self.stop()
                raise servers.StartError(f"exited with code {self.proc.returncode}: "
                                         f"{self.stderr_tail(3)}")
            last = probe(self.netns, "127.0.0.1" if self.port_local else self.host,
                         self.port, self.path)
            if last == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise servers.StartError(f"not ready after {ready_timeout:.0f}s ({last}): "
                                 f"{self.stderr_tail(3)}")


def probe(netns: str | None, host: str, port: int, path: str = "/") -> int | str:
    """GET's status (or why none), from inside `netns` when given."""
    if netns is None:
        try:
            return servers.http_get_status(port, path)
        except OSError as exc:
            return str(exc) or type(exc).__name__
    done = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null",
                           "-w", "%{http_code}", "--max-time", "2",
                           f"http://{host}:{port}{path}"],
                          capture_output=True, text=True, timeout=10)
    code = done.stdout.strip()
    return int(code) if code.isdigit() and code != "000" else f"curl exit {done.returncode}"


@dataclass
class Layout:
    name: str
    pods: list[Pod]
    apps: list[servers.Server] = field(default_factory=list)
    sidecars: list[servers.Server] = field(default_factory=list)
    failed: str | None = None
    runs: dict[str, list[dict]] = field(default_factory=dict)
    mem_idle: list[dict] = field(default_factory=list)
    mem_after: list[dict] = field(default_factory=list)

    client_netns: str | None = None          # --netns: where wrk runs (the bridge namespace)
    mtls_status: list[dict] = field(default_factory=list)   # --mtls: each sidecar's /status mtls

    @property
    def entry_url(self) -> str:
        return f"http://{self.pods[0].host}:{self.pods[0].app_port}/"

    def all_servers(self) -> list[servers.Server]:
        return self.apps + self.sidecars


# --- configs -------------------------------------------------------------------------------------

def _keepalive(name: str, address: str) -> str:
    return f"""
    upstream {name} {{
        server {address};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}"""


_PROXY = """proxy_http_version 1.1; proxy_set_header Connection "";"""


def app_conf(tmp: Path, name: str, listen: str, next_address: str | None,
             next_service: str) -> str:
    """An app: proxies to `next_address` with Host: next_service, or (last) answers 200 "ok"."""
    if next_address is None:
        body = """location / { return 200 "ok"; }"""
        upstream = ""
    else:
        body = (f"""location / {{ proxy_pass http://next; {_PROXY} """
                f"""proxy_set_header Host {next_service}; }}""")
        upstream = _keepalive("next", next_address)
    return servers._nginx_common(tmp, name) + f"""
http {{{servers._nginx_http_common(tmp, name)}{upstream}
    server {{
        listen {listen} backlog=4096;
        location = /ready {{ return 200 "ready"; }}
        {body}
    }}
}}
"""


def nginx_sidecar_conf(tmp: Path, name: str, pod: Pod, pods: list[Pod]) -> str:
    """nginx as a sidecar: inbound -> the app; outbound routes by Host to every service."""
    upstreams = _keepalive("app", f"127.0.0.1:{pod.app_port}") + "".join(
        _keepalive(f"svc_{service(j)}", f"{p.host}:{p.inbound}") for j, p in enumerate(pods))
    outbound = "".join(f"""
    server {{
        listen 127.0.0.1:{pod.outbound};
        server_name {service(j)};
        location / {{ proxy_pass http://svc_{service(j)}; {_PROXY} proxy_set_header Host $host; }}
    }}""" for j in range(len(pods)))
    return servers._nginx_common(tmp, name) + f"""
http {{{servers._nginx_http_common(tmp, name)}{upstreams}
    server {{
        listen {pod.bind}:{pod.inbound} backlog=4096;
        location / {{ proxy_pass http://app; {_PROXY} proxy_set_header Host $host; }}
    }}
    server {{
        listen 127.0.0.1:{pod.outbound} backlog=4096 default_server;
        location / {{ return 503 "unknown service"; }}
    }}{outbound}
}}
"""


def haproxy_sidecar_conf(tmp: Path, name: str, pod: Pod, pods: list[Pod]) -> str:
    rules = "".join(f"\n    use_backend svc_{service(j)} if {{ hdr(host) -i {service(j)} }}"
                    for j in range(len(pods)))
    backends = "".join(f"""
backend svc_{service(j)}
    server {service(j)} {p.host}:{p.inbound}
""" for j, p in enumerate(pods))
    return servers.haproxy_common(tmp, name) + f"""
frontend in
    bind {pod.bind}:{pod.inbound}
    default_backend app

backend app
    server app 127.0.0.1:{pod.app_port}

frontend out
    bind 127.0.0.1:{pod.outbound}{rules}
{backends}"""


def registry_file(pods: list[Pod], mtls: str | None = None) -> str:
    """The file registry; `mtls` ("strict") marks every instance as taking mTLS only, as a
    sidecar registering itself with --mtls does (fastmesh.mesh.routes.MTLS_KEY)."""
    def metadata(p: Pod) -> dict:
        meta = {"fastmesh.admin": f"127.0.0.1:{p.admin}"}
        return dict(meta, **{"fastmesh.mtls": mtls}) if mtls else meta
    return json.dumps({"services": {
        service(i): [{"address": f"{p.host}:{p.inbound}", "id": f"{service(i)}-1",
                      "metadata": metadata(p)}]
        for i, p in enumerate(pods)}}, indent=1) + "\n"     # JSON is YAML


def issue_certificates(home: Path, python: str, count: int) -> list[Path]:
    """A CA for this run (`fastmesh ca init`) and one workload directory per service
    (`fastmesh ca issue`): home/certs/sN with cert.pem, key.pem, ca.pem."""
    ca = home / "ca"
    base = [python, "-m", "fastmesh", "ca"]
    steps = [base + ["init", "--trust-domain", TRUST_DOMAIN, "--dir", str(ca)]]
    dirs = [home / "certs" / service(i) for i in range(count)]
    steps += [base + ["issue", "--dir", str(ca), "--service", service(i), "--out", str(d)]
              for i, d in enumerate(dirs)]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env=servers.fastmesh_env(servers.REPO, python), cwd=servers.REPO)
        if done.returncode != 0:
            raise servers.StartError(f"{shlex.join(argv[2:])} exited {done.returncode}: "
                                     f"{(done.stderr or done.stdout).strip()[-300:]}")
    return dirs


# --- starting a layout ---------------------------------------------------------------------------

def new_pods(net=None) -> list[Pod]:
    """Loopback: free ports on this host. In namespaces: the same ports in every pod."""
    if net is None:
        return [Pod(*(servers.free_port() for _ in range(4))) for _ in range(SERVICES)]
    pods = []
    for i in range(SERVICES):
        ns_pod = net.add_pod(service(i))
        pods.append(Pod(8080, 15006, 15001, 15000, ns_pod.address, ns_pod.netns))
    return pods


def _server(pod: Pod, name: str, argv: list[str], port: int, home: Path, path: str = "/ready",
            local: bool = False, **kw) -> servers.Server:
    """A server of `pod`, probed at `port` (on the pod's address, or its loopback: `local`)."""
    if pod.netns is None:
        return servers.Server(name, argv, port, home, path=path, **kw)
    server = PodServer(name, argv, port, home, path=path, **kw)
    server.netns, server.host, server.port_local = pod.netns, pod.host, local
    return server


def _nginx(pod: Pod, name: str, conf: str, port: int, home: Path, nginx: str) -> servers.Server:
    made = servers.nginx_server(name, conf, port, home, nginx)
    return _server(pod, name, made.argv, port, home)


def build(name: str, tmp: Path, tools: dict, python: str, net=None) -> Layout:
    """Configs and (not started) servers of one layout, in `tmp/name`; in `net`'s namespaces
    (fastmesh.mesh.netns.Network) when given."""
    layout = Layout(name, new_pods(net))
    if net is not None:
        layout.client_netns = net.bridge.netns
    home = tmp / name
    home.mkdir()
    os.chmod(home, 0o755)
    pods = layout.pods
    tls_dirs = issue_certificates(home, python, len(pods)) if name == MTLS else []
    for i, pod in enumerate(pods):
        last = i == len(pods) - 1
        if last:
            target = None
        elif name == "direct":
            target = f"{pods[i + 1].host}:{pods[i + 1].app_port}"
        else:
            target = f"127.0.0.1:{pod.outbound}"
        app = f"app-{service(i)}"
        conf = app_conf(home, app, f"{pod.bind}:{pod.app_port}", target,
                        "" if last else service(i + 1))
        layout.apps.append(_nginx(pod, app, conf, pod.app_port, home, tools["nginx"]))
        if name == "direct":
            continue
        side = f"sidecar-{service(i)}"
        if name in ("fastmesh", MTLS):
            (home / "mesh.yaml").write_text(registry_file(pods, "strict" if tls_dirs else None))
            argv = [python, "-m", "fastmesh", "sidecar", "--service", service(i),
                    "--app-port", str(pod.app_port), "--registry", f"file:{home / 'mesh.yaml'}",
                    "--inbound", f"{pod.bind}:{pod.inbound}",
                    "--advertise", f"{pod.host}:{pod.inbound}",
                    "--outbound", f"127.0.0.1:{pod.outbound}",
                    "--admin", f"127.0.0.1:{pod.admin}", "--instance-id", f"{service(i)}-1"]
            if tls_dirs:
                argv += ["--mtls", "strict", "--tls-dir", str(tls_dirs[i])]
            sidecar = _server(pod, side, argv, pod.admin, home, local=True,
                              env=servers.fastmesh_env(servers.REPO, python), cwd=servers.REPO)
        elif name == "nginx":
            sidecar = _nginx(pod, side, nginx_sidecar_conf(home, side, pod, pods), pod.inbound,
                             home, tools["nginx"])
        else:
            conf = home / f"{side}.cfg"
            conf.write_text(haproxy_sidecar_conf(home, side, pod, pods))
            sidecar = _server(pod, side, [tools["haproxy"], "-db", "-f", str(conf)],
                              pod.inbound, home)
        layout.sidecars.append(sidecar)
    return layout


def start(layout: Layout, timeout: float) -> None:
    """Apps and sidecars from the end of the chain; then one request through all of it."""
    try:
        for i in reversed(range(len(layout.pods))):
            layout.apps[i].start(timeout)
            if layout.sidecars:
                layout.sidecars[i].start(timeout)
        deadline = time.monotonic() + timeout
        status = None
        entry = layout.pods[0]
        while time.monotonic() < deadline:
            status = probe(layout.client_netns, entry.host, entry.app_port)
            if status == 200:
                break
            time.sleep(0.1)
        if status != 200:
            raise servers.StartError(f"the chain answered {status} instead of 200")
        layout.mem_idle = [servers.memory(s) for s in layout.sidecars]
    except (servers.StartError, OSError) as exc:
        layout.failed = f"failed to start: {exc}"


# --- measuring -----------------------------------------------------------------------------------

SCENARIOS = (("latency", 1), ("throughput", 50))


def measure(layout: Layout, scenario: str, conns: int, args, wrk: str) -> None:
    dead = [s for s in layout.all_servers() if not s.alive()]
    if dead:
        layout.runs.setdefault(scenario, []).append(
            {"error": f"{dead[0].name} exited: {dead[0].stderr_tail(3)}"})
        return
    url = layout.entry_url
    inside = ["ip", "netns", "exec", layout.client_netns] if layout.client_netns else []
    if args.warmup > 0 and (scenario == "throughput" or args.mtls):
        try:                        # --mtls: -c1 runs too, so pooled connections are open
            loadgen.run_wrk(inside + loadgen.wrk_argv(wrk, url, conns, args.warmup), args.warmup)
        except (RuntimeError, ValueError):
            pass
    argv = inside + loadgen.wrk_argv(wrk, url, conns, args.duration)
    pids = [servers.session_pids(s.proc.pid) for s in layout.sidecars]
    cpu0 = [servers.cpu_seconds(p) for p in pids]
    try:
        result = loadgen.run_wrk(argv, args.duration)
    except (RuntimeError, ValueError) as exc:
        result = {"error": str(exc)}
    else:
        cpu = sum(servers.cpu_seconds(p) - c for p, c in zip(pids, cpu0))
        # Per hop: each of the HOPS hops crosses two sidecars (outbound, then inbound).
        result["sidecar_cpu_us_per_hop"] = (cpu * 1e6 / result["requests"] / HOPS
                                            if layout.sidecars and result["requests"] else None)
    layout.runs.setdefault(scenario, []).append(result)


def run_rounds(layouts: list[Layout], args, wrk: str) -> None:
    live = [t for t in layouts if not t.failed]
    for r in range(args.rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for scenario, conns in SCENARIOS:
            for t in order:
                print(f"round {r + 1}/{args.rounds} {scenario:<10} {t.name}", file=sys.stderr)
                measure(t, scenario, conns, args, wrk)
    for t in live:
        t.mem_after = [servers.memory(s) for s in t.sidecars]
        if t.name == MTLS:
            t.mtls_status = [sidecar_mtls(pod) for pod in t.pods]


def sidecar_mtls(pod: Pod) -> dict:
    """The `mtls` part of a sidecar's /status (mode, identity, inbound handshake counters)."""
    url = f"http://127.0.0.1:{pod.admin}/status"
    argv = ["curl", "-s", "--max-time", "5", url]
    try:
        if pod.netns:
            text = subprocess.run(["ip", "netns", "exec", pod.netns, *argv], capture_output=True,
                                  text=True, timeout=10).stdout
        else:
            with urllib.request.urlopen(url, timeout=5) as answer:
                text = answer.read().decode()
        return json.loads(text).get("mtls") or {"error": "no mtls in /status"}
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc) or type(exc).__name__}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if "error" not in r and r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(layouts: list[Layout]) -> dict:
    out = {}
    for t in layouts:
        s = {"failed": t.failed}
        errors = {"non2xx": 0, "socket": 0, "failed_runs": 0, "runs": 0}
        for scenario, _ in SCENARIOS:
            runs = t.runs.get(scenario, [])
            s[scenario] = {k: _median(runs, k)
                           for k in ("rps", "p50", "p99", "sidecar_cpu_us_per_hop")}
            for r in runs:
                errors["runs"] += 1
                if "error" in r:
                    errors["failed_runs"] += 1
                    s.setdefault("run_errors", []).append(r["error"])
                else:
                    errors["non2xx"] += int(r["non2xx"])
                    errors["socket"] += int(r["socket_errors"])
        s["errors"] = errors
        for when, mems in (("idle", t.mem_idle), ("after", t.mem_after)):
            rss = [m["rss_kb"] for m in mems if m]
            s[f"rss_{when}_kb"] = {"max": max(rss), "median": statistics.median(rss)} \
                if rss else None
        out[t.name] = s
    direct = out.get("direct", {}).get("latency", {})
    nginx_tp = out.get("nginx", {}).get("throughput") or {}
    nginx_rps, nginx_cpu = nginx_tp.get("rps"), nginx_tp.get("sidecar_cpu_us_per_hop")
    for name, s in out.items():
        for q in ("p50", "p99"):
            mine, floor = (s.get("latency") or {}).get(q), direct.get(q)
            s[f"per_hop_{q}"] = (mine - floor) / HOPS if mine is not None and \
                floor is not None and name != "direct" else None
        rps = (s.get("throughput") or {}).get("rps")
        s["vs_nginx"] = rps / nginx_rps if rps and nginx_rps else None
        cpu = (s.get("throughput") or {}).get("sidecar_cpu_us_per_hop")
        s["cpu_vs_nginx"] = cpu / nginx_cpu if cpu and nginx_cpu else None
    if MTLS in out:
        out[MTLS]["vs_plaintext"] = mtls_comparison(out)
        out[MTLS]["sidecars"] = next(t.mtls_status for t in layouts if t.name == MTLS)
    return out


MTLS_GOAL = 0.30                 # issue 9: mTLS adds at most 30 % to the plaintext per-hop p50


def mtls_comparison(summary: dict) -> dict:
    """Per-hop p50/p99 of the plaintext and the mTLS fastmesh chains and their ratio."""
    plain, secure = summary.get("fastmesh") or {}, summary[MTLS]
    out = {}
    for q in ("p50", "p99"):
        a, b = plain.get(f"per_hop_{q}"), secure.get(f"per_hop_{q}")
        ratio = b / a if a is not None and b is not None and a > 0 else None
        out[q] = {"plaintext": a, "mtls": b, "ratio": ratio}
    ratio = out["p50"]["ratio"]
    out["goal_met"] = None if ratio is None else ratio <= 1 + MTLS_GOAL
    return out


# --- report --------------------------------------------------------------------------------------

def table(layouts: list[Layout], summary: dict) -> list[str]:
    head = ["layout", "-c1 p50 µs", "-c1 p99 µs", "added/hop p50 µs", "added/hop p99 µs",
            "req/s (-c50)", "vs nginx", "sidecar CPU µs/hop (-c50)", "vs nginx", "errors",
            "sidecar RSS idle MiB", "sidecar RSS after MiB"]
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * 8 + ["---"] + ["---:"] * 2) + "|"]
    for t in layouts:
        s = summary[t.name]
        if s["failed"]:
            out.append(f"| {t.name} | {_cell(s['failed'])} |" + " |" * (len(head) - 2))
            continue
        lat, tp = s["latency"], s["throughput"]

        def rss(key):
            r = s.get(key)
            return DASH if not r else f"{_mib(r['median'])} (max {_mib(r['max'])})"
        out.append("| " + " | ".join([
            t.name, _num(lat["p50"]), _num(lat["p99"]),
            _num(s["per_hop_p50"], "{:+,.0f}"), _num(s["per_hop_p99"], "{:+,.0f}"),
            _num(tp["rps"]), _ratio(s["vs_nginx"]), _num(tp["sidecar_cpu_us_per_hop"], "{:,.1f}"),
            _ratio(s["cpu_vs_nginx"]), _errors(s["errors"]),
            rss("rss_idle_kb") if t.sidecars else DASH,
            rss("rss_after_kb") if t.sidecars else DASH]) + " |")
    return out


def markdown(args, info: dict, layouts: list[Layout], summary: dict, argv: list[str]) -> str:
    where = ("one network namespace per pod (veth pairs to a bridge), wrk in the bridge's "
             "namespace" if args.netns else "loopback ports of one host")
    lines = [f"Call chain of {SERVICES} services ({HOPS} hops, each through the caller's "
             f"outbound and the callee's inbound sidecar), {where}, one worker per "
             f"process; medians of {args.rounds} interleaved round(s) x {args.duration:g} s.", ""]
    lines += table(layouts, summary)
    lines += ["", "added/hop = (layout's -c1 percentile - direct's) / "
              f"{HOPS}; sidecar CPU/hop = CPU time of all the layout's sidecars (every thread, "
              f"schedstat) during the -c50 run / requests / {HOPS} (two sidecar passes per hop), "
              "steadier than req/s on a shared machine; sidecar RSS: median of the "
              f"{SERVICES} sidecars (max), nginx master + worker.", ""]
    if MTLS in summary and not summary[MTLS]["failed"]:
        lines += mtls_lines(summary[MTLS]) + [""]
    la0, la1 = info["loadavg_start"], info.get("loadavg_end", (0, 0, 0))
    lines += [f"- command: `{shlex.join(argv)}`",
              f"- machine: {info['cpu']}, {info['cpus_usable']} usable CPU(s), kernel "
              f"{info['kernel']}, Python {info['python']}",
              f"- load average at start {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}, at end "
              f"{la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}; measured for {info.get('measured_s')} s",
              f"- {info['nginx']}, {info['haproxy']}, {info['wrk']}, fastmesh {info['fastmesh']}"]
    for t in layouts:
        for e in (summary[t.name].get("run_errors") or [])[:2]:
            lines.append(f"- {t.name} run error: {_cell(e)}")
    return "\n".join(lines)


def mtls_lines(s: dict) -> list[str]:
    cmp = s["vs_plaintext"]
    out = []
    for q in ("p50", "p99"):
        c = cmp[q]
        more = DASH if c["ratio"] is None else f"{(c['ratio'] - 1) * 100:+.0f} %"
        out.append(f"- mTLS vs plaintext, added per hop {q}: {_num(c['plaintext'], '{:+,.0f}')} "
                   f"µs plaintext, {_num(c['mtls'], '{:+,.0f}')} µs mTLS: "
                   f"{_ratio(c['ratio'])} ({more})")
    if cmp["goal_met"] is not None:
        out.append(f"- {'✅' if cmp['goal_met'] else '❌'} mTLS adds ≤ {MTLS_GOAL:.0%} to the "
                   "plaintext per-hop p50 (warm pooled connections: every -c1 run follows an "
                   "unmeasured warm-up)")
    else:
        out.append("- mTLS goal not evaluated: the plaintext per-hop p50 was not positive or "
                   "a chain had no successful -c1 run")
    counts = []
    for i, st in enumerate(s.get("sidecars") or []):
        if "error" in st:
            counts.append(f"{service(i)}: {_cell(st['error'], 80)}")
            continue
        counts.append(f"{service(i)} ({st.get('mode')}): {handshake_counts(st)}")
    if counts:
        out.append("- inbound connections per mTLS sidecar (its /status; s1 is called by wrk "
                   "through its app only): " + "; ".join(counts))
    return out


def handshake_counts(status: dict) -> str:
    """'tls 85, refused 0' (refusals by reason when there are any) from a sidecar's mtls."""
    shakes = status.get("handshakes") or {}
    refused = shakes.get("refused") or {}
    parts = [f"{k} {v}" for k, v in shakes.items() if k != "refused" and (v or k == "tls")]
    bad = {reason: n for reason, n in refused.items() if n}
    parts.append("refused " + (", ".join(f"{r} {n}" for r, n in bad.items()) if bad else "0"))
    return ", ".join(parts)


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_round_options(p)
    p.add_argument("--layouts", default=None,
                   help="comma-separated, from: " + ", ".join(ALL_LAYOUTS + (MTLS,)) +
                        f" (default: {', '.join(ALL_LAYOUTS)}; with --mtls: "
                        f"{', '.join(MTLS_LAYOUTS)})")
    p.add_argument("--mtls", action="store_true",
                   help=f"add the layout {MTLS} (fastmesh sidecars in strict mTLS, certificates "
                        "from 'fastmesh ca'), warm -c1 runs up like the -c50 ones, and report "
                        "mTLS vs plaintext per hop")
    p.add_argument("--netns", action="store_true",
                   help="every pod in a network namespace of its own (root, iproute2; "
                        "fastmesh.mesh.netns), wrk in the bridge namespace; default: loopback "
                        "ports of this host")
    compare.add_server_options(p)
    args = p.parse_args(argv)
    known = ALL_LAYOUTS + (MTLS,)
    if args.layouts is None:
        args.layouts = ",".join(MTLS_LAYOUTS if args.mtls else ALL_LAYOUTS)
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        p.error(f"unknown layout(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if MTLS in names:
        args.mtls = True
        if "fastmesh" not in names:            # the plaintext chain it is compared with
            names.insert(0, "fastmesh")
    if "direct" not in names:
        names.insert(0, "direct")              # the floor every other row is compared with
    args.layout_names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, compare._sigterm)
    tools = compare.ensure_tools(args.no_install)
    info = compare.machine_info(tools)
    networks = []
    if args.netns:
        sys.path.insert(1, str(Path(__file__).resolve().parent.parent))   # the source tree
        from fastmesh.mesh import netns
        why = netns.unavailable()
        if why:
            print(f"--netns: {why}", file=sys.stderr)
            return 2
        if not shutil.which("curl"):
            print("--netns: curl is needed to probe the pods", file=sys.stderr)
            return 2
    tmp = compare.workdir("fastmesh-chain-")
    layouts: list[Layout] = []
    try:
        for name in args.layout_names:
            if name == "haproxy" and not tools.get("haproxy"):
                layout = Layout(name, [])
                layout.failed = "haproxy is not installed"
                layouts.append(layout)
                continue
            net = None
            if args.netns:
                net = netns.Network(f"10.78.{len(networks)}.0/24")
                networks.append(net)
                net.start()
            try:
                layout = build(name, tmp, tools, args.python, net)
            except servers.StartError as exc:           # `fastmesh ca` for --mtls
                layout = Layout(name, [])
                layout.failed = f"failed to start: {exc}"
                layouts.append(layout)
                print(f"{name}: {layout.failed}", file=sys.stderr)
                continue
            layouts.append(layout)
            start(layout, args.ready_timeout)
            if layout.failed:
                print(f"{name}: {layout.failed}", file=sys.stderr)
        started = time.time()
        run_rounds(layouts, args, tools["wrk"])
        info["loadavg_end"] = os.getloadavg()
        info["measured_s"] = round(time.time() - started, 1)
        summary = summarize(layouts)
        print(markdown(args, info, layouts, summary,
                       [sys.executable, sys.argv[0], *(argv or sys.argv[1:])]))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"settings": vars(args), "machine": info, "summary": summary,
                 "runs": {t.name: t.runs for t in layouts}}, indent=2, default=str))
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping servers", file=sys.stderr)
        return 130
    finally:
        for layout in layouts:
            for server in layout.sidecars + layout.apps:
                server.stop()
        for net in networks:
            net.close()
        compare.end_workdir(tmp, args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main())
