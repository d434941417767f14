"""Worker processes: N workers on one port, crash restarts with backoff, graceful drain, signals.

Also holds the helpers the other operations tests (admin, metrics, reload) share.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
import yaml

from conftest import (
    ROOT, Proc, RawClient, config, fastmesh_cmd, free_port, get, read_request_head, service,
    stop_process, wait_for_port,
)


# --- shared helpers ---------------------------------------------------------------------------

class Gateway(Proc):
    """`fastmesh run` with an admin port of its own."""

    def __init__(self, tmp_path, cfg: dict, workers: int = 2, *extra: str, admin: bool = True):
        self.config_path = tmp_path / f"gw-{free_port()}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.admin_port = free_port() if admin else None
        port = free_port()
        args = ["run", "--config", str(self.config_path), "--listen", f"127.0.0.1:{port}",
                "--workers", str(workers),
                "--admin", f"127.0.0.1:{self.admin_port}" if admin else "off", *extra]
        super().__init__(args, port)
        if admin:
            wait_for_port(self.admin_port, self.proc)

    def write_config(self, cfg: dict) -> None:
        self.config_path.write_text(yaml.safe_dump(cfg))

    def admin(self, method: str, path: str, body: object = None, token: str | None = None,
              raw: bytes | None = None) -> tuple[int, object]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", data=data,
                                     method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, payload, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
        except urllib.error.HTTPError as err:
            status, payload, ctype = err.code, err.read(), err.headers["Content-Type"]
        if ctype and ctype.startswith("application/json"):
            return status, json.loads(payload)
        return status, payload.decode()

    def status(self) -> dict:
        code, body = self.admin("GET", "/status")
        assert code == 200, body
        return body

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["alive"]]

    def wait_status(self, predicate, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status()
            if predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"status never matched: {last}")

    def wait_exit(self, timeout: float = 20.0) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = self.stop()
            raise AssertionError(f"did not exit within {timeout}s:\n{out}")
        return code, self.proc.stdout.read()


@pytest.fixture
def ops(tmp_path):
    """Factory: ops(cfg, workers=2, *extra) starts a Gateway, stopped at teardown."""
    started: list[Gateway] = []

    def start(cfg: dict, workers: int = 2, *extra: str, admin: bool = True) -> Gateway:
        gw = Gateway(tmp_path, cfg, workers, *extra, admin=admin)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:        # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pids, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"still alive: {[p for p in pids if pid_alive(p)]}")


def echo_cfg(echo, *routes: dict) -> dict:
    return config(service("echo", echo.url, list(routes) or [{"name": "all", "paths": ["/"]}]))


# --- tests ------------------------------------------------------------------------------------

def test_n_workers_serve_one_port_each_in_its_own_process(echo, ops):
    gw = ops(echo_cfg(echo), 3)
    status = gw.status()
    pids = [w["pid"] for w in status["workers"]]
    assert len(set(pids)) == 3 and gw.pid not in pids
    assert all(w["alive"] and w["config_version"] == status["config"]["version"]
               for w in status["workers"])
    for _ in range(60):                              # new connection each: spread by the kernel
        assert get(gw.port, "/x").status == 200
    served = [w["requests"] for w in gw.status()["workers"]]
    assert sum(served) == 60
    assert sum(1 for n in served if n) >= 2, served


def test_single_worker_runs_in_the_supervisor_process(echo, ops):
    gw = ops(echo_cfg(echo), 1)
    assert gw.worker_pids() == [gw.pid]
    assert get(gw.port, "/x").status == 200


def test_crashed_worker_is_restarted_and_logged(echo, ops):
    gw = ops(echo_cfg(echo), 2)
    victim = gw.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    status = gw.wait_status(lambda s: victim not in [w["pid"] for w in s["workers"]]
                            and all(w["alive"] for w in s["workers"]))
    assert status["worker_restarts"] == 1
    assert status["workers"][0]["restarts"] == 1
    assert status["workers"][0]["config_version"] == status["config"]["version"]
    for _ in range(20):
        assert get(gw.port, "/x").status == 200
    out = gw.stop()
    assert f"worker 0 (pid {victim}) was killed by SIGKILL" in out
    assert "worker 0 restarted" in out


def test_crash_loop_is_backed_off(echo, ops):
    gw = ops(echo_cfg(echo), 2)
    delays = []
    for _ in range(3):
        victim = gw.status()["workers"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        gw.wait_status(lambda s: s["workers"][1]["alive"] and s["workers"][1]["pid"] != victim)
    out = gw.stop()
    for line in out.splitlines():
        if "restarting it in" in line:
            delays.append(float(line.split("restarting it in ")[1].split("s")[0]))
    # The first crash of a worker that had not run long is delayed; quick crashes double it.
    assert delays == [0.5, 1.0, 2.0], out
    assert "crash loop" in out


def test_worker_that_cannot_bind_fails_the_start(echo, tmp_path):
    taken = socket.socket()           # no SO_REUSEPORT: the workers cannot share it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(echo_cfg(echo)))
    try:
        out = subprocess.run(fastmesh_cmd("run", "-c", str(path), "--listen", f"127.0.0.1:{port}",
                                          "--workers", "2", "--admin", "off"),
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    finally:
        taken.close()
    assert out.returncode == 1
    assert "cannot listen" in out.stderr


def slow_upstream(delay: float):
    def handler(conn, index):
        while True:
            head = read_request_head(conn)
            if not head:
                return
            time.sleep(delay)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
    return handler


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_in_flight_requests_then_exits_0(scripted, ops, workers):
    up = scripted(slow_upstream(1.0))
    gw = ops(config(service("slow", up.url, [{"name": "slow", "paths": ["/"]}])), workers)
    pids = gw.worker_pids()
    idle = RawClient(gw.port)                    # an idle keep-alive connection
    idle.send(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.read_response().status == 200
    results = []
    closed = []

    def call():
        with RawClient(gw.port, timeout=10) as c:
            c.send(b"GET /inflight HTTP/1.1\r\nHost: x\r\n\r\n")
            results.append(c.read_response())
            assert c.is_closed(timeout=5)        # then the drained connection is closed
            closed.append(True)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.4)                              # requests are now waiting on the upstream
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=10)
    code, out = gw.wait_exit()
    assert code == 0, out
    assert [r.status for r in results] == [200] * 4
    assert all(r.body == b"slow" for r in results)
    assert closed == [True] * 4
    assert time.monotonic() - started < 8
    assert idle.is_closed()
    idle.close()
    wait_dead(pids)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
    assert "fastmesh: stopped" in out


def test_drain_deadline_bounds_shutdown(scripted, ops):
    up = scripted(slow_upstream(30.0))
    gw = ops(config(service("stuck", up.url, [{"name": "stuck", "paths": ["/"]}])), 2,
             "--drain-timeout", "1")
    client = RawClient(gw.port, timeout=15)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGINT)
    code, out = gw.wait_exit(timeout=15)
    assert code == 0, out
    assert time.monotonic() - started < 6
    assert client.is_closed(timeout=5)
    client.close()


def test_workers_exit_when_the_supervisor_dies(echo, ops):
    gw = ops(echo_cfg(echo), 2)
    pids = gw.worker_pids()
    gw.proc.kill()
    gw.proc.wait(timeout=5)
    wait_dead(pids, timeout=15)


def test_sighup_goes_to_the_supervisor_only(echo, ops):
    gw = ops(echo_cfg(echo), 2)
    pids = gw.worker_pids()
    os.kill(pids[0], signal.SIGHUP)              # workers ignore it: reloads are coordinated
    time.sleep(0.5)
    assert gw.worker_pids() == pids


def test_config_travels_to_workers_as_msgpack_unchanged():
    from fastmesh.config import load_config_data
    from fastmesh.ipc import decode_config, encode_config
    cfg = load_config_data({
        "gateway": {"listen": "127.0.0.1:0", "server_timing": True,
                    "limits": {"max_body_size": "1m", "header_timeout": "2s"},
                    "admin": {"listen": "127.0.0.1:9", "token": "0123456789"}},
        "services": [{"name": "a", "url": "http://[::1]:81/p", "connect_timeout": 250,
                      "routes": [{"name": "r", "paths": ["/a", "~/b\\d"], "methods": ["GET"],
                                  "headers": {"x-v": ["1", "2"]}, "hosts": ["*.example.com"]}]}],
        "routes": [{"name": "top", "service": "a", "paths": ["=/e"], "priority": 3}],
    })
    back = decode_config(encode_config(cfg), cfg.version)
    assert back == cfg
    assert isinstance(back.routes[0].headers[0][1], tuple)
    with pytest.raises(ValueError):
        decode_config(encode_config(cfg), "not-this-one")


def test_workers_default_comes_from_fastmesh_workers_env(echo, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(echo_cfg(echo)))
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        fastmesh_cmd("run", "-c", str(path), "--listen", f"127.0.0.1:{port}",
                     "--admin", f"127.0.0.1:{admin}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "FASTMESH_WORKERS": "3"})
    try:
        wait_for_port(admin, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=10) as resp:
            assert len(json.load(resp)["workers"]) == 3
    finally:
        stop_process(proc)
