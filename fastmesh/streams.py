"""L4 proxying: the `streams` of the config (plain TCP, TLS passthrough by SNI) and the one TCP
relay of the project (also used by the sidecar for opaque TCP, fastmesh.mesh.transparent).

The relay (`Relay`, two `Side` protocols) is the whole hot path of L4. Per chunk it does one
addition and one write: what one side reads, the other side's transport writes. Around that:
- flow control: when a transport's write buffer goes above HIGH_WATER, its protocol's
  pause_writing stops reading the other side until it drains (resume_writing);
- half-close: an EOF one way is passed on (write_eof) and the other direction carries on until it
  ends too; then both are closed. A connection lost (reset, closed) on one side closes the other
  once its buffered bytes are written;
- idle timeout without a timer per chunk: one timer per relay looks at the byte counts every
  idle_timeout / IDLE_CHECKS; when they have not moved for idle_timeout, both sides are aborted
  (so a relay is closed after between idle_timeout and idle_timeout * (1 + 1/IDLE_CHECKS) of
  silence).

A stream (`StreamListener`, one per stream per worker, SO_REUSEPORT like the HTTP listener) takes
each connection first with an `Accepted` protocol: for plain TCP it connects at once; for TLS
passthrough it reads until a whole ClientHello arrived (fastmesh.sni; at most hello_timeout and
sni.MAX_HELLO), picks the destination by its SNI (exact name, then a one-label wildcard, then the
stream's `default`; otherwise the connection is closed; non-TLS bytes are closed at once), and
replays the buffered ClientHello to the backend, which terminates TLS itself.

Balancing and health reuse the gateway's: one fastmesh._core.balancer.Balancer per upstream that
streams use (`Balancer.from_upstream`: algorithm, passive ejection, circuit breaker) and a
fastmesh.health.HealthChecker for the upstreams' active checks (HTTP probes, as for services).
One connection is one balancer "request": `begin` at the pick; a failed or timed-out connect is
`end(CONNECT_FAIL)` and the next attempt goes to another target (at most MAX_CONNECT_TRIES, never
more than the upstream has); a connect that succeeds is reported at once (`end(RESPONSE)` with the
connect time, so a half-open target recovers and the EWMA measures connect latency) and the
connection is counted in flight again until it closes (least-connections balances open
connections; the target's `requests` count therefore grows by two per connection). Consistent
hashing hashes the client's IP address.

`StreamSet` is the worker's view: `start(config)`; `prepare(config)` binds the sockets of new
listeners (so a busy port refuses the reload), `commit(version)` starts them, closes removed ones
and their connections, and gives kept ones (same name and listen address) the new settings
without touching their connections; `abort(version)`; `stop()`; `snapshot()`, the per-stream
counters of the worker's stats (`merge_snapshots` sums them over workers).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

from fastmesh._core.balancer import ABORTED, CONNECT_FAIL, RESPONSE, Balancer
from fastmesh.config.streams import Destination, Stream
from fastmesh.sni import HELLO, MORE, read_hello

log = logging.getLogger("fastmesh.streams")

HIGH_WATER = 256 * 1024             # a side pauses the other side's reading above this
IDLE_CHECKS = 4                     # idle timer looks this many times per idle_timeout
MAX_CONNECT_TRIES = 3               # targets tried for one connection, at most
LISTEN_BACKLOG = 4096

# What Relay.connect_balanced came to.
CONNECTED = "connected"
NO_TARGET = "no target"             # the balancer had none to give (all ejected, breaker open)
FAILED = "failed"                   # every target tried refused or timed out
GONE = "gone"                       # the client left first


# --- the relay --------------------------------------------------------------------------------

class Side(asyncio.Protocol):
    """One side of a relay: what its transport reads, `peer` (the other transport) writes."""

    __slots__ = ("relay", "transport", "peer", "received", "eof", "lost")

    def __init__(self, relay: "Relay", peer):
        self.relay = relay
        self.transport = None
        self.peer = peer
        self.received = 0
        self.eof = False
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.peer.write(data)

    def eof_received(self):
        self.eof = True
        return self.relay.half_closed(self)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.relay.side_lost(self)

    # our transport's buffer is full: stop reading the side that fills it until it drains
    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()


class Relay:
    """One proxied connection: the client's side and the server's, counters, the idle timer.

    Build it with the accepted transport, `connect` it to a server, then `start` it (which moves
    the client's transport over to the relay). `owner` (a set) holds it while it runs.
    """

    __slots__ = ("loop", "owner", "stats", "pair", "client", "server", "idle_timeout", "timer",
                 "seen", "quiet_since", "balancer", "target", "done", "started", "secure")

    def __init__(self, downstream, owner: set, stats: "StreamStats | None" = None,
                 idle_timeout: float | None = None):
        self.loop = asyncio.get_running_loop()
        self.owner = owner
        self.stats = stats
        self.client = Side(self, None)            # its peer: the server's transport, once known
        self.client.transport = downstream
        self.server = Side(self, downstream)  # ready before connecting: a server may speak first
        self.idle_timeout = idle_timeout
        self.timer = None
        self.seen = 0
        self.quiet_since = 0.0
        self.balancer = None
        self.target = None
        self.done = False
        self.started = False
        self.secure = False         # the server side is over mTLS (connect's `tls`)
        self.pair = None            # a second StreamStats that counts it (the sidecar's per pair)

    async def connect(self, host: str, port: int, timeout: float, tls: tuple | None = None) -> None:
        """Connect the server side; OSError or TimeoutError when it cannot. `tls`: over mTLS
        with these settings (fastmesh.mesh.opaque_mtls: the sidecars' opaque TCP)."""
        async with asyncio.timeout(timeout):
            if tls is None:
                await self.loop.create_connection(lambda: self.server, host, port)
            else:
                from fastmesh.mesh.opaque_mtls import connect
                await connect(self.loop, self.server, host, port, tls, timeout)
        self.secure = tls is not None

    async def connect_to(self, host: str, port: int, timeout: float, tls: tuple | None,
                         failed: Callable) -> str:
        """`connect` to one given server: CONNECTED, FAILED (`failed(host, port, exc)` hears
        why) or GONE (the client left first: no connect)."""
        if self.client.transport.is_closing():
            return GONE
        try:
            await self.connect(host, port, timeout, tls)
        except (OSError, TimeoutError) as exc:
            failed(host, port, exc)
            return FAILED
        return CONNECTED

    async def connect_balanced(self, balancer: Balancer, key: bytes, timeout: float,
                               dial: Callable, failed: Callable) -> str:
        """Connect the server side to a target that `balancer` picks, another one after a
        failure (MAX_CONNECT_TRIES at most, never more than it has); CONNECTED, NO_TARGET,
        FAILED or GONE. `dial(target)`: the (host, port, tls) to connect to for it;
        `failed(host, port, exc)` hears of each failed connect. The balancer learns each
        outcome (module doc): a failed connect counts towards ejecting the target, a connection
        that is up is in flight until the relay releases it."""
        tries = min(MAX_CONNECT_TRIES, len(balancer.targets))
        target = None
        for _ in range(tries):
            if self.client.transport.is_closing():
                return GONE
            target = None if not balancer.admit_py() or not balancer.admit_connection_py() \
                else balancer.pick_py(key, target)
            if target is None:
                return NO_TARGET
            host, port, tls = dial(target)
            balancer.begin_py(target)
            balancer.pending_begin_py()
            started = time.monotonic_ns()
            try:
                await self.connect(host, port, timeout, tls)
            except (OSError, TimeoutError) as exc:
                balancer.pending_end_py()
                balancer.end_py(target, time.monotonic_ns() - started, CONNECT_FAIL, 0)
                failed(host, port, exc)
                continue
            except asyncio.CancelledError:
                balancer.pending_end_py()
                balancer.end_py(target, 0, ABORTED, 0)
                raise
            balancer.pending_end_py()
            balancer.end_py(target, time.monotonic_ns() - started, RESPONSE, 200)
            balancer.begin_py(target)             # in flight again while the connection lives
            balancer.conn_opened_py()
            self.balancer, self.target = balancer, target
            if self.done:                         # the server closed already
                self.release()
            return CONNECTED
        return FAILED

    def start(self, initial: bytes = b"", eof: bool = False) -> None:
        """Relay from now on: the client's transport gets its Side; `initial` (bytes read before
        the relay existed) is sent first; `eof`: the client has already finished sending."""
        downstream, upstream = self.client.transport, self.server.transport
        self.started = True
        self.owner.add(self)
        self.client.peer = upstream
        downstream.set_protocol(self.client)
        self.client.connection_made(downstream)
        if initial:
            self.client.received += len(initial)
            upstream.write(initial)
        if self.idle_timeout:
            self.quiet_since = self.loop.time()
            self.timer = self.loop.call_later(self.idle_timeout / IDLE_CHECKS, self._check_idle)
        if eof:
            self.client.eof_received()
        elif not downstream.is_closing():
            downstream.resume_reading()

    def half_closed(self, side: Side) -> bool:
        """`side` read an EOF: pass it on; both ways done: close. True keeps `side` writable."""
        other = self.server if side is self.client else self.client
        peer = side.peer
        if other.eof or peer is None or peer.is_closing() or not peer.can_write_eof():
            self.close()
            return False
        peer.write_eof()
        return True

    def side_lost(self, side: Side) -> None:
        other = self.server if side is self.client else self.client
        if other.transport is not None and not other.transport.is_closing():
            other.transport.close()              # after what is buffered for it is written
        if other.lost or other.transport is None or not self.started:
            self._finish()

    def close(self) -> None:
        """Close both sides once their buffered bytes are written."""
        for side in (self.client, self.server):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def abort(self) -> None:
        for side in (self.client, self.server):
            if side.transport is not None:
                side.transport.abort()

    def _check_idle(self) -> None:
        now = self.loop.time()
        moved = self.client.received + self.server.received
        if moved != self.seen:
            self.seen = moved
            self.quiet_since = now
        elif now - self.quiet_since >= self.idle_timeout:
            self.timer = None
            if self.stats is not None:
                self.stats.idle_closed += 1
            self.abort()
            return
        self.timer = self.loop.call_later(self.idle_timeout / IDLE_CHECKS, self._check_idle)

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.owner.discard(self)
        for stats in (self.stats, self.pair):
            if stats is not None:
                stats.bytes_in += self.client.received
                stats.bytes_out += self.server.received
        self.release()

    def release(self) -> None:
        """The connection to the target is over: in flight no more (no health verdict)."""
        if self.balancer is not None:
            self.balancer.end_py(self.target, 0, ABORTED, 0)
            self.balancer.conn_closed_py()
            self.balancer = None


def close_all(relays: set) -> None:
    for relay in list(relays):
        relay.close()


# --- streams ----------------------------------------------------------------------------------

class StreamStats:
    """Counters of one stream in one worker (kept across reloads while the stream keeps its
    listener). Bytes are counted when a connection ends (see StreamListener.snapshot)."""

    __slots__ = ("accepted", "connect_failures", "no_target", "refused", "idle_closed",
                 "bytes_in", "bytes_out", "mtls")

    def __init__(self):
        self.accepted = 0               # client connections accepted
        self.connect_failures = 0       # connect attempts that failed or timed out
        self.no_target = 0              # no healthy target, or the circuit breaker said no
        self.refused = 0                # passthrough: not TLS, SNI without a route, hello too slow
        self.idle_closed = 0
        self.bytes_in = 0               # client -> server
        self.bytes_out = 0              # server -> client
        self.mtls = 0                   # the sidecar's opaque TCP: relayed with mTLS on one side


class Accepted(asyncio.Protocol):
    """The first protocol of a stream connection: decide where it goes, connect, hand over."""

    __slots__ = ("listener", "transport", "buffer", "timer", "eof", "decided")

    def __init__(self, listener: "StreamListener"):
        self.listener = listener
        self.transport = None
        self.buffer = None
        self.timer = None
        self.eof = False
        self.decided = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        listener = self.listener
        listener.stats.accepted += 1
        stream = listener.stream
        self.buffer = bytearray()
        if not stream.tls_passthrough:
            transport.pause_reading()
            self.decided = True
            listener.connect(self, stream.destination)
            return
        self.timer = listener.loop.call_later(stream.hello_timeout, self._hello_timed_out)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.decided:            # connecting (bytes read before a pause took effect): kept
            self.transport.pause_reading()
            return
        status, name = read_hello(bytes(self.buffer))
        if status == MORE:
            return
        destination = self.listener.route(name) if status == HELLO else None
        if destination is None:
            self._refuse()
            return
        self._stop_timer()
        self.decided = True
        self.transport.pause_reading()
        self.listener.connect(self, destination)

    def eof_received(self):
        self.eof = True
        if not self.decided:
            self._refuse()
            return False
        return True                 # connecting: the relay passes the EOF on once it runs

    def connection_lost(self, exc) -> None:
        self._stop_timer()
        self.decided = True

    def _hello_timed_out(self) -> None:
        self.timer = None
        self._refuse()

    def _refuse(self) -> None:
        if self.decided:
            return
        self.decided = True
        self._stop_timer()
        self.listener.stats.refused += 1
        self.transport.abort()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class StreamListener:
    """One stream in one worker: its listening socket, settings, SNI table and connections."""

    def __init__(self, loop, stream: Stream, sock: socket.socket):
        self.loop = loop
        self.stream = stream
        self.sock = sock                          # bound; listening once started
        self.server = None
        self.balancers: dict[str, Balancer] = {}
        self.exact: dict[str, Destination] = {}
        self.wildcard: dict[str, Destination] = {}
        self.stats = StreamStats()
        self.relays: set = set()
        self.connecting: set = set()              # connect tasks (the loop keeps weak references)
        self.configure(stream, {})

    def configure(self, stream: Stream, balancers: dict) -> None:
        """New settings for new connections; open ones keep what they were given."""
        self.stream = stream
        self.balancers = balancers
        exact, wildcard = {}, {}
        for route in stream.tls_passthrough:
            for sni in route.snis:
                if sni.startswith("*."):
                    wildcard[sni[2:]] = route.destination
                else:
                    exact[sni] = route.destination
        self.exact, self.wildcard = exact, wildcard

    async def start(self) -> None:
        self.sock.listen(LISTEN_BACKLOG)
        self.server = await self.loop.create_server(lambda: Accepted(self), sock=self.sock,
                                                    backlog=LISTEN_BACKLOG)

    def route(self, sni: str | None) -> Destination | None:
        """Exact SNI, then its one-label wildcard, then the default (no SNI: the default)."""
        if sni is not None:
            found = self.exact.get(sni)
            if found is not None:
                return found
            parent = sni.partition(".")[2]
            if parent:
                found = self.wildcard.get(parent)
                if found is not None:
                    return found
        return self.stream.default

    def connect(self, accepted: Accepted, destination: Destination) -> None:
        task = self.loop.create_task(self._connect(accepted, destination))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect(self, accepted: Accepted, destination: Destination) -> None:
        """Connect to the destination (another target after a failure, bounded), then relay;
        the client is closed when no target can be reached."""
        stream, stats, transport = self.stream, self.stats, accepted.transport
        relay = Relay(transport, self.relays, stats, stream.idle_timeout)
        balancer = self.balancers.get(destination.upstream) if destination.upstream else None
        if destination.upstream is not None and balancer is None:
            stats.no_target += 1                  # cannot happen with a validated config
            transport.abort()
            return

        def failed(host: str, port: int, exc: BaseException) -> None:
            stats.connect_failures += 1
            reason = getattr(exc, "strerror", None) or "connect timed out"
            log.info("stream %s: cannot connect to %s:%d: %s", stream.name, host, port, reason)

        try:
            if balancer is not None:
                key = b""
                if balancer.algorithm_name == "consistent-hashing":
                    peer = transport.get_extra_info("peername")
                    key = peer[0].encode() if peer else b""
                outcome = await relay.connect_balanced(
                    balancer, key, stream.connect_timeout,
                    lambda target: (target.host, target.port, None), failed)
            else:
                outcome = await relay.connect_to(destination.host, destination.port,
                                                 stream.connect_timeout, None, failed)
        except asyncio.CancelledError:            # the stream was removed or the worker stops
            transport.abort()
            raise
        if outcome == CONNECTED:
            if transport.is_closing():            # the client left while we connected
                relay.server.transport.close()
                relay.side_lost(relay.client)
                return
            relay.start(bytes(accepted.buffer), accepted.eof)
            return
        if outcome == NO_TARGET:
            stats.no_target += 1
        if outcome != GONE:
            transport.abort()

    def close(self) -> None:
        """Stop accepting and close every connection of this stream."""
        if self.server is not None:
            self.server.close()
        else:
            self.sock.close()
        for task in list(self.connecting):
            task.cancel()
        close_all(self.relays)

    def snapshot(self) -> dict:
        stats = self.stats
        live_in = sum(r.client.received for r in self.relays)
        live_out = sum(r.server.received for r in self.relays)
        return {
            "name": self.stream.name, "listen": self.stream.listen,
            "mode": "tls_passthrough" if self.stream.tls_passthrough else "tcp",
            "connections": len(self.relays), "connecting": len(self.connecting),
            "accepted": stats.accepted, "connect_failures": stats.connect_failures,
            "no_target": stats.no_target, "refused": stats.refused,
            "idle_closed": stats.idle_closed,
            "bytes_in": stats.bytes_in + live_in, "bytes_out": stats.bytes_out + live_out,
        }


def bind_stream(listen: str) -> socket.socket:
    """A bound (not yet listening) SO_REUSEPORT socket for `listen`: every worker binds its own."""
    from fastmesh.server import bound_socket, parse_listen
    host, port = parse_listen(listen)
    sock = bound_socket(host, port, reuse_port=True)
    if sock is None:                              # a host name: bind its first address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        sock = bound_socket(infos[0][4][0], port, reuse_port=True)
    sock.setblocking(False)
    return sock


class StreamSet:
    """Every stream of the worker's config; see the module doc."""

    def __init__(self, loop):
        self.loop = loop
        self.listeners: dict[str, StreamListener] = {}
        self.balancers: dict[str, Balancer] = {}
        self.health = None                        # a HealthChecker once an upstream needs one
        self.pending: dict[str, tuple] = {}       # version -> (config, new listeners, balancers)
        self.starting: set = set()                # listener start tasks (held: weak in the loop)

    async def start(self, config) -> None:
        """Open every stream of `config`; OSError when a listen address cannot be bound."""
        error = self.prepare(config)
        if error is not None:
            raise OSError(error)
        starting = self._commit(config.version)
        if starting:
            await asyncio.gather(*starting)

    def prepare(self, config) -> str | None:
        """Bind the listeners `config` adds and build its balancers; the error text or None."""
        self.abort(None)
        fresh: dict[str, StreamListener] = {}
        try:
            for stream in config.streams:
                kept = self.listeners.get(stream.name)
                if kept is None or kept.stream.listen != stream.listen:
                    sock = bind_stream(stream.listen)
                    fresh[stream.name] = StreamListener(self.loop, stream, sock)
        except (OSError, ValueError) as exc:
            for listener in fresh.values():
                listener.sock.close()
            return f"stream {stream.name}: cannot listen on {stream.listen}: {exc}"
        self.pending = {config.version: (config, fresh, self._balancers(config))}
        return None

    def commit(self, version: str) -> None:
        for coroutine in self._commit(version):
            task = self.loop.create_task(coroutine)
            self.starting.add(task)
            task.add_done_callback(self.starting.discard)

    def update(self, config) -> None:
        """The same config with other upstream targets (discovery): fresh balancers inheriting
        health; listeners and a prepared reload are left alone."""
        if self.listeners:
            self._configure(config, self._balancers(config))

    def _commit(self, version: str) -> list:
        """Apply a prepared config; the coroutines that start the new listeners."""
        prepared = self.pending.pop(version, None)
        self.pending = {}
        if prepared is None:
            return []
        config, fresh, balancers = prepared
        wanted = {s.name: s for s in config.streams}
        for name, listener in list(self.listeners.items()):
            if name not in wanted or name in fresh:
                listener.close()
                del self.listeners[name]
        starting = []
        for stream in config.streams:
            listener = fresh.get(stream.name)
            if listener is not None:
                self.listeners[stream.name] = listener
                starting.append(self._start_listener(listener))
        self._configure(config, balancers)
        return starting

    def _configure(self, config, balancers: dict) -> None:
        for stream in config.streams:
            listener = self.listeners.get(stream.name)
            if listener is not None and listener.stream.listen == stream.listen:
                used = {d.upstream for d in stream.destinations() if d.upstream}
                listener.configure(stream, {name: balancers[name] for name in used})
        self.balancers = balancers
        self._check_health(config)

    async def _start_listener(self, listener: StreamListener) -> None:
        try:
            await listener.start()
        except OSError as exc:              # the socket was bound at prepare: very unlikely
            log.error("stream %s: cannot listen on %s: %s", listener.stream.name,
                      listener.stream.listen, exc)

    def abort(self, version: str | None) -> None:
        for _, fresh, _ in self.pending.values():
            for listener in fresh.values():
                listener.sock.close()
        self.pending = {}

    def _balancers(self, config) -> dict[str, Balancer]:
        """One Balancer per upstream the streams use, inheriting the current one's health."""
        used = {d.upstream for s in config.streams for d in s.destinations() if d.upstream}
        balancers = {}
        for upstream in config.upstreams:
            if upstream.name in used:
                balancer = Balancer.from_upstream(upstream)
                old = self.balancers.get(upstream.name)
                if old is not None:
                    balancer.inherit(old)
                balancers[upstream.name] = balancer
        return balancers

    def _check_health(self, config) -> None:
        entries = [(u, self.balancers[u.name]) for u in config.upstreams
                   if u.name in self.balancers]
        if self.health is None and not entries:
            return
        if self.health is None:
            from fastmesh.health import HealthChecker
            self.health = HealthChecker(self.loop)
            self.health.start(entries)
        else:
            self.health.replace(entries)

    async def stop(self) -> None:
        self.abort(None)
        for listener in self.listeners.values():
            listener.close()
        self.listeners = {}
        if self.health is not None:
            await self.health.stop()

    def snapshot(self) -> list[dict]:
        """Per stream: this worker's counters and its upstreams' targets (fastmesh.streams
        merge_snapshots sums them over the workers)."""
        rows = []
        for listener in self.listeners.values():
            row = listener.snapshot()
            row["upstreams"] = {name: [{k: v for k, v in target.items() if k != "requests"}
                                       for target in balancer.health()]
                                for name, balancer in listener.balancers.items()}
            rows.append(row)
        return rows


COUNTERS = ("connections", "connecting", "accepted", "connect_failures", "no_target", "refused",
            "idle_closed", "bytes_in", "bytes_out")


def merge_snapshots(snapshots: list[dict]) -> list[dict]:
    """Worker snapshots -> one row per stream with its counters summed over the workers (the
    targets' health is per worker and left out)."""
    merged: dict[str, dict] = {}
    for snap in snapshots:
        for row in snap.get("streams") or ():
            into = merged.setdefault(row["name"], {"name": row["name"], "listen": row["listen"],
                                                   "mode": row["mode"], "workers": 0,
                                                   **{key: 0 for key in COUNTERS}})
            into["workers"] += 1
            for key in COUNTERS:
                into[key] += row.get(key, 0)
    return list(merged.values())
