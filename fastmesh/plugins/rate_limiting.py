"""rate-limiting: requests per second/minute/hour/day per consumer, credential, IP, header, service
or route; `policy: local` (one host, shared by its workers) or `policy: redis` (the cluster).

Local: the counters live in fastmesh._core.ratelimit's table in shared memory, one file per
gateway, `/dev/shm/fastmesh-ratelimit-<supervisor pid>.tbl`. Worker processes are started by the
supervisor (exec, not fork), so the table cannot be an inherited anonymous mapping: each worker
maps the file named after its parent (the supervisor), so the limit holds across all workers and
across worker restarts and reloads. The supervisor imports this module when it validates a config
naming the plugin and removes its table at exit; a table left by a gateway that was killed is
removed by the next gateway that opens a table (its owner is gone and nobody holds its lock).

Redis: see fastmesh/plugins/redis_counter.py (exact: `sync_rate: -1`, one round trip per request;
batched: `sync_rate: <seconds>`). With Redis unreachable, `fault_tolerant: true` (default) counts
with the local limiter instead; `false` answers 503 (Kong answers 500 there).
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import os
import sys
import tempfile

from fastmesh._core.ratelimit import DEFAULT_SLOTS, Limiter, SharedTable, now_ms
from fastmesh.config.schema import Invalid, boolean, describe, integer, string, token
from fastmesh.osutil import pid_alive
from fastmesh._core.rate_limit_filter import RateLimitFilter
from fastmesh.plugins import Field, Response

PERIODS = (("second", 1000), ("minute", 60_000), ("hour", 3_600_000), ("day", 86_400_000))
LIMIT_BY = ("consumer", "credential", "ip", "header", "service", "route")
TABLE_PREFIX = "fastmesh-ratelimit-"


# --- the shared table of this gateway -------------------------------------------------------------

def table_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def table_path(owner: int) -> str:
    return os.path.join(table_dir(), f"{TABLE_PREFIX}{owner}.tbl")


def _is_worker_process() -> bool:
    """A worker process started by fastmesh.supervisor (`python -c "...worker_main..." FD`)."""
    argv = getattr(sys, "orig_argv", ())
    return len(argv) >= 3 and argv[1] == "-c" and "worker_main" in argv[2]


def owner_pid() -> int:
    """The gateway process whose table this process shares: the supervisor.

    FASTMESH_SUPERVISOR_PID, when a supervisor exports it, is trusted if it names this process or
    its parent; otherwise a worker is recognised by the command line the supervisor starts it with.
    """
    named = os.environ.get("FASTMESH_SUPERVISOR_PID", "")
    if named.isdigit() and int(named) in (os.getpid(), os.getppid()):
        return int(named)
    return os.getppid() if _is_worker_process() else os.getpid()



def sweep_stale(directory: str | None = None) -> list[str]:
    """Remove tables whose owner process is gone and that no process has mapped."""
    directory = directory or table_dir()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(TABLE_PREFIX) and name.endswith(".tbl")):
            continue
        pid = name[len(TABLE_PREFIX):-4]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # fails while anyone has it mapped
            os.unlink(path)
            removed.append(path)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.ENOENT):
                raise
        finally:
            os.close(fd)
    return removed


_table: SharedTable | None = None
_table_owner: int | None = None


def local_table() -> SharedTable:
    """This gateway's table (opened once per process; a forked process opens it again)."""
    global _table, _table_owner
    owner = owner_pid()
    if _table is None or _table_owner != owner:
        sweep_stale()
        _table = SharedTable(table_path(owner), DEFAULT_SLOTS)
        _table_owner = owner
    return _table


def _remove_own_table(pid: int = os.getpid()) -> None:
    if os.getpid() == pid:      # not in a forked child that inherited the handler
        try:
            os.unlink(table_path(pid))
        except OSError:
            pass


if not _is_worker_process():
    atexit.register(_remove_own_table)


# --- config ---------------------------------------------------------------------------------------

def limit_value(value) -> int:
    return integer(0, 10**9, "limit")(value)


def one_of(*choices: str):
    def parse(value) -> str:
        if value not in choices:
            raise Invalid(f"expected one of {', '.join(choices)}, found {describe(value)}")
        return value
    return parse


def redis_settings(value) -> dict:
    """{url, timeout (ms, Kong's unit), prefix}"""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping with url, timeout, prefix; found {describe(value)}")
    unknown = set(value) - {"url", "timeout", "prefix"}
    if unknown:
        raise Invalid(f"unknown field '{sorted(unknown)[0]}' (expected url, timeout, prefix)")
    url = value.get("url")
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise Invalid(f"url: expected redis://host:port/db, rediss:// or unix://, found {describe(url)}")
    timeout = value.get("timeout", 2000)
    try:
        timeout = integer(1, 10_000, "timeout (ms)")(timeout)
    except Invalid as err:
        raise Invalid(f"timeout: {err.message}") from None
    prefix = value.get("prefix", "fastmesh:rl:")
    if not isinstance(prefix, str):
        raise Invalid(f"prefix: expected a string, found {describe(prefix)}")
    return {"url": url, "timeout": timeout, "prefix": prefix}


def sync_rate(value) -> float:
    """-1: exact (a Redis round trip per request); > 0: seconds between batched syncs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value == -1 or 0 < value <= 3600):
        raise Invalid(f"expected -1 (exact) or seconds in (0, 3600], found {describe(value)}")
    return float(value)


def header_name(value) -> str:
    return token(value, "header name")


def status_code(value) -> int:
    return integer(400, 599, "error_code")(value)


# --- the plugin -----------------------------------------------------------------------------------

class RateLimiting(RateLimitFilter):
    """Config, setup and the Redis policy; the local policy and the response headers are native
    (fastmesh/_core/rate_limit_filter.pyx)."""

    name = "rate-limiting"
    priority = 910
    schema = {
        "second": Field(limit_value, None),
        "minute": Field(limit_value, None),
        "hour": Field(limit_value, None),
        "day": Field(limit_value, None),
        "limit_by": Field(one_of(*LIMIT_BY), "consumer"),
        "header_name": Field(header_name, None),
        "policy": Field(one_of("local", "redis"), "local"),
        "redis": Field(redis_settings, None),
        "sync_rate": Field(sync_rate, -1.0),
        "fault_tolerant": Field(boolean, True),
        "hide_client_headers": Field(boolean, False),
        "error_code": Field(status_code, 429),
        "error_message": Field(string, "API rate limit exceeded"),
    }

    @classmethod
    def check(cls, config):
        problems = []
        given = [(name, config[name]) for name, _ in PERIODS if config[name] is not None]
        if not given:
            problems.append(("", "at least one of second, minute, hour, day is required"))
        for (small, low), (large, high) in zip(given, given[1:]):
            if low > high:
                problems.append((small, f"the limit per {small} ({low}) is above the limit per "
                                        f"{large} ({high})"))
        if config["limit_by"] == "header" and not config["header_name"]:
            problems.append(("header_name", "required when limit_by is 'header'"))
        if config["policy"] == "redis" and not config["redis"]:
            problems.append(("redis", "required when policy is 'redis' (redis: {url: ...})"))
        return problems

    def setup(self, gateway_config) -> None:
        conf = self.config
        self.periods = [(ms, conf[name]) for name, ms in PERIODS if conf[name] is not None]
        # per period: the X-RateLimit-* names and the constant limit value, made once here
        self.period_headers = [
            (f"X-RateLimit-Limit-{name.capitalize()}".encode(), b"%d" % conf[name],
             f"X-RateLimit-Remaining-{name.capitalize()}".encode())
            for name, _ in PERIODS if conf[name] is not None]
        self.scope = getattr(self, "scope", None) or "global"   # set by the Plan compiler
        self.prefix = b"%s|%s|" % (self.scope.encode(), conf["limit_by"].encode())
        self.header = conf["header_name"].lower().encode() if conf["header_name"] else None
        self.by = conf["limit_by"]
        self.limiter = Limiter(local_table(), self.periods)
        self.single = len(self.periods) == 1
        self.hide = conf["hide_client_headers"]
        self.redis = None
        self.batched = None
        if conf["policy"] == "redis":
            from fastmesh.plugins.redis_counter import Batched, counter_for
            settings = conf["redis"]
            self.redis = counter_for(settings["url"], settings["timeout"] / 1000.0)
            self.redis_prefix = settings["prefix"].encode() + self.prefix
            if conf["sync_rate"] > 0:
                self.batched = Batched(self.redis, self.periods, conf["sync_rate"])
        self.compile(self.limiter, self.prefix, self.by, self.header or b"", self.hide,
                     self.redis is None, tuple(self.period_headers), conf["error_code"],
                     conf["error_message"])

    # -- phases -----------------------------------------------------------------------------------
    def remote_access(self, request):
        """`policy: redis` (the local policy never gets here: it is native)."""
        ident = self.identity(request)
        if not self.redis.available:
            return self._unavailable(request, ident)
        now = now_ms()
        if self.batched is not None:
            admitted, verdicts = self.batched.take(self.redis_prefix + ident, 1, now)
            return self._verdict(request, admitted, verdicts)
        return self._exact(request, ident, now)

    def _local(self, request, ident: bytes):
        return self.take_local(request, self.prefix + ident)

    def _unavailable(self, request, ident: bytes):
        if self.config["fault_tolerant"]:
            return self._local(request, ident)
        return Response(503, {"message": "Rate limiting is unavailable"}, [(b"Retry-After", b"1")])

    async def _exact(self, request, ident: bytes, now: int):
        from fastmesh._core.ratelimit import decide
        from fastmesh.plugins.redis_counter import RedisUnavailable, window_keys
        base = self.redis_prefix + ident
        keys, args = [], [1]
        for period, limit in self.periods:
            keys += window_keys(base, period, now)
            args += [period, limit, now % period]
        try:
            out = await self.redis.run("exact", keys, args)
        except RedisUnavailable:
            return self._unavailable(request, ident)
        verdicts = []
        for i, (period, limit) in enumerate(self.periods):
            cur, prev = int(out[2 + 2 * i]), int(out[3 + 2 * i])
            _, remaining, reset, retry = decide(prev, cur, period, limit, now % period, 1)
            verdicts.append((period, limit, remaining, reset, retry))
        refusing = int(out[1])
        if refusing:
            verdicts = verdicts[:refusing]
        return self._verdict(request, bool(out[0]), verdicts)

    def _verdict(self, request, admitted: bool, verdicts: list):
        """Answer or record headers from [(period, limit, remaining, reset, retry)]."""
        if not admitted:
            _, limit, _, reset, retry = verdicts[-1]
            return self.refuse(limit, reset, retry)
        if not self.hide:
            tightest = min(verdicts, key=lambda v: v[2])
            self.record_quota(request, tightest[1], tightest[2], tightest[3], [v[2] for v in verdicts])
        return None
