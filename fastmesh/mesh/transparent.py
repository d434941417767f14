"""The sidecar's side of transparent interception: where a connection was going, and what it is.

With `fastmesh mesh-init` rules, the app's connections arrive at the outbound listener and other
pods' at the inbound one, redirected by iptables. A `Detector` takes each new connection first:

- it reads the original destination (SO_ORIGINAL_DST: the address before the REDIRECT);
- it waits for the first bytes (at most the detect timeout, DETECT_TIMEOUT by default: a
  server-first protocol sends nothing), except on the opaque ports (`--opaque-ports`: declared
  not HTTP, relayed at once, so a server-first protocol such as MySQL or SMTP never waits);
- HTTP for the mesh goes to the listener's Gateway (the Cython data path): the transport is
  handed over with the bytes read so far, so the Gateway serves it exactly as if it had
  accepted it; nothing in Python stays on the request path afterwards;
- anything else is relayed as opaque TCP to the original destination (outbound: or, sent to an
  address an instance registered, to one of the instances that registered it, as the
  address's balancer picks: opaque_mtls.TcpBalancers) or to the
  app's port that was asked for (inbound), by the project's one TCP relay (fastmesh.streams.Relay:
  flow control and half-close as for `streams`; no idle timeout here), counted per side
  (`relay_counts`: the sidecar's /status and /metrics). The outbound relay to a sidecar with
  mTLS is wrapped in it (fastmesh.mesh.opaque_mtls); the route may also refuse a connection
  (the inbound side's authorization of opaque TCP).

On the outbound side, "HTTP for the mesh" means that the Host header (or the absolute-form
target) names a service or an instance host of the registry view (the sidecar decides, see
Sidecar._outbound_target); other HTTP goes through unchanged to where it was going (and to the
Gateway's "unknown service" 503 when that destination cannot be reached).
"""
from __future__ import annotations

import asyncio
import re
import socket
import struct
import sys
from typing import Callable

from fastmesh.streams import CONNECTED, GONE, NO_TARGET, Relay, close_all

SO_ORIGINAL_DST = 80                # linux/netfilter_ipv4.h, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80           # linux/netfilter_ipv6/ip6_tables.h, level SOL_IPV6
DETECT_TIMEOUT = 0.5                # no first byte within this: a server-first protocol, opaque
DETECT_MAX = 16384                  # look at most this far for the end of the request head
CONNECT_TIMEOUT = 2.0
EXTERNAL = "(external)"         # the destination of a relay to an address outside the mesh
UNKNOWN = "(unknown)"           # the caller of an inbound relay without a verified identity

_connecting: set = set()            # relays waiting for their upstream connection

_REQUEST_LINE = re.compile(rb"[A-Z]{3,20} ")
_HOST = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)
_ABSOLUTE = re.compile(rb"[A-Z]+ https?://([^/?# ]+)")


def original_destination(sock) -> tuple[str, int] | None:
    """Where the connection on `sock` was addressed before iptables (IPv4: a sockaddr_in) or
    ip6tables (IPv6: a sockaddr_in6) redirected it; None when it was not redirected (or the
    kernel does not know)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            address = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            address = socket.inet_ntoa(raw[4:8])
    except OSError:
        return None
    port, = struct.unpack_from("!H", raw, 2)
    return address, port


def looks_like_http(data: bytes) -> bool | None:
    """True/False, or None when too few bytes arrived to tell."""
    match = _REQUEST_LINE.match(data)
    if match:
        return not data.startswith(b"PRI ")          # HTTP/2 prior knowledge: not ours
    if len(data) >= 22 or not data.isalpha() or not data.isupper():
        return False
    return None                                       # "GE", "OPTIO": wait for more


def request_host(head: bytes) -> str | None:
    """The host the first request names (absolute-form target, else Host), without the port."""
    match = _ABSOLUTE.match(head) or _HOST.search(head)
    if match is None:
        return None
    text = match.group(1).decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[:text.find("]") + 1] if "]" in text else text
    return text.partition(":")[0].rstrip(".") or None


class Detector(asyncio.Protocol):
    """The first protocol of every connection on an intercepting listener; see the module doc.

    `route(original_destination, first_bytes, is_http)` decides: None to hand the connection
    to `gateway`, False to close it (refused), else the (host, port) to relay it to, or
    (host, port, tls) to relay it over mTLS (fastmesh.streams.Relay.connect's `tls`; None:
    plaintext), or (host, port, tls, service) naming the mesh service it is for, or an
    opaque_mtls.Balanced: a mesh address's instances, as its balancer picks them. `pairs`: the
    StreamStats that counts the relays with a service: outbound the destination's (EXTERNAL:
    not one of the mesh), inbound the caller's, which `caller` tells from the connection
    (UNKNOWN: neither a verified identity nor a registered address).
    `opaque`: known to be opaque TCP already (the mTLS inbound's ALPN said so): no sniffing.
    """

    def __init__(self, gateway, route: Callable, relays: set,
                 opaque_ports: frozenset = frozenset(), timeout: float = DETECT_TIMEOUT,
                 stats=None, opaque: bool = False, pairs: Callable | None = None,
                 caller: Callable | None = None):
        self.gateway = gateway
        self.stats = stats              # a fastmesh.streams.StreamStats: this side's relays
        self.pairs = pairs              # the other end's service -> its StreamStats
        self.caller = caller            # inbound: transport -> the caller's service
        self.route = route
        self.relays = relays
        self.opaque_ports = opaque_ports
        self.timeout = timeout
        self.transport = None
        self.buffer = bytearray()
        self.original = None
        self.timer = None
        self.eof = False
        self.decided = False
        self.opaque = opaque

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.original = original_destination(transport.get_extra_info("socket"))
        if self.opaque or self.original is not None and self.original[1] in self.opaque_ports:
            self._decide(False)             # declared opaque: no waiting, no sniffing
            return
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        http = looks_like_http(bytes(self.buffer[:24]))
        if http is None:
            return
        if http and b"\r\n\r\n" not in self.buffer and len(self.buffer) < DETECT_MAX:
            return                      # the Host header may be in the next segment
        self._decide(http)

    def eof_received(self):
        self.eof = True
        self._decide(looks_like_http(bytes(self.buffer[:24])) is True)
        return True

    def _timed_out(self) -> None:
        """Nothing (a server-first protocol), or a request head still incomplete: decide now."""
        self.timer = None
        self._decide(looks_like_http(bytes(self.buffer[:24])) is True)

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.decided = True

    def _decide(self, http: bool) -> None:
        if self.decided:
            return
        self.decided = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        target = self.route(self.original, bytes(self.buffer), http)
        if target is None:
            self._to_gateway()
        elif target is False:
            self.transport.abort()
        else:
            self.transport.pause_reading()
            task = asyncio.get_running_loop().create_task(self._relay(target, http))
            _connecting.add(task)                 # the loop keeps only a weak reference
            task.add_done_callback(_connecting.discard)

    def _to_gateway(self) -> None:
        transport = self.transport
        protocol = self.gateway.protocol_factory()
        if self.original is not None:
            # A request without Host (HTTP/1.0) is routed by the address it was sent to.
            host, port = self.original
            shown = f"[{host}]" if ":" in host else host
            protocol.set_default_host(f"{shown}:{port}".encode())
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer and not transport.is_closing():
            protocol.data_received(bytes(self.buffer))
        if self.eof and not transport.is_closing():
            protocol.eof_received()

    async def _relay(self, target, http: bool) -> None:
        """Relay to `target`: (host, port[, tls[, service]]), or a mesh address's instances
        (opaque_mtls.Balanced: the one its balancer picks, another after a failed connect).
        When none connects, the Gateway answers HTTP (503 naming the service) and anything
        else is aborted."""
        downstream = self.transport
        relay = Relay(downstream, self.relays, self.stats)
        balanced = not isinstance(target, tuple)
        if self.pairs is not None:
            relay.pair = self.pairs(
                self.caller(downstream) if self.caller is not None
                else target.service if balanced else target[3] if len(target) > 3 else EXTERNAL)
        counted = [stats for stats in (self.stats, relay.pair) if stats is not None]

        def failed(host: str, port: int, exc: BaseException) -> None:
            for stats in counted:
                stats.connect_failures += 1
            reason = getattr(exc, "strerror", None) or str(exc) or "connect timed out"
            print(f"fastmesh sidecar: cannot relay to {host}:{port}: {reason}",
                  file=sys.stderr, flush=True)

        if balanced:
            outcome = await relay.connect_balanced(target.balancer, b"", CONNECT_TIMEOUT,
                                                   target.dial, failed)
        else:
            outcome = await relay.connect_to(target[0], target[1], CONNECT_TIMEOUT,
                                             target[2] if len(target) > 2 else None, failed)
        if outcome == GONE or outcome != CONNECTED and downstream.is_closing():
            return
        if outcome == NO_TARGET:        # every instance there ejected (or of weight 0)
            for stats in counted:
                stats.no_target += 1
            print(f"fastmesh sidecar: no instance of {target.service} to relay to at "
                  f"{self.original[0]} (all ejected after failed connects, or weight 0)",
                  file=sys.stderr, flush=True)
        if outcome != CONNECTED:
            if http:                    # let the Gateway answer (503 naming the service)
                downstream.resume_reading()
                self._to_gateway()
            else:
                downstream.abort()
            return
        if downstream.is_closing():
            relay.server.transport.close()
            return
        secure = relay.secure or downstream.get_extra_info("sslcontext") is not None
        for stats in counted:
            stats.accepted += 1
            stats.mtls += secure
        relay.start(bytes(self.buffer), self.eof)


def relay_counts(stats, relays: set, pair: bool = False) -> dict:
    """One side's opaque TCP (or, `pair`, one destination's: `stats` is a Relay.pair):
    connections relayed (and open now, and over mTLS), failed connects, none relayed for want
    of an instance (all ejected), refused by authorization, and bytes each way, those of open
    relays included."""
    live = [r for r in relays if (r.pair if pair else r.stats) is stats]
    return {"relayed": stats.accepted, "active": len(live), "mtls": stats.mtls,
            "connect_failures": stats.connect_failures, "no_target": stats.no_target,
            "refused": stats.refused,
            "bytes_to_destination": stats.bytes_in + sum(r.client.received for r in live),
            "bytes_from_destination": stats.bytes_out + sum(r.server.received for r in live)}


def close_relays(relays: set) -> None:
    """Close every open relay (the sidecar's shutdown)."""
    close_all(relays)
