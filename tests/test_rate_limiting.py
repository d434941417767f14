"""rate-limiting: the shared-memory counting core, the plugin on real gateways, local and Redis."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from conftest import RawClient, config, get, service
from fastmesh._core.ratelimit import Limiter, SharedTable, decide, key_hash
from fastmesh.config import ConfigError, load_config_data
from fastmesh.plugins import rate_limiting

MINUTE = 60_000


def at(window: int, period: int = 1000, offset: int = 0) -> int:
    """A timestamp `offset` ms into fixed window number `window` of `period`."""
    return 1_700_000_000_000 // period * period + window * period + offset


# --- the core: window math -----------------------------------------------------------------------

def test_a_burst_gets_exactly_the_limit_then_a_retry_time_that_works():
    table = SharedTable(None, 64)
    now = at(0)
    got = [table.check(b"k", 1000, 3, 1, now) for _ in range(5)]
    assert [g[0] for g in got] == [True, True, True, False, False]
    assert [g[1] for g in got[:3]] == [2, 1, 0]
    assert got[0][2] == 1000                       # reset: the window's end
    retry = got[3][3]
    # next window: prev = 3 weighs 3 * (1 - e); one more fits when e >= 1/3
    assert retry == 1000 + 334
    assert table.check(b"k", 1000, 3, 1, now + retry - 1)[0] is False
    assert table.check(b"k", 1000, 3, 1, now + retry)[0] is True


def test_the_previous_window_weighs_in_proportionally():
    table = SharedTable(None, 64)
    for _ in range(10):
        assert table.check(b"k", MINUTE, 10, 1, at(0, MINUTE))[0]
    # 45 s into the next minute the previous 10 count for 10 * 15/60 = 2.5: 7 more fit
    admitted = sum(table.check(b"k", MINUTE, 10, 1, at(1, MINUTE, 45_000))[0] for _ in range(20))
    assert admitted == 7
    # two windows later the old counts are gone
    assert sum(table.check(b"k", MINUTE, 10, 1, at(3, MINUTE))[0] for _ in range(20)) == 10


def test_decide_is_the_same_arithmetic_for_counts_kept_elsewhere():
    assert decide(0, 0, 1000, 3, 0) == (True, 2, 1000, 0)
    assert decide(3, 1, 1000, 3, 500) == (False, 0, 500, 167)
    assert decide(0, 5, 1000, 5, 250, 1) == (False, 0, 750, 750 + 200)
    with pytest.raises(ValueError):
        decide(0, 0, 1000, 3, 1000)


def test_a_refused_period_takes_back_what_the_others_counted():
    table = SharedTable(None, 64)
    limiter = Limiter(table, [(1000, 2), (MINUTE, 5)])
    now = at(0, MINUTE)
    assert [limiter.take(b"c", 1, now) for _ in range(3)] == [True, True, False]
    assert (limiter.limit, limiter.remaining) == (2, 0)
    # the refused request did not use minute quota: 3 more seconds of 2 = 5 admitted in all
    total = 2
    for second in range(1, 6):
        total += sum(limiter.take(b"c", 1, now + second * 2000) for _ in range(2))
    assert total == 5
    assert limiter.take(b"c", 1, now + 20_000) is False
    assert limiter.limit == 5 and limiter.retry_ms > 0


def test_keys_and_periods_are_counted_apart():
    table = SharedTable(None, 64)
    now = at(0)
    assert table.check(b"a", 1000, 1, 1, now)[0] and table.check(b"b", 1000, 1, 1, now)[0]
    assert table.check(b"a", 2000, 1, 1, now)[0]
    assert not table.check(b"a", 1000, 1, 1, now)[0]
    assert key_hash(b"a", 1000) != key_hash(b"a", 2000) != 0


# --- the core: a full table ----------------------------------------------------------------------

def _colliding(nslots: int, count: int) -> list[bytes]:
    """Keys whose home slot is slot 0 of a table of `nslots`: they share one probe range."""
    found, i = [], 0
    while len(found) < count:
        key = b"key-%d" % i
        if key_hash(key, 1000) & (nslots - 1) == 0:
            found.append(key)
        i += 1
    return found


def test_a_full_probe_range_evicts_the_least_recently_used_key():
    table = SharedTable(None, 8)
    keys = _colliding(8, 9)
    now = at(0)
    for i, key in enumerate(keys[:8]):                # fills every slot, key i touched at now+i
        assert table.check(key, 1000, 1, 1, now + i)[0]
    assert table.used() == 8 and table.evictions == 0
    assert table.check(keys[8], 1000, 1, 1, now + 10)[0]
    assert table.evictions == 1                       # keys[0] (oldest) lost its slot ...
    assert table.check(keys[0], 1000, 1, 1, now + 11)[0]     # ... and starts over from zero
    assert table.evictions == 2
    assert not table.check(keys[7], 1000, 1, 1, now + 12)[0]  # recent keys kept their counts
    assert table.used() == 8                          # memory stays fixed


def test_stale_slots_are_reused_without_counting_an_eviction():
    table = SharedTable(None, 8)
    keys = _colliding(8, 9)
    for key in keys[:8]:
        table.check(key, 1000, 1, 1, at(0))
    assert table.check(keys[8], 1000, 1, 1, at(5))[0]     # all idle for > 2 periods
    assert table.evictions == 0


# --- the core: sharing between processes ---------------------------------------------------------

def _hammer(path, key, count, out):
    table = SharedTable(path) if path else _inherited
    out.put(sum(table.check(key, MINUTE, 500, 1)[0] for _ in range(count)))


_inherited = None


@pytest.mark.parametrize("by_path", [True, False], ids=["file", "anonymous-fork"])
def test_processes_sharing_the_table_admit_the_limit_not_n_times_it(tmp_path, by_path):
    global _inherited
    path = str(tmp_path / "t.tbl") if by_path else None
    table = SharedTable(path, 1024)
    _inherited = table
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(path, b"shared", 400, out)) for _ in range(4)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    # 1600 tried: unshared tables would admit 400 in each process (1600); shared, 500 in all
    assert sum(counts) == 500, counts
    assert table.check(b"shared", MINUTE, 500, 1)[0] is False


def _open_and_take(path, barrier, out):
    barrier.wait(timeout=10)
    table = SharedTable(path, 256)
    out.put(sum(table.check(b"k", MINUTE, 10, 1)[0] for _ in range(10)))


def test_processes_opening_a_new_table_at_once_all_get_the_same_one(tmp_path):
    """Workers start together: exactly one creates the file, none blocks, all share it."""
    path = str(tmp_path / "race.tbl")
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_open_and_take, args=(path, barrier, out)) for _ in range(6)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=20) for _ in procs]        # a deadlock fails here, bounded
    for p in procs:
        p.join(timeout=10)
    assert sum(counts) == 10, counts
    assert sorted(os.listdir(tmp_path)) == ["race.tbl"]  # no temporary files left


def test_a_table_file_is_validated_and_keeps_its_size(tmp_path):
    path = tmp_path / "t.tbl"
    first = SharedTable(str(path), 64)
    again = SharedTable(str(path), 4096)          # an existing table keeps its own size
    assert again.nslots == 64 and path.stat().st_size == 64 + 64 * 64
    assert first.creator == os.getpid()
    first.close()
    again.close()
    bogus = tmp_path / "bogus.tbl"
    bogus.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="not a fastmesh rate limit table"):
        SharedTable(str(bogus))
    with pytest.raises(ValueError, match="power of two"):
        SharedTable(None, 100)


def test_tables_of_dead_gateways_are_swept_and_live_ones_kept(tmp_path):
    ctx = multiprocessing.get_context("fork")
    dead = ctx.Process(target=lambda: None)
    dead.start()
    dead.join()
    stale = tmp_path / f"fastmesh-ratelimit-{dead.pid}.tbl"
    SharedTable(str(stale), 8).close()
    mine = tmp_path / f"fastmesh-ratelimit-{os.getpid()}.tbl"
    SharedTable(str(mine), 8).close()
    in_use_path = tmp_path / f"fastmesh-ratelimit-{dead.pid + 100000}.tbl"
    in_use = SharedTable(str(in_use_path), 8)      # owner gone, but still mapped: kept
    removed = rate_limiting.sweep_stale(str(tmp_path))
    assert removed == [str(stale)]
    assert mine.exists() and in_use_path.exists()
    in_use.close()
    assert rate_limiting.sweep_stale(str(tmp_path)) == [str(in_use_path)]


# --- config ------------------------------------------------------------------------------------

def issues_of(plugin_config: dict) -> dict[str, list[str]]:
    data = {"services": [], "plugins": [{"name": "rate-limiting", "config": plugin_config}]}
    with pytest.raises(ConfigError) as info:
        load_config_data(data)
    out: dict[str, list[str]] = {}
    for issue in info.value.issues:
        out.setdefault(issue.path, []).append(issue.message)
    return out


def test_config_errors_name_the_field():
    assert "at least one of second" in issues_of({})["plugins[0].config"][0]
    assert "required when limit_by is 'header'" in \
        issues_of({"minute": 5, "limit_by": "header"})["plugins[0].config.header_name"][0]
    assert "required when policy is 'redis'" in \
        issues_of({"minute": 5, "policy": "redis"})["plugins[0].config.redis"][0]
    assert "above the limit per minute" in \
        issues_of({"second": 10, "minute": 5})["plugins[0].config.second"][0]
    assert "expected one of consumer" in \
        issues_of({"minute": 5, "limit_by": "cookie"})["plugins[0].config.limit_by"][0]
    assert "expected -1 (exact)" in issues_of({"minute": 5, "sync_rate": 0})["plugins[0].config.sync_rate"][0]
    found = issues_of({"minute": 5, "policy": "redis", "redis": {"url": "http://x", "timeout": 0}})
    assert "url: expected redis://" in found["plugins[0].config.redis"][0]
    assert "expected an integer" in issues_of({"minute": "5"})["plugins[0].config.minute"][0]


# --- on a gateway --------------------------------------------------------------------------------

def rl_config(echo, plugin: dict, *extra_plugins: dict, consumers=None, routes=None) -> dict:
    cfg = config(service("s", echo.url, routes or [{"name": "r", "paths": ["/"]}]))
    cfg["plugins"] = [*extra_plugins, {"name": "rate-limiting", "config": plugin}]
    if consumers:
        cfg["consumers"] = consumers
    return cfg


def statuses(port: int, count: int, headers: dict | None = None, path: str = "/") -> list[int]:
    return [get(port, path, headers=headers).status for _ in range(count)]


def test_minute_limit_by_ip_with_headers_then_429(gateway, echo):
    gw = gateway(rl_config(echo, {"minute": 3, "hour": 100, "limit_by": "ip"}))
    first = [get(gw.port) for _ in range(3)]
    assert [r.status for r in first] == [200, 200, 200]
    assert [r.header("RateLimit-Remaining") for r in first] == ["2", "1", "0"]
    assert all(r.header("RateLimit-Limit") == "3" for r in first)
    assert 1 <= int(first[0].header("RateLimit-Reset")) <= 60
    assert first[2].header("X-RateLimit-Limit-Minute") == "3"
    assert first[2].header("X-RateLimit-Remaining-Minute") == "0"
    assert first[2].header("X-RateLimit-Limit-Hour") == "100"
    assert first[2].header("X-RateLimit-Remaining-Hour") == "97"
    refused = get(gw.port)
    assert refused.status == 429
    assert refused.json() == {"message": "API rate limit exceeded"}
    assert 1 <= int(refused.header("Retry-After")) <= 120
    assert refused.header("RateLimit-Remaining") == "0"
    assert refused.header("RateLimit-Limit") == "3"


def test_second_limit_admits_again_after_retry_after(gateway, echo):
    gw = gateway(rl_config(echo, {"second": 2, "limit_by": "ip",
                                  "error_code": 403, "error_message": "slow down"}))
    # start right after a second boundary so the burst falls in one window
    time.sleep(1 - time.time() % 1 + 0.02)
    got = [get(gw.port) for _ in range(4)]
    assert [r.status for r in got] == [200, 200, 403, 403]
    assert got[2].json() == {"message": "slow down"}
    wait = int(got[3].header("Retry-After"))
    assert 1 <= wait <= 2
    time.sleep(wait)
    assert get(gw.port).status == 200


def test_limit_by_header_counts_each_value_and_falls_back_to_ip(gateway, echo):
    gw = gateway(rl_config(echo, {"minute": 2, "limit_by": "header", "header_name": "X-Tenant"}))
    assert statuses(gw.port, 3, {"X-Tenant": "a"}) == [200, 200, 429]
    assert statuses(gw.port, 3, {"X-Tenant": "b"}) == [200, 200, 429]
    assert statuses(gw.port, 3) == [200, 200, 429]            # no header: the IP's own quota


def test_limit_by_consumer_with_key_auth_counts_each_consumer(gateway, echo):
    consumers = [{"username": "alice", "keyauth_credentials": [{"key": "alice-key"}]},
                 {"username": "bob", "keyauth_credentials": [{"key": "bob-key"}]}]
    gw = gateway(rl_config(echo, {"minute": 2},
                           {"name": "key-auth", "config": {"key_names": ["apikey"]}},
                           consumers=consumers))
    assert statuses(gw.port, 3, {"apikey": "alice-key"}) == [200, 200, 429]
    assert statuses(gw.port, 2, {"apikey": "bob-key"}) == [200, 200]
    assert get(gw.port).status == 401                         # key-auth answers first


def test_a_consumer_scoped_entry_gives_that_consumer_its_own_limit(gateway, echo):
    consumers = [{"username": "alice", "keyauth_credentials": [{"key": "alice-key"}]},
                 {"username": "bob", "keyauth_credentials": [{"key": "bob-key"}]}]
    cfg = rl_config(echo, {"minute": 2}, {"name": "key-auth"}, consumers=consumers)
    cfg["plugins"].append({"name": "rate-limiting", "consumer": "alice", "config": {"minute": 4}})
    gw = gateway(cfg)
    assert statuses(gw.port, 5, {"apikey": "alice-key"}) == [200] * 4 + [429]
    assert statuses(gw.port, 3, {"apikey": "bob-key"}) == [200, 200, 429]


def test_limit_by_credential_counts_each_key_of_one_consumer_apart(gateway, echo):
    consumers = [{"username": "alice", "keyauth_credentials": [{"key": "k-one", "id": "one"},
                                                               {"key": "k-two", "id": "two"}]}]
    gw = gateway(rl_config(echo, {"minute": 2, "limit_by": "credential"},
                           {"name": "key-auth", "config": {"key_names": ["apikey"]}},
                           consumers=consumers))
    assert statuses(gw.port, 3, {"apikey": "k-one"}) == [200, 200, 429]
    assert statuses(gw.port, 3, {"apikey": "k-two"}) == [200, 200, 429]


def test_a_header_value_cannot_pose_as_an_ip(gateway, echo):
    gw = gateway(rl_config(echo, {"minute": 2, "limit_by": "header", "header_name": "X-Tenant"}))
    assert statuses(gw.port, 3, {"X-Tenant": "ip:127.0.0.1"}) == [200, 200, 429]
    assert statuses(gw.port, 2) == [200, 200]                  # the IP's own quota is untouched


def test_limit_by_service_and_route_and_scopes_are_counted_apart(gateway, echo):
    routes = [{"name": "a", "paths": ["/a"]}, {"name": "b", "paths": ["/b"]}]
    cfg = config(service("s", echo.url, routes))
    cfg["plugins"] = [{"name": "rate-limiting", "route": "a", "config": {"minute": 2, "limit_by": "service"}},
                      {"name": "rate-limiting", "route": "b", "config": {"minute": 2, "limit_by": "service"}}]
    gw = gateway(cfg)
    assert statuses(gw.port, 3, path="/a") == [200, 200, 429]
    assert statuses(gw.port, 3, path="/b") == [200, 200, 429]  # another scope: its own counter
    cfg["plugins"] = [{"name": "rate-limiting", "config": {"minute": 3, "limit_by": "route"}}]
    gw2 = gateway(cfg)
    assert statuses(gw2.port, 4, path="/a") == [200, 200, 200, 429]
    assert statuses(gw2.port, 4, path="/b") == [200, 200, 200, 429]


def test_hide_client_headers(gateway, echo):
    gw = gateway(rl_config(echo, {"minute": 1, "limit_by": "ip", "hide_client_headers": True}))
    ok = get(gw.port)
    assert ok.status == 200 and ok.header("RateLimit-Limit") is None
    assert ok.header("X-RateLimit-Limit-Minute") is None
    refused = get(gw.port)
    assert refused.status == 429 and refused.header("Retry-After") is not None
    assert refused.header("RateLimit-Limit") is None


def table_file(pid: int) -> Path:
    return Path(rate_limiting.table_path(pid))


def test_local_limit_holds_across_two_workers_and_the_table_is_removed_at_stop(gateway, echo):
    gw = gateway(rl_config(echo, {"minute": 20, "limit_by": "ip"}), "--workers", "2")
    codes = statuses(gw.port, 60)                 # a new connection each: both workers serve
    assert codes.count(200) == 20 and codes.count(429) == 40, codes
    shm = table_file(gw.pid)
    assert shm.exists()
    assert shm.stat().st_size == 64 + 64 * rate_limiting.DEFAULT_SLOTS
    _wait_for_workers(gw.pid, shm, 2)          # both workers map the same table
    gw.stop()
    assert not shm.exists()


def test_one_worker_gateway_removes_its_table_too(gateway, echo):
    gw = gateway(rl_config(echo, {"minute": 5, "limit_by": "ip"}))
    assert get(gw.port).status == 200
    shm = table_file(gw.pid)
    assert shm.exists()
    gw.stop()
    assert not shm.exists()


def _wait_for_workers(supervisor: int, shm: Path, count: int, not_in: set = frozenset()) -> set:
    """The supervisor's `count` worker pids once each has the table mapped (bounded wait)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        workers = _children(supervisor)
        if len(workers) == count and not workers & not_in and all(_maps(p, shm) for p in workers):
            return workers
        time.sleep(0.1)
    raise AssertionError(f"workers of {supervisor} not all mapping {shm}: {_children(supervisor)}")


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _maps(pid: int, path: Path) -> bool:
    try:
        return str(path) in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# --- policy: redis -------------------------------------------------------------------------------

def redis_keys(redis_server, pattern: str = "*") -> list[str]:
    raw = redis_server.command("KEYS", pattern).decode("latin-1")
    return [line for line in raw.split("\r\n")[1:] if line and not line.startswith("$")]


def redis_total(redis_server) -> int:
    total = 0
    for key in redis_keys(redis_server, "fmtest:*"):
        reply = redis_server.command("GET", key).decode()
        total += int(reply.split("\r\n")[1])
    return total


def redis_plugin(redis_server, **extra) -> dict:
    return {"minute": 20, "limit_by": "ip", "policy": "redis",
            "redis": {"url": redis_server.url, "timeout": 300, "prefix": "fmtest:"}, **extra}


def test_redis_exact_two_gateways_admit_exactly_the_limit(gateway, echo, redis_server):
    cfg = rl_config(echo, redis_plugin(redis_server))
    a, b = gateway(cfg), gateway(cfg)
    codes = []
    for _ in range(30):
        codes += [get(a.port).status, get(b.port).status]
    assert codes.count(200) == 20 and codes.count(429) == 40, codes
    assert redis_total(redis_server) == 20
    assert all(k.startswith("fmtest:global|ip|ip:127.0.0.1|60000|") for k in
               redis_keys(redis_server, "fmtest:*"))


def test_redis_batched_two_gateways_stay_within_the_documented_bound(gateway, echo, redis_server):
    sync = 0.2
    cfg = rl_config(echo, redis_plugin(redis_server, minute=30, sync_rate=sync))
    a, b = gateway(cfg), gateway(cfg)
    rate = 25.0                    # requests per second per gateway (one worker each)
    admitted = 0
    for _ in range(60):
        started = time.monotonic()
        admitted += get(a.port).status == 200
        admitted += get(b.port).status == 200
        # never faster than `rate` (a late request is not made up for with a burst)
        time.sleep(max(0.0, started + 1 / rate - time.monotonic()))
    # overshoot <= (instances x workers - 1) x rate x 2 sync intervals (redis_counter's doc)
    bound = (2 * 1 - 1) * rate * 2 * sync
    assert 30 <= admitted <= 30 + bound, admitted
    assert _eventually(lambda: redis_total(redis_server) == admitted)   # last counts sent


def _timed_statuses(port: int, count: int, limit_s: float) -> list[int]:
    out = []
    for _ in range(count):
        started = time.monotonic()
        with RawClient(port, timeout=limit_s) as c:        # a hang fails the test, bounded
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            out.append(c.read_response().status)
        assert time.monotonic() - started < limit_s
    return out


def _eventually(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("sync_rate", [-1, 0.2], ids=["exact", "batched"])
def test_redis_down_falls_back_to_local_limits_and_recovers(gateway, echo, redis_server, sync_rate):
    gw = gateway(rl_config(echo, redis_plugin(redis_server, minute=5, sync_rate=sync_rate)))
    assert _timed_statuses(gw.port, 2, 3.0) == [200, 200]
    assert _eventually(lambda: redis_total(redis_server) == 2)
    redis_server.stop()
    if sync_rate > 0:              # batched notices at its next sync (until then its view holds)
        assert _eventually(lambda: "unavailable" in _peek_log(gw))
    # the local limiter takes over (its own count: 5 more), each answer bounded by the timeout
    codes = _timed_statuses(gw.port, 7, 3.0)
    assert codes == [200] * 5 + [429] * 2, codes
    redis_server.start()                           # empty: counting restarts in Redis
    assert _eventually(lambda: "is back" in _peek_log(gw))
    assert _timed_statuses(gw.port, 3, 3.0) == [200, 200, 200]
    assert _eventually(lambda: redis_total(redis_server) == 3)


def _peek_log(gw) -> str:
    """What the gateway printed so far (non-blocking read of its stdout pipe)."""
    import fcntl
    fd = gw.proc.stdout.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        chunk = gw.proc.stdout.read() or ""
    except (BlockingIOError, TypeError):
        chunk = ""
    gw.seen = getattr(gw, "seen", "") + chunk
    return gw.seen


@pytest.mark.parametrize("sync_rate", [-1, 0.2], ids=["exact", "batched"])
def test_redis_down_fails_closed_when_not_fault_tolerant(gateway, echo, redis_server, sync_rate):
    gw = gateway(rl_config(echo, redis_plugin(redis_server, sync_rate=sync_rate,
                                              fault_tolerant=False)))
    assert _timed_statuses(gw.port, 1, 3.0) == [200]
    redis_server.stop()
    if sync_rate > 0:              # batched notices at its next sync; requests never wait
        assert _eventually(lambda: "unavailable" in _peek_log(gw))
    codes = _timed_statuses(gw.port, 3, 3.0)
    assert codes == [503, 503, 503], codes
    refused = get(gw.port)
    assert refused.json() == {"message": "Rate limiting is unavailable"}
    redis_server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and get(gw.port).status == 503:
        time.sleep(0.2)
    assert get(gw.port).status == 200


def test_unreachable_redis_from_the_start_never_hangs(gateway, echo):
    import socket
    with socket.socket() as s:                     # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = rl_config(echo, {"minute": 2, "limit_by": "ip", "policy": "redis",
                           "redis": {"url": f"redis://127.0.0.1:{port}/0", "timeout": 200}})
    gw = gateway(cfg)
    assert _timed_statuses(gw.port, 3, 3.0) == [200, 200, 429]


def _children(pid: int) -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid}


def _ready(admin_port: int) -> set:
    try:
        workers = _status(admin_port)["workers"]
    except (OSError, ValueError, KeyError):
        return set()
    return {w["pid"] for w in workers if w.get("alive")}


def _status(admin_port: int) -> dict:
    import json
    return json.loads(get(admin_port, "/status").body)


def test_a_restarted_worker_and_a_reload_keep_the_same_counts(gateway, echo):
    import signal
    import yaml
    from conftest import free_port
    admin = free_port()
    cfg = rl_config(echo, {"minute": 10, "limit_by": "ip"})
    gw = gateway(cfg, "--workers", "2", "--admin", f"127.0.0.1:{admin}")
    assert statuses(gw.port, 5) == [200] * 5
    shm = table_file(gw.pid)
    before = _wait_for_workers(gw.pid, shm, 2)
    # killed only once the supervisor counts both as started (killing one that has not reported
    # ready yet is a failed start, which stops the gateway)
    assert _eventually(lambda: _ready(admin) == before)
    os.kill(sorted(before)[0], signal.SIGKILL)           # the supervisor starts a new one
    _wait_for_workers(gw.pid, shm, 2, not_in={sorted(before)[0]})
    version = _status(admin)["config"]["version"]
    cfg["plugins"][0]["config"]["minute"] = 12           # a reload: new plugin instances
    gw.config_path.write_text(yaml.safe_dump(cfg))
    os.kill(gw.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _status(admin)["config"]["version"] == version:
        time.sleep(0.1)
    got = [get(gw.port) for _ in range(20)]
    codes = [r.status for r in got]
    assert codes.count(200) == 7 and codes.count(429) == 13, codes   # 12 - the 5 counted before
    assert got[0].header("X-RateLimit-Limit-Minute") == "12"
