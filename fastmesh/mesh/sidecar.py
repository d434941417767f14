"""`fastmesh sidecar`: one process beside one service instance, two listeners, one registry.

- inbound (default 0.0.0.0:15006): what the mesh sends to this instance, relayed to the local app;
- outbound (default 127.0.0.1:15001): the app's calls to other services by name (`Host: payments`
  or an absolute-form `GET http://payments/...` when the app uses it as its HTTP proxy), balanced
  over the instances that the registry knows.

Each listener is a `fastmesh.server.Worker` with its own Gateway and Plan (a Gateway serves one
Plan). The outbound Plan is compiled from the registry view (fastmesh.mesh.routes) and swapped
with `Worker.prepare/commit`, the same two steps as a reload, whenever the view changes.

Everything runs in one process on one event loop (one worker per listener, no supervisor).

With `intercept` (pods whose TCP `fastmesh mesh-init` redirects), each listener takes new
connections through a fastmesh.mesh.transparent.Detector first: HTTP for the mesh is handed to
the listener's Gateway, other TCP is relayed to where it was going (SO_ORIGINAL_DST).

Lifecycle: ready (admin `GET /ready`) when both listeners are up and the registry view was loaded
once. The instance is registered (address: --advertise, else the inbound listener's address)
with a TTL heartbeat. SIGTERM/SIGINT: deregister first (callers stop picking this instance),
then drain the inbound side while the outbound side keeps serving the app, then drain the
outbound side, and exit 0.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from fastmesh import __version__
from fastmesh.config import ConfigError
from fastmesh.mesh.registry import Instance, Registry, open_registry
from fastmesh.mesh.routes import MeshPolicy, inbound_config, mesh_hosts, outbound_config
from fastmesh.server import DRAIN_TIMEOUT, Worker, format_url, parse_listen, start_server

INITIAL_WAIT = 3.0              # at start, wait this long at most for the first registry view
DEREGISTER_TIMEOUT = 3.0
DEFAULT_TTL = 10.0


@dataclass
class SidecarOptions:
    service: str
    app_port: int
    registry: str = "redis://127.0.0.1:6379/0"
    app_host: str = "127.0.0.1"
    inbound: str = "0.0.0.0:15006"
    outbound: str = "127.0.0.1:15001"
    advertise: tuple[str, int] | None = None
    zone: str = ""
    version: str = ""
    weight: int = 100
    metadata: tuple[tuple[str, str], ...] = ()
    instance_id: str | None = None
    admin: str | None = "127.0.0.1:15000"      # None: off
    admin_explicit: bool = False
    ttl: float = DEFAULT_TTL
    drain_timeout: float = DRAIN_TIMEOUT
    policy: MeshPolicy = field(default_factory=MeshPolicy)
    intercept: bool = False     # accept connections redirected by `fastmesh mesh-init`


def say(message: str, err: bool = False) -> None:
    print(f"fastmesh sidecar: {message}", file=sys.stderr if err else sys.stdout, flush=True)


def own_address() -> str:
    """The address other hosts reach this one at: the source address of the default route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))          # TEST-NET-1: nothing is sent
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def check_free(host: str, port: int) -> int:
    """Refuse an address another process listens on, and resolve port 0.

    Workers bind with SO_REUSEPORT, which would silently share a port with another sidecar of
    this host; a plain bind first fails with EADDRINUSE instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT is no conflict
        probe.bind((host, port))
        return probe.getsockname()[1]


class Sidecar:
    def __init__(self, options: SidecarOptions):
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.registry: Registry | None = None
        self.inbound: Worker | None = None
        self.outbound: Worker | None = None
        self.instance: Instance | None = None
        self.admin_server = None
        self.started = time.time()
        self.changes = 0                        # outbound Plans swapped in after the first
        self._scheduled = False
        self.stopping = False
        self.hosts: frozenset[str] = frozenset()     # what the outbound routes match (intercept)
        self.relays: set = set()                     # open opaque TCP relays (intercept)

    @property
    def ready(self) -> bool:
        return (self.outbound is not None and self.inbound is not None
                and self.instance is not None and not self.stopping
                and self.registry is not None and self.registry.ready)

    async def start(self) -> None:
        opts = self.options
        self.registry = open_registry(opts.registry, self._view_changed, opts.ttl)
        await self.registry.start(INITIAL_WAIT)
        in_host, in_port = parse_listen(opts.inbound)
        out_host, out_port = parse_listen(opts.outbound)
        in_port = check_free(in_host, in_port)
        out_port = check_free(out_host, out_port)
        self.inbound = Worker(0)
        await self.inbound.start(inbound_config(opts.service, opts.app_host, opts.app_port,
                                                opts.policy.connect_timeout,
                                                opts.policy.read_timeout), in_host, in_port)
        self.outbound = Worker(1)
        await self.outbound.start(outbound_config(self.registry.view(), opts.policy),
                                  out_host, out_port)
        if opts.intercept:
            self.hosts = mesh_hosts(self.registry.view())
            await self._intercept(self.inbound, self._inbound_target)
            await self._intercept(self.outbound, self._outbound_target)
        host, port = opts.advertise or (self._advertised_host(self.inbound.address[0]),
                                        self.inbound.address[1])
        ident = opts.instance_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.instance = Instance(opts.service, ident, host, port, opts.zone, opts.version,
                                 opts.weight, opts.metadata)
        await self.registry.register(self.instance)
        if opts.admin is not None:
            await self._start_admin(opts.admin, opts.admin_explicit)
        self._apply()           # the view may have moved while the listeners started

    # -- transparent interception ---------------------------------------------------------------
    async def _intercept(self, worker: Worker, target) -> None:
        """Put a Detector in front of `worker`'s Gateway: its listener is replaced by one on the
        same address whose connections are sniffed first (before the sidecar is registered)."""
        from fastmesh.mesh.transparent import Detector
        host, port = worker.address
        worker.server.close()
        gateway = worker.gateway
        worker.server = await start_server(
            self.loop, lambda: Detector(gateway, target, self.relays), host, port,
            reuse_port=True, backlog=4096)

    def _inbound_target(self, original, head: bytes, http: bool):
        """None: the inbound Gateway (HTTP for the app's port); else the local port asked for."""
        opts = self.options
        port = opts.app_port
        if original is not None and original[1] != self.inbound.address[1]:
            port = original[1]              # redirected: the pod port the caller dialled
        if http and port == opts.app_port:
            return None
        return opts.app_host, port

    def _outbound_target(self, original, head: bytes, http: bool):
        """None: the outbound Gateway (HTTP whose Host names a service or an instance); else
        the original destination (opaque TCP, HTTP for a host outside the mesh)."""
        from fastmesh.mesh.transparent import request_host
        # Addressed to the listener itself (explicit use). By port alone: relaying a call
        # for "<this pod's address>:15001" would loop back here.
        if original is None or original[1] == self.outbound.address[1]:
            return None
        if http:
            host = request_host(head)
            # The Gateway routes by Host. A single-label name (`http://payments/`) is a service
            # name even when the registry does not know it (yet): answered 503 naming it, at
            # once. Other hosts, and requests without one, go where they were sent (the data
            # path cannot route by the original destination yet).
            if host in self.hosts or (host and "." not in host and not host.startswith("[")):
                return None
        return original

    @staticmethod
    def _advertised_host(bound: str) -> str:
        try:
            unspecified = ipaddress.ip_address(bound).is_unspecified
        except ValueError:
            unspecified = False
        return own_address() if unspecified else bound

    async def _start_admin(self, listen: str, explicit: bool) -> None:
        from fastmesh.admin import AdminProtocol
        from fastmesh.config.operations import is_loopback
        from fastmesh.mesh.admin import SidecarAdmin
        if not is_loopback(listen):
            raise ValueError(f"the sidecar admin API on {listen} would be reachable from other "
                             "hosts: bind it to 127.0.0.1 (it has no token yet)")
        host, port = parse_listen(listen)
        api = SidecarAdmin(self)
        try:
            self.admin_server = await start_server(self.loop, lambda: AdminProtocol(api), host, port)
        except OSError as exc:
            if explicit:
                raise
            say(f"admin API not started: {listen} is busy ({exc.strerror}); set --admin", err=True)

    # -- registry changes -----------------------------------------------------------------------
    def _view_changed(self) -> None:
        if self._scheduled or self.outbound is None:
            return
        self._scheduled = True
        self.loop.call_soon(self._apply)

    def _apply(self) -> None:
        """Compile the outbound Plan for the current view and swap it in (when it changed)."""
        self._scheduled = False
        if self.outbound is None or self.outbound.gateway is None or self.outbound.stopped:
            return              # not started yet (start applies the view itself) or stopping
        view = self.registry.view()
        try:
            config = outbound_config(view, self.options.policy)
        except ConfigError as exc:            # an instance the loader refuses: keep the old Plan
            say(f"registry view refused, outbound routes unchanged:\n{exc}", err=True)
            return
        if self.options.intercept:
            self.hosts = mesh_hosts(view)
        if config.version == self.outbound.version:
            return
        problem = self.outbound.prepare(config)
        if problem:
            say(problem, err=True)
            return
        self.outbound.commit(config.version)
        self.changes += 1
        say(f"outbound routes: {len(view)} service(s), "
            f"{sum(map(len, view.values()))} instance(s) (config {config.version})")

    # -- views for the admin API ----------------------------------------------------------------
    def status(self) -> dict:
        opts = self.options
        return {
            "version": __version__, "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "ready": self.ready, "service": opts.service,
            "instance": self.instance.to_dict() if self.instance else None,
            "app": f"{opts.app_host}:{opts.app_port}",
            "inbound": self._listener(self.inbound), "outbound": self._listener(self.outbound),
            "outbound_changes": self.changes,
            "destinations": sorted(self.registry.view()) if self.registry else [],
            "registry": {k: v for k, v in self.registry.state().items() if k != "services"}
            if self.registry else None,
        }

    @staticmethod
    def _listener(worker: Worker | None) -> dict | None:
        if worker is None or worker.address is None:
            return None
        snap = worker.snapshot(full=True)
        return {"address": "%s:%d" % worker.address, "config_version": worker.version,
                "connections": snap["connections"], "requests": snap["requests"],
                "status": snap["status"], "upstreams": snap.get("upstreams")}

    # -- shutdown -------------------------------------------------------------------------------
    async def stop(self, drain: float) -> None:
        self.stopping = True
        if self.instance is not None and self.registry is not None and self.registry.writable:
            try:
                await asyncio.wait_for(self.registry.deregister(self.instance), DEREGISTER_TIMEOUT)
                say(f"deregistered {self.instance.service}/{self.instance.id}")
            except (asyncio.TimeoutError, Exception) as exc:
                say(f"could not deregister {self.instance.service}/{self.instance.id} "
                    f"({type(exc).__name__}: {exc}); it expires within {self.options.ttl:g}s",
                    err=True)
        if self.inbound is not None:
            await self.inbound.shutdown(drain)
        if self.outbound is not None:
            await self.outbound.shutdown(drain)
        if self.relays:
            from fastmesh.mesh.transparent import close_relays
            close_relays(self.relays)
        if self.admin_server is not None:
            self.admin_server.close()
        if self.registry is not None:
            await self.registry.stop()


async def serve_sidecar(options: SidecarOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sidecar = Sidecar(options)
    try:
        await sidecar.start()
    except (ValueError, ConfigError) as exc:
        say(str(exc), err=True)
        await sidecar.stop(0)
        return 1
    except OSError as exc:
        say(f"cannot listen: {exc}", err=True)
        await sidecar.stop(0)
        return 1
    inst = sidecar.instance
    admin = ""
    if sidecar.admin_server is not None:
        host, port = sidecar.admin_server.sockets[0].getsockname()[:2]
        admin = f", admin {format_url(host, port)}"
    print(f"fastmesh {__version__} sidecar for '{options.service}' (instance {inst.id}, "
          f"advertised {inst.address}): inbound {format_url(*sidecar.inbound.address)} -> app "
          f"{options.app_host}:{options.app_port}, outbound "
          f"{format_url(*sidecar.outbound.address)}{admin}; registry {sidecar.registry.kind} "
          f"({len(sidecar.registry.view())} service(s)); 1 worker, pid {os.getpid()}", flush=True)
    await stop.wait()
    await sidecar.stop(options.drain_timeout)
    print("fastmesh sidecar: stopped", flush=True)
    return 0


def run_sidecar(options: SidecarOptions) -> int:
    import uvloop
    return uvloop.run(serve_sidecar(options))
