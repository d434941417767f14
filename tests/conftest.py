"""Fixtures that run the real thing: gateway and echo processes on loopback, scripted upstreams.

Every process started here is stopped at teardown; every wait is bounded.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from redis_server import redis_server  # noqa: F401  (fixture: a real redis-server)

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0

# `fastmesh run` defaults to one worker per CPU. The fixtures here assume ONE serving process
# (one upstream pool per target, the RSS of the process they measure); multi-worker tests
# (test_supervisor.py and friends) pass --workers explicitly.
os.environ.setdefault("FASTMESH_WORKERS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_until(check, timeout: float, message: str, interval: float = 0.02):
    """Poll `check` until it returns something true (returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"{message} (waited {timeout}s)")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def fastmesh_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastmesh", *args]


class Proc:
    """A fastmesh process on a loopback port."""

    def __init__(self, args: list[str], port: int):
        self.port = port
        self.proc = subprocess.Popen(
            fastmesh_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for_port(port, self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> str:
        stop_process(self.proc)
        return self.proc.stdout.read() if self.proc.stdout else ""


@pytest.fixture
def echo():
    """A real echo upstream (`fastmesh echo`)."""
    port = free_port()
    proc = Proc(["echo", "--listen", f"127.0.0.1:{port}"], port)
    yield proc
    proc.stop()


@pytest.fixture
def gateway(tmp_path):
    """Factory: gateway(config_dict) starts `fastmesh run --config` on a fresh port."""
    started: list[Proc] = []

    def start(config: dict, *extra: str) -> Proc:
        path = tmp_path / f"fastmesh-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        proc = Proc(["run", "--config", str(path), "--listen", f"127.0.0.1:{port}", *extra], port)
        proc.config_path = path
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def service(name: str, url: str, routes: list[dict], **extra) -> dict:
    return {"name": name, "url": url, "routes": routes, **extra}


def config(*services: dict, **gateway) -> dict:
    cfg = {"_format_version": "1", "services": list(services)}
    if gateway:
        cfg["gateway"] = gateway
    return cfg


# -- what the echo upstream saw, what a config refuses ---------------------------------------

def echoed(resp):
    """The echo upstream's JSON description of the request it got (asserting a 200)."""
    assert resp.status == 200, (resp.status, resp.body)
    return resp.json()


def upstream_headers(resp) -> dict[str, list[str]]:
    """Headers the echo upstream received: lower-case name -> values."""
    out: dict[str, list[str]] = {}
    for name, value in echoed(resp)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def config_issues(data: dict) -> dict[str, list[str]]:
    """The problems load_config_data reports for `data`: path -> messages."""
    from fastmesh.config import ConfigError, load_config_data
    with pytest.raises(ConfigError) as info:
        load_config_data(data)
    out: dict[str, list[str]] = {}
    for issue in info.value.issues:
        out.setdefault(issue.path, []).append(issue.message)
    return out


# -- raw sockets ------------------------------------------------------------------------

def recv_until_close(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def raw_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        return recv_until_close(sock, timeout)


class RawResponse:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, raw_head: bytes):
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        import json
        return json.loads(self.body)


class RawClient:
    """A minimal HTTP/1.1 client over one socket: exact control of bytes and keep-alive.

    Response parsing here is deliberately simple and independent of fastmesh's parser.
    """

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_response(self, head_request: bool = False) -> RawResponse:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a full head; got {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        resp = RawResponse(status, headers, b"", head)
        if status < 200 or status in (204, 304) or head_request:
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        if "chunked" in te:
            resp.body = self._read_chunked()
        elif resp.header("content-length") is not None:
            n = int(resp.header("content-length"))
            while len(self.buf) < n:
                if not self._fill():
                    raise ConnectionError("closed mid-body")
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill():
                    raise ConnectionError("closed mid-chunk")
            line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while True:   # trailers until an empty line
                    while b"\r\n" not in self.buf:
                        if not self._fill():
                            raise ConnectionError("closed in trailers")
                    line, _, self.buf = self.buf.partition(b"\r\n")
                    if not line:
                        return body
            while len(self.buf) < size + 2:
                if not self._fill():
                    raise ConnectionError("closed mid-chunk")
            body += self.buf[:size]
            assert self.buf[size:size + 2] == b"\r\n"
            self.buf = self.buf[size + 2:]

    def is_closed(self, timeout: float = 2.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def get(port: int, path: str = "/", host: str = "example.com", headers: dict | None = None,
        method: str = "GET") -> RawResponse:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with RawClient(port) as c:
        c.send(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        return c.read_response(head_request=method == "HEAD")


# -- scripted upstream -------------------------------------------------------------------

class ScriptedUpstream:
    """A raw TCP upstream in a thread: handler(conn, index) scripts each connection.

    Counts connections so tests can assert on keep-alive reuse.
    """

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            index = self.connections
            self.connections += 1
            t = threading.Thread(target=self._run, args=(conn, index), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, conn, index):
        conn.settimeout(10)
        try:
            self.handler(conn, index)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.stopped.set()
        self.sock.close()
        self.accepter.join(timeout=2)
        for t in self.threads:
            t.join(timeout=2)


def read_request_head(conn: socket.socket) -> bytes:
    """Read one request head (through CRLFCRLF) from a scripted upstream connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return buf
        buf += data
    return buf


def next_request_head(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """For keep-alive upstreams: the next request head on `conn`, `buf` being what was read
    after the previous one; (head without CRLFCRLF, the bytes after it), or None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


@pytest.fixture
def scripted():
    """Factory: scripted(handler) starts a ScriptedUpstream, stopped at teardown."""
    ups: list[ScriptedUpstream] = []

    def start(handler) -> ScriptedUpstream:
        up = ScriptedUpstream(handler)
        ups.append(up)
        return up

    yield start
    for up in ups:
        up.stop()
