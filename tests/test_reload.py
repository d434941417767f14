"""Hot reload: SIGHUP and `fastmesh reload` swap every worker's Plan; bad configs are refused;
reloading under load drops nothing."""
from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import ROOT, RawClient, fastmesh_cmd, get
from test_supervisor import echo_cfg, ops  # noqa: F401  (fixture)


def routes_v(echo, n: int) -> dict:
    """Config generation n: /a always routes; /v{n} only in generation n."""
    return echo_cfg(echo, {"name": "a", "paths": ["/a"]}, {"name": f"v{n}", "paths": [f"/v{n}"]})


def all_workers_on(gw, version: str) -> dict:
    return gw.wait_status(lambda s: s["config"]["version"] == version and all(
        w["config_version"] == version for w in s["workers"]))


def version_of(gw) -> str:
    return gw.status()["config"]["version"]


@pytest.mark.parametrize("workers", [1, 3])
def test_sighup_swaps_the_plan_on_every_worker(echo, ops, workers):
    gw = ops(routes_v(echo, 1), workers)
    old = version_of(gw)
    keep = RawClient(gw.port)                       # keep-alive connection across the reload
    keep.send(b"GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert keep.read_response().status == 200
    gw.write_config(routes_v(echo, 2))
    gw.proc.send_signal(signal.SIGHUP)
    status = gw.wait_status(lambda s: s["config"]["version"] != old)
    all_workers_on(gw, status["config"]["version"])
    assert status["reloads"] == {"success": 1, "failure": 0}
    for _ in range(3 * workers):                    # new connections land on every worker
        assert get(gw.port, "/v2").status == 200
        assert get(gw.port, "/v1").status == 404
    keep.send(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")   # the old connection uses the new Plan
    assert keep.read_response().status == 200
    keep.close()
    assert f"reloaded: config version {status['config']['version']}" in gw.stop()


def test_invalid_config_is_refused_and_the_old_one_keeps_serving(echo, ops):
    gw = ops(routes_v(echo, 1), 2)
    old = version_of(gw)
    gw.config_path.write_text("services:\n  - name: echo\n    url: ftp://nowhere\n")
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_status(lambda s: s["reloads"]["failure"] == 1)
    assert version_of(gw) == old
    assert all(w["config_version"] == old for w in gw.status()["workers"])
    assert get(gw.port, "/v1").status == 200
    out = gw.stop()
    assert f"reload refused, still serving version {old}" in out
    assert "services[0].url" in out


def test_fastmesh_reload_command_reports_the_version_or_every_error(echo, ops):
    gw = ops(routes_v(echo, 1), 2)
    gw.write_config(routes_v(echo, 2))
    out = subprocess.run(fastmesh_cmd("reload", "--admin", f"127.0.0.1:{gw.admin_port}"),
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    new = version_of(gw)
    assert f"reloaded: config version {new} on 2 worker(s)" in out.stdout
    assert get(gw.port, "/v2").status == 200
    gw.config_path.write_text("services:\n  - name: echo\n    urll: x\n    routes: [{name: r}]\n")
    out = subprocess.run(fastmesh_cmd("reload", "--admin", f"127.0.0.1:{gw.admin_port}"),
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1
    assert "unknown field 'urll'" in out.stderr
    assert "no match criteria" in out.stderr
    assert version_of(gw) == new


def test_fastmesh_reload_with_pid_sends_sighup(echo, ops):
    gw = ops(routes_v(echo, 1), 2)
    old = version_of(gw)
    gw.write_config(routes_v(echo, 2))
    out = subprocess.run(fastmesh_cmd("reload", "--pid", str(gw.pid)), capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0
    gw.wait_status(lambda s: s["config"]["version"] != old)


class Load:
    """Client threads doing keep-alive requests (and some fresh connections) until stopped."""

    def __init__(self, port: int, threads: int = 4):
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def run(self, index: int) -> None:
        client = None
        served = 0
        while not self.stop.is_set():
            try:
                if client is None:
                    client = RawClient(self.port, timeout=10)
                client.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = client.read_response()
                if resp.status != 200:
                    raise AssertionError(f"status {resp.status}: {resp.body[:200]!r}")
                served += 1
                with self.lock:
                    self.ok += 1
                if (resp.header("connection") or "").lower() == "close" or (
                        index == 0 and served % 50 == 0):   # one thread also churns connections
                    client.close()
                    client = None
            except (OSError, ConnectionError, AssertionError) as exc:
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            client.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def test_twenty_reloads_under_load_drop_nothing(echo, ops):
    gw = ops(routes_v(echo, 0), 2)
    versions = []
    with Load(gw.port) as load:
        time.sleep(0.5)
        for n in range(1, 21):
            gw.write_config(routes_v(echo, n))
            code, body = gw.admin("POST", "/reload")
            assert code == 200, body
            versions.append(body["config_version"])
            time.sleep(0.2)
        time.sleep(0.5)
    assert len(set(versions)) == 20
    assert load.errors == []
    assert load.ok > 200
    status = gw.status()
    assert status["reloads"] == {"success": 20, "failure": 0}
    assert all(w["config_version"] == versions[-1] for w in status["workers"])


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_twenty_reloads_under_wrk_load_zero_errors(echo, ops):
    gw = ops(routes_v(echo, 0), 2)
    wrk = subprocess.Popen(["wrk", "-t2", "-c16", "-d6s", f"http://127.0.0.1:{gw.port}/a"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        for n in range(1, 21):
            gw.write_config(routes_v(echo, n))
            gw.proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)
        out, _ = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
    assert "requests in" in out, out
    assert "Socket errors" not in out, out          # connect/read/write/timeout errors
    assert "Non-2xx" not in out, out
    gw.wait_status(lambda s: s["reloads"]["success"] == 20)
