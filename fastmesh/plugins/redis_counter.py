"""The Redis side of rate-limiting's `policy: redis`: one client per URL, two ways to count.

- `RedisCounter.run("exact", ...)`: one Lua script round trip per request; the script reads both
  windows of every period, decides, and increments only when all admit, atomically (Redis runs a
  script alone). Admitted count across the cluster == the limit, at the price of one round trip.
- `Batched`: requests are decided locally against the last counts seen in Redis plus what this
  worker admitted since; every `sync_rate` seconds one script per batch of keys INCRBYs those
  local counts and reads the fresh totals back. No request waits on Redis. Overshoot: each worker
  decides on a view of the others that is up to two sync intervals old (they pushed up to one
  interval ago; it pulled up to one interval ago), so per key and window the cluster admits at
  most about `limit + (instances x workers - 1) x rate x 2 x sync_rate` (rate: requests per
  second one worker admits for that key), and never more than `instances x workers x limit`.

Never a hang: connect and socket timeouts equal `redis.timeout`, the pool blocks at most that long
for a free connection, redis-py's retries are off, and every call is also under `wait_for`. After a
failure the counter is marked down: calls fail at once (the plugin falls back or fails closed)
while a probe PINGs every PROBE_INTERVAL seconds; the first answer marks it up again. Scripts are
sent by SHA and reloaded on NOSCRIPT, so a restarted (empty) Redis is used again as is.

Keys: `<prefix><scope>|<limit_by>|<identifier>|<period ms>|<window number>`; a window key expires
two periods after its window starts (it is still read as "previous" during the next window).
"""
from __future__ import annotations

import asyncio
import logging
import sys
import weakref

from fastmesh._core.ratelimit import decide

log = logging.getLogger("fastmesh.plugins.rate_limiting")

PROBE_INTERVAL = 0.5
MAX_CONNECTIONS = 64
SYNC_CHUNK = 256            # keys per sync script call
MAX_ENDED = 65536           # closed windows kept for sending while Redis is down

# KEYS: cur1, prev1, cur2, prev2, ...  ARGV: cost, then per period: period ms, limit, elapsed ms.
# Returns {admitted 1/0, refusing period (1-based, 0 if admitted), cur1, prev1, cur2, prev2, ...}
# with the counts as they were before this request.
EXACT_LUA = """
local cost = tonumber(ARGV[1])
local n = #KEYS / 2
local out = {1, 0}
for i = 1, n do
  local period = tonumber(ARGV[3 * i - 1])
  local limit = tonumber(ARGV[3 * i])
  local elapsed = tonumber(ARGV[3 * i + 1])
  local cur = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  out[2 * i + 1] = cur
  out[2 * i + 2] = prev
  if out[1] == 1 and prev * (period - elapsed) + (cur + cost) * period > limit * period then
    out[1] = 0
    out[2] = i
  end
end
if out[1] == 1 then
  for i = 1, n do
    redis.call('INCRBY', KEYS[2 * i - 1], cost)
    redis.call('PEXPIRE', KEYS[2 * i - 1], 2 * tonumber(ARGV[3 * i - 1]))
  end
end
return out
"""

# KEYS: cur1, prev1, ...  ARGV: delta1, ttl1 ms, ...  Returns {cur1, prev1, ...} after the deltas.
SYNC_LUA = """
local out = {}
for i = 1, #KEYS / 2 do
  local delta = tonumber(ARGV[2 * i - 1])
  local cur
  if delta > 0 then
    cur = redis.call('INCRBY', KEYS[2 * i - 1], delta)
    redis.call('PEXPIRE', KEYS[2 * i - 1], tonumber(ARGV[2 * i]))
  else
    cur = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  end
  out[2 * i - 1] = cur
  out[2 * i] = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
end
return out
"""


class RedisUnavailable(Exception):
    pass


def _say(message: str) -> None:
    log.warning(message)
    print(f"fastmesh: rate-limiting: {message}", file=sys.stderr, flush=True)


class RedisCounter:
    """A pooled client for one Redis URL with up/down state; created on the worker's loop."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.timeout = timeout
        self.client = None
        self.exact_script = None
        self.sync_script = None
        self.down = False
        self.probe: asyncio.Task | None = None

    def _connect(self) -> None:
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=MAX_CONNECTIONS, timeout=self.timeout,
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0))
        self.client = aioredis.Redis(connection_pool=pool)
        self.exact_script = self.client.register_script(EXACT_LUA)
        self.sync_script = self.client.register_script(SYNC_LUA)

    @property
    def available(self) -> bool:
        return not self.down

    async def run(self, script_name: str, keys: list, args: list) -> list:
        """Run one of the scripts; RedisUnavailable at once while down, or on any failure."""
        if self.down:
            raise RedisUnavailable(self.url)
        if self.client is None:
            self._connect()
        script = self.exact_script if script_name == "exact" else self.sync_script
        try:
            return await asyncio.wait_for(script(keys=keys, args=args), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:      # RedisError, OSError, TimeoutError: all mean "not now"
            self._mark_down(exc)
            raise RedisUnavailable(self.url) from exc

    def _mark_down(self, exc: BaseException) -> None:
        if self.down:
            return
        self.down = True
        _say(f"redis at {self.url} unavailable ({type(exc).__name__}: {exc}); "
             f"probing every {PROBE_INTERVAL}s")
        self.probe = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await asyncio.wait_for(self.client.ping(), self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception:
                continue
            self.down = False
            self.probe = None
            _say(f"redis at {self.url} is back")
            return


_counters: dict[tuple, RedisCounter] = {}


def counter_for(url: str, timeout: float) -> RedisCounter:
    """The process's counter for (url, timeout): one pool shared by every plugin instance."""
    key = (url, timeout)
    counter = _counters.get(key)
    if counter is None:
        counter = _counters[key] = RedisCounter(url, timeout)
    return counter


def window_keys(base: bytes, period: int, now: int) -> tuple[bytes, bytes]:
    """The Redis keys of the current and previous window of `period` ms at `now` (ms)."""
    number = now // period
    return base + b"|%d|%d" % (period, number), base + b"|%d|%d" % (period, number - 1)


class Entry:
    """This worker's view of one (key, period): counts seen in Redis plus its own, unsent."""

    __slots__ = ("window", "cur", "prev", "pending", "inflight", "touched")

    def __init__(self, window: int, now: int):
        self.window = window        # start of the window, ms
        self.cur = 0                # total in Redis for this window at the last sync
        self.prev = 0               # total of the window before, as last seen
        self.pending = 0            # admitted here, not yet sent
        self.inflight = 0           # sent, answer not yet back
        self.touched = now


class Batched:
    """Local decisions on Redis totals refreshed every `interval` seconds (see module doc)."""

    def __init__(self, counter: RedisCounter, periods: list[tuple[int, int]], interval: float):
        self.counter = counter
        self.periods = periods      # [(period ms, limit)]
        self.interval = interval
        self.entries: dict[tuple[bytes, int], Entry] = {}
        self.ended: list[tuple[bytes, int, int]] = []    # (key, delta, ttl) of closed windows
        self.task: asyncio.Task | None = None

    def _start(self) -> None:
        self.task = asyncio.ensure_future(_sync_loop(weakref.ref(self), self.interval))

    def take(self, base: bytes, cost: int, now: int):
        """(admitted, [(period ms, limit, remaining, reset ms, retry ms)]) from the local view."""
        if self.task is None:
            self._start()
        entries = []
        verdicts = []
        admitted = True
        for index, (period, limit) in enumerate(self.periods):
            window = now - now % period
            entry = self.entries.get((base, index))
            if entry is None:
                entry = self.entries[(base, index)] = Entry(window, now)
            elif entry.window != window:
                self._roll(base, period, entry, window)
            entry.touched = now
            ok, remaining, reset, retry = decide(
                entry.prev, entry.cur + entry.pending + entry.inflight, period, limit,
                now - window, cost)
            entries.append(entry)
            verdicts.append((period, limit, remaining, reset, retry))
            if not ok:
                admitted = False
                break
        if admitted:
            for entry in entries:
                entry.pending += cost
        return admitted, verdicts

    def _roll(self, base: bytes, period: int, entry: Entry, window: int) -> None:
        seen = entry.cur + entry.pending + entry.inflight
        if entry.pending:
            key = base + b"|%d|%d" % (period, entry.window // period)
            self.ended.append((key, entry.pending, 2 * period))
        entry.prev = seen if entry.window == window - period else 0
        entry.window = window
        entry.cur = entry.pending = entry.inflight = 0

    async def sync(self, now: int) -> None:
        """Send local counts, read totals back; on failure keep them for the next round."""
        batch = []
        for (base, index), entry in list(self.entries.items()):
            period = self.periods[index][0]
            if now - entry.touched > 2 * period:
                if entry.pending:        # idle: send what is left, then forget the key
                    key = base + b"|%d|%d" % (period, entry.window // period)
                    self.ended.append((key, entry.pending, 2 * period))
                del self.entries[(base, index)]
                continue
            if entry.window != now - now % period:
                continue                 # rolls over on its next use
            delta = entry.pending
            entry.pending = 0
            entry.inflight += delta
            batch.append((base, period, entry, entry.window, delta))
        ended, self.ended = self.ended, []
        sent = 0
        try:
            while sent < len(ended):
                chunk = ended[sent:sent + SYNC_CHUNK]
                keys, args = [], []
                for key, delta, ttl in chunk:
                    keys += [key, key]
                    args += [delta, ttl]
                await self.counter.run("sync", keys, args)
                sent += len(chunk)
        except RedisUnavailable:
            # retried next round; bounded: a long outage forgets the oldest closed windows
            self.ended = (ended[sent:] + self.ended)[-MAX_ENDED:]
        for start in range(0, len(batch), SYNC_CHUNK):
            chunk = batch[start:start + SYNC_CHUNK]
            keys, args = [], []
            for base, period, entry, window, delta in chunk:
                cur, prev = window_keys(base, period, window)
                keys += [cur, prev]
                args += [delta, 2 * period]
            try:
                totals = await self.counter.run("sync", keys, args)
            except RedisUnavailable:
                for base, period, entry, window, delta in batch[start:]:
                    entry.inflight -= delta
                    if entry.window == window:
                        entry.pending += delta
                return
            for i, (base, period, entry, window, delta) in enumerate(chunk):
                entry.inflight -= delta
                if entry.window == window:
                    entry.cur = int(totals[2 * i])
                    entry.prev = int(totals[2 * i + 1])


async def _sync_loop(ref, interval: float) -> None:
    """Runs while its Batched lives (a replaced Plan drops it; the loop then ends)."""
    from fastmesh._core.ratelimit import now_ms
    while True:
        await asyncio.sleep(interval)
        batched = ref()
        if batched is None:
            return
        if batched.counter.available:
            try:
                await batched.sync(now_ms())
            except Exception:
                log.error("rate-limiting: sync failed", exc_info=True)
        del batched
