"""The supervisor: owns the config, the workers, reloads, shutdown and the merged metrics.

With `--workers 1` the single worker runs in the supervisor's own process and loop (no IPC, no
extra process). With N > 1 each worker is a process of its own (`fastmesh.server.worker_main`)
with its own uvloop and SO_REUSEPORT listener on the same address, talking to the supervisor
over a socket pair (fastmesh.ipc).

Config changes (SIGHUP, `fastmesh reload`, the admin API) are validated once, here, then applied
to every worker in two steps under one lock: every worker compiles the new Plan (prepare); only
when all succeeded do they swap it in (commit), otherwise all drop it (abort) and the old config
keeps serving. A worker started later (a restart) gets the config that is current at that moment.

A worker that exits unexpectedly is logged and restarted; when workers keep dying young the
restart is delayed, doubling each time up to 30 s (a crash loop is backed off, not spun).
SIGTERM/SIGINT: every worker stops accepting, finishes in-flight requests up to the drain
deadline, closes idle keep-alive connections and exits; then the supervisor exits 0.
"""
from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
import sys
import time

from fastmesh import __version__
from fastmesh.config import Config, ConfigError, ConfigIssue, load_config_data
from fastmesh.config.loader import read_document
from fastmesh.config.operations import DEFAULT_ADMIN_LISTEN, admin_listen, exposure_problem
from fastmesh.config.schema import Invalid
from fastmesh.config.tls import listen_clash, listener_addresses, listeners_change
from fastmesh.defaults import embedded_config
from fastmesh.ipc import Channel, ChannelClosed, encode_config
from fastmesh.metrics import Aggregate, render, tls_handshakes
from fastmesh.server import DRAIN_TIMEOUT, Worker, format_url, parse_listen, trim_heap

START_TIMEOUT = 30.0        # a worker process must be listening within this
REQUEST_TIMEOUT = 10.0      # a worker must answer a control message within this
STABLE_AFTER = 10.0         # a worker that lived this long was not crash-looping
MAX_BACKOFF = 30.0
FIRST_BACKOFF = 0.5
EMBEDDED = "<embedded default>"
ADMIN_SOURCE = "<admin>"


def say(message: str, err: bool = False) -> None:
    print(f"fastmesh: {message}", file=sys.stderr if err else sys.stdout, flush=True)


class StartError(Exception):
    pass


# --- workers, as the supervisor sees them ----------------------------------------------------------

class LocalHandle:
    """The single worker of `--workers 1`, in this process: direct calls, no pipe."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.index = 0
        self.pid = os.getpid()
        self.started = time.time()
        self.restarts = 0
        self.alive = True
        self.last: dict | None = None

    @property
    def version(self):
        return self.worker.version

    async def prepare(self, config: Config, blob: bytes) -> str | None:
        return self.worker.prepare(config)

    async def commit(self, version: str) -> bool:
        return self.worker.commit(version)

    async def abort(self, version: str) -> None:
        self.worker.abort(version)

    async def snapshot(self, full: bool = True) -> dict | None:
        return self.worker.snapshot(full)

    async def stop(self, drain: float) -> None:
        await self.worker.shutdown(drain)
        self.alive = False


class ProcessHandle:
    """One worker process and its end of the pipe."""

    def __init__(self, index: int, restarts: int = 0):
        self.index = index
        self.restarts = restarts
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.pid: int | None = None
        self.version: str | None = None
        self.started = time.time()
        self.alive = False
        self.last: dict | None = None         # latest stats received (kept when it dies)
        self.final: dict | None = None        # stats sent by the worker as it stopped
        self.next_id = 0
        self.waiting: dict[int, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    async def spawn(self, config: Config, blob: bytes, host: str, port: int, drain: float,
                    listeners: list = ()) -> None:
        parent, child = socket.socketpair()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c",
                "import sys; from fastmesh.server import worker_main; worker_main(int(sys.argv[1]))",
                str(child.fileno()), pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        finally:
            child.close()
        self.pid = self.proc.pid
        self.started = time.time()
        self.channel = await Channel.open(parent)
        self.channel.send({"t": "start", "index": self.index, "config": blob,
                           "version": config.version, "host": host, "port": port, "drain": drain,
                           "listeners": [list(x) for x in listeners]})
        try:
            msg = await asyncio.wait_for(self.channel.recv(), START_TIMEOUT)
        except (ChannelClosed, asyncio.TimeoutError):
            await self.kill()
            raise StartError(f"worker {self.index} (pid {self.pid}) did not start") from None
        if msg.get("t") != "ready":
            await self.kill()
            raise StartError(msg.get("error") or f"worker {self.index} failed to start")
        self.version = msg.get("version")
        self.alive = True
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.channel.recv()
                if msg.get("t") == "final":
                    self.final = msg.get("stats")
                    continue
                future = self.waiting.pop(msg.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(msg)
        except ChannelClosed:
            pass
        finally:
            self.alive = False
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(ChannelClosed(f"worker {self.index} exited"))
            self.waiting.clear()

    async def request(self, msg: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
        if not self.alive:
            raise ChannelClosed(f"worker {self.index} is not running")
        self.next_id += 1
        msg["id"] = self.next_id
        future = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = future
        try:
            self.channel.send(msg)
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(msg["id"], None)

    async def prepare(self, config: Config, blob: bytes) -> str | None:
        reply = await self.request({"t": "prepare", "config": blob, "version": config.version})
        return None if reply.get("ok") else reply.get("error", "prepare failed")

    async def commit(self, version: str) -> bool:
        reply = await self.request({"t": "commit", "version": version})
        self.version = reply.get("version", self.version)
        return bool(reply.get("ok"))

    async def abort(self, version: str) -> None:
        await self.request({"t": "abort", "version": version})

    async def snapshot(self, full: bool = True) -> dict | None:
        reply = await self.request({"t": "stats", "full": full}, timeout=5.0)
        stats = reply.get("stats")
        if full and stats is not None:
            self.last = stats
        return stats

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self, drain: float) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self.channel.send({"t": "stop", "drain": drain})
        except ChannelClosed:
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), drain + 5.0)
        except asyncio.TimeoutError:
            say(f"worker {self.index} (pid {self.pid}) did not stop in time; killing it", err=True)
            await self.kill()
        if self.reader is not None:
            await asyncio.wait([self.reader], timeout=2.0)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# --- the supervisor ------------------------------------------------------------------------------

class Supervisor:
    def __init__(self, config_path: str | None, listen: str | None, workers: int,
                 drain: float = DRAIN_TIMEOUT):
        self.config_path = config_path
        self.listen_override = listen
        self.n_workers = workers
        self.drain = drain
        self.loop = asyncio.get_running_loop()
        self.lock = asyncio.Lock()
        self.handles: list = []
        self.aggregate = Aggregate()
        self.reloads = {"success": 0, "failure": 0}
        self.restarts = 0
        self.started = time.time()
        self.stopping = False
        self.config: Config | None = None
        self.document: dict | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.echo_server = None
        self.probe: socket.socket | None = None
        self.listeners: list[tuple[str, int, bool]] = []   # config `listeners`, ports resolved
        self.extra_probes: list[socket.socket] = []
        self.slots: list[asyncio.Task] = []

    # -- starting ------------------------------------------------------------------------------------
    async def load_initial(self) -> None:
        if self.config_path:
            self.document = read_document(self.config_path)
            self.config = load_config_data(self.document, source=self.config_path)
            return
        from fastmesh.echo import start_echo
        self.echo_server = await start_echo("127.0.0.1", 0)
        echo_port = self.echo_server.sockets[0].getsockname()[1]
        self.document = embedded_config(echo_port, self.listen_override or "127.0.0.1:8000")
        self.config = load_config_data(self.document, source=EMBEDDED)

    async def start(self) -> None:
        await self.load_initial()
        self.host, self.port = parse_listen(self.listen_override or self.config.gateway.listen)
        clash = listen_clash(self.host, self.port, self.config.listeners)
        if clash is not None:
            raise StartError(f"listen address {self.host}:{self.port} is also {clash}")
        if self.n_workers == 1:
            worker = Worker(0)
            await worker.start(self.config, self.host, self.port)
            self.host, self.port = worker.address
            self.listeners = worker.listeners
            self.handles = [LocalHandle(worker)]
            return
        self._reserve_port()
        self._reserve_listeners()
        blob = encode_config(self.config)
        handles = [ProcessHandle(i) for i in range(self.n_workers)]
        results = await asyncio.gather(
            *(h.spawn(self.config, blob, self.host, self.port, self.drain, self.listeners)
              for h in handles),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(h.stop(0) for h in handles if h.alive))
            error = failed[0]
            raise error if not isinstance(error, StartError) else StartError(str(error))
        self.handles = handles
        self.slots = [asyncio.ensure_future(self._watch(h)) for h in handles]

    def _reserve_port(self) -> None:
        """Check the address and resolve port 0 once, so every worker binds the same port.

        The probe socket is bound with SO_REUSEPORT but never listens, so it takes no
        connections; it keeps the port while workers come and go.
        """
        info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)[0]
        probe = socket.socket(info[0], socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(info[4])
        except OSError:
            probe.close()
            raise
        self.port = probe.getsockname()[1]
        self.probe = probe

    def _reserve_listeners(self) -> None:
        """Like _reserve_port, for each of the config's `listeners`."""
        for host, port, tls in listener_addresses(self.config.listeners):
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)[0]
            probe = socket.socket(info[0], socket.SOCK_STREAM)
            self.extra_probes.append(probe)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(info[4])
            self.listeners.append((host, probe.getsockname()[1], tls))

    # -- keeping workers alive ---------------------------------------------------------------------
    async def _watch(self, handle: ProcessHandle) -> None:
        failures = 0
        while True:
            code = await handle.wait()
            if handle.reader is not None:
                await asyncio.wait([handle.reader], timeout=2.0)
            if self.stopping:
                return
            lived = time.time() - handle.started
            self.aggregate.forget_worker(handle.final or handle.last)
            failures = 0 if lived >= STABLE_AFTER else failures + 1
            delay = 0.0 if failures == 0 else min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
            say(f"worker {handle.index} (pid {handle.pid}) {describe_exit(code)} after "
                f"{lived:.1f}s; restarting it in {delay:.1f}s"
                + (f" (crash loop: {failures} quick exits in a row)" if failures > 1 else ""),
                err=True)
            while True:
                if delay:
                    await asyncio.sleep(delay)
                if self.stopping:
                    return
                replacement = ProcessHandle(handle.index, handle.restarts + 1)
                self.restarts += 1
                try:
                    async with self.lock:
                        if self.stopping:
                            return
                        await replacement.spawn(self.config, encode_config(self.config),
                                                self.host, self.port, self.drain,
                                                self.listeners)
                except (StartError, OSError) as exc:
                    failures += 1
                    delay = min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
                    say(f"worker {handle.index} could not be restarted: {exc}; "
                        f"trying again in {delay:.1f}s", err=True)
                    continue
                break
            self.handles[handle.index] = handle = replacement
            say(f"worker {handle.index} restarted (pid {handle.pid}, config version "
                f"{handle.version})", err=True)

    # -- config changes ----------------------------------------------------------------------------
    async def apply(self, config: Config, document: dict) -> list[str]:
        """Make `config` active on every worker, or on none; [] on success, else the errors."""
        async with self.lock:
            if config.version == self.config.version:
                self.config, self.document = config, document
                self.reloads["success"] += 1
                return []
            fixed = listeners_change(self.config.listeners, config.listeners)
            if fixed is not None:
                self.reloads["failure"] += 1
                say(f"config {config.version} refused, still serving version "
                    f"{self.config.version}:\n{fixed}", err=True)
                return [fixed]
            blob = encode_config(config)
            live = [h for h in self.handles if h.alive]
            results = await asyncio.gather(*(h.prepare(config, blob) for h in live),
                                           return_exceptions=True)
            errors = [r for r in results if isinstance(r, str)]
            # A worker that died meanwhile is not an error of the config: it restarts on the
            # config that is current when it comes back.
            if errors:
                await asyncio.gather(*(h.abort(config.version) for h in live),
                                     return_exceptions=True)
                self.reloads["failure"] += 1
                say(f"config {config.version} refused, still serving version "
                    f"{self.config.version}:\n" + "\n".join(errors), err=True)
                return errors
            await asyncio.gather(*(h.commit(config.version) for h in live), return_exceptions=True)
            self.config, self.document = config, document
            self.reloads["success"] += 1
        print(f"reloaded: config version {config.version}", flush=True)
        return []

    def refuse(self, issues: list[ConfigIssue]) -> None:
        self.reloads["failure"] += 1
        print(f"reload refused, still serving version {self.config.version}:\n"
              + "\n".join(str(i) for i in issues), file=sys.stderr, flush=True)

    async def apply_document(self, document: object, source: str = ADMIN_SOURCE) -> list:
        """Validate and apply a whole declarative config; [] on success, else ConfigIssues/str."""
        try:
            config = load_config_data(document, source=source)
        except ConfigError as exc:
            self.refuse(exc.issues)
            return exc.issues
        return await self.apply(config, document)

    async def reload_from_file(self) -> list:
        if not self.config_path:
            issue = ConfigIssue(EMBEDDED, "", "reload ignored: running on the embedded default "
                                "config (start with --config FILE to reload)")
            print(f"fastmesh: {issue.message}", file=sys.stderr, flush=True)
            return [issue]
        try:
            document = read_document(self.config_path)
        except ConfigError as exc:
            self.refuse(exc.issues)
            return exc.issues
        return await self.apply_document(document, source=self.config_path)

    def current_document(self) -> dict:
        return copy.deepcopy(self.document)

    # -- observing ---------------------------------------------------------------------------------
    async def snapshots(self, full: bool = True) -> list[dict]:
        live = [h for h in self.handles if h.alive]
        results = await asyncio.gather(*(h.snapshot(full) for h in live), return_exceptions=True)
        return [r for r in results if isinstance(r, dict)]

    async def status(self) -> dict:
        snaps = {s["index"]: s for s in await self.snapshots(full=False)}
        workers = []
        for h in self.handles:
            snap = snaps.get(h.index, {})
            workers.append({
                "index": h.index, "pid": h.pid, "alive": h.alive,
                "config_version": snap.get("version", h.version),
                "started": h.started, "restarts": h.restarts,
                "connections": snap.get("connections"), "requests": snap.get("requests"),
            })
        config = self.config
        status = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "listen": format_url(self.host, self.port),
            "listeners": [format_url(h, p, "https" if tls else "http")
                          for h, p, tls in self.listeners],
            "workers": workers,
            "worker_restarts": self.restarts,
            "config": {"version": config.version, "source": config.source,
                       "services": len(config.services), "routes": len(config.routes),
                       "applied": all(w["config_version"] == config.version
                                      for w in workers if w["alive"])},
            "connections": sum(s.get("connections", 0) for s in snaps.values()),
            "requests": sum(s.get("requests", 0) for s in snaps.values())
            + self.aggregate.gone_counters.get("requests", 0),
            "reloads": dict(self.reloads),
        }
        if config.streams:
            from fastmesh.streams import merge_snapshots
            status["streams"] = merge_snapshots(list(snaps.values()))
        if any(tls for _host, _port, tls in self.listeners):
            status["tls_handshakes"] = tls_handshakes(list(snaps.values()),
                                                      self.aggregate.gone_tls)
        return status

    async def metrics_text(self) -> str:
        merged = self.aggregate.merge(await self.snapshots(full=True))
        info = {"version": __version__, "started": self.started,
                "workers": sum(1 for h in self.handles if h.alive), "restarts": self.restarts,
                "config_version": self.config.version, "reloads": self.reloads}
        return render(merged, info)

    # -- stopping ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        self.stopping = True
        async with self.lock:
            await asyncio.gather(*(h.stop(self.drain) for h in self.handles),
                                 return_exceptions=True)
        for task in self.slots:
            task.cancel()
        if self.probe is not None:
            self.probe.close()
        for probe in self.extra_probes:
            probe.close()
        if self.echo_server is not None:
            self.echo_server.close()


# --- `fastmesh run` ---------------------------------------------------------------------------------

def resolve_admin(sup: Supervisor, override: str | None) -> tuple[str | None, bool]:
    """(admin listen address or None when off, whether it was asked for explicitly)."""
    settings = sup.config.gateway.admin
    if override is not None:
        listen, explicit = admin_listen(override), True
    elif settings.listen is not None:
        listen, explicit = settings.listen, True
    else:
        listen, explicit = DEFAULT_ADMIN_LISTEN, False
    if listen == "off":
        return None, explicit
    problem = exposure_problem(listen, settings.token)
    if problem:
        raise StartError(problem)
    return listen, explicit


async def serve(config_path: str | None, listen: str | None, workers: int,
                admin: str | None = None, drain: float = DRAIN_TIMEOUT) -> int:
    from fastmesh.admin import start_admin
    sup = Supervisor(config_path, listen, workers, drain)
    # Signals are handled from the start: a SIGTERM while workers are still starting stops the
    # gateway cleanly once they are up, instead of killing the supervisor under them.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hup_early: list[bool] = []
    loop.add_signal_handler(signal.SIGHUP, lambda: hup_early.append(True))
    try:
        await sup.start()
        admin_listen_at, explicit = resolve_admin(sup, admin)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        await sup.stop()
        return 1
    except (Invalid, StartError) as exc:
        print(f"fastmesh: {getattr(exc, 'message', exc)}", file=sys.stderr)
        await sup.stop()
        return 1
    except OSError as exc:
        print(f"fastmesh: cannot listen: {exc}", file=sys.stderr)
        await sup.stop()
        return 1
    admin_server = None
    if admin_listen_at is not None:
        try:
            admin_server = await start_admin(sup, admin_listen_at)
        except OSError as exc:
            if explicit:
                print(f"fastmesh: cannot listen (admin API on {admin_listen_at}): {exc}",
                      file=sys.stderr)
                await sup.stop()
                return 1
            say(f"admin API not started: {admin_listen_at} is busy ({exc.strerror}); "
                "set gateway.admin.listen or --admin", err=True)
    _announce(sup, admin_server)
    trim_heap(len(sup.config.routes))     # what reading the config freed, when it is big
    reloads: set[asyncio.Task] = set()

    def on_hup() -> None:
        task = asyncio.ensure_future(sup.reload_from_file())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if hup_early:
        on_hup()
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    if admin_server is not None:
        admin_server.close()
    await sup.stop()
    if reloads:
        await asyncio.wait(reloads, timeout=5)
    print("fastmesh: stopped", flush=True)
    return 0


def _announce(sup: Supervisor, admin_server) -> None:
    config = sup.config
    url = format_url(sup.host, sup.port)
    workers = f"{len(sup.handles)} worker{'s' if len(sup.handles) != 1 else ''}"
    print(f"fastmesh {__version__} listening on {url} "
          f"(config {config.source}, version {config.version}, "
          f"{len(config.routes)} route(s), {workers}, pid {os.getpid()})", flush=True)
    for host, port, tls in sup.listeners:
        scheme = "https" if tls else "http"
        print(f"{'TLS ' if tls else ''}listener on {format_url(host, port, scheme)}"
              + (f" ({len(config.certificates)} certificate(s))" if tls else ""), flush=True)
    if admin_server is not None:
        host, port = admin_server.sockets[0].getsockname()[:2]
        print(f"admin API on {format_url(host, port)}", flush=True)
    if sup.echo_server is not None:
        echo_port = sup.echo_server.sockets[0].getsockname()[1]
        print(f"embedded default: every path goes to the built-in echo upstream on "
              f"127.0.0.1:{echo_port}\ntry: curl -i {url}/hello?name=fastmesh", flush=True)
