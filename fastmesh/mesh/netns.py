"""Pod-like network namespaces on one machine, for the mesh's tests and benchmarks.

A `Network` is a bridge in a namespace of its own plus one namespace per pod, each joined to the
bridge by a veth pair (`eth0` in the pod), with a private IPv4 address and, unless
`subnet6=None`, a private IPv6 one (ULA, same host number; no duplicate address detection, so
it is usable at once), loopback up and default routes through the bridge (so a connect() to any address is routed, and interception rules see
it). Nothing is created in the caller's namespace: the veth pairs are made inside the bridge
namespace, so only the namespace names (under /run/netns) are shared with the host, and they
all start with a unique prefix that carries the creating pid.

    with Network("10.77.0.0/24") as net:         # the bridge namespace gets 10.77.0.1, fd77::1
        a = net.add_pod("a")                      # 10.77.0.2 and fd77::2, namespace "<prefix>a"
        net.set_hosts({"b": "10.77.0.250"})       # /etc/hosts inside every pod
        proc = net.run_in(a, ["fastmesh", "echo", "--listen", "0.0.0.0:8080"])
        sock = net.connect(a, ("127.0.0.1", 8080))    # a socket made inside the pod
    # every process started with run_in is stopped and every namespace deleted, even on errors

`cleanup_stale()` deletes the namespaces that a crashed run left behind (those whose creating
process is gone); parallel runs never touch each other's. Root and iproute2 are needed
(`unavailable()` says why not, for tests that skip).
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastmesh.osutil import pid_alive

ROOT_PREFIX = "fmesh-"          # every namespace made here: fmesh-<pid>-<random>-<name>
NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NAME` bind-mounts /etc/netns/NAME/* over /etc
STOP_TIMEOUT = 5.0
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Pod:
    """One namespace on the bridge: `netns` is its full name, `address` its IPv4 address,
    `address6` its IPv6 one (None when the network has no IPv6 subnet)."""

    name: str
    netns: str
    address: str
    address6: str | None = None


def unavailable() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"{ROOT_PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"'ip netns add' fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def in_namespace(netns: str, make):
    """make() run in a thread that entered `netns` (setns affects one thread only): sockets it
    creates belong to that namespace for good. Its result, or its exception re-raised."""
    import ctypes
    result: dict = {}

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = make()
        except BaseException as exc:          # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=enter, name=f"netns {netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done



def delete_namespace(netns: str) -> None:
    """Kill what still runs in `netns`, then delete it (its veth ends go with it)."""
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", netns, check=False)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def cleanup_stale(prefix: str = ROOT_PREFIX) -> list[str]:
    """Delete namespaces named `prefix<pid>-...` whose creating process is gone; their names."""
    removed = []
    names = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    for name in names:
        if not name.startswith(prefix):
            continue
        owner = name[len(prefix):].partition("-")[0]
        if owner.isdigit() and pid_alive(int(owner)):
            continue                # a run in progress (possibly this one): not stale
        delete_namespace(name)
        removed.append(name)
    return removed


def namespaces(prefix: str = ROOT_PREFIX) -> list[str]:
    """The namespaces whose names start with `prefix` (for tests asserting that all are gone)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


class Network:
    """A bridge namespace and pods on it; a context manager that always cleans up."""

    def __init__(self, subnet: str = "10.77.0.0/24", prefix: str | None = None,
                 subnet6: str | None = "fd77::/64"):
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.version != 4 or self.subnet.num_addresses < 8:
            raise ValueError(f"expected an IPv4 subnet of at least 8 addresses, found {subnet}")
        self.subnet6 = ipaddress.ip_network(subnet6) if subnet6 else None
        if self.subnet6 is not None and (self.subnet6.version != 6 or
                                         self.subnet6.num_addresses < self.subnet.num_addresses):
            raise ValueError(f"expected an IPv6 subnet at least as large as {subnet}, "
                             f"found {subnet6}")
        self.prefix = prefix or f"{ROOT_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-"
        hosts = self.subnet.hosts()
        first = str(next(hosts))
        self.bridge = Pod("bridge", self.prefix + "br", first, self._twin6(first))
        self._free = hosts
        self.pods: dict[str, Pod] = {}
        self.procs: list[subprocess.Popen] = []
        self.hosts: dict[str, str] = {}
        self._made: list[str] = []

    # -- building ---------------------------------------------------------------------------
    def __enter__(self) -> "Network":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Create the bridge namespace: bridge `br0` holding the subnet's first address."""
        ns = self.bridge.netns
        self._add_namespace(ns)
        # A fixed MAC: else the bridge takes the lowest of its ports' MACs, which changes when
        # a pod joins, and the other pods' ARP entries for the bridge address go stale (their
        # packets to it are lost for seconds).
        mac = "02:fa:57:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        _ip("-n", ns, "link", "add", "br0", "address", mac, "type", "bridge")
        _ip("-n", ns, "addr", "add", f"{self.bridge.address}/{self.subnet.prefixlen}",
            "dev", "br0")
        if self.bridge.address6 is not None:
            _ip("-n", ns, "addr", "add", f"{self.bridge.address6}/{self.subnet6.prefixlen}",
                "dev", "br0", "nodad")
        _ip("-n", ns, "link", "set", "br0", "up")

    def _twin6(self, address: str) -> str | None:
        """The IPv6 address with the same host number as IPv4 `address` (None: no IPv6)."""
        if self.subnet6 is None:
            return None
        number = int(ipaddress.ip_address(address)) - int(self.subnet.network_address)
        return str(self.subnet6[number])

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_pod(self, name: str, address: str | None = None) -> Pod:
        """A new namespace `<prefix><name>` with eth0 on the bridge (next free address)."""
        if name in self.pods or name == "br" or not name.replace("-", "").isalnum():
            raise ValueError(f"pod name must be new, alphanumeric and not 'br', found {name!r}")
        addr = address or str(next(self._free))
        pod = Pod(name, self.prefix + name, addr, self._twin6(addr))
        self._add_namespace(pod.netns)
        veth = f"v{len(self.pods)}"
        br = self.bridge.netns
        # Both ends are made inside the bridge namespace, the pod's end moved straight into
        # the pod: no interface ever appears in the caller's namespace.
        _ip("-n", br, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
            "netns", pod.netns)
        _ip("-n", br, "link", "set", veth, "master", "br0", "up")
        _ip("-n", pod.netns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", pod.netns, "link", "set", "eth0", "up")
        _ip("-n", pod.netns, "route", "add", "default", "via", self.bridge.address)
        if pod.address6 is not None:
            _ip("-n", pod.netns, "addr", "add", f"{pod.address6}/{self.subnet6.prefixlen}",
                "dev", "eth0", "nodad")
            _ip("-n", pod.netns, "-6", "route", "add", "default", "via", self.bridge.address6)
        self.pods[name] = pod
        if self.hosts:
            self._write_hosts(pod)
        return pod

    def set_hosts(self, names: dict[str, str]) -> None:
        """Name -> address in /etc/hosts of every namespace, pods added later included (read
        by processes started afterwards, and by each new lookup of glibc's resolver), and an
        empty /etc/resolv.conf."""
        self.hosts = dict(names)
        for pod in (self.bridge, *self.pods.values()):
            self._write_hosts(pod)

    def _write_hosts(self, pod: Pod) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{address} {name}" for name, address in self.hosts.items()]
        folder = NETNS_ETC / pod.netns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text("\n".join(lines) + "\n")
        # No DNS server is reachable from a pod: with none configured, lookups of other names
        # fail at once (glibc then asks 127.0.0.1:53, refused) instead of timing out.
        (folder / "resolv.conf").write_text("# fastmesh.mesh.netns: names come from hosts\n")

    # -- processes --------------------------------------------------------------------------
    def run_in(self, pod: Pod, argv: list[str], **popen) -> subprocess.Popen:
        """Start argv inside `pod` (`ip netns exec`: the Popen's pid is the command's own);
        stopped by close() if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", pod.netns, *argv], **popen)
        self.procs.append(proc)
        return proc

    def exec_in(self, pod: Pod, argv: list[str], timeout: float = 30) -> str:
        """Run argv inside `pod` to completion; its output, RuntimeError when it fails."""
        done = subprocess.run(["ip", "netns", "exec", pod.netns, *argv], capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {pod.name}: exit {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()}")
        return done.stdout

    def connect(self, pod: Pod, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        """A TCP socket made inside `pod` and connected to `address` from there (as a process
        of the pod would: the pod's routes and iptables rules apply). Usable from any thread."""
        return in_namespace(pod.netns, lambda: socket.create_connection(address, timeout))

    def listen(self, pod: Pod, address: tuple[str, int]) -> socket.socket:
        """A TCP socket listening on `address` inside `pod`."""
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(64)
            return sock
        return in_namespace(pod.netns, make)

    # -- cleanup ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the processes (SIGTERM, then SIGKILL), delete every namespace made here."""
        running = [p for p in self.procs if p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        for ns in reversed(self._made):
            delete_namespace(ns)
        self._made.clear()


__all__ = ["Network", "Pod", "cleanup_stale", "delete_namespace", "in_namespace", "namespaces",
           "unavailable"]
