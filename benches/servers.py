"""Servers under test: config rendering, start/stop, readiness and memory.

Every server runs as a child of this process in its own session (so its
workers can be found and killed by session id, never by name), from its own
temporary directory (config, pid file, error log, temp paths), on a loopback
port picked here. Nothing outside that directory is touched; a system nginx
(e.g. on :80) is left alone.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


class StartError(RuntimeError):
    """A server did not come up; the message carries its last stderr lines."""


def free_port() -> int:
    """A loopback port that is free right now (small race, fine on a quiet box)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- config rendering ------------------------------------------------------

def _nginx_common(tmp: Path, name: str, workers: int = 1) -> str:
    """Top of an nginx.conf: `workers` worker processes, foreground, everything inside tmp."""
    return f"""
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 8192; }}
"""


def _nginx_http_common(tmp: Path, name: str) -> str:
    return f"""
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
"""


def nginx_upstream_conf(tmp: Path, port: int, workers: int = 1) -> str:
    """The benchmark upstream: `return 200 "ok"`, never the bottleneck."""
    return _nginx_common(tmp, "upstream", workers) + f"""
http {{{_nginx_http_common(tmp, "upstream")}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def nginx_proxy_conf(tmp: Path, port: int, upstream_port: int, workers: int = 1,
                     name: str = "proxy", tls: str = "") -> str:
    """nginx as a reverse proxy with pooled keep-alive upstream connections (per worker).

    With several workers they share one listening socket (nginx's default: no `reuseport`,
    accept_mutex off), as a stock nginx.conf does. `tls`: server lines (certificate, protocol)
    that make it terminate TLS on `port` (nginx_tls_proxy_conf)."""
    return _nginx_common(tmp, name, workers) + f"""
http {{{_nginx_http_common(tmp, name)}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port}{' ssl' if tls else ''} backlog=4096;{tls}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def haproxy_common(tmp: Path, name: str, threads: int = 1, settings: str = "") -> str:
    """The global and defaults sections every HAProxy of the benches shares: `threads` threads
    (one process), pidfile {tmp}/{name}.pid, HTTP mode, keep-alive, always reusing idle server
    connections; `settings`: more global lines, each ending in a newline."""
    return f"""
global
    nbthread {threads}
    maxconn 8192
    pidfile {tmp}/{name}.pid
{settings}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    timeout http-request 10s
"""


def haproxy_conf(tmp: Path, port: int, upstream_port: int, threads: int = 1) -> str:
    """HAProxy, `threads` threads (one process), HTTP mode, always reusing idle server
    connections."""
    return haproxy_common(tmp, "haproxy", threads) + f"""
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server up 127.0.0.1:{upstream_port}
"""


def _q(s: str) -> str:
    """A YAML scalar: JSON strings are valid YAML double-quoted scalars."""
    return json.dumps(s)


BENCH_HOST = "bench-target.example.com"
BENCH_PATH = "/bench/target"


def fastmesh_conf(upstream_port: int, n_routes: int = 0, position: float = 0.7) -> str:
    """Declarative fastmesh config.

    n_routes == 0: the plain config (one route, ``paths: [/]``, any host).
    n_routes >= 1: n_routes routes with distinct hosts and prefix paths spread
    over services of 100 routes each; the benchmarked route (BENCH_HOST +
    BENCH_PATH) is one of them, at ``position`` of the list (not first).
    """
    url = f"http://127.0.0.1:{upstream_port}"
    if n_routes <= 0:
        return f"""_format_version: "1"
services:
  - name: bench
    url: {url}
    routes:
      - name: all
        paths: [/]
"""
    bench_at = min(n_routes - 1, max(1, int(n_routes * position))) if n_routes > 1 else 0
    lines = ['_format_version: "1"', "services:"]
    per_service = 100
    for i in range(n_routes):
        if i % per_service == 0:
            lines += [f"  - name: svc{i // per_service}", f"    url: {url}", "    routes:"]
        if i == bench_at:
            host, path, name = BENCH_HOST, BENCH_PATH, "bench"
        else:
            host, path, name = f"svc{i}.example.com", f"/api/v1/svc{i}", f"r{i}"
        lines += [f"      - name: {_q(name)}",
                  f"        hosts: [{_q(host)}]",
                  f"        paths: [{_q(path)}]"]
    return "\n".join(lines) + "\n"


# --- process lifecycle -----------------------------------------------------

@dataclass
class Server:
    """One running server: its process, where it listens, how to reach it."""
    name: str
    argv: list[str]
    port: int
    workdir: Path
    env: dict | None = None
    cwd: Path | None = None
    host_header: str | None = None      # Host to send (routes scenario)
    path: str = "/"
    proc: subprocess.Popen | None = None
    stderr_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    tls: bool = False                   # serves HTTPS on `port` (benches/tls.py)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{self.path}"

    def start(self, ready_timeout: float) -> None:
        self.stderr_path = self.workdir / f"{self.name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                cwd=self.cwd or self.workdir, env=self.env, start_new_session=True)
        try:
            wait_ready(self, ready_timeout)
        except StartError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, n: int = 6) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except (OSError, AttributeError):
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the session, wait (bounded), then SIGKILL whatever is left."""
        if self.proc is None:
            return
        sid = self.proc.pid       # session leader: its pid is the session id
        _signal_session(sid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_session(sid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _signal_session(sid: int, sig: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_ready(server: Server, timeout: float) -> None:
    """Bounded wait: the port accepts TCP, then one GET gets a 2xx answer."""
    deadline = time.monotonic() + timeout
    last = "no connection"
    while time.monotonic() < deadline:
        if not server.alive():
            raise StartError(f"exited with code {server.proc.returncode}: {server.stderr_tail(3)}")
        try:
            status = http_get_status(server.port, server.path, server.host_header, server.tls)
            if 200 <= status < 300:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = str(e) or type(e).__name__
        time.sleep(0.1)
    raise StartError(f"not ready after {timeout:.0f}s ({last}): {server.stderr_tail(3)}")


def http_get_status(port: int, path: str = "/", host: str | None = None,
                    tls: bool = False) -> int:
    if tls:                             # readiness only: the bench certificate is not verified
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=unverified)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        headers = {"Host": host} if host else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# --- memory ----------------------------------------------------------------

def _proc_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, session) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # fields[0] = state, [1] = ppid, [2] = pgrp, [3] = session
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[3]))
    return table


def session_pids(root: int) -> list[int]:
    """Live processes started by us for one server: the session whose leader is
    root (we started it with a new session), plus root's descendants in case
    one of them moved to a session of its own. Zombies are left out."""
    table = _proc_table()
    found = {pid for pid, (_, _, sid) in table.items() if sid == root}
    if root in table:
        found.add(root)
    grew = True
    while grew:
        kids = {pid for pid, (_, ppid, _) in table.items() if ppid in found} - found
        found |= kids
        grew = bool(kids)
    return sorted(pid for pid in found if table[pid][0] != "Z")


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by `pids`, all their live threads, from schedstat (nanoseconds
    on a CPU; utime/stime count 10 ms ticks, too coarse for a few seconds of load)."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue                                  # exited meanwhile: counts 0
    return total / 1e9


def server_cpu_seconds(server: Server) -> float:
    """CPU seconds so far of all the server's processes (nginx master + worker, fastmesh
    supervisor + worker, HAProxy's process)."""
    return cpu_seconds(session_pids(server.proc.pid)) if server.proc else 0.0


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(server: Server) -> dict:
    """RSS and peak RSS (VmHWM) summed over all the server's processes, in KiB.

    For nginx that is master + worker, for fastmesh supervisor + worker,
    for HAProxy its single process. Shared pages (the code of a forked
    master and worker) are counted in each, as RSS does.
    """
    if not server.alive():
        return {}
    pids = session_pids(server.proc.pid)
    per = {pid: _status_kb(pid, "VmRSS") for pid in pids}
    return {
        "processes": len(pids),
        "rss_kb": sum(per.values()),
        "hwm_kb": sum(_status_kb(pid, "VmHWM") for pid in pids),
        "max_proc_rss_kb": max(per.values(), default=0),
    }


# --- constructors ----------------------------------------------------------

def nginx_server(name: str, conf: str, port: int, workdir: Path, nginx: str) -> Server:
    path = workdir / f"{name}.conf"
    path.write_text(conf)
    argv = [nginx, "-p", str(workdir), "-c", str(path), "-e", str(workdir / f"{name}-error.log")]
    return Server(name, argv, port, workdir)


def haproxy_server(conf: str, port: int, workdir: Path, haproxy: str) -> Server:
    path = workdir / "haproxy.cfg"
    path.write_text(conf)
    return Server("haproxy", [haproxy, "-db", "-f", str(path)], port, workdir)


_compiled: set[tuple[str, str]] = set()


def fastmesh_env(tree: Path = REPO, python: str = sys.executable) -> dict:
    """The environment of a fastmesh process of the benches: `tree` first on PYTHONPATH, and
    its bytecode compiled once per run (compileall) and read, as from an installed package or
    the container image. A machine with PYTHONDONTWRITEBYTECODE set (ours and our CI's) would
    otherwise compile fastmesh from source at every start, which leaves ~0.3-0.8 MiB more in
    the RSS that no deployment carries (tests/test_memory.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if (str(tree), python) not in _compiled:
        subprocess.run([python, "-m", "compileall", "-q", str(Path(tree) / "fastmesh")],
                       env=env, check=True, timeout=300, stdout=subprocess.DEVNULL)
        _compiled.add((str(tree), python))
    return env


def fastmesh_server(name: str, conf: str, port: int, workdir: Path, python: str = sys.executable,
                    host_header: str | None = None, path: str = "/", workers: int = 1) -> Server:
    """`fastmesh run --workers N` (always explicit: fastmesh's own default is one per CPU), with
    the admin API off so that several instances can run side by side."""
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(conf)
    argv = [python, "-m", "fastmesh", "run", "--config", str(cfg),
            "--listen", f"127.0.0.1:{port}", "--workers", str(workers), "--admin", "off"]
    return Server(name, argv, port, workdir, env=fastmesh_env(REPO, python), cwd=REPO,
                  host_header=host_header, path=path)


# --- TLS variants (benches/tls.py) -----------------------------------------
#
# Every TLS server of a run serves the same ECDSA P-256 leaf (benches/certs.py) with the same
# pinned protocol, suite and key-exchange group, written twice: in the server's own config
# (nginx ssl_protocols / ssl_conf_command, HAProxy ssl-default-bind-*) and in an OPENSSL_CONF
# file given to every TLS server process, which is how fastmesh (Python's ssl, policy from
# fastmesh.tls.harden) gets the same pin. Session resumption is on or off for all alike.

TLS_PROTOCOL = "TLSv1.3"
TLS_SUITE = "TLS_AES_256_GCM_SHA384"      # OpenSSL's first TLS 1.3 suite: fastmesh's default
TLS_GROUP = "X25519"


def openssl_conf(tmp: Path, resumption: bool) -> Path:
    """An OPENSSL_CONF for TLS server processes: the pinned suite and group; with resumption
    off, no TLS 1.3 session tickets at all (NumTickets = 0), so every handshake is a full one."""
    path = tmp / f"openssl-{'resume' if resumption else 'full'}.cnf"
    path.write_text(f"""openssl_conf = bench_conf
[bench_conf]
ssl_conf = bench_ssl
[bench_ssl]
system_default = bench_system
[bench_system]
MinProtocol = {TLS_PROTOCOL}
Ciphersuites = {TLS_SUITE}
Groups = {TLS_GROUP}
{'' if resumption else 'NumTickets = 0'}
""")
    return path


def nginx_tls_proxy_conf(tmp: Path, port: int, upstream_port: int, cert: Path, key: Path,
                         name: str = "tls-proxy", resumption: bool = False) -> str:
    """nginx_proxy_conf's proxy (one worker, pooled upstream) terminating TLS on `port`."""
    cache = name.replace("-", "_")
    session = (f"ssl_session_cache shared:{cache}:10m; ssl_session_tickets on;" if resumption
               else "ssl_session_cache off; ssl_session_tickets off;")
    return nginx_proxy_conf(tmp, port, upstream_port, 1, name, tls=f"""
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {TLS_PROTOCOL};
        ssl_conf_command Ciphersuites {TLS_SUITE};
        ssl_ecdh_curve {TLS_GROUP};
        {session}""")


def haproxy_tls_conf(tmp: Path, port: int, upstream_port: int, chain: Path,
                     name: str = "haproxy-tls", resumption: bool = False) -> str:
    """haproxy_conf's proxy (one thread, http-reuse always) terminating TLS on `port`;
    `chain` is the leaf and its key in one PEM file; `show info` on {tmp}/{name}.sock."""
    options = f"ssl-min-ver {TLS_PROTOCOL}" + ("" if resumption else " no-tls-tickets")
    return haproxy_common(tmp, name, 1, f"""\
    stats socket {tmp}/{name}.sock
    ssl-default-bind-ciphersuites {TLS_SUITE}
    ssl-default-bind-curves {TLS_GROUP}
    ssl-default-bind-options {options}
{'' if resumption else '    tune.ssl.cachesize 0'}
""") + f"""
frontend fe
    bind 127.0.0.1:{port} ssl crt {chain} alpn http/1.1
    default_backend be

backend be
    server up 127.0.0.1:{upstream_port}
"""


def fastmesh_tls_conf(upstream_port: int, tls_port: int, cert: Path, key: Path) -> str:
    """fastmesh_conf's one route, served on a TLS listener (`listeners`, `certificates`); the
    plain listener stays where --listen puts it."""
    return fastmesh_conf(upstream_port) + f"""listeners:
  - {{listen: "127.0.0.1:{tls_port}", tls: true}}
certificates:
  - {{cert: {_q(str(cert))}, key: {_q(str(key))}}}
"""


def _over_tls(server: Server, port: int, conf: Path) -> Server:
    server.port, server.tls = port, True
    server.env = dict(server.env or os.environ, OPENSSL_CONF=str(conf))
    return server


def nginx_tls_server(name: str, conf: str, port: int, workdir: Path, nginx: str,
                     openssl: Path) -> Server:
    return _over_tls(nginx_server(name, conf, port, workdir, nginx), port, openssl)


def haproxy_tls_server(name: str, conf: str, port: int, workdir: Path, haproxy: str,
                       openssl: Path) -> Server:
    path = workdir / f"{name}.cfg"
    path.write_text(conf)
    return _over_tls(Server(name, [haproxy, "-db", "-f", str(path)], port, workdir), port, openssl)


def fastmesh_tls_server(name: str, conf: str, tls_port: int, workdir: Path, openssl: Path,
                        python: str = sys.executable) -> Server:
    """fastmesh_server (one worker, admin off) on a free plain port, probed and measured on
    its TLS listener `tls_port`."""
    made = fastmesh_server(name, conf, free_port(), workdir, python=python, workers=1)
    return _over_tls(made, tls_port, openssl)
