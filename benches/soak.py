#!/usr/bin/env python3
"""Soak: good and bad traffic for a few minutes; every good request answered, RSS flat.

Starts `fastmesh echo` and a fastmesh gateway in front of it (one worker, in temp dirs, via
benches/servers.py), then runs for --duration seconds, all at once:

  * good: keep-alive GETs and POSTs (small bodies, Content-Length or chunked) whose answers are
    checked against what was sent (the echo returns method, target, body size and SHA-256);
  * bad: the hostile requests of benches/conformance.py, each on a new connection; their
    statuses are counted (a "200" here is only fine where conformance says it is legitimate);
  * slow heads: a head sent a byte at a time, which header_timeout must cut off (408 or close);
  * abrupt disconnects: half a head, half a body, or a request and an immediate RST;
  * big bodies: uploads of several MiB (checked by size and hash).

The gateway's RSS is sampled every --sample seconds. At the end it prints the counts and
RSS min/max/last with a verdict: flat when the last third's mean is within max(5 %, 4 MiB) of the
mean of the middle third (the first third is warm-up).

    python3 benches/soak.py [--duration 180] [--sample 2]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import random
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import (  # noqa: E402
    REPO, Server, StartError, fastmesh_env, fastmesh_server, free_port, memory,
)
from conformance import CASES  # noqa: E402

# rules whose request is legitimate: a 200 for them is correct
# (`Transfer_Encoding` is an ordinary, if suspicious, header name: forwarded as such, like HAProxy)
LEGIT = {"identical duplicate CL", "HTTP/1.2", "absolute-form, other Host", "Upgrade request with a body",
         "`Transfer_Encoding: chunked` + CL"}


class Stats:
    def __init__(self):
        self.good_sent = 0
        self.good_ok = 0
        self.good_wrong: list[str] = []
        self.bad_sent = 0
        self.bad_status: collections.Counter = collections.Counter()
        self.bad_unexpected_200: collections.Counter = collections.Counter()
        self.slow_sent = 0
        self.slow_result: collections.Counter = collections.Counter()
        self.disconnects = 0
        self.big_sent = 0
        self.big_ok = 0
        self.big_wrong: list[str] = []
        self.rss: list[tuple[float, int]] = []


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", ""):
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            body += (await reader.readexactly(size + 2))[:-2]
    else:
        body = await reader.read()
    return status, headers, body


def chunked(body: bytes, rnd: random.Random) -> bytes:
    out = b""
    i = 0
    while i < len(body):
        n = rnd.randint(1, 70000)
        out += b"%x\r\n%s\r\n" % (len(body[i:i + n]), body[i:i + n])
        i += n
    return out + b"0\r\n\r\n"


def check_echo(st_list: list[str], status: int, body: bytes, method: str, target: str, payload: bytes) -> bool:
    if status != 200:
        st_list.append(f"{method} {target}: status {status}")
        return False
    try:
        d = json.loads(body)
    except ValueError:
        st_list.append(f"{method} {target}: not JSON")
        return False
    want = (method, target, len(payload), hashlib.sha256(payload).hexdigest())
    got = (d.get("method"), d.get("target"), d.get("body_size"), d.get("body_sha256"))
    if got != want:
        st_list.append(f"{method} {target}: echo saw {got[:3]}, sent {want[:3]}")
        return False
    return True


async def good_worker(port: int, end: float, st: Stats, seed: int):
    rnd = random.Random(seed)
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            st.good_wrong.append(f"connect: {e}")
            await asyncio.sleep(0.1)
            continue
        try:
            for _ in range(rnd.randint(1, 50)):
                if time.monotonic() >= end:
                    break
                i = st.good_sent
                target = f"/good/{i}?q={rnd.randint(0, 1 << 30)}"
                kind = rnd.choice(["get", "get", "cl", "chunked"])
                body = b""
                if kind == "get":
                    req = f"GET {target} HTTP/1.1\r\nHost: soak\r\nX-I: {i}\r\n\r\n".encode()
                    method = "GET"
                else:
                    method = "POST"
                    body = os.urandom(rnd.randint(0, 20000))
                    if kind == "cl":
                        req = f"POST {target} HTTP/1.1\r\nHost: soak\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                    else:
                        req = (f"POST {target} HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                               + chunked(body, rnd))
                st.good_sent += 1
                writer.write(req)
                status, _, rbody = await asyncio.wait_for(read_response(reader), timeout=10)
                if check_echo(st.good_wrong, status, rbody, method, target, body):
                    st.good_ok += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
            st.good_wrong.append(f"error: {type(e).__name__}: {e}")
        finally:
            writer.close()


async def bad_worker(port: int, end: float, st: Stats, seed: int):
    rnd = random.Random(seed)
    while time.monotonic() < end:
        rule, payload = rnd.choice(CASES)
        st.bad_sent += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout=5)
                status = head[9:12].decode()
            except asyncio.IncompleteReadError:
                status = "closed"
            except asyncio.TimeoutError:
                status = "no answer"
            writer.close()
        except OSError as e:
            status = f"error {type(e).__name__}"
        st.bad_status[status] += 1
        if status == "200" and rule not in LEGIT:
            st.bad_unexpected_200[rule] += 1
        await asyncio.sleep(rnd.uniform(0, 0.01))


async def slow_worker(port: int, end: float, st: Stats, seed: int):
    rnd = random.Random(seed)
    while time.monotonic() < end:
        st.slow_sent += 1
        result = "open"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = b"GET /slow HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"s" * 500
            for b in head:
                if reader.at_eof() or time.monotonic() >= end + 5:
                    break
                writer.write(bytes([b]))
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(64), timeout=0.1)
                    result = data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
                    break
                except asyncio.TimeoutError:
                    pass
            writer.close()
        except OSError:
            result = "closed"
        st.slow_result[result] += 1
        await asyncio.sleep(rnd.uniform(0, 0.2))


async def disconnect_worker(port: int, end: float, st: Stats, seed: int):
    rnd = random.Random(seed)
    while time.monotonic() < end:
        try:
            sock = socket.socket()
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", port))
            what = rnd.choice(["half-head", "half-body", "request-then-rst", "chunked-half"])
            if what == "half-head":
                await loop.sock_sendall(sock, b"GET /gone HTTP/1.1\r\nHost: so")
            elif what == "half-body":
                await loop.sock_sendall(sock, b"POST /gone HTTP/1.1\r\nHost: soak\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
            elif what == "chunked-half":
                await loop.sock_sendall(sock, b"POST /gone HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\nxyz")
            else:
                await loop.sock_sendall(sock, b"GET /gone HTTP/1.1\r\nHost: soak\r\n\r\n")
            await asyncio.sleep(rnd.uniform(0, 0.05))
            if rnd.random() < 0.5:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
            sock.close()
            st.disconnects += 1
        except OSError:
            pass
        await asyncio.sleep(rnd.uniform(0, 0.02))


async def big_worker(port: int, end: float, st: Stats, seed: int):
    rnd = random.Random(seed)
    blob = os.urandom(16 << 20)
    while time.monotonic() < end:
        size = rnd.randint(1 << 20, 16 << 20)
        body = blob[:size]
        target = f"/big/{st.big_sent}"
        st.big_sent += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {target} HTTP/1.1\r\nHost: soak\r\nContent-Length: {size}\r\n\r\n".encode())
            for i in range(0, size, 1 << 18):
                writer.write(body[i:i + (1 << 18)])
                await writer.drain()
            status, _, rbody = await asyncio.wait_for(read_response(reader), timeout=30)
            if check_echo(st.big_wrong, status, rbody, "POST", target, body):
                st.big_ok += 1
            writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            st.big_wrong.append(f"{target}: {type(e).__name__}")
        await asyncio.sleep(rnd.uniform(0, 0.5))


async def sampler(gw: Server, end: float, st: Stats, every: float):
    t0 = time.monotonic()
    while time.monotonic() < end:
        m = memory(gw)
        if m:
            st.rss.append((time.monotonic() - t0, m["rss_kb"]))
        await asyncio.sleep(every)


async def run(port: int, gw: Server, duration: float, sample: float, st: Stats):
    end = time.monotonic() + duration
    tasks = [sampler(gw, end, st, sample)]
    tasks += [good_worker(port, end, st, 100 + i) for i in range(8)]
    tasks += [bad_worker(port, end, st, 200 + i) for i in range(4)]
    tasks += [slow_worker(port, end, st, 300 + i) for i in range(20)]
    tasks += [disconnect_worker(port, end, st, 400 + i) for i in range(2)]
    tasks += [big_worker(port, end, st, 500 + i) for i in range(1)]
    await asyncio.gather(*tasks)


def verdict(rss: list[tuple[float, int]]) -> tuple[str, str]:
    values = [kb for _, kb in rss]
    if len(values) < 6:
        return "unknown", "too few samples"
    third = len(values) // 3
    mid = sum(values[third:2 * third]) / third
    last = sum(values[2 * third:]) / len(values[2 * third:])
    growth = last - mid
    allowed = max(0.05 * mid, 4096)
    detail = f"mean of the middle third {mid / 1024:.1f} MiB, of the last third {last / 1024:.1f} MiB"
    return ("flat" if growth <= allowed else "NOT flat"), detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=180)
    ap.add_argument("--sample", type=float, default=2.0)
    args = ap.parse_args()
    st = Stats()
    with tempfile.TemporaryDirectory(prefix="fastmesh-soak-") as tmp:
        work = Path(tmp)
        echo_port, gw_port = free_port(), free_port()
        env = fastmesh_env()
        echo = Server("echo", [sys.executable, "-m", "fastmesh", "echo", "--listen", f"127.0.0.1:{echo_port}"],
                      echo_port, work, env=env, cwd=REPO)
        conf = (f'_format_version: "1"\n'
                f"gateway:\n  limits: {{header_timeout: 2s, body_timeout: 5s, keepalive_timeout: 10s}}\n"
                f"services:\n  - name: echo\n    url: http://127.0.0.1:{echo_port}\n"
                f"    routes:\n      - name: all\n        paths: [/]\n")
        gw = fastmesh_server("fastmesh", conf, gw_port, work)
        try:
            echo.start(ready_timeout=20)
            gw.start(ready_timeout=20)
        except StartError as e:
            print(f"could not start: {e}", file=sys.stderr)
            echo.stop()
            gw.stop()
            return 2
        t0 = time.monotonic()
        try:
            asyncio.run(run(gw_port, gw, args.duration, args.sample, st))
        finally:
            alive = gw.alive()
            gw.stop()
            echo.stop()
    elapsed = time.monotonic() - t0
    rss = [kb for _, kb in st.rss]
    flat, detail = verdict(st.rss)
    ok = st.good_ok == st.good_sent and not st.big_wrong and alive and not st.bad_unexpected_200
    print(f"## soak: {elapsed:.0f} s, gateway {'alive' if alive else 'DIED'}")
    print(f"- good requests: {st.good_sent} sent, {st.good_ok} answered correctly"
          + (f", {len(st.good_wrong)} wrong, e.g. {st.good_wrong[:3]}" if st.good_wrong else ""))
    print(f"- big uploads (1-16 MiB): {st.big_sent} sent, {st.big_ok} answered correctly"
          + (f", wrong: {st.big_wrong[:3]}" if st.big_wrong else ""))
    print(f"- bad requests: {st.bad_sent} sent, statuses: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(st.bad_status.items())))
    if st.bad_unexpected_200:
        print(f"  UNEXPECTED 200 for: {dict(st.bad_unexpected_200)}")
    print(f"- slow heads: {st.slow_sent}, ended by: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(st.slow_result.items())))
    print(f"- abrupt disconnects: {st.disconnects}")
    if rss:
        print(f"- gateway RSS: min {min(rss) / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB, "
              f"last {rss[-1] / 1024:.1f} MiB over {len(rss)} samples: {flat} ({detail})")
    print(f"- verdict: {'PASS' if ok and flat == 'flat' else 'FAIL'}")
    return 0 if ok and flat == "flat" else 1


if __name__ == "__main__":
    raise SystemExit(main())
