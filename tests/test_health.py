"""Active health checks (fastmesh/health.py) against real servers on loopback: `fastmesh echo`
for a healthy target, scripted sockets that answer 500, hang, or close; plus the counters, the
health-change watcher and clean start/stop (no task or socket outlives stop())."""
from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest
import uvloop

from conftest import free_port, read_request_head
from fastmesh._core.balancer import Balancer
from fastmesh.config.upstreams import ActiveHealthCheck, HealthChecks, Upstream
from fastmesh.config.upstreams import Target as TargetSpec
from fastmesh.health import (
    FAILURE, HTTP_FAILURE, OK, TIMEOUT, HealthChecker, ProbeState, probe, probe_request,
)

FAST = dict(interval=0.05, timeout=0.3, successes=2, failures=2, timeouts=2, http_failures=2)


def upstream(ports: list[int], **check) -> Upstream:
    active = ActiveHealthCheck(path="/healthz", **{**FAST, **check})
    return Upstream(name="u", targets=tuple(TargetSpec("127.0.0.1", p, 1) for p in ports),
                    healthchecks=HealthChecks(active=active))


def run(coro):
    return uvloop.run(coro)


def client_sockets(*ports: int) -> int:
    """Sockets this process holds that are connected to one of `ports` (the probes' side; the
    scripted servers live in this process too, so counting every fd would count theirs)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) in ports:
                    count += 1
    return count


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# --- scripted targets -------------------------------------------------------------------------

def answer(status: int):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                     .encode())
    return handler


@pytest.fixture
def release():
    """An event that hanging handlers wait on; set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


# --- counting ---------------------------------------------------------------------------------

def test_probe_state_thresholds():
    check = ActiveHealthCheck(successes=2, failures=3, timeouts=2, http_failures=1)
    s = ProbeState()
    assert s.record(FAILURE, 0, check) is None
    assert s.record(FAILURE, 0, check) is None
    assert s.record(OK, 200, check) is None              # a success clears the failure run
    assert s.record(TIMEOUT, 0, check) is None
    assert s.record(TIMEOUT, 0, check) is False          # 2 timeouts in a row
    assert s.record(OK, 200, check) is None
    assert s.record(OK, 200, check) is True              # 2 successes in a row
    assert s.record(HTTP_FAILURE, 500, check) is False
    assert s.record(HTTP_FAILURE, 500, check) is None    # already unhealthy: no new verdict


def test_zero_threshold_disables_that_kind():
    check = ActiveHealthCheck(http_failures=0)
    s = ProbeState()
    for _ in range(10):
        assert s.record(HTTP_FAILURE, 500, check) is None
    assert s.healthy


def test_probe_request_bytes():
    assert probe_request("::1", 81, "/h?x=1") == (
        b"GET /h?x=1 HTTP/1.1\r\nHost: [::1]:81\r\nUser-Agent: fastmesh-health\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n")


# --- single probes against real servers -----------------------------------------------------

def test_probe_outcomes(echo, scripted, release):
    ok = scripted(answer(503))
    hang = scripted(lambda conn, i: (read_request_head(conn), release.wait(10)))
    closes = scripted(lambda conn, i: read_request_head(conn))
    garbage = scripted(lambda conn, i: (read_request_head(conn), conn.sendall(b"NOPE\r\n\r\n")))
    refused = free_port()

    async def main():
        return [await probe("127.0.0.1", echo.port, "/healthz", 2.0),
                await probe("127.0.0.1", ok.port, "/", 2.0),
                await probe("127.0.0.1", hang.port, "/", 0.2),
                await probe("127.0.0.1", closes.port, "/", 2.0),
                await probe("127.0.0.1", garbage.port, "/", 2.0),
                await probe("127.0.0.1", refused, "/", 2.0)]

    assert run(main()) == [("response", 200), ("response", 503), (TIMEOUT, 0), (FAILURE, 0),
                           (FAILURE, 0), (FAILURE, 0)]
    assert client_sockets(echo.port, ok.port, hang.port, closes.port, garbage.port) == 0


# --- the checker ------------------------------------------------------------------------------

def test_unhealthy_targets_are_marked_and_healthy_one_kept(echo, scripted, release):
    errors = scripted(answer(500))
    hang = scripted(lambda conn, i: (read_request_head(conn), release.wait(10)))
    closes = scripted(lambda conn, i: read_request_head(conn))
    refused = free_port()
    up = upstream([echo.port, errors.port, hang.port, closes.port, refused])
    balancer = Balancer.from_upstream(up)

    async def main():
        checker = HealthChecker(watch_interval=0)
        checker.start([(up, balancer)])
        await until(lambda: [t.active_ok for t in balancer.targets]
                    == [True, False, False, False, False])
        rows = checker.status()
        assert [r["active_check"]["last"] for r in rows] == [OK, HTTP_FAILURE, TIMEOUT, FAILURE,
                                                             FAILURE]
        assert rows[1]["active_check"]["last_status"] == 500
        assert {balancer.pick_py().port for _ in range(5)} == {echo.port}
        await checker.stop()
        return checker

    checker = run(main())
    assert checker.entries == [] and checker._watcher is None
    assert client_sockets(echo.port, errors.port, hang.port, closes.port) == 0


def test_target_recovers_after_consecutive_successes(scripted):
    status = {"code": 500}

    def flaky(conn, index):
        read_request_head(conn)
        conn.sendall(f"HTTP/1.1 {status['code']} X\r\nContent-Length: 0\r\n\r\n".encode())

    target = scripted(flaky)
    up = upstream([target.port], successes=3)
    balancer = Balancer.from_upstream(up)
    t = balancer.targets[0]

    async def main():
        checker = HealthChecker(watch_interval=0)
        checker.start([(up, balancer)])
        await until(lambda: not t.active_ok)
        assert balancer.pick_py() is None
        status["code"] = 200
        probes = checker.status()[0]["active_check"]["probes"]
        await until(lambda: t.active_ok)
        assert checker.status()[0]["active_check"]["probes"] >= probes + 3
        assert balancer.pick_py() is t
        await checker.stop()

    run(main())


def test_healthy_statuses_list_is_honoured(scripted):
    redirect = scripted(answer(302))
    created = scripted(answer(201))
    up = upstream([redirect.port, created.port], http_statuses=(200, 302))
    balancer = Balancer.from_upstream(up)

    async def main():
        checker = HealthChecker(watch_interval=0)
        checker.start([(up, balancer)])
        await until(lambda: not balancer.targets[1].active_ok)
        assert balancer.targets[0].active_ok
        await checker.stop()

    run(main())


def test_stop_during_a_hanging_probe_closes_its_socket(scripted, release):
    hang = scripted(lambda conn, i: (read_request_head(conn), release.wait(10)))
    up = upstream([hang.port], timeout=30.0, interval=60.0)
    balancer = Balancer.from_upstream(up)

    async def main():
        checker = HealthChecker()
        checker.start([(up, balancer)])
        await until(lambda: hang.connections == 1)
        await asyncio.sleep(0.05)
        assert client_sockets(hang.port) == 1
        await checker.stop()
        assert all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    run(main())
    assert client_sockets(hang.port) == 0


def test_replace_keeps_counters_for_unchanged_targets(scripted):
    errors = scripted(answer(500))
    up = upstream([errors.port])
    first = Balancer.from_upstream(up)

    async def main():
        checker = HealthChecker(watch_interval=0)
        checker.start([(up, first)])
        await until(lambda: not first.targets[0].active_ok)
        second = Balancer.from_upstream(up)            # a new Plan, same upstream
        checker.replace([(up, second)])
        assert not second.targets[0].active_ok         # unhealthy verdict carried over at once
        await checker.stop()

    run(main())


def test_watcher_reports_passive_ejections(echo):
    up = Upstream(name="u", targets=(TargetSpec("127.0.0.1", echo.port, 1),))   # no active
    balancer = Balancer.from_upstream(up)
    changes = []

    async def main():
        checker = HealthChecker(watch_interval=0.01,
                                on_change=lambda row, before: changes.append(
                                    (row["passive"], before and before["passive"])))
        checker.start([(up, balancer)])
        await until(lambda: len(changes) == 1)
        balancer.eject(0)
        await until(lambda: len(changes) == 2)
        await checker.stop()

    run(main())
    assert changes == [("healthy", None), ("ejected", "healthy")]


def test_works_on_the_default_asyncio_loop_too(echo):
    up = upstream([echo.port])
    balancer = Balancer.from_upstream(up)

    async def main():
        checker = HealthChecker(watch_interval=0)
        checker.start([(up, balancer)])
        await until(lambda: checker.status()[0]["active_check"]["probes"] >= 2)
        await checker.stop()
        assert balancer.targets[0].active_ok

    asyncio.run(main())
