"""One hostile client cannot starve the others (issue 3). Bounded loops, loopback only.

Each test runs a crowd of hostile connections and, at the same time, a well-behaved client whose
every request must be answered quickly. Bounds are generous (a loaded CI box), but an event loop
that a hostile client could block would blow through them by seconds, not milliseconds.
"""
from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time

import pytest

from conftest import RawClient, ScriptedUpstream, config, get, service

HEADER_TIMEOUT = 1.0
MAX_LATENCY = 0.5          # worst request of the good client while the attack runs (seconds)
MAX_MEDIAN = 0.05


def route_all(url: str, **limits) -> dict:
    limits.setdefault("header_timeout", f"{int(HEADER_TIMEOUT * 1000)}ms")
    return config(service("s", url, [{"name": "r", "paths": ["/"]}]), limits=limits)


async def good_request(port: int, reader=None, writer=None, path: str = "/good"):
    """One GET on a given or new connection; returns (status, seconds, reader, writer)."""
    t0 = time.monotonic()
    if writer is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status, time.monotonic() - t0, reader, writer


async def good_client(port: int, duration: float, every: float = 0.02) -> list[tuple[int, float]]:
    """Requests for `duration` seconds, alternating keep-alive reuse and fresh connections."""
    results = []
    reader = writer = None
    end = time.monotonic() + duration
    i = 0
    while time.monotonic() < end:
        if i % 4 == 0 and writer is not None:
            writer.close()
            reader = writer = None
        status, dt, reader, writer = await asyncio.wait_for(
            good_request(port, reader, writer), timeout=5)
        results.append((status, dt))
        i += 1
        await asyncio.sleep(every)
    if writer is not None:
        writer.close()
    return results


def assert_served_well(results: list[tuple[int, float]], minimum: int = 10) -> None:
    assert len(results) >= minimum, results
    assert all(s == 200 for s, _ in results), results
    lat = sorted(dt for _, dt in results)
    assert lat[-1] < MAX_LATENCY, f"worst {lat[-1] * 1000:.1f} ms"
    assert statistics.median(lat) < MAX_MEDIAN, f"median {statistics.median(lat) * 1000:.1f} ms"


# ---------------------------------------------------------------------------------------


async def slowloris(port: int, keepalive_first: bool, per_byte: float = 0.05):
    """Send a head one byte at a time (forever, unless the server ends it).

    Returns (status or None, seconds from the first slow byte to the close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if keepalive_first:
        # a normal request first; the slow head is the *next* one on the same connection
        status, _, reader, writer = await good_request(port, reader, writer)
        assert status == 200
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000
    got = bytearray()

    async def read_all():
        while True:
            data = await reader.read(65536)
            if not data:
                return
            got.extend(data)

    reading = asyncio.ensure_future(read_all())
    t0 = time.monotonic()
    try:
        for b in head:
            if reading.done():
                break
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(per_byte)
        await asyncio.wait_for(reading, timeout=5)
    except (ConnectionError, asyncio.TimeoutError):
        pass
    elapsed = time.monotonic() - t0
    writer.close()
    status = int(got[9:12]) if got.startswith(b"HTTP/1.1 ") else None
    return status, elapsed


def test_slowloris_is_cut_off_while_a_normal_client_is_served(echo, gateway):
    gw = gateway(route_all(echo.url))

    async def main():
        attackers = [asyncio.ensure_future(slowloris(gw.port, keepalive_first=i % 4 == 0))
                     for i in range(100)]
        await asyncio.sleep(0.1)
        good = await good_client(gw.port, duration=HEADER_TIMEOUT + 1.0)
        cut = await asyncio.wait_for(asyncio.gather(*attackers), timeout=8)
        return good, cut

    good, cut = asyncio.run(main())
    assert_served_well(good)
    for status, elapsed in cut:
        assert status == 408, cut
        assert elapsed < HEADER_TIMEOUT + 1.0, cut     # header_timeout + sweep + slack
    assert get(gw.port).status == 200


def test_idle_connections_up_to_the_limit_do_not_lock_out_a_client(echo, gateway):
    limit = 300
    gw = gateway(route_all(echo.url, max_connections=limit))

    async def main():
        idle = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(limit - 1)]
        await asyncio.sleep(0.1)
        # the last free slot: a normal client is served at once
        status, dt, r, w = await asyncio.wait_for(good_request(gw.port), timeout=5)
        # one more than the limit is refused at once, not queued
        r2, w2 = await asyncio.open_connection("127.0.0.1", gw.port)
        refused = await asyncio.wait_for(r2.read(), timeout=3)
        w2.close()
        w.close()
        # the idle ones are closed by the gateway after header_timeout, freeing their slots
        t0 = time.monotonic()
        eofs = await asyncio.wait_for(asyncio.gather(*(rd.read() for rd, _ in idle)), timeout=5)
        freed_after = time.monotonic() - t0
        for _, wr in idle:
            wr.close()
        good = await good_client(gw.port, duration=0.5)
        return status, dt, refused, eofs, freed_after, good

    status, dt, refused, eofs, freed_after, good = asyncio.run(main())
    assert status == 200 and dt < MAX_LATENCY
    assert refused.startswith(b"HTTP/1.1 503 "), refused[:100]
    assert all(e == b"" for e in eofs)
    assert freed_after < HEADER_TIMEOUT + 1.0
    assert_served_well(good)


def big_upstream(size: int, seen: list | None = None):
    """/big answers `size` bytes; anything else answers 2 bytes. `seen` collects /big's paths."""
    body = b"x" * size

    def handler(conn, index):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            line = head.split(b"\r\n")[0]
            if line.startswith(b"GET /big"):
                if seen is not None:
                    seen.append(line.split()[1])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return handler


def read_responses(sock: socket.socket, count: int, timeout: float = 20.0) -> list[tuple[int, int]]:
    """Read `count` Content-Length responses off a blocking socket: [(status, body length)]."""
    sock.settimeout(timeout)
    buf = b""
    out = []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            data = sock.recv(1 << 20)
            assert data, f"closed after {len(out)} of {count} responses"
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length:"))
        while len(buf) < length:
            data = sock.recv(1 << 20)
            assert data, f"closed inside response {len(out) + 1} of {count}"
            buf += data
        out.append((int(head[9:12]), length))
        buf = buf[length:]
    return out


def test_a_client_that_never_reads_does_not_block_others(gateway):
    up = ScriptedUpstream(big_upstream(1 << 20))
    try:
        gw = gateway(route_all(up.url))
        rss_before = gw.rss_kb()
        hogs = []
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", gw.port))
            s.setblocking(False)
            try:
                s.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
            except BlockingIOError:
                pass
            hogs.append(s)
        time.sleep(0.5)                     # let the gateway's buffers toward the hogs fill up
        good = asyncio.run(good_client(gw.port, duration=1.5))
        assert_served_well(good)
        grew_mb = (gw.rss_kb() - rss_before) / 1024
        assert grew_mb < 64, f"gateway RSS grew {grew_mb:.1f} MB for clients that never read"
        for s in hogs:
            s.close()
        time.sleep(0.2)
        assert asyncio.run(good_request(gw.port))[0] == 200
    finally:
        up.stop()


def test_pipelined_requests_wait_while_a_client_reads_nothing_and_none_is_lost(gateway):
    # Each response fits in one upstream read, so it ends in the very read that fills the
    # client's buffer: the gateway must not go on to the next pipelined request until the
    # client takes bytes again (it did once, and buffered every response of the pipeline).
    n, size = 300, 48 * 1024
    seen: list = []
    up = ScriptedUpstream(big_upstream(size, seen))
    try:
        gw = gateway(route_all(up.url))
        kernel = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])   # send buffer max
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", gw.port))
        s.sendall(b"".join(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(n)))
        time.sleep(1.0)
        forwarded = len(seen)
        held = (kernel + 256 * 1024) // size + 2    # the kernel's share, the gateway's, in flight
        assert forwarded <= min(held, n // 2), \
            f"{forwarded} of {n} requests forwarded to a client reading nothing"
        assert asyncio.run(good_request(gw.port))[0] == 200     # others are served meanwhile
        answers = read_responses(s, n)
        assert answers == [(200, size)] * n
        assert seen == [b"/big/%d" % i for i in range(n)]      # each once, in order
        s.close()
    finally:
        up.stop()


def test_a_client_that_accepts_nothing_is_cut_off_after_send_timeout(gateway):
    up = ScriptedUpstream(big_upstream(8 << 20))
    try:
        gw = gateway(route_all(up.url, send_timeout="1s"))
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", gw.port))
        stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        slow = socket.create_connection(("127.0.0.1", gw.port))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        slow.settimeout(5)
        t0 = time.monotonic()
        got = 0
        while time.monotonic() - t0 < 3.5:          # takes bytes slowly but steadily: kept
            data = slow.recv(16384)
            assert data, f"the slow reader was cut off after {got} bytes"
            got += len(data)
            time.sleep(0.25)
        # The stalled one was closed: reading now gives what was buffered, then the end.
        stalled.settimeout(5)
        received = 0
        while True:
            try:
                data = stalled.recv(1 << 20)
            except ConnectionResetError:
                break
            if not data:
                break
            received += len(data)
        assert received < 8 << 20
        slow.close()
        stalled.close()
        assert asyncio.run(good_request(gw.port))[0] == 200
    finally:
        up.stop()


def test_a_pipelined_flood_on_one_connection_does_not_starve_another(echo, gateway):
    gw = gateway(route_all(echo.url))
    n = 30000
    stop = threading.Event()
    answered = [0]

    def flood():
        with RawClient(gw.port, timeout=10) as c:
            sender = threading.Thread(
                target=lambda: c.sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n" * n), daemon=True)
            sender.start()
            seen = 0
            c.sock.settimeout(0.5)
            while not stop.is_set() and answered[0] < n:
                try:
                    data = c.sock.recv(1 << 16)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    return      # closed at max_requests_per_connection with requests unread
                if not data:
                    return
                seen += data.count(b"HTTP/1.1 200 ")
                answered[0] = seen

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        time.sleep(0.2)
        during = answered[0]
        good = asyncio.run(good_client(gw.port, duration=2.0, every=0.01))
        flooding = answered[0] - during
    finally:
        stop.set()
        t.join(timeout=5)
    assert_served_well(good, minimum=20)
    assert flooding > 100        # the flood was really being served at the same time
