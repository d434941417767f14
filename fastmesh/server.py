"""One gateway worker: a uvloop event loop, its listener, the active Plan, reload and shutdown.

The data path itself lives in fastmesh._core.proxy; this module only wires it to sockets, signals
and the supervisor:

- `run_gateway` runs the whole gateway. With one worker, everything (worker, config control and
  the admin API) shares one process and one loop; with more, fastmesh.supervisor starts worker
  processes that enter through `worker_main`.
- A config change is applied in two steps, so that no worker serves a half-applied config:
  `Worker.prepare` compiles the new Plan beside the active one, `Worker.commit` swaps it in (one
  assignment), `Worker.abort` drops it.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time

import uvloop

from time import monotonic
from fastmesh._core.proxy import Gateway
from fastmesh.config import Config
from fastmesh.discovery import Discovery
from fastmesh.metrics import RouteStats, UpstreamStats
from fastmesh.health import HealthChecker
from fastmesh.plan import PoolRegistry, compile_plan

log = logging.getLogger("fastmesh")

POOL_SWEEP_INTERVAL = 1.0
DRAIN_TIMEOUT = 10.0


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:8000', '[::1]:8000', ':8000' (all interfaces) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid listen address {value!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def format_url(host: str, port: int, scheme: str = "http") -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else shown}:{port}"


def bound_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket | None:
    """A TCP socket bound to an IP literal (not listening yet); None when `host` is a name.

    Given a host, loop.create_server resolves it with getaddrinfo on libuv's thread pool, even
    for an IP literal: four threads (and their malloc arenas) an idle process keeps for good.
    Binding here skips that; the options and the bind error are those create_server uses.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        return None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise OSError(exc.errno, f"error while attempting to bind on address "
                                     f"{(host, port)!r}: {reason}") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def start_server(loop, factory, host: str, port: int, *, reuse_port: bool = False,
                       backlog: int = 100):
    """loop.create_server on HOST:PORT (SO_REUSEADDR), bound by `bound_socket` when it can."""
    sock = bound_socket(host, port, reuse_port)
    if sock is None:                                   # a host name: the loop resolves it
        return await loop.create_server(factory, host, port, reuse_address=True,
                                        reuse_port=reuse_port or None, backlog=backlog)
    try:
        return await loop.create_server(factory, sock=sock, backlog=backlog)
    except BaseException:
        sock.close()
        raise


TRIM_MIN_ROUTES = 1000
# Compiled from source at this start (no bytecode cache to read: PYTHONDONTWRITEBYTECODE in a
# source tree): the compiler's freed memory, ~1 MB, is then worth trimming whatever the config.
COMPILED_FROM_SOURCE = __cached__ is not None and not os.path.exists(__cached__)
_malloc_trim = None


def trim_heap(routes: int) -> None:
    """Give the C heap's free pages back to the system (glibc malloc_trim) when worth it.

    Reading and compiling a config frees far more than it keeps; glibc keeps the freed pages
    mapped unless asked, and they count in the RSS for the process's life. What that frees grows
    with the config: 1.5 MB at 3,000 routes, but less than ctypes (needed to call it) costs,
    ~0.3 MB, at a few hundred. So: from TRIM_MIN_ROUTES routes on, or after compiling sources.
    A no-op where there is no malloc_trim.
    """
    global _malloc_trim
    if routes < TRIM_MIN_ROUTES and not COMPILED_FROM_SOURCE:
        return
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (ImportError, OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def settle_heap(routes: int = 0) -> None:
    """Move the long-lived heap (config, Plan, routes) out of the garbage collector's sight.

    A Plan with 10,000 routes is hundreds of thousands of objects; without this, every full
    collection triggered by request-time allocations walks them all. Called when a Plan of
    `routes` routes goes live: unfreeze, collect (so a replaced Plan's cycles are freed), freeze
    again, then hand the freed C heap back (trim_heap).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    trim_heap(routes)


class Worker:
    """Serves one Plan at a time on one SO_REUSEPORT listener until told to stop."""

    def __init__(self, index: int = 0):
        self.index = index
        self.loop = asyncio.get_running_loop()
        self.pools = PoolRegistry()
        self.route_stats = RouteStats()
        self.upstream_stats = UpstreamStats()
        self.gateway: Gateway | None = None
        self.server = None
        self.address: tuple[str, int] | None = None
        self.tls = None                           # fastmesh.tls.EdgeTLS: certificates by SNI
        self.servers: list = []                   # config `listeners`, beside self.server
        self.listeners: list[tuple[str, int, bool]] = []   # their bound (host, port, tls)
        self.sweeper = None
        self.access_log = None                    # a fastmesh.accesslog.AccessLog when on
        self.health = HealthChecker(self.loop)
        self.discovery = Discovery(self.loop, self._rediscover)   # DNS / targets_file targets
        self.pending: dict[str, object] = {}      # version -> prepared Plan
        self.started = time.time()
        self.stopped = False
        self.streams = None                       # fastmesh.streams.StreamSet, see _stream_set

    @property
    def version(self) -> str | None:
        return self.gateway.plan.version if self.gateway is not None else None

    async def start(self, config: Config, host: str, port: int, listeners=None) -> None:
        """Serve on HOST:PORT and on `listeners` ((host, port, tls); None: config.listeners)."""
        limits = config.gateway.limits
        resolved = await self.discovery.start(config)     # bounded wait for the first answers
        self.gateway = Gateway(
            self.loop, compile_plan(resolved, self.pools),
            max_head_size=limits.max_head_size, max_line_size=limits.max_line_size,
            max_headers=limits.max_headers, header_timeout=limits.header_timeout,
            body_timeout=limits.body_timeout, keepalive_timeout=limits.keepalive_timeout,
            send_timeout=limits.send_timeout,
            max_requests_per_connection=limits.max_requests_per_connection,
            max_connections=limits.max_connections,
            max_response_head_size=limits.max_response_head_size,
        )
        try:
            if self._stream_set(resolved) is not None:
                await self.streams.start(resolved)
            self.server = await start_server(self.loop, self.gateway.protocol_factory, host, port,
                                             reuse_port=True, backlog=4096)
            await self._listen(config, listeners)
        except BaseException:
            for server in [self.server, *self.servers]:
                if server is not None:
                    server.close()
            self.gateway.stop()
            if self.streams is not None:
                await self.streams.stop()
            await self.discovery.stop()
            raise
        bound = self.server.sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        settle_heap(len(config.routes))
        self.sweeper = self.loop.call_later(POOL_SWEEP_INTERVAL, self._sweep_pools)
        self.health.start(self.gateway.plan.health_entries())
        self._apply_headers_settings(config)
        if config.gateway.access_log != "off":
            from fastmesh.accesslog import AccessLog
            self.access_log = AccessLog(self.gateway, self.loop, config.gateway.access_log)
            self.access_log.start()

    async def _listen(self, config: Config, listeners) -> None:
        """The config's `listeners`: TLS ones share one EdgeTLS (handshake: header_timeout)."""
        from fastmesh.config.tls import listener_addresses
        from fastmesh.tls import EdgeTLS
        self.tls = EdgeTLS(config.certificates)
        timeout = config.gateway.limits.header_timeout
        if listeners is None:
            listeners = listener_addresses(config.listeners)
        for host, port, tls in listeners:
            factory = self.gateway.protocol_factory
            if tls:
                factory = self.tls.protocol_factory(factory, timeout)
            server = await start_server(self.loop, factory, host, port,
                                        reuse_port=True, backlog=4096)
            self.servers.append(server)
            bound = server.sockets[0].getsockname()
            self.listeners.append((bound[0], bound[1], bool(tls)))

    def _stream_set(self, config: Config):
        """The worker's L4 streams (fastmesh.streams), created for the first config that has
        any: a worker that never had streams does not import them. None until then."""
        if self.streams is None and config.streams:
            from fastmesh.streams import StreamSet
            self.streams = StreamSet(self.loop)
        return self.streams

    def _sweep_pools(self) -> None:
        self.pools.sweep(monotonic())
        self.sweeper = self.loop.call_later(POOL_SWEEP_INTERVAL, self._sweep_pools)

    # -- two-step config change ----------------------------------------------------------------
    def prepare(self, config: Config) -> str | None:
        """Compile `config` beside the active Plan; the error text if it cannot be compiled."""
        try:
            resolved = self.discovery.prepare(config)
            self.pending = {config.version: compile_plan(resolved, self.pools, self.gateway.plan)}
            self.tls.prepare(config.version, config.certificates)
        except Exception as exc:          # a validated config should always compile
            self.pending = {}
            return f"worker {self.index}: cannot compile config {config.version}: {exc}"
        streams = self._stream_set(resolved)
        return streams.prepare(resolved) if streams is not None else None

    def commit(self, version: str) -> bool:
        """Swap in the prepared Plan: requests already routed finish on the old one."""
        plan = self.pending.pop(version, None)
        self.pending = {}
        if plan is None:
            return self.version == version
        old = self.gateway.plan
        self.gateway.set_plan(plan)
        self.tls.commit(version)
        self._apply_headers_settings(plan.config)
        self.health.replace(plan.health_entries())
        self.route_stats.retire(old)
        self.upstream_stats.retire(old, plan)
        self.discovery.commit(version)
        if self.streams is not None:
            self.streams.commit(version)
        settle_heap(len(plan.config.routes))
        return True

    def _apply_headers_settings(self, config: Config) -> None:
        """Request-id and trace-context settings: applied at start and with every new config."""
        gateway = config.gateway
        self.gateway.enable_request_id(gateway.request_id)
        self.gateway.set_tracing(gateway.tracing.enabled, gateway.tracing.sample_rate)

    def abort(self, version: str) -> None:
        self.pending.pop(version, None)
        self.tls.abort(version)
        self.discovery.abort(version)
        if self.streams is not None:
            self.streams.abort(version)

    def _rediscover(self) -> None:
        """Discovery saw new addresses: swap in a Plan of the same config with the targets known
        now, compiled against the active Plan so unchanged addresses keep their health state."""
        if self.gateway is None or self.stopped:
            return
        old = self.gateway.plan
        resolved = self.discovery.resolve()
        if resolved == old.config:
            return
        plan = compile_plan(resolved, self.pools, old)
        self.gateway.set_plan(plan)
        self.health.replace(plan.health_entries())
        self.route_stats.retire(old)
        self.upstream_stats.retire(old, plan)
        if self.streams is not None:
            self.streams.update(resolved)
        settle_heap(len(plan.config.routes))
        log.info("worker %d: upstream targets changed (discovery)", self.index)

    # -- stats -----------------------------------------------------------------------------------
    def snapshot(self, full: bool = True) -> dict:
        gw = self.gateway
        stats = gw.stats()
        snap = {
            "index": self.index, "pid": os.getpid(), "version": self.version,
            "started": self.started, "connections": stats["connections"],
            "requests": stats["requests"], "local_responses": stats["local_responses"],
            "send_timeouts": stats["send_timeouts"],
            "status": stats["status"],
        }
        if self.streams is not None and self.streams.listeners:
            snap["streams"] = self.streams.snapshot()
        if any(tls for _h, _p, tls in self.listeners):
            snap["tls_handshakes"] = dict(self.tls.handshakes)
        if full:
            snap["routes"] = self.route_stats.snapshot(gw.plan)
            snap["pools"] = self.pools.stats()
            counters = self.upstream_stats.counters(gw.plan)
            snap["upstream_counters"] = counters
            snap["upstreams"] = self.upstream_stats.health(gw.plan, counters)
        return snap

    async def shutdown(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close the rest."""
        if self.stopped:
            return
        self.stopped = True
        for server in [self.server, *self.servers]:
            if server is not None:
                server.close()
        if self.streams is not None:
            await self.streams.stop()
        if self.gateway is None:
            return
        self.gateway.close_idle_connections()
        deadline = self.loop.time() + drain_timeout
        while self.gateway.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            self.gateway.close_idle_connections()
        self.gateway.stop()
        await self.health.stop()
        await self.discovery.stop()
        if self.access_log is not None:
            self.access_log.stop()
        if self.sweeper is not None:
            self.sweeper.cancel()
        self.pools.close_idle()


# --- the whole gateway ----------------------------------------------------------------------------

def run_gateway(config_path: str | None, listen: str | None, workers: int = 1,
                admin: str | None = None, drain_timeout: float = DRAIN_TIMEOUT) -> int:
    from fastmesh.supervisor import serve
    return uvloop.run(serve(config_path, listen, workers, admin, drain_timeout))


# --- a worker process (started by fastmesh.supervisor) ---------------------------------------------

def worker_main(fd: int) -> int:
    """Entry point of a worker process: `fd` is its end of the supervisor's socket pair."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)     # reloads come from the supervisor
    code = uvloop.run(_worker_process(socket.socket(fileno=fd)))
    sys.stdout.flush()
    os._exit(code)


async def _worker_process(sock: socket.socket) -> int:
    from fastmesh.ipc import Channel, ChannelClosed, decode_config
    channel = await Channel.open(sock)
    loop = asyncio.get_running_loop()
    try:
        start = await channel.recv()
    except ChannelClosed:
        return 1
    worker = Worker(start["index"])
    drain = float(start.get("drain", DRAIN_TIMEOUT))
    try:
        config = decode_config(start["config"], start["version"])
        await worker.start(config, start["host"], start["port"], start.get("listeners"))
    except Exception as exc:
        what = f"cannot listen: {exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        channel.send({"t": "failed", "error": what})
        await channel.drain()
        return 1
    channel.send({"t": "ready", "pid": os.getpid(), "version": worker.version,
                  "address": list(worker.address)})
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def serve_channel() -> None:
        while True:
            msg = await channel.recv()
            kind = msg.get("t")
            reply = {"t": "reply", "id": msg.get("id"), "ok": True}
            if kind == "prepare":
                try:
                    error = worker.prepare(decode_config(msg["config"], msg["version"]))
                except Exception as exc:
                    error = f"worker {worker.index}: bad config message: {exc}"
                if error:
                    reply.update(ok=False, error=error)
            elif kind == "commit":
                reply["ok"] = worker.commit(msg["version"])
                reply["version"] = worker.version
            elif kind == "abort":
                worker.abort(msg["version"])
            elif kind == "stats":
                reply["stats"] = worker.snapshot(full=msg.get("full", True))
            elif kind == "stop":
                nonlocal drain
                drain = float(msg.get("drain", drain))
                stop.set()
                return
            else:
                reply.update(ok=False, error=f"unknown message {kind!r}")
            channel.send(reply)

    listener = asyncio.ensure_future(serve_channel())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([listener, stopper], return_when=asyncio.FIRST_COMPLETED)
    # Stopped by the supervisor, a signal, or the supervisor's end of the pipe closing.
    listener.cancel()
    try:
        await listener
    except (asyncio.CancelledError, ChannelClosed):
        pass
    await worker.shutdown(drain)
    try:
        channel.send({"t": "final", "stats": worker.snapshot()})
        await asyncio.wait_for(channel.drain(), 2)
    except (ChannelClosed, asyncio.TimeoutError, OSError):
        pass
    return 0


# --- the echo upstream ------------------------------------------------------------------------------

async def _serve_echo(listen: str) -> int:
    from fastmesh.echo import start_echo
    host, port = parse_listen(listen)
    server = await start_echo(host, port)
    bound = server.sockets[0].getsockname()
    print(f"fastmesh echo listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    return 0


def run_echo(listen: str) -> int:
    return uvloop.run(_serve_echo(listen))
