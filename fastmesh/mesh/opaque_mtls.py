"""Opaque TCP between sidecars over mTLS (interception): which calls are wrapped, and how the
inbound side tells them from HTTP.

Without this, a relayed TCP connection (not HTTP, or HTTP for a host outside the mesh, sent to
a pod's address) crossed the network in plaintext and a strict destination refused it.

- Who takes it: an intercepting sidecar publishes TCP_KEY in its instance metadata (its
  --opaque-ports, comma-separated, maybe none): TCP sent to that instance's address reaches its
  inbound listener. With MTLS_KEY (its mode) that says whether to wrap (`wraps`): always when
  it is strict; when it is permissive, unless the port is one of its opaque ports (served as
  plaintext without a peek there, so a server-first protocol never waits).
- The caller's side: the outbound relay connects with TLS (fastmesh._core.tls_transport),
  presents this workload's certificate, offers ALPN OPAQUE_ALPN and accepts only the SPIFFE id
  of the service that owns the address (`Dialer`: the peer is checked before a byte of the
  server reaches the app). Rotation: the context comes from fastmesh.upstream_tls, so its
  refresh() reloads it in place as for the HTTP pools.
- The destination's side: the mTLS accept path (fastmesh.mesh.mtls) hands the handshaken
  connection to `Dispatch`: ALPN OPAQUE_ALPN is opaque TCP, authorized by identity
  (mesh_authorization.allows_tcp) and relayed by a Detector to the port the caller dialled
  (SO_ORIGINAL_DST); anything else is HTTP for the inbound Gateway, as before.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from fastmesh._core.balancer import Balancer
from fastmesh.mesh.routes import (
    MTLS_KEY, MeshPolicy, MeshTLSFiles, host_owners, routable_host, zone_priorities,
)

log = logging.getLogger("fastmesh")

OPAQUE_ALPN = "fastmesh-tcp"        # offered by the caller's relay; the inbound accepts it too
TCP_KEY = "fastmesh.tcp"            # instance metadata: intercepts inbound; its opaque ports


@dataclass(frozen=True)
class Peer:
    """An instance that takes TCP at its address through its sidecar."""

    service: str
    host: str                       # where it is dialled: its registered address's host
    mode: str                       # its inbound mTLS mode (strict, permissive, disabled)
    opaque_ports: frozenset[int]
    weight: int = 100               # the registry's, as for HTTP
    zone: str = ""


def tcp_metadata(opaque_ports: frozenset[int]) -> str:
    return ",".join(str(p) for p in sorted(opaque_ports))


def _ports(text: str) -> frozenset[int]:
    return frozenset(int(p) for p in text.split(",") if p.strip().isdigit())


def peers(view, owners: dict | None = None) -> dict[str, tuple[Peer, ...]]:
    """Address -> the Peers that take TCP sent to it: the instances of the registry view that
    intercept inbound (and are registered at a routable address), under each of their
    `Instance.hosts` that names their service only (routes.host_owners). An instance's own
    address has one; a service's virtual address, which all its instances register
    (--advertise-also), has each of them. An address registered by an instance is its alone;
    one that two services claim is left out (its owner, hence its identity, is unknown).
    `owners`: host_owners(view), when the caller has it already."""
    owners = host_owners(view) if owners is None else owners
    found: dict[str, list[Peer]] = {}
    for name, instances in view.items():
        for instance in instances:
            meta = dict(instance.metadata)
            own = routable_host(instance.host)
            if TCP_KEY not in meta or own is None:
                continue
            peer = Peer(name, instance.host, meta.get(MTLS_KEY, "disabled"),
                        _ports(meta[TCP_KEY]), instance.weight, instance.zone)
            for address in dict.fromkeys(filter(None, map(routable_host, instance.hosts))):
                names, registered = owners[address]
                if names == {name} and (address == own or not registered):
                    found.setdefault(address, []).append(peer)
    return {address: tuple(at) for address, at in found.items()}


def wraps(peer: Peer, port: int) -> bool:
    """Whether a relayed connection to `peer` on `port` goes over mTLS (module doc)."""
    return peer.mode == "strict" or (peer.mode == "permissive" and port not in peer.opaque_ports)


@dataclass(frozen=True)
class Balanced:
    """Opaque TCP for an address of the mesh, as fastmesh.mesh.transparent.Detector relays it
    (fastmesh.streams.Relay.connect_balanced): the address's balancer, the service there, and
    `dial(target)`, the (host, port, tls or None) to connect to for a target it picks."""

    balancer: Balancer
    service: str
    dial: Callable


class TcpBalancers:
    """Opaque TCP to an address of the mesh goes where the balancer of that address sends it,
    as the streams of the gateway do: one Balancer per address over the Peers there (a
    service's virtual address has all its instances; an instance's own address, one), with
    the registry's weights, this zone's instances first (policy.local_zone), and passive
    ejection: policy.eject_failures failed connects in a row take an instance out for
    policy.ejection_time. Least connections, not the HTTP routes' p2c-ewma: opaque bytes have
    no response time to learn from, only connect times, and a TCP connection's cost is that it
    stays open, which least connections evens out (equal counts take turns).

    Without mTLS here, strict peers are left out while another one takes plaintext (they
    would refuse it). `update` rebuilds the balancers of the addresses whose Peers changed;
    each new one carries over the health of the instances it keeps (Balancer.inherit)."""

    def __init__(self, policy: MeshPolicy, mtls: bool):
        self.policy = policy
        self.mtls = mtls
        self.at: dict[str, tuple[Balancer, tuple[Peer, ...]]] = {}

    def update(self, table: dict[str, tuple[Peer, ...]]) -> None:
        found = {}
        for address, at in table.items():
            if not self.mtls:
                at = tuple(peer for peer in at if peer.mode != "strict") or at
            at = tuple({peer.host: peer for peer in at}.values())   # one target per host
            old = self.at.get(address)
            if old is not None and old[1] == at:
                found[address] = old
                continue
            policy = self.policy
            balancer = Balancer(
                address, [(peer.host, 0, peer.weight, tier) for peer, tier
                          in zip(at, zone_priorities(at, policy.local_zone))],
                "least-connections", passive_failures=policy.eject_failures,
                passive_timeouts=policy.eject_timeouts, ejection_time=policy.ejection_time)
            if old is not None:
                balancer.inherit(old[0])
            found[address] = (balancer, at)
        self.at = found

    def status(self) -> dict:
        """Address -> its service and instances as its balancer sees them, for the addresses
        with more than one (a service's virtual address) or with one that is not healthy:
        open connections, failed connects, ejections and state (the sidecar's /status)."""
        found = {}
        for address, (balancer, at) in sorted(self.at.items()):
            targets = balancer.targets
            if len(targets) < 2 and all(t.state_name == "healthy" for t in targets):
                continue
            found[address] = {"service": at[0].service, "instances": [
                {"host": t.host, "weight": t.weight, "priority": t.priority,
                 "state": t.state_name, "open": t.in_flight, "failures": t.failures,
                 "ejections": t.ejections} for t in targets]}
        return found

    def route(self, host: str, port: int, dialer: "Dialer | None",
              own: tuple[str, str] | None, app_host: str) -> Balanced | None:
        """TCP sent to `host`:`port` (an original destination), or None when no Peer takes
        it there. Each target is dialled over mTLS where the peer takes it (`wraps`) and this
        sidecar has mTLS (`dialer`). The peer that is this pod's own instance (`own`: its
        service and host) is `app_host`:port, as its inbound side would relay it: the sidecar's
        own connections are not redirected, so a dial of its pod address would reach the app
        directly, past TLS."""
        found = lookup(self.at, host)
        if not found:
            return None
        balancer, at = found

        def dial(target) -> tuple:
            peer = at[target.index]
            if own == (peer.service, peer.host):
                return app_host, port, None
            if dialer is not None and wraps(peer, port):
                return peer.host, port, dialer.dial(peer.service)
            return peer.host, port, None

        return Balanced(balancer, at[0].service, dial)


def lookup(table: dict[str, tuple], host: str) -> tuple:
    """What `table` (by routable address: `peers`, TcpBalancers.at) has for `host`, an
    original destination as the kernel gives it; () when nothing."""
    address = routable_host(host)
    return table.get(address, ()) if address is not None else ()


class IdentityRejected(OSError):
    """The destination's certificate is valid but names another service."""


class Dialer:
    """TLS settings of the outbound relays: one client context (this workload's certificate,
    the mesh root, ALPN OPAQUE_ALPN), one identity check per destination service."""

    def __init__(self, files: MeshTLSFiles):
        self.files = files
        self.dials: dict[str, tuple] = {}

    def dial(self, service: str) -> tuple:
        """What fastmesh.streams.Relay.connect takes as `tls` for a destination of `service`
        (made once per service: refresh() rotates the context in place)."""
        found = self.dials.get(service)
        if found is None:
            from fastmesh import upstream_tls
            f = self.files
            identity = f"spiffe://{f.trust_domain}/svc/{service}"
            ctx = upstream_tls.context(upstream_tls.UpstreamTLS(
                True, f.ca, f.cert, f.key, service, identity, (OPAQUE_ALPN,)))
            found = self.dials[service] = (ctx, upstream_tls.peer_checker(identity))
        return found


class Gate(asyncio.Protocol):
    """The server side's protocol while its TLS handshake is checked: the identity is looked at
    before the real protocol (`side`) sees the connection; a wrong one aborts it."""

    def __init__(self, side: asyncio.Protocol, check: Callable):
        self.side = side
        self.check = check
        self.problem: str | None = None

    def connection_made(self, transport) -> None:
        self.problem = self.check(transport)
        if self.problem is not None:
            transport.abort()
            return
        transport.set_protocol(self.side)
        self.side.connection_made(transport)

    def connection_lost(self, exc) -> None:
        pass                        # only reached for a rejected peer: `connect` raises


async def connect(loop, side: asyncio.Protocol, host: str, port: int, tls: tuple,
                  timeout: float):
    """Connect `side` over mTLS (`tls`: Dialer.dial's answer); IdentityRejected, ssl.SSLError,
    OSError or TimeoutError when it cannot."""
    from fastmesh._core.tls_transport import connect as tls_connect
    ctx, check = tls
    gate = Gate(side, check)
    transport = await tls_connect(loop, gate, host, port, ctx, None, timeout)
    if gate.problem is not None:
        raise IdentityRejected(f"identity rejected: {gate.problem}")
    return transport


class Dispatch(asyncio.Protocol):
    """The inbound protocol of a connection whose mTLS handshake is done: opaque TCP (ALPN
    OPAQUE_ALPN) to `relay()` after authorization, anything else to `http()` (the Gateway)."""

    def __init__(self, http: Callable, relay: Callable, authorize: Callable):
        self.http = http
        self.relay = relay
        self.authorize = authorize

    def connection_made(self, transport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        opaque = sslobj is not None and sslobj.selected_alpn_protocol() == OPAQUE_ALPN
        if opaque and not self.authorize(transport):
            transport.abort()
            return
        protocol = self.relay() if opaque else self.http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
