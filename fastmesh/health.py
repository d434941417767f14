"""Upstream health: active HTTP checks, and logging of passive (outlier) state changes.

Passive health lives in the balancer (fastmesh/_core/balancer.pyx): the proxy reports each
request's outcome and the balancer ejects and restores targets itself. This module adds:

- active checks: for every upstream with `healthchecks.active`, one task per target on the
  worker's loop sends `GET <path>` every `interval` (first probe at once), with `timeout` for the
  whole exchange, on a fresh connection (`Connection: close`), and reads only the response head
  (parsed with fastmesh._core.http1.parse_response). Outcomes, counted consecutively per target:
    - a status in healthy.http_statuses (any 2xx/3xx when that list is empty): a success; it
      clears the failure counts; `successes` in a row mark the target healthy;
    - any other status: an HTTP failure; `http_failures` in a row mark it unhealthy;
    - no complete head within `timeout`: a timeout; `timeouts` in a row mark it unhealthy;
    - refused, reset, closed early or an invalid head: a failure; `failures` in a row mark it
      unhealthy. (A threshold of 0 disables that kind.)
  The verdict goes to `Balancer.set_health`; targets start healthy.
- a watcher that logs every change of a target's health (active verdicts, passive ejections,
  half-open returns) on the `fastmesh.health` logger, and can call `on_change(row, previous)`.

`HealthChecker.start(entries)` takes (Upstream, Balancer) pairs; `replace(entries)` swaps them when
a new Plan is applied (active counters carry over for unchanged upstream+target+check settings);
`await stop()` cancels every task and waits for them, so no socket outlives it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from fastmesh._core.http1 import HTTPParseError, parse_response

log = logging.getLogger("fastmesh.health")

OK, HTTP_FAILURE, TIMEOUT, FAILURE = "ok", "http_failure", "timeout", "failure"
MAX_PROBE_HEAD = 16384


@dataclass
class ProbeState:
    """Consecutive counts for one target's active checks."""

    successes: int = 0
    failures: int = 0
    timeouts: int = 0
    http_failures: int = 0
    healthy: bool = True
    last: str = ""                      # the last outcome: ok / http_failure / timeout / failure
    last_status: int = 0
    probes: int = 0

    def record(self, outcome: str, status: int, check) -> bool | None:
        """Count one probe; returns the new verdict when it changes, else None."""
        self.probes += 1
        self.last, self.last_status = outcome, status
        if outcome == OK:
            self.successes += 1
            self.failures = self.timeouts = self.http_failures = 0
            if not self.healthy and self.successes >= check.successes:
                self.healthy = True
                return True
            return None
        self.successes = 0
        if outcome == HTTP_FAILURE:
            self.http_failures += 1
            tripped = check.http_failures and self.http_failures >= check.http_failures
        elif outcome == TIMEOUT:
            self.timeouts += 1
            tripped = check.timeouts and self.timeouts >= check.timeouts
        else:
            self.failures += 1
            tripped = check.failures and self.failures >= check.failures
        if tripped and self.healthy:
            self.healthy = False
            return False
        return None


def status_is_healthy(status: int, check) -> bool:
    if check.http_statuses:
        return status in check.http_statuses
    return 200 <= status < 400


def probe_request(host: str, port: int, path: str) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: fastmesh-health\r\n"
            f"Accept: */*\r\nConnection: close\r\n\r\n").encode("latin-1")


async def probe(host: str, port: int, path: str, timeout: float,
                pool=None) -> tuple[str, int]:
    """One active check: (outcome, status); outcome is OK/HTTP_FAILURE decided by the caller from
    the status, here "response", TIMEOUT or FAILURE. With the target's TLS `pool` (an https
    service), the probe is TLS with the pool's context, name and peer check: a certificate the
    proxy would refuse fails the check too."""
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races
        # the inner task's completion, and stop() would then wait for a task that never ends
        async with asyncio.timeout(timeout):
            return await _exchange(host, port, path, pool if getattr(pool, "ssl", None) else None)
    except TimeoutError:
        return TIMEOUT, 0
    except (OSError, EOFError, HTTPParseError, ValueError):
        return FAILURE, 0


async def _exchange(host: str, port: int, path: str, tls=None) -> tuple[str, int]:
    writer = None
    try:
        if tls is None:
            reader, writer = await asyncio.open_connection(host, port)
        else:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls.ssl, server_hostname=tls.server_hostname)
            refused = tls.peer_check(writer.transport) if tls.peer_check is not None else None
            if refused is not None:
                raise ConnectionError(f"upstream identity rejected: {refused}")
        writer.write(probe_request(host, port, path))
        buf = b""
        while True:
            data = await reader.read(4096)
            if not data:
                raise EOFError("closed before a complete response head")
            buf += data
            parsed = parse_response(buf, max_head_size=MAX_PROBE_HEAD)
            if parsed is not None:
                return "response", parsed.status
            if len(buf) > MAX_PROBE_HEAD:
                raise ValueError("response head too large")
    finally:
        if writer is not None:
            writer.close()                  # the status is all we wanted


@dataclass
class _Entry:
    upstream: object                    # fastmesh.config.upstreams.Upstream
    balancer: object                    # fastmesh._core.balancer.Balancer
    tasks: list = field(default_factory=list)


class HealthChecker:
    """Active checks and health-change logging for a worker's upstreams."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *,
                 watch_interval: float = 0.5,
                 on_change: Callable[[dict, dict | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.loop = loop
        self.watch_interval = watch_interval
        self.on_change = on_change
        self.clock = clock
        self.entries: list[_Entry] = []
        self.states: dict[tuple, ProbeState] = {}   # (upstream, host, port, check) -> state
        self._watcher: asyncio.Task | None = None
        self._last_rows: dict[tuple[str, str], dict] = {}

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, entries: Iterable[tuple[object, object]]) -> None:
        """Start checks for (Upstream, Balancer) pairs; call on the worker's loop thread."""
        loop = self.loop or asyncio.get_event_loop()
        self.loop = loop
        for upstream, balancer in entries:
            entry = _Entry(upstream, balancer)
            check = upstream.healthchecks.active if upstream.healthchecks else None
            if check is not None:
                for target in balancer.targets:
                    key = (upstream.name, target.host, target.port, check)
                    state = self.states.setdefault(key, ProbeState())
                    if not state.healthy:
                        balancer.set_health(target, False)
                    entry.tasks.append(loop.create_task(
                        self._run_target(balancer, target, check, state),
                        name=f"health {upstream.name} {target.address}"))
            self.entries.append(entry)
        self._forget_stale()
        if self._watcher is None and self.watch_interval > 0:
            self._watcher = loop.create_task(self._watch(), name="health watcher")

    def replace(self, entries: Iterable[tuple[object, object]]) -> None:
        """A new Plan: stop the old checks (without waiting) and start the new ones."""
        for entry in self.entries:
            for task in entry.tasks:
                task.cancel()
        self.entries = []
        self.start(entries)

    async def stop(self) -> None:
        tasks = [t for e in self.entries for t in e.tasks]
        if self._watcher is not None:
            tasks.append(self._watcher)
            self._watcher = None
        self.entries = []
        pending = set(tasks)
        while pending:                      # re-cancel: a task may absorb one cancellation
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)

    def _forget_stale(self) -> None:
        live = {(e.upstream.name, t.host, t.port, e.upstream.healthchecks.active)
                for e in self.entries if e.upstream.healthchecks
                and e.upstream.healthchecks.active for t in e.balancer.targets}
        for key in [k for k in self.states if k not in live]:
            del self.states[key]

    # --- active checks ---------------------------------------------------------------------

    async def _run_target(self, balancer, target, check, state: ProbeState) -> None:
        while True:
            started = self.clock()
            outcome, status = await probe(target.host, target.port, check.path, check.timeout,
                                          target.pool)
            if outcome == "response":
                outcome = OK if status_is_healthy(status, check) else HTTP_FAILURE
            verdict = state.record(outcome, status, check)
            if verdict is not None:
                balancer.set_health(target, verdict)
                log.warning("upstream %s target %s: active check says %s (%s%s)",
                            balancer.name, target.address,
                            "healthy" if verdict else "unhealthy", outcome,
                            f" {status}" if status else "")
                self._check_changes()
            await asyncio.sleep(max(0.0, check.interval - (self.clock() - started)))

    # --- watching (active and passive) -----------------------------------------------------

    async def _watch(self) -> None:
        while True:
            self._check_changes()
            await asyncio.sleep(self.watch_interval)

    def _check_changes(self) -> None:
        rows: dict[tuple[str, str], dict] = {}
        for entry in self.entries:
            for row in entry.balancer.health():
                rows[(row["upstream"], row["target"])] = row
        for key, row in rows.items():
            before = self._last_rows.get(key)
            if before is None or (before["healthy"], before["passive"], before["active"]) != \
                    (row["healthy"], row["passive"], row["active"]):
                if before is not None:
                    log.warning("upstream %s target %s: %s (active %s, passive %s, %d ejections)",
                                row["upstream"], row["target"],
                                "healthy" if row["healthy"] else "unhealthy", row["active"],
                                row["passive"], row["ejections"])
                if self.on_change is not None:
                    self.on_change(row, before)
        self._last_rows = rows

    def status(self) -> list[dict]:
        """Per target: balancer health plus the active-check counters (admin view)."""
        out = []
        for entry in self.entries:
            check = entry.upstream.healthchecks.active if entry.upstream.healthchecks else None
            for row, target in zip(entry.balancer.health(), entry.balancer.targets):
                row = dict(row)
                state = self.states.get((entry.upstream.name, target.host, target.port, check))
                if state is not None:
                    row["active_check"] = {
                        "probes": state.probes, "last": state.last,
                        "last_status": state.last_status, "successes": state.successes,
                        "failures": state.failures, "timeouts": state.timeouts,
                        "http_failures": state.http_failures}
                out.append(row)
        return out
