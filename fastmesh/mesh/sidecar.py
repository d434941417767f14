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

With mTLS (`--mtls strict|permissive`, fastmesh.mesh.mtls), the inbound listener accepts through
an MtlsListener (TLS with a client certificate from the mesh root; plaintext too when
permissive), the caller's verified SPIFFE id reaches the app in X-Fastmesh-Peer, and outbound
calls to destinations that take mTLS present this workload's certificate and check the peer's.
`--policy FILE` (fastmesh.mesh.policy) restricts who may call this service and sets what the
app's calls to each destination get (timeouts, retries, plugins); the file is re-read when it
changes (a broken change keeps the rules in force).

Lifecycle: ready (admin `GET /ready`) when both listeners are up and the registry view was loaded
once. The instance is registered (address: --advertise, else the inbound listener's address;
its other addresses: --advertise-also, and with --intercept on all interfaces this pod's IPv6
ones) with a TTL heartbeat. SIGTERM/SIGINT: deregister first (callers stop picking this
instance), then drain the inbound side while the outbound side keeps serving the app, then drain the
outbound side, and exit 0.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from fastmesh import __version__
from fastmesh.config import ConfigError
from fastmesh.mesh.registry import (
    ADDRESSES_KEY, ADDRESSES_MAX, Instance, Registry, addresses_value, open_registry,
)
from fastmesh.mesh.routes import (
    MTLS_KEY, MeshPolicy, MeshTLSFiles, destination_of, host_owners, inbound_config, mesh_hosts,
    outbound_config, routable_host, use_sources,
)
from fastmesh.mesh.destinations import DEFAULT_IDLE, SWEEPS_PER_IDLE, Destinations
from fastmesh.server import DRAIN_TIMEOUT, Worker, format_url, parse_listen, start_server

INITIAL_WAIT = 3.0              # at start, wait this long at most for the first registry view
DEREGISTER_TIMEOUT = 3.0
DEFAULT_TTL = 10.0
POLICY_POLL = 1.0               # the --policy file is checked for changes this often


@dataclass
class SidecarOptions:
    service: str
    app_port: int
    registry: str = "redis://127.0.0.1:6379/0"
    app_host: str = "127.0.0.1"
    inbound: str = "0.0.0.0:15006"
    outbound: str = "127.0.0.1:15001"
    advertise: tuple[str, int] | None = None
    advertise_also: tuple[str, ...] = ()   # more addresses (ADDRESSES_KEY), beside detected ones
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
    opaque_ports: frozenset[int] = frozenset()  # intercepted, but never sniffed: opaque TCP
    detect_timeout: float = 0.5     # intercepted and silent this long: opaque (server-first)
    destinations: str = "called"    # compile only the destinations the app calls, or "all"
    destinations_idle: float = DEFAULT_IDLE
    mtls: str = "disabled"      # strict | permissive | disabled (fastmesh.mesh.mtls)
    tls_dir: str | None = None  # certificate files (`fastmesh ca issue`), or where --ca-url's go
    ca_url: str | None = None   # the signing service (`fastmesh ca serve`)
    ca_token: str | None = None
    authz_file: str | None = None   # --policy: the mesh policy file (fastmesh.mesh.policy)


IPV6_TWINS = {"0.0.0.0": "::", "127.0.0.1": "::1"}   # intercept: IPv6 listens here too


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


# /proc/net/if_inet6 flags of an address not to advertise: IFA_F_DADFAILED, _DEPRECATED, _TENTATIVE;
# IFA_F_TEMPORARY too: a privacy address is a source address, nobody dials it.
UNUSABLE_IPV6 = 0x01 | 0x08 | 0x20 | 0x40


def own_ipv6_addresses(path: str = "/proc/net/if_inet6") -> tuple[str, ...]:
    """This host's global-scope IPv6 addresses (a dual-stack pod's; not loopback or link-local,
    none that is temporary, tentative, deprecated or failed duplicate detection; read once, at
    start): registered with the instance (ADDRESSES_KEY) so that the mesh knows IPv6 calls to
    them. () where the file cannot be read (not Linux, IPv6 off)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    found = set()
    for line in lines:
        fields = line.split()
        try:
            scope, flags = int(fields[3], 16), int(fields[4], 16)
            if scope == 0 and not flags & UNUSABLE_IPV6:
                found.add(ipaddress.IPv6Address(bytes.fromhex(fields[0])).compressed)
        except (IndexError, ValueError):
            continue
    return tuple(sorted(found))


def _pair(pairs: dict, name: str):
    """The StreamStats in `pairs` for the service `name`, made at its first relay (one per
    service the relays have had at the other end)."""
    found = pairs.get(name)
    if found is None:
        from fastmesh.streams import StreamStats
        found = pairs[name] = StreamStats()
    return found


def check_free(host: str, port: int) -> int:
    """Refuse an address another process listens on, and resolve port 0.

    Workers bind with SO_REUSEPORT, which would silently share a port with another sidecar of
    this host; a plain bind first fails with EADDRINUSE instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT is no conflict
        if family == socket.AF_INET6:       # as the listener binds (server.bound_socket)
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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
        self.tcp = None             # opaque_mtls.TcpBalancers: TCP to mesh addresses (intercept)
        self.tcp_callers: dict[str, str] = {}   # instance host -> its service (plaintext callers)
        # direction -> the other end's service -> StreamStats of the relays with it
        self.tcp_pairs: dict[str, dict] = {"outbound": {}, "inbound": {}}
        self.dialer = None                           # opaque_mtls.Dialer (intercept with mTLS)
        self.relays: set = set()                     # open opaque TCP relays (intercept)
        self.inbound_ipv6 = None                     # mTLS + intercept: the IPv6 twin listener
        self.opaque: dict = {}                       # intercept: direction -> StreamStats
        self.tls = None                              # a fastmesh.mesh.mtls.MeshTLS when on
        self.callers: frozenset[str] = frozenset()   # inbound: the services it has routes for
        self.authz: dict | None = None               # the policy file: service -> rules
        self.outbound_policy = None                  # ... and its part for the app's calls
        self.destinations = Destinations(options.destinations, options.destinations_idle)
        self.destinations_sweep: asyncio.Task | None = None
        self.authz_stamp = None
        self.authz_error: str | None = None
        self.authz_loads = 0
        self.authz_watch: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return (self.outbound is not None and self.inbound is not None
                and self.instance is not None and not self.stopping
                and self.registry is not None and self.registry.ready)

    async def start(self) -> None:
        opts = self.options
        if opts.authz_file is not None:
            self._read_authz(initial=True)          # ValueError: the sidecar does not start
        await self._start_tls()
        self.registry = open_registry(opts.registry, self._view_changed, opts.ttl)
        await self.registry.start(INITIAL_WAIT)
        in_host, in_port = parse_listen(opts.inbound)
        out_host, out_port = parse_listen(opts.outbound)
        in_port = check_free(in_host, in_port)
        out_port = check_free(out_host, out_port)
        self.inbound = Worker(0)
        self.inbound.route_stats.by_class = True    # /metrics: latency per status class
        await self.inbound.start(self._inbound_config(), in_host, in_port)
        from fastmesh.mesh.mtls import PEER_HEADER, identify
        # Always: a caller's own X-Fastmesh-Peer never reaches the app, mTLS or not.
        self.inbound.gateway.set_peer_identity(PEER_HEADER, identify)
        self.outbound = Worker(1)
        self.outbound.route_stats.by_class = True
        await self.outbound.start(self._outbound_config(self.registry.view()), out_host, out_port)
        # Caller services: outbound stamps this service, inbound counts per caller (routes.py).
        use_sources(self.inbound.gateway, self.outbound.gateway, opts.service,
                    self.tls.identity if self.tls is not None else None)
        from fastmesh.mesh import unknown_service
        unknown_service.serve(self)         # the catch-all asks `activate` for known services
        also = opts.advertise_also
        if opts.intercept:
            from fastmesh.streams import StreamStats
            from fastmesh.mesh.opaque_mtls import Dialer, TcpBalancers
            self.opaque = {"outbound": StreamStats(), "inbound": StreamStats()}
            if self.tls is not None:
                self.dialer = Dialer(self._tls_files())
            self.tcp = TcpBalancers(opts.policy, self.dialer is not None)
            self._learn_hosts(self.registry.view())
            if self.tls is None:
                twin = await self._intercept(self.inbound, self._inbound_target)
            else:                           # the mTLS accept path takes it over (below)
                twin = self.inbound_ipv6 = await self._listen_ipv6(
                    self.inbound, self.inbound.gateway.protocol_factory)
            await self._intercept(self.outbound, self._outbound_target)
            bound = self.inbound.address[0]
            if bound == "::" or twin is not None and IPV6_TWINS.get(bound) == "::":
                # IPv6 TCP to any of this pod's addresses reaches this sidecar.
                also = tuple(dict.fromkeys(also + own_ipv6_addresses()))
        if self.tls is not None:
            self._listen_mtls()
        host, port = opts.advertise or (self._advertised_host(self.inbound.address[0]),
                                        self.inbound.address[1])
        ident = opts.instance_id or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
        metadata = opts.metadata
        if also:
            value = addresses_value(",".join(also[:ADDRESSES_MAX]))     # as callers will read it
            metadata = tuple(sorted(dict(metadata, **{ADDRESSES_KEY: value}).items()))
        if self.tls is not None:
            metadata = tuple(sorted(dict(metadata, **{MTLS_KEY: self.tls.mode}).items()))
        if opts.intercept:                  # TCP to this address reaches this sidecar
            from fastmesh.mesh.opaque_mtls import TCP_KEY, tcp_metadata
            metadata = tuple(sorted(dict(metadata, **{
                TCP_KEY: tcp_metadata(opts.opaque_ports)}).items()))
        self.instance = Instance(opts.service, ident, host, port, opts.zone, opts.version,
                                 opts.weight, metadata)
        await self.registry.register(self.instance)
        if opts.admin is not None:
            await self._start_admin(opts.admin, opts.admin_explicit)
        if opts.authz_file is not None:
            self.authz_watch = self.loop.create_task(self._watch_authz())
        if self.destinations.lazy:
            self.destinations_sweep = self.loop.create_task(self._sweep_destinations())
        self._apply()           # the view may have moved while the listeners started

    # -- mTLS and authorization -----------------------------------------------------------------
    async def _start_tls(self) -> None:
        if self.options.mtls == "disabled":
            return
        from fastmesh.mesh.mtls import MeshTLS
        from fastmesh.mesh.registry import service_of      # not .ca: no `cryptography` here
        from fastmesh.mesh.workload_cert import CertificateError
        opts = self.options
        try:
            self.tls = MeshTLS.from_options(opts.mtls, opts.service, opts.tls_dir, opts.ca_url,
                                            opts.ca_token)
            if self.tls is None:
                return
            await self.tls.start()
        except CertificateError as exc:
            raise ValueError(f"mTLS: {exc}") from None
        identity = self.tls.identity
        if service_of(identity) != opts.service:
            raise ValueError(f"the workload certificate is for {identity or 'no SPIFFE id'}, "
                             f"not for service '{opts.service}'")

    def _tls_files(self) -> MeshTLSFiles | None:
        if self.tls is None:
            return None
        from fastmesh.mesh.registry import trust_domain_of
        files = self.tls.outbound()
        return MeshTLSFiles(trust_domain_of(self.tls.identity), files["tls_ca"],
                            files["tls_client_cert"], files["tls_client_key"])

    def _listen_mtls(self) -> None:
        """The inbound listener's connections go through the mTLS accept path (and, plaintext
        ones in permissive mode, through interception's Detector when it is on)."""
        gateway = self.inbound.gateway
        from fastmesh.mesh.mtls import DETECT_TIMEOUT
        plain, opaque, detect = gateway.protocol_factory, None, DETECT_TIMEOUT
        silent = None
        if self.options.intercept:
            plain = self._detector(gateway, self._inbound_target)
            # Silent through the peek: the detect timeout has been waited once already.
            silent = self._detector(gateway, self._inbound_target, 0.0)
            if self.options.opaque_ports:
                opaque = self._dialled_opaque_port
            detect = self.options.detect_timeout
        secure = gateway.protocol_factory
        if self.options.intercept:          # opaque TCP over mTLS too, told apart by ALPN
            from fastmesh.mesh.opaque_mtls import Dispatch
            relay = self._detector(gateway, self._inbound_tls_target, opaque=True)
            secure = lambda: Dispatch(gateway.protocol_factory, relay, self._tcp_allowed_over_tls)   # noqa: E731

        def take(server):
            return self.tls.listen(self.loop, server, secure, plain, opaque, detect, silent)
        self.inbound.server = take(self.inbound.server)
        if self.inbound_ipv6 is not None:
            at = self.inbound.servers.index(self.inbound_ipv6)
            self.inbound.servers[at] = self.inbound_ipv6 = take(self.inbound_ipv6)

    def _inbound_config(self):
        opts = self.options
        rules = None
        if self.tls is not None or self.authz is not None:
            rules = (self.authz or {}).get(opts.service, [])
        return inbound_config(opts.service, opts.app_host, opts.app_port,
                              opts.policy.connect_timeout, opts.policy.read_timeout, rules,
                              callers=self.registry.view() if self.registry else ())

    def _read_authz(self, initial: bool = False) -> bool:
        """(Re-)read the policy file; a broken one raises at start, later keeps the old rules.
        True when this service's rules changed; a change of the outbound part is applied here."""
        from fastmesh.osutil import file_stamp
        from fastmesh.mesh.policy import read_policy_file
        path = self.options.authz_file
        self.authz_stamp = file_stamp(path)
        try:
            policy_file = read_policy_file(path)
        except ValueError as exc:
            if initial:
                raise ValueError(f"--policy: {exc}") from None
            self.authz_error = str(exc)
            say(f"policy file not applied, the previous rules stay in force:\n{exc}", err=True)
            return False
        self.authz_error = None
        policy = policy_file.authorization
        changed = self.authz is None or policy.get(self.options.service) != \
            self.authz.get(self.options.service)
        self.authz = policy
        if policy_file.outbound != self.outbound_policy:
            self.outbound_policy = policy_file.outbound
            if not initial:
                self._view_changed()        # recompile the outbound Plan with the new settings
        self.authz_loads += 1
        return changed

    async def _watch_authz(self) -> None:
        from fastmesh.osutil import file_stamp
        while True:
            await asyncio.sleep(POLICY_POLL)
            if file_stamp(self.options.authz_file) == self.authz_stamp:
                continue
            if not self._read_authz() or self.inbound is None or self.inbound.stopped:
                continue
            config = self._inbound_config()
            problem = self.inbound.prepare(config)
            if problem:
                self.authz_error = problem
                say(problem, err=True)
                continue
            self.inbound.commit(config.version)
            rules = self.authz.get(self.options.service, [])
            say(f"authorization policy: {len(rules)} rule(s) for '{self.options.service}'"
                f"{'' if rules else ' (open to any caller)'}")

    # -- transparent interception ---------------------------------------------------------------
    async def _intercept(self, worker: Worker, target):
        """Put a Detector in front of `worker`'s Gateway: its listener is replaced by one on the
        same address whose connections are sniffed first (before the sidecar is registered).
        Returns the IPv6 twin listener (_listen_ipv6), if any."""
        host, port = worker.address
        factory = self._detector(worker.gateway, target)
        worker.server.close()
        worker.server = await start_server(self.loop, factory, host, port, reuse_port=True,
                                           backlog=4096)
        return await self._listen_ipv6(worker, factory)

    async def _listen_ipv6(self, worker: Worker, factory):
        """With interception, the IPv6 twin of `worker`'s listener (:: for 0.0.0.0, ::1 for
        127.0.0.1): ip6tables redirects a dual-stack pod's IPv6 TCP to the same port there.
        Added to the worker's servers (closed with it); None when the listener has an address
        of its own, or IPv6 is off here (said: IPv6 TCP redirected to it is then refused)."""
        host, port = worker.address
        twin = IPV6_TWINS.get(host)
        if twin is None:
            return None
        try:
            check_free(twin, port)
            server = await start_server(self.loop, factory, twin, port, reuse_port=True,
                                        backlog=4096)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise
            say(f"no IPv6 listener on [{twin}]:{port} ({exc.strerror or exc}): IPv6 TCP "
                f"redirected there is refused", err=True)
            return None
        worker.servers.append(server)
        return server

    def _detector(self, gateway, target, timeout: float | None = None, opaque: bool = False):
        """The protocol factory of an intercepting listener: a Detector before `gateway`
        (waiting `timeout` for the first bytes, the --detect-timeout by default; `opaque`:
        none, the connection is opaque TCP)."""
        from fastmesh.mesh.transparent import Detector
        opts = self.options
        wait = opts.detect_timeout if timeout is None else timeout
        direction = "outbound" if target == self._outbound_target else "inbound"
        stats = self.opaque[direction]
        pairs = self.tcp_pairs[direction]
        caller = self._tcp_caller if direction == "inbound" else None
        return lambda: Detector(gateway, target, self.relays, opts.opaque_ports, wait, stats,
                                opaque, lambda name: _pair(pairs, name), caller)

    def _tcp_caller(self, transport) -> str:
        """The service of an inbound relay's caller, for its counters: its verified SPIFFE
        id's (mTLS); in plaintext the service whose instance is registered at the address it
        connects from (a caller's sidecar dials from its pod's address; as a plaintext HTTP
        call's source is what its request says, this is what its address says, and it
        authorizes nothing); transparent.UNKNOWN when neither tells."""
        from fastmesh.mesh.transparent import UNKNOWN
        if self.tls is None or transport.get_extra_info("sslcontext") is None:
            peer = transport.get_extra_info("peername")
            return self.tcp_callers.get(routable_host(peer[0]) if peer else None, UNKNOWN)
        from fastmesh.mesh.mtls import peer_id
        from fastmesh.mesh.registry import service_of, trust_domain_of
        found = service_of(peer_id(transport.get_extra_info("peercert")),
                           trust_domain_of(self.tls.identity))
        return found or UNKNOWN

    def _learn_hosts(self, view) -> None:
        """What the outbound Detector needs of the view: the hosts the Gateway routes, and the
        instances that take opaque TCP at their address (maybe over mTLS)."""
        from fastmesh.mesh.opaque_mtls import peers
        self.hosts = mesh_hosts(view)
        owners = host_owners(view)
        self.tcp.update(peers(view, owners))
        self.tcp_callers = {host: next(iter(names)) for host, (names, registered) in owners.items()
                            if registered and len(names) == 1}

    def _tcp_allowed(self, peer: str | None) -> bool:
        """The authorization policy's answer for opaque TCP from `peer` (None: plaintext),
        counted with the HTTP decisions of this service; a refusal is logged."""
        from fastmesh.plugins.mesh_authorization import allows_tcp, decisions
        service = self.options.service
        rules = (self.authz or {}).get(service, [])
        if not rules:
            return True
        allowed = allows_tcp(rules, peer)
        decisions(service).count(allowed)
        if not allowed:
            self.opaque["inbound"].refused += 1
            say(f"authorization: opaque TCP from {peer or 'a caller without mTLS'} to "
                f"'{service}' denied (no rule without methods and paths allows it)", err=True)
        return allowed

    def _tcp_allowed_over_tls(self, transport) -> bool:
        from fastmesh.mesh.mtls import peer_id
        return self._tcp_allowed(peer_id(transport.get_extra_info("peercert")))

    def _dialled_opaque_port(self, sock) -> bool:
        """Whether a redirected connection was dialled to one of the --opaque-ports."""
        from fastmesh.mesh.transparent import original_destination
        original = original_destination(sock)
        return original is not None and original[1] in self.options.opaque_ports

    def _inbound_target(self, original, head: bytes, http: bool):
        """None: the inbound Gateway (HTTP for the app's port); else the local port asked for
        (False: opaque TCP the authorization policy refuses to a caller without mTLS)."""
        target = self._inbound_tls_target(original, head, http)
        if target is not None and not self._tcp_allowed(None):
            return False
        return target

    def _inbound_tls_target(self, original, head: bytes, http: bool):
        """As _inbound_target, for a caller whose mTLS identity has been authorized already."""
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
            # once. A request without Host (HTTP/1.0) is routed by the address it was sent to
            # when that is an instance of the mesh. Other hosts go where they were sent.
            if host is None:
                dialled = original[0].lower()
                host = f"[{dialled}]" if ":" in dialled else dialled
            if host in self.hosts or (host and "." not in host and not host.startswith("[")):
                return None
        # TCP sent to an address of the mesh: balanced over the instances there.
        me = self.instance
        return self.tcp.route(original[0], original[1], self.dialer,
                              (me.service, me.host) if me else None,
                              self.options.app_host) or original

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
        self._apply_inbound()

        def build():
            config = self._outbound_config(view)
            if self.options.intercept:      # the whole view's addresses, called or not
                self._learn_hosts(view)
            return config

        if self._swap_plan(self.outbound, build, "outbound"):
            self.changes += 1
            say(f"outbound routes: {len(view)} service(s), "
                f"{sum(map(len, view.values()))} instance(s) (config {self.outbound.version})")

    def _apply_inbound(self) -> None:
        """A route per caller service: swap in a new inbound Plan when the names changed."""
        callers = frozenset(self.registry.view())
        if callers == self.callers or self.inbound is None or self.inbound.stopped:
            return              # (instances come and go far more often than services)
        self.callers = callers
        self._swap_plan(self.inbound, self._inbound_config, "inbound")

    @staticmethod
    def _swap_plan(worker, build, side: str) -> bool:
        """Compile build()'s config beside `worker`'s Plan and switch to it; False when it is
        refused (the old Plan keeps serving) or unchanged."""
        try:
            config = build()
        except ConfigError as exc:            # an instance the loader refuses: keep the old Plan
            say(f"registry view refused, {side} routes unchanged:\n{exc}", err=True)
            return False
        if config.version == worker.version:
            return False
        problem = worker.prepare(config)
        if problem:
            say(problem, err=True)
            return False
        worker.commit(config.version)
        return True

    def _outbound_config(self, view):
        return outbound_config(view, self.options.policy, self._tls_files(), self.outbound_policy,
                               self.destinations.chosen(view))

    # -- destinations held on demand (fastmesh.mesh.destinations) -------------------------------
    def destination_for(self, host: str | None) -> str | None:
        """The registry service a call to `host` is for, when the sidecar could route it."""
        return destination_of(self.registry.view(), host) if self.registry else None

    def activate(self, name: str) -> bool:
        """Compile `name` into the outbound Plan now; True when the Plan routes it."""
        if self.outbound is None or self.outbound.stopped or not self.destinations.lazy:
            return False
        if self.destinations.add(name):
            self._apply()
        return any(t.name == name for t in self.outbound.gateway.plan.targets)

    async def _sweep_destinations(self) -> None:
        every = self.destinations.idle / SWEEPS_PER_IDLE
        while True:
            await asyncio.sleep(every)
            if self.outbound is None or self.outbound.stopped:
                return
            requests = {}
            for route, _service, acc in self.outbound.route_stats.snapshot(
                    self.outbound.gateway.plan):
                requests[route] = requests.get(route, 0) + sum(acc.get("counts", {}).values())
            dropped = self.destinations.sweep(requests)
            if dropped:
                say(f"outbound destinations idle for {self.destinations.idle:g}s, dropped: "
                    f"{', '.join(dropped)}")
                self._apply()

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
            "held_destinations": self.destinations.status(),
            "registry": {k: v for k, v in self.registry.state().items() if k != "services"}
            if self.registry else None,
            "mtls": self.tls.status() if self.tls is not None else {"mode": "disabled"},
            "opaque_tcp": self.opaque_status(),
            "authorization": self.authz_status(),
        }

    def opaque_status(self) -> dict | None:
        """Opaque TCP relayed per direction (interception only; None without it)."""
        if not self.opaque:
            return None
        from fastmesh.mesh.transparent import relay_counts
        found = {side: relay_counts(stats, self.relays) for side, stats in self.opaque.items()}
        for side, key in (("outbound", "by_destination"), ("inbound", "by_source")):
            found[side][key] = {name: relay_counts(stats, self.relays, pair=True)
                                for name, stats in sorted(self.tcp_pairs[side].items())}
        found["outbound"]["balancing"] = self.tcp.status()
        return found

    def authz_status(self) -> dict:
        from fastmesh.plugins.mesh_authorization import decisions
        opts = self.options
        rules = (self.authz or {}).get(opts.service, [])
        return {"file": opts.authz_file, "rules": len(rules), "enforced": bool(rules),
                "loads": self.authz_loads, "error": self.authz_error,
                "decisions": decisions(opts.service).as_dict()}

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
        if self.authz_watch is not None:
            self.authz_watch.cancel()
        if self.destinations_sweep is not None:
            self.destinations_sweep.cancel()
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
        if self.tls is not None:
            await self.tls.stop()


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
          f"({len(sidecar.registry.view())} service(s)); mTLS "
          f"{sidecar.tls.mode + ' as ' + str(sidecar.tls.identity) if sidecar.tls else 'disabled'}"
          f"; 1 worker, pid {os.getpid()}", flush=True)
    await stop.wait()
    await sidecar.stop(options.drain_timeout)
    print("fastmesh sidecar: stopped", flush=True)
    return 0


def run_sidecar(options: SidecarOptions) -> int:
    import uvloop
    return uvloop.run(serve_sidecar(options))
