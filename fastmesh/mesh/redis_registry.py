"""The Redis registry: instances with a TTL heartbeat, watched through pub/sub and resyncs.

Layout (PREFIX is `fastmesh` unless the URL says `?prefix=NAME`):

    PREFIX:svc:<service>:<instance-id>   string, the instance as JSON; expires after the TTL
    PREFIX:idx:<service>                 set of the service's instance ids
    PREFIX:services                      set of service names
    PREFIX:events                        pub/sub channel: {"op": "register"|"deregister", ...}

A sidecar announces its instance every TTL/3 (`SET ... XX PX ttl`, plus the index entries);
when the key is gone (first registration, expiry, Redis restarted empty) it is written again and
a `register` event is published. Deregistration deletes the key and publishes `deregister`.

Watchers keep a local view: a full resync (one Lua script: read every indexed instance, drop
index entries whose key expired) on start, on every event, on a keyspace `expired` notification
(when the server has `notify-keyspace-events` with `Ex`), and every RESYNC_INTERVAL at most, so a
crashed instance drops out within TTL + RESYNC_INTERVAL even without notifications.

When Redis is unreachable the last view stays and the watcher retries (backoff up to
RETRY_MAX). When it comes back, possibly empty after a restart, instances of the last view that
are missing are kept for one TTL (their sidecars re-register on their next heartbeat), so a
Redis restart never empties the routing table.
"""
from __future__ import annotations

import asyncio
import json
import sys
from typing import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastmesh.mesh.registry import Instance, Registry, make_view, parse_instance

DEFAULT_PREFIX = "fastmesh"
RESYNC_INTERVAL = 2.0       # full resync at least this often
RETRY_MIN = 0.25            # reconnect backoff after Redis failed: 0.25 s, 0.5 s ... RETRY_MAX
RETRY_MAX = 2.0
COMMAND_TIMEOUT = 2.0       # one Redis command (socket timeout)
CONNECT_TIMEOUT = 1.0

# Every indexed instance's JSON; index entries whose key is gone are removed (atomically, so a
# registration running at the same time is never half-undone).
RESYNC_SCRIPT = """
local out = {}
for _, svc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local idx = ARGV[1] .. ':idx:' .. svc
  for _, id in ipairs(redis.call('SMEMBERS', idx)) do
    local value = redis.call('GET', ARGV[1] .. ':svc:' .. svc .. ':' .. id)
    if value then
      table.insert(out, value)
    else
      redis.call('SREM', idx, id)
    end
  end
end
return out
"""


def split_url(url: str) -> tuple[str, str, int]:
    """(URL for redis-py without our `prefix` argument, prefix, database number)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    kept = []
    for key, value in query:
        if key == "prefix":
            if not value or any(c in value for c in " \r\n\x00"):
                raise ValueError(f"registry URL: invalid prefix {value!r}")
            prefix = value
        else:
            kept.append((key, value))
    db = 0
    path = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and path:
        if not path.isdigit():
            raise ValueError(f"registry URL: expected a database number after '/', found {path!r}")
        db = int(path)
    for key, value in kept:
        if key == "db" and value.isdigit():
            db = int(value)
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix, db


class RedisRegistry(Registry):
    kind = "redis"

    def __init__(self, url: str, on_change: Callable[[], None], ttl: float):
        super().__init__(on_change)
        from redis.asyncio import from_url
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        redis_url, self.prefix, self.db = split_url(url)
        self.url = url
        self.ttl = float(ttl)
        self.client = from_url(redis_url, socket_timeout=COMMAND_TIMEOUT,
                               socket_connect_timeout=CONNECT_TIMEOUT,
                               retry=Retry(NoBackoff(), 0))     # our loops retry, with backoff
        self.services_key = f"{self.prefix}:services"
        self.channel = f"{self.prefix}:events"
        self.expired_channel = f"__keyevent@{self.db}__:expired"
        self.loop = asyncio.get_running_loop()
        self.lost = False                   # Redis failed since the last successful resync
        self.grace_until = 0.0              # keep missing instances until then (after a return)
        self.gone: set[tuple[str, str]] = set()     # deregistered during the grace period
        self.watcher: asyncio.Task | None = None
        self.heartbeats: dict[tuple[str, str], asyncio.Task] = {}
        self.stopped = False
        self.resyncs = 0
        self._first = asyncio.Event()
        # Each resync's answer, blob -> Instance (None: invalid). A resync that reads the same
        # blobs as the last one changes nothing and costs no parsing: at a few hundred instances,
        # parsing them all again every RESYNC_INTERVAL stalled the sidecar's loop for milliseconds.
        self._parsed: dict[bytes, Instance | None] = {}
        self._exact = False     # the view is exactly _parsed (not before a resync, not in grace)

    # -- keys ---------------------------------------------------------------------------------
    def instance_key(self, instance: Instance) -> str:
        return f"{self.prefix}:svc:{instance.service}:{instance.id}"

    def index_key(self, service: str) -> str:
        return f"{self.prefix}:idx:{service}"

    # -- watching -----------------------------------------------------------------------------
    async def start(self, wait: float) -> None:
        self.watcher = self.loop.create_task(self._watch(), name="registry watch")
        try:
            await asyncio.wait_for(self._first.wait(), wait)
        except asyncio.TimeoutError:
            _say(f"registry {self.url}: no answer within {wait:g}s "
                 f"({self.error or 'no reply'}); starting with an empty view", err=True)

    async def _watch(self) -> None:
        backoff = RETRY_MIN
        while not self.stopped:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel, self.expired_channel)
                if self.lost and self.ready:
                    self.grace_until = self.loop.time() + self.ttl
                await self._resync()
                if self.lost:
                    _say(f"registry {self.url} is reachable again: resynced "
                         f"({sum(map(len, self._view.values()))} instance(s))")
                self.lost = False
                self.error = None
                backoff = RETRY_MIN
                await self._follow(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:            # connection refused/reset, timeouts, bad replies
                self.error = f"{type(exc).__name__}: {exc}"
                if not self.lost:
                    _say(f"registry {self.url} unreachable ({self.error}); routing on the last "
                         f"view ({sum(map(len, self._view.values()))} instance(s)), retrying",
                         err=True)
                self.lost = True
                self._first.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
                except (asyncio.CancelledError, Exception):
                    pass

    async def _follow(self, pubsub) -> None:
        """Resync on every event and at least every RESYNC_INTERVAL, until the connection fails."""
        next_full = self.loop.time() + RESYNC_INTERVAL
        while not self.stopped:
            timeout = max(0.0, next_full - self.loop.time())
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            dirty = False
            while message is not None:          # take everything queued: one resync for all
                dirty = self._note(message) or dirty
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
            if dirty or self.loop.time() >= next_full:
                await self._resync()
                next_full = self.loop.time() + RESYNC_INTERVAL

    def _note(self, message: dict) -> bool:
        """True when the message may change the view."""
        channel = _text(message.get("channel"))
        data = _text(message.get("data"))
        if channel == self.expired_channel:
            return data.startswith(f"{self.prefix}:svc:")
        if channel != self.channel:
            return False
        try:
            event = json.loads(data)
        except ValueError:
            return True
        if isinstance(event, dict) and event.get("op") == "deregister":
            self.gone.add((str(event.get("service")), str(event.get("id"))))
        return True

    async def _resync(self) -> None:
        raw = await self.client.eval(RESYNC_SCRIPT, 1, self.services_key, self.prefix)
        grace = self.loop.time() < self.grace_until
        if not grace:
            self.gone.clear()
        if grace or not self._exact or self._parsed.keys() != set(raw):
            known = self._parsed
            self._parsed = {blob: known[blob] if blob in known else self._parse(blob)
                            for blob in raw}
            self._exact = not grace
            instances = [i for i in self._parsed.values() if i is not None]
            if grace:
                kept = [i for found in self._view.values() for i in found
                        if (i.service, i.id) not in self.gone]
                instances = kept + instances        # what Redis says wins
            self._set_view(make_view(instances))
        self.resyncs += 1
        self._first.set()

    @staticmethod
    def _parse(blob: bytes) -> Instance | None:
        try:
            return parse_instance(json.loads(blob), "redis")
        except ValueError as exc:
            _say(f"registry: skipping an invalid instance: {exc}", err=True)
            return None

    # -- registration -------------------------------------------------------------------------
    async def register(self, instance: Instance) -> None:
        key = (instance.service, instance.id)
        failing = False
        try:
            await asyncio.wait_for(self._announce(instance), COMMAND_TIMEOUT + 1)
        except (asyncio.TimeoutError, Exception) as exc:
            failing = True
            _say(f"registry {self.url}: cannot register {instance.service}/{instance.id} yet "
                 f"({type(exc).__name__}: {exc}); retrying", err=True)
        if key not in self.heartbeats:
            self.heartbeats[key] = self.loop.create_task(self._heartbeat(instance, failing),
                                                         name=f"registry heartbeat {key}")

    def _beat(self) -> float:
        return max(0.1, self.ttl / 3)

    async def _heartbeat(self, instance: Instance, failing: bool) -> None:
        """Every TTL/3; after a failure every 0.5 s at most, so a returning Redis sees this
        instance again quickly."""
        while True:
            await asyncio.sleep(self._beat() if not failing else min(self._beat(), 0.5))
            try:
                rewritten = await asyncio.wait_for(self._announce(instance), COMMAND_TIMEOUT + 1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    _say(f"registry: heartbeat of {instance.service}/{instance.id} failed "
                         f"({type(exc).__name__}: {exc}); retrying", err=True)
                failing = True
                continue
            if rewritten:
                _say(f"registry: {instance.service}/{instance.id} registered again (its key was "
                     f"gone: expired, or Redis restarted)")
            failing = False

    async def _announce(self, instance: Instance) -> bool:
        """Refresh the instance's key; write it again (and tell the watchers) if it was gone.
        True when it had to be written again."""
        ttl_ms = max(1, int(self.ttl * 1000))
        value = json.dumps(instance.to_dict(), sort_keys=True)
        key = self.instance_key(instance)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, value, px=ttl_ms, xx=True)
        pipe.sadd(self.services_key, instance.service)
        pipe.sadd(self.index_key(instance.service), instance.id)
        refreshed, _, _ = await pipe.execute()
        if refreshed:
            return False
        pipe = self.client.pipeline(transaction=True)
        pipe.set(key, value, px=ttl_ms)
        pipe.sadd(self.services_key, instance.service)
        pipe.sadd(self.index_key(instance.service), instance.id)
        pipe.publish(self.channel, json.dumps(
            {"op": "register", "service": instance.service, "id": instance.id}))
        await pipe.execute()
        return True

    async def deregister(self, instance: Instance) -> None:
        task = self.heartbeats.pop((instance.service, instance.id), None)
        if task is not None:
            task.cancel()
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.instance_key(instance))
        pipe.srem(self.index_key(instance.service), instance.id)
        pipe.publish(self.channel, json.dumps(
            {"op": "deregister", "service": instance.service, "id": instance.id}))
        await asyncio.wait_for(pipe.execute(), COMMAND_TIMEOUT + 1)

    async def stop(self) -> None:
        self.stopped = True
        tasks = list(self.heartbeats.values()) + ([self.watcher] if self.watcher else [])
        self.heartbeats = {}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        try:
            await asyncio.wait_for(self.client.aclose(), 1.0)
        except (asyncio.TimeoutError, Exception):
            pass

    def state(self) -> dict:
        state = super().state()
        state.update(url=self.url, prefix=self.prefix, ttl=self.ttl, reachable=not self.lost,
                     resyncs=self.resyncs)
        return state


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _say(message: str, err: bool = False) -> None:
    print(f"fastmesh sidecar: {message}", file=sys.stderr if err else sys.stdout, flush=True)
