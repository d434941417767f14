"""The mesh with transparent interception, in real network namespaces.

Each test builds pods with fastmesh.mesh.netns (a bridge in its own namespace, one namespace per
pod, private addresses), runs redis-server in the bridge namespace and, per pod, an app, its
`fastmesh sidecar --intercept` and the `fastmesh mesh-init` rules. Apps call each other by plain
`http://<service>/` (names resolve, through the pod's /etc/hosts, to addresses that exist
nowhere: only interception makes the call work) or by an instance's address. The sidecars run
with the group id that the rules exclude (`setpriv --regid`), as root otherwise.

Skips, with the reason, when not root or when `ip netns`, iptables or redis-server is missing.
Every process is stopped and every namespace deleted (asserted); every loop is bounded.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, wait_until
from test_mesh_mtls import CA

from fastmesh.mesh import netns

PROXY_GID = "1337"              # the sidecars' group: mesh-init leaves their traffic alone
APP_PORT = 8080
VIPS = {"a": "10.77.0.200", "b": "10.77.0.201", "c": "10.77.0.202"}   # what the names resolve to


def _why_not() -> str | None:
    reason = netns.unavailable()
    if reason:
        return reason
    for tool, package in (("iptables", "iptables"), ("setpriv", "util-linux"),
                          ("redis-server", "redis-server")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    return None


WHY_NOT = _why_not()
needs_netns = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))

# The app: answers JSON saying who it is; with a next hop, calls it first by plain
# `http://<next>/...` and nests the answer. Also two opaque TCP servers: 9000 (the client
# speaks first: it echoes lines) and 9001 (the server speaks first: a banner).
APP = r'''
import http.client, json, socket, socketserver, sys, threading, time
from http.server import BaseHTTPRequestHandler
service, instance, nxt = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        answer = {"service": service, "instance": instance, "host": self.headers.get("Host"),
                  "path": self.path, "peer": self.client_address[0]}
        status = 200
        if nxt:
            conn = http.client.HTTPConnection(nxt, timeout=10)   # name, host:port, [v6]:port
            conn.request("GET", self.path)
            resp = conn.getresponse()
            status = resp.status
            answer["next"] = json.loads(resp.read())
            conn.close()
        data = json.dumps(answer).encode()
        self.wfile.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (status, len(data), data))
    def log_message(self, *args):
        pass

def opaque(port, banner):
    srv = socket.create_server(("0.0.0.0", port), reuse_port=True)
    def serve(conn):
        with conn:
            if banner:
                conn.sendall(b"hello from %s\n" % instance.encode())
            for line in conn.makefile("rb"):
                conn.sendall(b"%s %s" % (instance.encode(), line))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

for port, banner in ((9000, False), (9001, True)):
    threading.Thread(target=opaque, args=(port, banner), daemon=True).start()
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
server = socketserver.ThreadingTCPServer(("0.0.0.0", 8080), Handler)   # (no getfqdn lookup)
server.serve_forever(poll_interval=0.05)
'''


class Mesh:
    """A Network with Redis on the bridge and helpers to start pods (app + sidecar + rules)."""

    def __init__(self, net: netns.Network, workdir):
        self.net = net
        self.workdir = workdir
        self.app_file = workdir / "app.py"
        self.app_file.write_text(APP)
        self.registry = f"redis://{net.bridge.address}:6379/0"
        self.start_redis()
        net.set_hosts(VIPS)
        self.sidecars: dict[str, subprocess.Popen] = {}
        self.apps: dict[str, subprocess.Popen] = {}

    def start_redis(self) -> None:
        """redis-server in the bridge namespace (empty: no persistence)."""
        self.redis = self.net.run_in(self.net.bridge, [
            "redis-server", "--bind", self.net.bridge.address, "--port", "6379", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.workdir),
            "--notify-keyspace-events", "KEA"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.redis_command("PING") == b"+PONG\r\n", 10, "redis never started")

    def redis_command(self, *args: str) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        try:
            with self.net.connect(self.net.bridge, (self.net.bridge.address, 6379), 1.0) as sock:
                sock.sendall(b"".join(parts))
                return sock.recv(65536)
        except OSError:
            return b""

    def pod(self, service: str, instance: str, calls: str = "",
            sidecar_args: tuple = ()) -> netns.Pod:
        """A pod: the mesh-init rules, the app, and its sidecar (ready when this returns)."""
        began = time.monotonic()
        pod = self.net.add_pod(instance)
        self.net.exec_in(pod, [sys.executable, "-m", "fastmesh", "mesh-init",
                               "--proxy-gid", PROXY_GID])
        self.apps[instance] = self.net.run_in(
            pod, [sys.executable, str(self.app_file), service, instance, calls])
        log = open(self.workdir / f"sidecar-{instance}.log", "w")
        self.sidecars[instance] = self.net.run_in(
            pod, ["setpriv", "--regid", PROXY_GID, "--clear-groups", sys.executable, "-m",
                  "fastmesh", "sidecar", "--service", service, "--app-port", str(APP_PORT),
                  "--registry", self.registry, "--instance-id", instance, "--intercept",
                  "--ttl", "3", "--drain-timeout", "3", *sidecar_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        try:
            wait_until(lambda: self.admin(pod, "/ready")[0] == 200, 20,
                       f"sidecar {instance} never became ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its output:\n{self.log(instance)}") from None
        started = time.monotonic()
        wait_until(lambda: self.http(pod, ("127.0.0.1", APP_PORT), "/")[0] == 200, 10,
                   f"app {instance} never answered")
        print(f"pod {instance}: ready in {time.monotonic() - began:.2f}s "
              f"(app {time.monotonic() - started:.2f}s)")
        return pod

    def log(self, instance: str) -> str:
        return (self.workdir / f"sidecar-{instance}.log").read_text()

    def http(self, pod: netns.Pod, address: tuple[str, int], path: str,
             host: str | None = None, timeout: float = 10) -> tuple[int, dict]:
        """GET from inside `pod` (as its app would: the pod's rules apply)."""
        try:
            sock = self.net.connect(pod, address, timeout)
        except OSError:
            return 0, {}
        conn = http.client.HTTPConnection(*address, timeout=timeout)
        conn.sock = sock
        try:
            conn.request("GET", path, headers={"Host": host} if host else {})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(body) if body else {}

    def admin(self, pod: netns.Pod, path: str) -> tuple[int, dict]:
        try:
            return self.http(pod, ("127.0.0.1", 15000), path, timeout=2)
        except (OSError, http.client.HTTPException):
            return 0, {}

    def sees(self, pod: netns.Pod, service: str, count: int) -> bool:
        return len(self.admin(pod, "/registry")[1].get("services", {}).get(service, ())) == count


def read_to_end(sock, limit: int = 1 << 16) -> bytes:
    """Everything until the peer's EOF (a reset counts as one)."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def mesh(tmp_path):
    netns.cleanup_stale()
    with netns.Network("10.77.0.0/24") as net:
        m = Mesh(net, tmp_path)
        yield m
        for name, proc in m.sidecars.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    # Network.close() stopped every process and deleted every namespace.
    assert netns.namespaces(net.prefix) == []
    assert all(p.poll() is not None for p in net.procs)


@needs_netns
def test_call_chain_through_interception_by_name_and_by_instance_address(mesh):
    net = mesh.net
    c = mesh.pod("c", "c1")
    b = mesh.pod("b", "b1", calls=f"{c.address}:{APP_PORT}")      # by instance address
    a = mesh.pod("a", "a1", calls="b")                              # by name: http://b/
    client = net.add_pod("client")                                  # no sidecar, no rules
    wait_until(lambda: mesh.sees(a, "b", 1) and mesh.sees(b, "c", 1), 5,
               "the sidecars never saw b and c")

    before = {pod: mesh.admin(pod, "/status")[1]["outbound"]["requests"] for pod in (a, b)}
    # client -> a1's pod address:8080 (inbound rule -> a's sidecar -> app) -> http://b/ (outbound
    # rule -> a's sidecar -> b1's sidecar -> app) -> http://<c1>:8080/ -> ... -> c1's app
    status, body = mesh.http(client, (a.address, APP_PORT), "/orders/7?x=1")
    assert status == 200, body
    assert (body["service"], body["instance"], body["host"]) == ("a", "a1", f"{a.address}:8080")
    assert body["peer"] == "127.0.0.1"                  # it came through a's inbound sidecar
    hop = body["next"]
    assert (hop["service"], hop["instance"], hop["host"], hop["peer"]) == \
        ("b", "b1", "b", "127.0.0.1")
    leaf = hop["next"]
    assert (leaf["service"], leaf["instance"], leaf["path"], leaf["peer"]) == \
        ("c", "c1", "/orders/7?x=1", "127.0.0.1")
    # Each sidecar's outbound routed it (by service name, then by instance address).
    for pod in (a, b):
        assert mesh.admin(pod, "/status")[1]["outbound"]["requests"] == before[pod] + 1

    # Keep-alive: later requests on a connection that the detector handed over are routed too.
    with net.connect(a, (VIPS["b"], 80)) as sock:
        conn = http.client.HTTPConnection(VIPS["b"], 80, timeout=10)
        conn.sock = sock
        for path in ("/one", "/two", "/three"):
            conn.request("GET", path, headers={"Host": "b"})
            resp = conn.getresponse()
            assert (resp.status, json.loads(resp.read())["path"]) == (200, path)

    # HTTP/1.0 without Host, to an instance's address: routed by where it was sent (a's
    # outbound sidecar, then c1's inbound one), not relayed around the mesh.
    before = mesh.admin(a, "/status")[1]["outbound"]["requests"]
    with net.connect(a, (c.address, APP_PORT)) as sock:
        sock.sendall(b"GET /no-host HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], reply
    answer = json.loads(payload)
    assert (answer["service"], answer["path"], answer["peer"]) == ("c", "/no-host", "127.0.0.1")
    assert mesh.admin(a, "/status")[1]["outbound"]["requests"] == before + 1

    # HTTP for a host outside the mesh goes where it was going, unchanged (here: a server in
    # the bridge namespace); the pod's own address is the source, as without a sidecar.
    outside = net.listen(net.bridge, (net.bridge.address, 8088))
    outside.settimeout(10)
    seen: dict = {}

    def serve_once() -> None:
        try:
            conn, peer = outside.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                head += chunk
            seen["head"], seen["peer"] = head, peer[0]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\n{}")

    server = threading.Thread(target=serve_once)
    server.start()
    try:
        status, body = mesh.http(a, (net.bridge.address, 8088), "/ext", host="example.org")
    finally:
        server.join(timeout=15)
        outside.close()
    assert status == 200, (body, mesh.log("a1"))
    assert seen["head"].startswith(b"GET /ext HTTP/1.1\r\n")
    assert b"\r\nHost: example.org\r\n" in seen["head"]
    assert seen["peer"] == a.address

    # A name the registry does not know: the call is intercepted and answered 503 naming it,
    # at once (the address it was sent to exists nowhere).
    started = time.monotonic()
    status, body = mesh.http(a, ("10.77.0.203", 80), "/", host="ledger")
    assert (status, body.get("service")) == (503, "ledger")
    assert time.monotonic() - started < 1.0

    # Opaque TCP: client-first (9000) and server-first (9001, detected by the timeout), from
    # a's pod to c1's address: relayed by a's outbound and c1's inbound sidecars.
    with net.connect(a, (c.address, 9000)) as sock:
        sock.sendall(b"ping\n")
        assert sock.makefile("rb").readline() == b"c1 ping\n"
    lines = [b"%07d\n" % i for i in range(100_000)]          # 0.8 MB each way, streamed
    with net.connect(a, (c.address, 9000), timeout=20) as sock:
        writer = threading.Thread(target=sock.sendall, args=(b"".join(lines),))
        writer.start()
        expected = b"".join(b"c1 " + line for line in lines)
        got = bytearray()
        while len(got) < len(expected):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            got += chunk
        writer.join(timeout=20)
    assert got == expected
    with net.connect(a, (c.address, 9001)) as sock:
        reader = sock.makefile("rb")
        assert reader.readline() == b"hello from c1\n"
        sock.sendall(b"more\n")
        assert reader.readline() == b"c1 more\n"
        reader.close()                  # (its reference keeps the socket open past `with`)
    # Counted on both sides: c1's inbound relayed the three opaque connections, a's outbound
    # those and the call to example.org; bytes as the relays carried them.
    def opaque(pod, direction: str) -> dict:
        return mesh.admin(pod, "/status")[1]["opaque_tcp"][direction]

    wait_until(lambda: opaque(a, "outbound")["active"] == 0 == opaque(c, "inbound")["active"],
               5, "the relays never closed")
    inbound, outbound = opaque(c, "inbound"), opaque(a, "outbound")
    by_source = inbound.pop("by_source")
    assert inbound == {"relayed": 3, "active": 0, "mtls": 0, "connect_failures": 0,
                       "no_target": 0, "refused": 0,
                       "bytes_to_destination": 5 + 800_000 + 5,
                       "bytes_from_destination": 8 + 1_100_000 + 14 + 8}, inbound
    assert by_source == {"a": inbound}          # plaintext: by the address a's sidecar dials from
    assert (outbound["relayed"], outbound["connect_failures"]) == (4, 0), outbound
    for flow in ("bytes_to_destination", "bytes_from_destination"):
        assert outbound[flow] > inbound[flow], outbound     # plus the example.org exchange
    metrics = mesh.net.exec_in(a, [sys.executable, "-c", (
        "import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:15000/metrics', timeout=5).read().decode())")])
    assert 'fastmesh_mesh_opaque_connections_total{direction="outbound",outcome="relayed"} 4' \
        in metrics, metrics[-1500:]


@needs_netns
def test_opaque_ports_skip_protocol_detection_in_both_directions(mesh):
    # Detection waits 4 s here for a silent client: a server-first protocol on a port that is
    # not declared opaque would wait that long on each side (a's outbound, c1's inbound).
    opaque = ("--opaque-ports", "9001,9100-9101", "--detect-timeout", "4")
    ca = CA(mesh.workdir / "ca")
    # c1 takes mTLS or plaintext (its inbound listener peeks at the first byte, except on an
    # opaque port); d1 takes mTLS only, so opaque TCP to it is refused at once.
    c = mesh.pod("c", "c1", sidecar_args=(*opaque, "--mtls", "permissive", "--tls-dir",
                                          str(ca.issue("c", mesh.workdir / "c-tls"))))
    d = mesh.pod("d", "d1", sidecar_args=(*opaque, "--mtls", "strict", "--tls-dir",
                                          str(ca.issue("d", mesh.workdir / "d-tls"))))
    a = mesh.pod("a", "a1", sidecar_args=opaque)
    before = mesh.admin(a, "/status")[1]["outbound"]["requests"]
    started = time.monotonic()
    with mesh.net.connect(a, (c.address, 9001), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline() == b"hello from c1\n"          # the server spoke first
        waited = time.monotonic() - started
        # An HTTP request on an opaque port is bytes like any other: relayed, not routed.
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n")
        assert reader.readline() == b"c1 GET /x HTTP/1.1\r\n"
    assert waited < 2.0, f"the banner took {waited:.2f}s: detection was not skipped"
    # Other ports are still sniffed: a client-first protocol and HTTP for the mesh.
    with mesh.net.connect(a, (c.address, 9000), timeout=10) as sock:
        sock.sendall(b"ping\n")
        assert sock.makefile("rb").readline() == b"c1 ping\n"
    status, body = mesh.http(a, (VIPS["c"], 80), "/after", host="c")
    assert (status, body["instance"], body["peer"]) == (200, "c1", "127.0.0.1")
    assert mesh.admin(a, "/status")[1]["outbound"]["requests"] == before + 1
    assert mesh.admin(c, "/status")[1]["mtls"]["handshakes"]["plaintext"] >= 3

    # a1 has no mTLS, so its opaque TCP is plaintext, which d1 refuses: a client-first
    # protocol at its first byte; a server-first one (silent) once the peek gives up (strict
    # mode peeks on opaque ports too: mesh callers send them a ClientHello).
    started = time.monotonic()
    with mesh.net.connect(a, (d.address, 9000), timeout=10) as sock:
        sock.sendall(b"ping\n")
        assert read_to_end(sock) == b""              # closed by d1's strict inbound side
    assert time.monotonic() - started < 1.5
    with mesh.net.connect(a, (d.address, 9001), timeout=10) as sock:
        assert read_to_end(sock) == b""
    refused = mesh.admin(d, "/status")[1]["mtls"]["handshakes"]["refused"]
    assert refused["plaintext"] == 1 and refused["timeout"] == 1, refused

    # A server-first protocol on a port NOT declared opaque, to a permissive inbound side: the
    # detect timeout (1 s for e1) is waited once, by the peek, not once more by the detector.
    e = mesh.pod("e", "e1", sidecar_args=("--detect-timeout", "1", "--mtls", "permissive",
                                          "--tls-dir", str(ca.issue("e", mesh.workdir / "e-tls"))))
    started = time.monotonic()
    with mesh.net.connect(a, (e.address, 9001), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline() == b"hello from e1\n"
        waited = time.monotonic() - started
        sock.sendall(b"more\n")
        assert reader.readline() == b"e1 more\n"
    assert 0.9 < waited < 1.8, f"the banner took {waited:.2f}s (1 s expected: one detect wait)"


@needs_netns
def test_opaque_tcp_between_sidecars_is_mtls_checked_and_authorized(mesh, tmp_path):
    # c1 is strict: before, opaque TCP to it was refused (sent in plaintext). Now the caller's
    # sidecar wraps it in mTLS (ALPN fastmesh-tcp), checks c1's identity, and c1 authorizes
    # the caller's identity for TCP: b may (a rule without methods), a may not (its rule is
    # for GET only), a caller without mTLS never gets in.
    ca = CA(mesh.workdir / "ca")
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"authorization": [
        {"to": "c", "from": ["spiffe://example.org/svc/a"], "methods": ["GET"]},
        {"to": "c", "from": ["spiffe://example.org/svc/b"]}]}))
    opaque = ("--opaque-ports", "9001", "--detect-timeout", "4")

    def tls(service: str, mode: str = "strict") -> tuple:
        return ("--mtls", mode, "--tls-dir", str(ca.issue(service, mesh.workdir / f"{service}-tls")))

    c = mesh.pod("c", "c1", sidecar_args=(*opaque, *tls("c"), "--policy", str(policy)))
    e = mesh.pod("e", "e1", sidecar_args=(*opaque, *tls("e", "permissive")))
    b = mesh.pod("b", "b1", sidecar_args=(*opaque, *tls("b")))
    a = mesh.pod("a", "a1", sidecar_args=(*opaque, *tls("a")))
    plain = mesh.pod("p", "p1", sidecar_args=opaque)
    # Client-first, with half-close: b's app sends, shuts its side, reads to the end.
    with mesh.net.connect(b, (c.address, 9000), timeout=10) as sock:
        sock.sendall(b"ping\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == b"c1 ping\n"
    # Server-first on an opaque port (no sniffing on either side): the banner comes at once.
    started = time.monotonic()
    with mesh.net.connect(b, (c.address, 9001), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline() == b"hello from c1\n"
        waited = time.monotonic() - started
        sock.sendall(b"x" * 200_000 + b"\n")              # many TLS records each way
        assert reader.readline() == b"c1 " + b"x" * 200_000 + b"\n"
        reader.close()
    assert waited < 2.0, f"the banner took {waited:.2f}s"
    status = mesh.admin(c, "/status")[1]
    assert status["opaque_tcp"]["inbound"]["mtls"] == 2, status["opaque_tcp"]
    assert status["mtls"]["handshakes"]["tls"] >= 2
    assert mesh.admin(b, "/status")[1]["opaque_tcp"]["outbound"]["mtls"] == 2
    # a's identity is valid, but no rule allows it TCP; p1 has no certificate at all.
    for caller in (a, plain):
        with mesh.net.connect(caller, (c.address, 9000), timeout=10) as sock:
            sock.sendall(b"ping\n")
            assert read_to_end(sock) == b""
    status = mesh.admin(c, "/status")[1]
    assert status["opaque_tcp"]["inbound"]["refused"] == 1          # a (p1: no handshake)
    assert status["mtls"]["handshakes"]["refused"]["plaintext"] == 1
    assert status["authorization"]["decisions"] == {"allowed": 2, "denied": 1}
    assert "opaque TCP from spiffe://example.org/svc/a to 'c' denied" in mesh.log("c1")
    # A permissive destination: mTLS where it peeks, plaintext on its declared opaque port.
    for port, line in ((9000, b"e1 ping\n"), (9001, b"hello from e1\n")):
        with mesh.net.connect(a, (e.address, port), timeout=10) as sock:
            if port == 9000:
                sock.sendall(b"ping\n")
            assert sock.makefile("rb").readline() == line
    inbound = mesh.admin(e, "/status")[1]["opaque_tcp"]["inbound"]
    assert (inbound["relayed"], inbound["mtls"]) == (2, 1), inbound


@needs_netns
def test_opaque_tcp_to_a_service_address_is_balanced_over_its_instances(mesh):
    # What the name `b` resolves to in every pod (VIPS, like a cluster IP) is no pod's address:
    # relayed as sent, TCP to it went nowhere. b's instances register it (--advertise-also),
    # so a's sidecar balances TCP for it over them (least connections: one at a time, they
    # take turns), over mTLS as they are strict; a connect that fails tries the next
    # instance, and three in a row eject the failing one.
    ca = CA(mesh.workdir / "ca")

    def tls(service: str, instance: str) -> tuple:
        return ("--mtls", "strict", "--tls-dir",
                str(ca.issue(service, mesh.workdir / f"{instance}-tls")))

    b = {name: mesh.pod("b", name, sidecar_args=("--advertise-also", VIPS["b"],
                                                  *tls("b", name))) for name in ("b1", "b2")}
    a = mesh.pod("a", "a1", sidecar_args=tls("a", "a1"))
    wait_until(lambda: mesh.sees(a, "b", 2) and mesh.sees(b["b1"], "b", 2), 5,
               "a or b1 never saw both b instances")

    def ping(pod) -> bytes:
        with mesh.net.connect(pod, (VIPS["b"], 9000), timeout=10) as sock:
            sock.sendall(b"ping\n")
            sock.shutdown(socket.SHUT_WR)
            return read_to_end(sock)

    answers = [ping(a) for _ in range(6)]
    assert sorted(answers) == [b"b1 ping\n"] * 3 + [b"b2 ping\n"] * 3, answers
    outbound = mesh.admin(a, "/status")[1]["opaque_tcp"]["outbound"]
    assert (outbound["relayed"], outbound["mtls"], outbound["connect_failures"]) == (6, 6, 0)
    # b1's own app calling its service's address: its own instance is served locally (its
    # sidecar's dial of its pod address is not redirected: it would reach the app past TLS).
    answers = [ping(b["b1"]) for _ in range(4)]
    assert sorted(answers) == [b"b1 ping\n"] * 2 + [b"b2 ping\n"] * 2, answers
    outbound = mesh.admin(b["b1"], "/status")[1]["opaque_tcp"]["outbound"]
    assert (outbound["relayed"], outbound["mtls"], outbound["connect_failures"]) == (4, 2, 0)
    # b2's sidecar dies. Until its registration expires (TTL 3 s), connects to it fail and go
    # to b1; the third failed connect in a row ejects b2, and from then on a's TCP for b goes
    # to b1 without trying b2 first: however the picks fell, 3 failures in all.
    mesh.sidecars["b2"].kill()
    mesh.sidecars["b2"].wait(timeout=10)
    assert [ping(a) for _ in range(10)] == [b"b1 ping\n"] * 10
    outbound = mesh.admin(a, "/status")[1]["opaque_tcp"]["outbound"]
    assert outbound["relayed"] == 16 and outbound["connect_failures"] == 3, outbound
    assert "cannot relay to" in mesh.log("a1")
    balancing = outbound["balancing"][VIPS["b"]]
    assert balancing["service"] == "b"
    assert {i["host"]: (i["state"], i["failures"], i["ejections"])
            for i in balancing["instances"]} == {b["b1"].address: ("healthy", 0, 0),
                                                 b["b2"].address: ("ejected", 3, 1)}
    # Counted per destination too: a's TCP to b, in /status and /metrics.
    to_b = outbound["by_destination"]["b"]
    assert (to_b["relayed"], to_b["mtls"], to_b["connect_failures"]) == (16, 16, 3), \
        outbound["by_destination"]
    assert to_b["bytes_to_destination"] == 80 and to_b["bytes_from_destination"] == 128
    metrics = mesh.net.exec_in(a, [sys.executable, "-c", (
        "import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:15000/metrics', timeout=5).read().decode())")])
    assert 'fastmesh_mesh_tcp_connections_total{direction="outbound",source="a",' \
           'destination="b",outcome="relayed"} 16' in metrics
    assert 'fastmesh_mesh_tcp_bytes_total{direction="outbound",source="a",destination="b",' \
           'flow="from_destination"} 128' in metrics
    # And per caller on the destination's side, by its verified identity: b1 took 3 + 10 of
    # a's (b1's own calls never left its pod).
    inbound = mesh.admin(b["b1"], "/status")[1]["opaque_tcp"]["inbound"]
    assert {name: c["relayed"] for name, c in inbound["by_source"].items()} == {"a": 13}, inbound
    # b1's sidecar dies too: two failed connects for the next connection (b1 is all there is),
    # the third ejects b1, and with no instance left a's sidecar closes its connections at
    # once, without a connect, counted as no_target.
    mesh.sidecars["b1"].kill()
    mesh.sidecars["b1"].wait(timeout=10)

    def unanswered() -> bytes:
        with mesh.net.connect(a, (VIPS["b"], 9000), timeout=10) as sock:
            try:
                sock.sendall(b"ping\n")
                sock.shutdown(socket.SHUT_WR)
            except OSError:                 # closed already
                return b""
            return read_to_end(sock)

    assert [unanswered() for _ in range(3)] == [b""] * 3
    outbound = mesh.admin(a, "/status")[1]["opaque_tcp"]["outbound"]
    assert (outbound["relayed"], outbound["connect_failures"], outbound["no_target"]) == \
        (16, 6, 2), outbound
    assert outbound["by_destination"]["b"]["no_target"] == 2
    assert "no instance of b to relay to" in mesh.log("a1")


@needs_netns
def test_ipv6_tcp_is_intercepted_like_ipv4(mesh):
    # Each pod also has an IPv6 address, and its app listens on IPv4 only: IPv6 reaches an app
    # only through the sidecars (mesh-init's ip6tables rules, the sidecars' IPv6 listeners,
    # the original IPv6 destination read back). Without the rules, a dual-stack pod's IPv6
    # would bypass the sidecar, its mTLS and its authorization.
    net = mesh.net
    c = mesh.pod("c", "c1")
    b = mesh.pod("b", "b1", calls=f"[{c.address6}]:{APP_PORT}")    # by IPv6 instance address
    ca = CA(mesh.workdir / "ca")
    d = mesh.pod("d", "d1", sidecar_args=("--mtls", "strict", "--tls-dir",
                                          str(ca.issue("d", mesh.workdir / "d-tls"))))
    e = mesh.pod("e", "e1", sidecar_args=("--mtls", "strict", "--tls-dir",
                                          str(ca.issue("e", mesh.workdir / "e-tls"))))
    client = net.add_pod("client")                                  # no sidecar, no rules
    # Each intercepting sidecar registered its pod's IPv6 address beside its IPv4 one.
    wait_until(lambda: mesh.sees(b, "c", 1) and mesh.sees(e, "d", 1), 5, "b or e never saw c, d")
    listed = mesh.admin(b, "/registry")[1]["services"]["c"][0]
    assert (listed["address"], listed["metadata"]["fastmesh.addresses"]) == \
        (f"{c.address}:15006", c.address6), listed
    routed = mesh.admin(b, "/status")[1]["outbound"]["requests"]
    status, body = mesh.http(client, (b.address6, APP_PORT), "/six?x=1")
    assert status == 200, (body, mesh.log("b1"))
    assert (body["instance"], body["host"], body["peer"]) == \
        ("b1", f"[{b.address6}]:{APP_PORT}", "127.0.0.1")      # through b1's inbound sidecar
    leaf = body["next"]                 # b1's app -> b1's outbound -> c1's inbound -> c1's app
    # b1's outbound knew [c6] for c's: it routed the call (balanced, retried as by name, Host
    # the service's as for a call by IPv4 instance address); it did not relay it as sent.
    assert (leaf["instance"], leaf["host"], leaf["path"], leaf["peer"]) == \
        ("c1", "c", "/six?x=1", "127.0.0.1")
    assert mesh.admin(b, "/status")[1]["outbound"]["requests"] == routed + 1
    assert mesh.admin(b, "/status")[1]["opaque_tcp"]["outbound"]["relayed"] == 0
    # Opaque TCP over IPv6, client-first and server-first, through both sidecars.
    with net.connect(b, (c.address6, 9000)) as sock:
        sock.sendall(b"ping\n")
        assert sock.makefile("rb").readline() == b"c1 ping\n"
    with net.connect(b, (c.address6, 9001)) as sock:
        assert sock.makefile("rb").readline() == b"hello from c1\n"
    # Strict mTLS holds over IPv6 too: plaintext to d1's pod is refused, not let through.
    with net.connect(client, (d.address6, APP_PORT)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: d\r\n\r\n")
        try:
            answer = sock.recv(100)
        except ConnectionResetError:        # closed with the request unread: a reset
            answer = b""
        assert answer == b""
    refused = mesh.admin(d, "/status")[1]["mtls"]["handshakes"]["refused"]
    assert refused["plaintext"] == 1, refused
    # From a pod with mTLS, opaque TCP to d1's IPv6 address is wrapped in mTLS as to its IPv4
    # one (d1's identity checked, then relayed to the dialled port), so strict d1 takes it.
    with net.connect(e, (d.address6, 9000), timeout=10) as sock:
        sock.sendall(b"ping\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == b"d1 ping\n", mesh.log("e1")
    assert mesh.admin(e, "/status")[1]["opaque_tcp"]["outbound"]["mtls"] == 1
    assert mesh.admin(d, "/status")[1]["opaque_tcp"]["inbound"]["mtls"] == 1


@needs_netns
def test_killing_one_of_two_instances_under_load_gives_no_client_errors(mesh):
    b1 = mesh.pod("b", "b1")
    b2 = mesh.pod("b", "b2")
    a = mesh.pod("a", "a1")
    wait_until(lambda: mesh.sees(a, "b", 2), 5, "a never saw both b instances")

    errors: list[str] = []
    counts = {"b1": 0, "b2": 0}
    lock = threading.Lock()

    def caller(n: int) -> None:
        for _ in range(n):                      # the app's plain call: http://b/work
            try:
                status, body = mesh.http(a, (VIPS["b"], 80), "/work", host="b")
            except (OSError, ValueError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                if status != 200:
                    errors.append(f"{status} {body}")
                else:
                    counts[body["instance"]] += 1

    threads = [threading.Thread(target=caller, args=(60,)) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: counts["b2"] > 5 and counts["b1"] > 5, 20, "b1 and b2 never both served")
    mesh.sidecars["b2"].kill()                   # the pod dies: no deregistration
    mesh.apps["b2"].kill()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert counts["b1"] + counts["b2"] == 240
    assert counts["b2"] > 0
    after = [mesh.http(a, (VIPS["b"], 80), "/", host="b")[1]["instance"] for _ in range(10)]
    assert after == ["b1"] * 10
    assert b1.address != b2.address


@needs_netns
def test_new_instance_gets_traffic_within_one_second_of_registering(mesh):
    mesh.pod("b", "b1")
    a = mesh.pod("a", "a1")
    wait_until(lambda: mesh.sees(a, "b", 1), 5, "a never saw b")
    registered: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            if mesh.redis_command("EXISTS", "fastmesh:svc:b:b2") == b":1\r\n":
                registered["at"] = time.monotonic()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    mesh.pod("b", "b2")
    watcher.join(timeout=30)
    assert "at" in registered, "b2 never registered"
    first = None
    while time.monotonic() - registered["at"] < 1.0:
        if mesh.http(a, (VIPS["b"], 80), "/", host="b")[1].get("instance") == "b2":
            first = time.monotonic()
            break
    assert first is not None, "b2 got no traffic within 1 s of registering"
    print(f"b2's first request {(first - registered['at']) * 1000:.0f} ms after registering")


@needs_netns
def test_redis_outage_keeps_routing_and_resyncs_when_it_returns(mesh):
    b1 = mesh.pod("b", "b1")
    a = mesh.pod("a", "a1")
    wait_until(lambda: mesh.sees(a, "b", 1), 5, "a never saw b")
    mesh.redis.kill()
    mesh.redis.wait(timeout=5)
    wait_until(lambda: mesh.admin(a, "/status")[1]["registry"]["reachable"] is False, 10,
               "a's sidecar did not notice that Redis went away")
    deadline = time.monotonic() + 4                 # longer than the TTL (3 s)
    served = 0
    while time.monotonic() < deadline:
        status, body = mesh.http(a, (VIPS["b"], 80), "/", host="b")
        assert (status, body.get("instance")) == (200, "b1")
        served += 1
        time.sleep(0.05)
    assert served > 10
    mesh.start_redis()                              # empty
    wait_until(lambda: mesh.redis_command("EXISTS", "fastmesh:svc:b:b1") == b":1\r\n", 10,
               "b1 did not register again")
    wait_until(lambda: mesh.admin(a, "/status")[1]["registry"]["reachable"], 10,
               "a's sidecar never reconnected")
    b2 = mesh.pod("b", "b2")                        # known only to the new Redis
    wait_until(lambda: mesh.sees(a, "b", 2), 5, "a never saw b2 after the resync")
    seen = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and seen != {"b1", "b2"}:
        status, body = mesh.http(a, (VIPS["b"], 80), "/", host="b")
        assert status == 200, body
        seen.add(body["instance"])
    assert seen == {"b1", "b2"}, (seen, b1, b2)


@needs_netns
def test_sigterm_drains_in_flight_requests_and_deregisters(mesh):
    b = mesh.pod("b", "b1")
    a = mesh.pod("a", "a1")
    wait_until(lambda: mesh.sees(a, "b", 1), 5, "a never saw b")
    assert mesh.redis_command("EXISTS", "fastmesh:svc:b:b1") == b":1\r\n"

    slow: dict = {}

    def slow_call() -> None:
        slow["answer"] = mesh.http(a, (VIPS["b"], 80), "/slow", host="b")

    caller = threading.Thread(target=slow_call)
    caller.start()
    wait_until(lambda: mesh.admin(b, "/status")[1].get("inbound", {}).get("connections"), 5,
               "the slow request never reached b's sidecar", interval=0.02)
    sidecar = mesh.sidecars["b1"]
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(timeout=15) == 0
    caller.join(timeout=15)
    assert slow["answer"][0] == 200 and slow["answer"][1]["path"] == "/slow"
    log = mesh.log("b1")
    assert "deregistered b/b1" in log, log
    assert mesh.redis_command("EXISTS", "fastmesh:svc:b:b1") == b":0\r\n"
    wait_until(lambda: mesh.http(a, (VIPS["b"], 80), "/", host="b")[0] == 503, 2,
               "a still routes to the deregistered instance")
    assert mesh.redis_command("SISMEMBER", "fastmesh:idx:b", "b1") == b":0\r\n", b


@needs_netns
def test_mesh_init_is_idempotent_prints_its_rules_and_removes_them(tmp_path):
    netns.cleanup_stale()
    with netns.Network("10.78.0.0/24") as net:
        pod = net.add_pod("p")
        init = [sys.executable, "-m", "fastmesh", "mesh-init", "--proxy-uid", "1337",
                "--proxy-gid", PROXY_GID, "--exclude-ports", "22,6379",
                "--exclude-cidrs", "10.96.0.0/12,fd10::/16"]
        planned = net.exec_in(pod, [*init, "--dry-run"]).splitlines()
        assert net.exec_in(pod, ["iptables", "-t", "nat", "-S"]).count("FASTMESH") == 0
        net.exec_in(pod, init)
        net.exec_in(pod, init)                  # twice: IPv6 as idempotent as IPv4 (below)
        ipv6 = net.exec_in(pod, ["ip6tables", "-t", "nat", "-S"]).splitlines()
        assert [line for line in ipv6 if "FASTMESH" in line and " -d " in line] == \
            ["-A FASTMESH_OUTPUT -d fd10::/16 -j RETURN"]
        assert sum(line.endswith("-j FASTMESH_INBOUND") for line in ipv6) == 1
        assert "-A FASTMESH_INBOUND -p tcp -j REDIRECT --to-ports 15006" in ipv6
        first = net.exec_in(pod, ["iptables", "-t", "nat", "-S"])
        net.exec_in(pod, init)                  # again: same rules, no duplicate jumps
        second = net.exec_in(pod, ["iptables", "-t", "nat", "-S"])
        assert first == second
        assert second.count("-j FASTMESH_OUTPUT") == 1 and second.count("-j FASTMESH_INBOUND") == 1
        appended = [line.split(" -t nat ", 1)[1] for line in planned
                    if line.startswith("iptables ") and " -A " in line]
        assert appended == [line for line in second.splitlines() if line.startswith("-A FASTMESH")]
        for expected in ("-A FASTMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                         "-A FASTMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                         "-A FASTMESH_OUTPUT -o lo -j RETURN",
                         "-A FASTMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
                         "-A FASTMESH_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
                         "-A FASTMESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                         "-A FASTMESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                         "-A FASTMESH_INBOUND -p tcp -j REDIRECT --to-ports 15006"):
            assert expected in second.splitlines(), (expected, second)
        out = net.exec_in(pod, [sys.executable, "-m", "fastmesh", "mesh-init", "--remove"])
        assert "removed FASTMESH_INBOUND, FASTMESH_OUTPUT (IPv4); " \
               "FASTMESH_INBOUND, FASTMESH_OUTPUT (IPv6)" in out
        assert "FASTMESH" not in net.exec_in(pod, ["iptables", "-t", "nat", "-S"])
        assert "FASTMESH" not in net.exec_in(pod, ["ip6tables", "-t", "nat", "-S"])
        refused = subprocess.run([sys.executable, "-m", "fastmesh", "mesh-init"],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and "--proxy-uid" in refused.stderr
    assert netns.namespaces(net.prefix) == []


@needs_netns
def test_stale_namespaces_of_a_dead_run_are_cleaned_and_live_ones_kept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.ROOT_PREFIX}{dead.pid}-000000-x"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with netns.Network("10.79.0.0/24") as live:
        live.add_pod("p")
        removed = netns.cleanup_stale()
        assert stale in removed
        assert netns.namespaces(live.prefix) == sorted([live.bridge.netns, live.pods["p"].netns])
    assert stale not in netns.namespaces()
    assert netns.namespaces(live.prefix) == []


# -- without namespaces: the generated routes, detection, the rules --------------------------------

def test_instance_hosts_route_to_their_service_unless_ambiguous():
    from fastmesh.mesh.registry import Instance, make_view
    from fastmesh.mesh.routes import mesh_hosts, outbound_config
    view = make_view([Instance("b", "b1", "10.0.0.5", 15006),
                      Instance("b", "b2", "10.0.0.6", 15006),
                      Instance("c", "c1", "10.0.0.6", 15007),        # shares 10.0.0.6 with b2
                      Instance("d", "d1", "127.0.0.1", 15008),       # loopback: names nothing
                      Instance("e", "e1", "fd00::1", 15006), Instance("f", "f1", "Pod-F.local", 1)])
    config = outbound_config(view)
    assert {r.name: r.hosts for r in config.routes if r.hosts} == {
        "b": ("b", "10.0.0.5"), "c": ("c",), "d": ("d",), "e": ("e", "[fd00::1]"),
        "f": ("f", "pod-f.local")}
    assert mesh_hosts(view) == {"b", "c", "d", "e", "f", "10.0.0.5", "[fd00::1]", "pod-f.local"}


def test_more_addresses_of_an_instance_route_to_its_service_and_take_opaque_mtls():
    from fastmesh.mesh.opaque_mtls import lookup, peers
    from fastmesh.mesh.registry import Instance, make_view, parse_instance
    from fastmesh.mesh.routes import destination_of, mesh_hosts

    def instance(service, ident, address, addresses, tcp=True, mode=None):
        meta = {"fastmesh.addresses": addresses, **({"fastmesh.tcp": ""} if tcp else {}),
                **({"fastmesh.mtls": mode} if mode else {})}
        return parse_instance({"service": service, "id": ident, "address": address,
                               "metadata": meta})

    c1 = instance("c", "c1", "10.0.0.5:15006", "[FD00::0005], fd00::6,", mode="strict")
    assert c1.hosts == ("10.0.0.5", "fd00::5", "fd00::6")          # as registered, normalized
    assert dict(c1.metadata)["fastmesh.addresses"] == "fd00::5,fd00::6"
    view = make_view([
        c1, instance("d", "d1", "10.0.0.7:15006", "fd00::6"),         # fd00::6: c's and d's
        instance("e", "e1", "10.0.0.8:15006", "10.0.0.5,10.96.0.9"),  # 10.0.0.5 is c1's
        instance("f", "f1", "10.0.0.9:15006", "10.96.0.9", tcp=False),   # 10.96.0.9: e's and f's
        Instance("g", "g1", "10.0.0.10", 15006)])
    # A claimed address names its service, unless another instance is registered at it (c1
    # keeps 10.0.0.5) or two services claim it (fd00::6, 10.96.0.9: neither, for HTTP and TCP).
    assert mesh_hosts(view) == {"c", "d", "e", "f", "g", "10.0.0.5", "10.0.0.7", "10.0.0.8",
                                "10.0.0.9", "10.0.0.10", "[fd00::5]"}
    assert destination_of(view, "[fd00::5]") == "c" and destination_of(view, "[fd00::6]") is None
    assert destination_of(view, "10.0.0.5") == "c" and destination_of(view, "10.96.0.9") is None
    table = peers(view)
    assert [(p.service, p.host, p.mode) for p in lookup(table, "fd00::5")] == \
        [("c", "10.0.0.5", "strict")]                    # dialled at its registered address
    assert [p.service for p in lookup(table, "10.0.0.5")] == ["c"]
    assert lookup(table, "fd00::6") == () and lookup(table, "10.96.0.9") == ()
    assert lookup(table, "10.0.0.9") == () and lookup(table, "10.0.0.10") == ()   # no TCP key
    for bad in ("fd00::5:1:2:3:4:5:6:7", "c1.pods.local", "fe80::1%eth0", "[10.0.0.1]",
                ",".join(f"10.0.1.{i}" for i in range(17))):
        with pytest.raises(ValueError,
                           match=r"metadata: fastmesh.addresses: (expected IP|at most 16)"):
            instance("c", "c1", "10.0.0.5:1", bad)


def test_opaque_tcp_balancers_weigh_prefer_plaintext_without_mtls_and_serve_their_own():
    from fastmesh._core.balancer import CONNECT_FAIL
    from fastmesh.mesh.opaque_mtls import Peer, TcpBalancers
    from fastmesh.mesh.routes import MeshPolicy
    b1, b2, b3 = (Peer("b", f"10.0.0.{i}", mode, frozenset())
                  for i, mode in ((1, "strict"), (2, "disabled"), (3, "permissive")))
    vip = "10.96.0.2"
    plain = TcpBalancers(MeshPolicy(), mtls=False)
    plain.update({vip: (b1, b2, b3), "10.0.0.1": (b1,)})
    # Without mTLS: strict b1 is left out while another instance takes plaintext; alone, kept.
    route = plain.route(vip, 9000, None, None, "127.0.0.1")
    assert route.service == "b"
    assert [route.dial(t) for t in route.balancer.targets] == \
        [("10.0.0.2", 9000, None), ("10.0.0.3", 9000, None)]
    assert [t.host for t in plain.route("10.0.0.1", 1, None, None, "::1").balancer.targets] == \
        ["10.0.0.1"]
    assert plain.route("10.0.0.9", 9000, None, None, "127.0.0.1") is None
    # This pod's own instance is its app's port, locally, never over TLS.
    route = plain.route(vip, 9000, None, ("b", "10.0.0.3"), "127.0.0.1")
    assert route.dial(route.balancer.targets[1]) == ("127.0.0.1", 9000, None)
    # Least connections, by the registry's weights; this zone's instances first.
    heavy, light, far = (Peer("c", f"10.0.1.{i}", "disabled", frozenset(), weight, zone)
                         for i, weight, zone in ((1, 300, "z1"), (2, 100, "z1"), (3, 100, "z2")))
    zoned = TcpBalancers(MeshPolicy(local_zone="z1"), mtls=False)
    zoned.update({vip: (heavy, light, far)})
    balancer = zoned.route(vip, 1, None, None, "::1").balancer
    picked = []
    for _ in range(8):
        target = balancer.pick_py(b"", None)
        picked.append(target.host)
        balancer.begin_py(target)           # each stays open: counts as a connection
    assert picked.count("10.0.1.1") == 6 and picked.count("10.0.1.2") == 2, picked
    # Three failed connects in a row eject an instance (MeshPolicy.eject_failures). A view
    # change keeps an unchanged address's balancer, and carries health over otherwise.
    for _ in range(3):
        balancer.begin_py(balancer.targets[1])
        balancer.end_py(balancer.targets[1], 1000, CONNECT_FAIL, 0)
    assert balancer.targets[1].state_name == "ejected"
    zoned.update({vip: (heavy, light, far)})
    assert zoned.route(vip, 1, None, None, "::1").balancer is balancer
    zoned.update({vip: (heavy, light)})
    fresh = zoned.route(vip, 1, None, None, "::1").balancer
    assert fresh is not balancer
    assert [(t.host, t.state_name) for t in fresh.targets] == \
        [("10.0.1.1", "healthy"), ("10.0.1.2", "ejected")]


def test_own_ipv6_addresses_are_the_usable_global_ones(tmp_path):
    from fastmesh.mesh.sidecar import own_ipv6_addresses
    table = tmp_path / "if_inet6"
    table.write_text(
        "fd000000000000000000000000000005 02 40 00 80     eth0\n"   # global (ULA), permanent
        "00000000000000000000000000000001 01 80 10 80       lo\n"   # loopback scope
        "fe800000000000000000000000000001 02 40 20 80     eth0\n"   # link-local
        "20010db8000000000000000000000007 02 40 00 c0     eth0\n"   # tentative
        "20010db8000000000000000000000008 02 40 00 20     eth0\n"   # deprecated
        "2001db8000000000000000000000000a 02 40 00 01     eth0\n"   # temporary (privacy)
        "20010db8000000000000000000000009 03 40 00 00     eth1\n"
        "short line\n")
    assert own_ipv6_addresses(str(table)) == ("2001:db8::9", "fd00::5")
    assert own_ipv6_addresses(str(tmp_path / "missing")) == ()


def test_protocol_detection_and_the_requested_host():
    from fastmesh.mesh.transparent import looks_like_http, request_host
    assert looks_like_http(b"GET / HTTP/1.1\r\n") is True
    assert looks_like_http(b"OPTIO") is None                # too short to tell: wait
    for opaque in (b"PRI * HTTP/2.0\r\n", b"\x16\x03\x01\x02\x00", b"SSH-2.0-x",
                   b"*1\r\n$4\r\nPING"):
        assert looks_like_http(opaque) is False, opaque
    assert request_host(b"GET / HTTP/1.1\r\nhost: Payments.:8080\r\n\r\n") == "payments"
    assert request_host(b"GET http://b:81/x HTTP/1.1\r\nHost: c\r\n\r\n") == "b"
    assert request_host(b"GET / HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n") == "[fd00::1]"
    assert request_host(b"GET / HTTP/1.0\r\n\r\n") is None


def test_mesh_init_dry_run_and_refusals():
    def mesh_init(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fastmesh", "mesh-init", *args],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)

    done = mesh_init("--proxy-uid", "1337", "--proxy-mark", "0x539", "--no-inbound",
                     "--outbound-port", "16001", "--ipv6", "off", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "iptables -t nat -A FASTMESH_OUTPUT -m mark --mark 0x539 -j RETURN" in lines
    assert lines[-3] == "iptables -t nat -A FASTMESH_OUTPUT -p tcp -j REDIRECT --to-ports 16001"
    assert not any("-A FASTMESH_INBOUND" in line for line in lines)
    assert not any(line.startswith("ip6tables") for line in lines)
    # By default the same rules for IPv6; each excluded CIDR goes to its own IP version.
    done = mesh_init("--proxy-gid", "1", "--exclude-cidrs", "10.0.0.0/8,fd00::/8", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    v4 = [line for line in lines if line.startswith("iptables ")]
    v6 = [line.replace("ip6tables ", "iptables ", 1) for line in lines
          if line.startswith("ip6tables ")]
    assert len(v4) == len(v6) == len(lines) / 2
    assert "iptables -t nat -A FASTMESH_OUTPUT -d 10.0.0.0/8 -j RETURN" in v4
    assert "iptables -t nat -A FASTMESH_OUTPUT -d fd00::/8 -j RETURN" in v6
    assert [line for line in v4 if "-d " not in line] == [line for line in v6 if "-d " not in line]
    done = mesh_init("--proxy-gid", "1", "--ipv6", "on", "--ip6tables", "/nonexistent/ip6tables")
    assert done.returncode == 1 and "is not installed" in done.stderr, done.stderr
    for args, expected in ((["--exclude-ports", "22,0"], "ports 1..65535"),
                           (["--exclude-cidrs", "10.0.0.0/33"], "expected CIDRs"),
                           (["--proxy-mark", "x"], "expected a number")):
        done = mesh_init("--proxy-gid", "1", *args, "--dry-run")
        assert done.returncode == 2 and expected in done.stderr, (args, done.stderr)
