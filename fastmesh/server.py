"""One gateway worker: a uvloop event loop, its listener, the active Plan, reload and shutdown.

The data path itself lives in fastmesh._core.proxy; this module only wires it
to sockets and signals.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop

from fastmesh import __version__
from time import monotonic
from fastmesh._core.proxy import Gateway
from fastmesh.config import Config, ConfigError, load_config, load_config_data
from fastmesh.defaults import embedded_config
from fastmesh.echo import start_echo
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


class Worker:
    """Serves a config on one listener until told to stop."""

    def __init__(self, config_path: str | None, listen: str | None):
        self.config_path = config_path
        self.listen_override = listen
        self.loop = asyncio.get_running_loop()
        self.pools = PoolRegistry()
        self.gateway: Gateway | None = None
        self.server = None
        self.echo_server = None
        self.stopping = asyncio.Event()
        self.sweeper = None

    async def start(self) -> None:
        config = await self._initial_config()
        listen = self.listen_override or config.gateway.listen
        host, port = parse_listen(listen)
        limits = config.gateway.limits
        self.gateway = Gateway(
            self.loop, compile_plan(config, self.pools),
            max_head_size=limits.max_head_size, max_line_size=limits.max_line_size,
            max_headers=limits.max_headers, header_timeout=limits.header_timeout,
            body_timeout=limits.body_timeout, keepalive_timeout=limits.keepalive_timeout,
            max_requests_per_connection=limits.max_requests_per_connection,
            max_connections=limits.max_connections,
            max_response_head_size=limits.max_response_head_size,
        )
        self.server = await self.loop.create_server(
            self.gateway.protocol_factory, host, port, reuse_port=True, backlog=4096)
        bound = self.server.sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        self.sweeper = self.loop.call_later(POOL_SWEEP_INTERVAL, self._sweep_pools)
        self._announce(config)

    async def _initial_config(self) -> Config:
        if self.config_path:
            return load_config(self.config_path)
        self.echo_server = await start_echo("127.0.0.1", 0)
        echo_port = self.echo_server.sockets[0].getsockname()[1]
        listen = self.listen_override or "127.0.0.1:8000"
        return load_config_data(embedded_config(echo_port, listen), source="<embedded default>")

    def _announce(self, config: Config) -> None:
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{'127.0.0.1' if host == '0.0.0.0' else shown}:{port}"
        print(f"fastmesh {__version__} listening on {url} "
              f"(config {config.source}, version {config.version}, "
              f"{len(config.routes)} route(s))", flush=True)
        if self.echo_server is not None:
            echo_port = self.echo_server.sockets[0].getsockname()[1]
            print(f"embedded default: every path goes to the built-in echo upstream on "
                  f"127.0.0.1:{echo_port}\ntry: curl -i {url}/hello?name=fastmesh", flush=True)

    def _sweep_pools(self) -> None:
        self.pools.sweep(monotonic())
        self.sweeper = self.loop.call_later(POOL_SWEEP_INTERVAL, self._sweep_pools)

    def reload(self) -> bool:
        """Re-read the config file; a bad config is refused and the old Plan keeps serving."""
        if not self.config_path:
            log.warning("reload ignored: running on the embedded default config")
            return False
        try:
            config = load_config(self.config_path)
            plan = compile_plan(config, self.pools)
        except ConfigError as exc:
            print(f"reload refused, still serving version {self.gateway.plan.version}:\n{exc}",
                  file=sys.stderr, flush=True)
            return False
        self.gateway.set_plan(plan)
        print(f"reloaded: config version {config.version}", flush=True)
        return True

    async def shutdown(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close the rest."""
        self.server.close()
        self.gateway.close_idle_connections()
        deadline = self.loop.time() + drain_timeout
        while self.gateway.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            self.gateway.close_idle_connections()
        self.gateway.stop()
        if self.sweeper is not None:
            self.sweeper.cancel()
        self.pools.close_idle()
        if self.echo_server is not None:
            self.echo_server.close()


async def _serve(config_path: str | None, listen: str | None) -> int:
    worker = Worker(config_path, listen)
    try:
        await worker.start()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fastmesh: cannot listen: {exc}", file=sys.stderr)
        return 1
    loop = worker.loop
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, worker.reload)
    await worker.stopping.wait()
    await worker.shutdown()
    return 0


def run_gateway(config_path: str | None, listen: str | None) -> int:
    return uvloop.run(_serve(config_path, listen))


async def _serve_echo(listen: str) -> int:
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
