"""East-west metrics (sidecar admin /metrics and /stats) and `fastmesh mesh status`.

Real sidecar processes over loopback ports with small apps in threads of this process (the pods
of test_mesh_sidecar), a real redis-server or a registry file. Every process is stopped at
teardown; every loop is bounded.
"""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
import yaml

from conftest import fastmesh_cmd, free_port, get
from fastmesh.mesh import status
from test_mesh_sidecar import (  # noqa: F401  (mesh, file_mesh: the same fixtures)
    ThreadedApp, admin_get, file_mesh, instance_key, mesh, wait_until,
)


class StatusApp(ThreadedApp):
    """An app that answers GET /status/NNN with status NNN (anything else: 200), body `{}`."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                match = re.match(r"^/status/(\d{3})", self.path)
                code = int(match.group(1)) if match else 200
                self.wfile.write(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\n{}" % code)

            def log_message(self, *args):
                pass

        self.serve(Handler)


@pytest.fixture
def status_app():
    app = StatusApp()
    yield app
    app.stop()


def write_registry(path, entries: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"services": entries}))
    tmp.replace(path)


def entry(sidecar, ident: str, admin: str | None = "own") -> dict:
    found = {"address": f"127.0.0.1:{sidecar.inbound}", "id": ident}
    if admin is not None:
        found["metadata"] = {"fastmesh.admin": f"127.0.0.1:{sidecar.admin}" if admin == "own"
                             else admin}
    return found


def admin_text(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), body


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name{labels}` (labels in any order), None when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        sample, value = line.rsplit(" ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample[len(name):]))
        if sample.split("{", 1)[0] == name and found == labels:
            return float(value)
    return None


# Inbound, the callee's sidecar names the caller (and "(unknown)" outside the mesh).
OUTSIDE = "(unknown)"


def chain(mesh, service_b_app) -> tuple:
    """a (an app that calls b with the same path) -> b (`service_b_app`), both with sidecars."""
    b = mesh.sidecar("b", service_b_app, "--instance-id", "b1")
    a_out = free_port()
    a_app = mesh.app("a", "a1", calls=("b", a_out))
    a = mesh.sidecar("a", a_app, "--instance-id", "a1", outbound=a_out)
    # (b must know a too: its inbound side names a's calls by a's name)
    wait_until(lambda: "b" in a.status()["destinations"] and "a" in b.status()["destinations"],
               5, "a and b never saw each other")
    return a, b


# -- the sidecar's metrics ----------------------------------------------------------------------

def test_sidecar_metrics_per_source_destination_and_status_class(file_mesh, status_app):
    b = file_mesh.sidecar("b", status_app, "--instance-id", "b1")
    a = file_mesh.pod("a", "a1")
    write_registry(file_mesh.path, {"b": [entry(b, "b1")], "a": [entry(a, "a1")]})
    wait_until(lambda: "b" in a.status()["destinations"], 5, "a never saw b")
    for path in ("/status/200", "/status/200", "/status/404", "/status/500", "/status/500"):
        get(a.outbound, path, host="b")
    assert get(a.outbound, "/", host="nosuch").status == 503       # unknown service

    code, ctype, text = admin_text(a.admin, "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    pair = {"direction": "outbound", "source": "a", "destination": "b"}
    assert metric(text, "fastmesh_mesh_requests_total", **pair, status_class="2xx") == 2
    assert metric(text, "fastmesh_mesh_requests_total", **pair, status_class="4xx") == 1
    assert metric(text, "fastmesh_mesh_requests_total", **pair, status_class="5xx") == 2
    assert metric(text, "fastmesh_mesh_requests_total", direction="outbound", source="a",
                  destination="(unknown)", status_class="5xx") == 1
    # Latency per status class too: each class's histogram holds exactly its requests.
    for cls, n in (("2xx", 2), ("4xx", 1), ("5xx", 2)):
        assert metric(text, "fastmesh_mesh_request_duration_seconds_count", **pair,
                      status_class=cls) == n
        assert metric(text, "fastmesh_mesh_request_duration_seconds_bucket", **pair,
                      status_class=cls, le="+Inf") == n
        assert 0 < metric(text, "fastmesh_mesh_request_duration_seconds_sum", **pair,
                          status_class=cls) < 5
    assert metric(text, "fastmesh_mesh_request_duration_seconds_count", **pair,
                  status_class="3xx") is None
    assert metric(text, "fastmesh_mesh_request_duration_seconds_count", **pair) is None
    assert metric(text, "fastmesh_mesh_added_latency_seconds_count", **pair) == 5
    # The callee's sidecar counts the same requests inbound, under the caller's name.
    _, _, b_text = admin_text(b.admin, "/metrics")
    inbound = {"direction": "inbound", "source": "a", "destination": "b"}
    assert metric(b_text, "fastmesh_mesh_requests_total", **inbound, status_class="2xx") == 2
    assert metric(b_text, "fastmesh_mesh_requests_total", **inbound, status_class="5xx") == 2
    assert metric(b_text, "fastmesh_mesh_requests_total", direction="outbound", source="b",
                  destination="b", status_class="2xx") is None

    code, stats = admin_get(a.admin, "/stats")
    assert code == 200 and (stats["service"], stats["instance"]) == ("a", "a1")
    pairs = {(p["direction"], p["source"], p["destination"]): p for p in stats["pairs"]}
    ab = pairs[("outbound", "a", "b")]
    assert ab["requests"] == 5 and ab["status"] == {"2xx": 2, "4xx": 1, "5xx": 2}
    assert ab["latency"]["count"] == 5 and sum(ab["latency"]["buckets"][1::2]) == 5
    by_status = ab["latency_by_status"]
    assert {cls: h["count"] for cls, h in by_status.items()} == {"2xx": 2, "4xx": 1, "5xx": 2}
    assert sum(sum(h["buckets"][1::2]) for h in by_status.values()) == 5
    assert min(h["min_ns"] for h in by_status.values()) == ab["latency"]["min_ns"]
    assert 0 < ab["latency"]["min_ns"] <= ab["latency"]["max_ns"]
    assert pairs[("outbound", "a", "(unknown)")]["status"] == {"5xx": 1}


def test_metrics_endpoints_are_read_only(file_mesh):
    a = file_mesh.pod("a", "a1")
    conn = http.client.HTTPConnection("127.0.0.1", a.admin, timeout=5)
    conn.request("POST", "/stats", body=b"{}")
    resp = conn.getresponse()
    assert resp.status == 405 and resp.getheader("Allow") == "GET, HEAD"
    conn.close()


def test_sidecar_registers_its_admin_address(mesh):
    b = mesh.pod("b", "b1", "--meta", "team=ledger")
    raw = mesh.redis.command("GET", instance_key("b", "b1"))
    value = json.loads(raw.split(b"\r\n", 1)[1].rsplit(b"\r\n", 1)[0])
    assert value["metadata"] == {"team": "ledger", "fastmesh.admin": f"127.0.0.1:{b.admin}"}
    # An explicit --meta fastmesh.admin=... wins (an admin API reached through another address).
    c = mesh.pod("c", "c1", "--meta", "fastmesh.admin=127.0.0.2:9")
    raw = mesh.redis.command("GET", instance_key("c", "c1"))
    assert json.loads(raw.split(b"\r\n", 1)[1].rsplit(b"\r\n", 1)[0])["metadata"] == \
        {"fastmesh.admin": "127.0.0.2:9"}
    assert c.status()["instance"]["metadata"]["fastmesh.admin"] == "127.0.0.2:9"


# -- fastmesh mesh status -------------------------------------------------------------------------

def test_two_snapshots_count_exactly_the_requests_between_them(mesh, status_app):
    a, b = chain(mesh, status_app)
    get(a.inbound, "/status/200", host="a")                 # traffic before the first snapshot
    view, ready, error = status.read_registry(mesh.registry)
    assert ready and error is None and set(view) == {"a", "b"}
    assert view["b"][0].admin == f"127.0.0.1:{b.admin}"
    before = status.snapshot(view)
    assert all(s.stats is not None for s in before)
    for i in range(40):
        assert get(a.inbound, "/status/500" if i % 4 == 0 else "/status/200", host="a").status \
            in (200, 500)
    after = status.snapshot(view)
    rows = {(r.direction, r.source, r.destination): r for r in status.compare(before, after)}
    assert set(rows) == {("outbound", "a", "b"), ("inbound", OUTSIDE, "a"),
                         ("inbound", "a", "b")}
    for row in rows.values():
        assert row.requests == 40 and row.status == {"2xx": 30, "5xx": 10}, row
        assert row.success == 0.75 and row.total == 41 and row.rate > 0
        p50, p99 = status.percentile(row.buckets, 50), status.percentile(row.buckets, 99)
        assert 0 < p50 <= p99 < 5e9
    # a -> b takes longer at a's outbound than b's app alone, and the caller's inbound row
    # contains the whole call.
    assert sum(rows[("inbound", OUTSIDE, "a")].buckets.values()) == 40


def test_a_sidecar_that_restarted_counts_from_zero():
    def stats(started, requests):
        return {"service": "b", "instance": "b1", "started": started, "time": started + 10,
                "pairs": [{"direction": "inbound", "source": None, "destination": "b",
                           "requests": requests, "status": {"2xx": requests},
                           "latency": {"count": requests, "buckets": [700, requests]}}]}
    before = [status.Sidecar("b", "b1", "x", stats(100.0, 50))]
    after = [status.Sidecar("b", "b1", "x", stats(200.0, 7))]
    [row] = status.compare(before, after)
    # The new process counted 7 in the 10 s since it started: never a negative count.
    assert (row.requests, row.total, row.rate, row.status) == (7, 7, 0.7, {"2xx": 7})
    # A sidecar with no earlier snapshot (unreachable then, or new): totals, no rate.
    [row] = status.compare([], after)
    assert (row.requests, row.total, row.rate) == (0, 7, 0.0)
    same = [status.Sidecar("b", "b1", "x", stats(100.0, 57))]
    [row] = status.compare(before, same)
    assert (row.requests, row.status, row.buckets) == (7, {"2xx": 7}, {700: 7})


def run_status(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(fastmesh_cmd("mesh", "status", *args), capture_output=True, text=True,
                          timeout=timeout)


def test_mesh_status_once_prints_a_row_per_service_pair(mesh, status_app):
    c = mesh.sidecar("c", status_app, "--instance-id", "c1")
    b_out = free_port()
    b = mesh.sidecar("b", mesh.app("b", "b1", calls=("c", b_out)), "--instance-id", "b1",
                     outbound=b_out)
    a_out = free_port()
    a = mesh.sidecar("a", mesh.app("a", "a1", calls=("b", a_out)), "--instance-id", "a1",
                     outbound=a_out)
    wait_until(lambda: "b" in a.status()["destinations"] and "c" in b.status()["destinations"]
               and "b" in c.status()["destinations"] and "a" in b.status()["destinations"],
               5, "the sidecars never saw each other")
    stop = threading.Event()
    answers: list[int] = []

    def load():
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            answers.append(get(a.inbound, "/x", host="a").status)
            time.sleep(0.005)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_until(lambda: len(answers) > 5, 5, "no traffic through the chain")
        done = run_status("--registry", mesh.registry, "--once", "--interval", "1")
        as_json = run_status("--registry", mesh.registry, "--once", "--interval", "0.5",
                             "--json")
    finally:
        stop.set()
        loader.join(timeout=25)
    assert set(answers) == {200}
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("SOURCE"))
    assert header.split() == ["SOURCE", "DESTINATION", "DIR", "RPS", "SUCCESS", "P50", "P99",
                              "REQUESTS"]
    rows = {tuple(line.split()[:3]): line.split() for line in lines
            if re.match(r"^(\w+|\*|\(unknown\))\s+\S+\s+(in|out)\s", line)}
    assert set(rows) == {("a", "b", "out"), ("b", "c", "out"), (OUTSIDE, "a", "in"),
                         ("a", "b", "in"), ("b", "c", "in")}
    for row in rows.values():
        assert float(row[3]) > 0 and row[4] == "100.00%" and int(row[7]) > 0, row
        assert re.fullmatch(r"\d+µs|\d+\.\d\dms", row[5]), row
        assert re.fullmatch(r"\d+µs|\d+\.\d\dms", row[6]), row
    assert "3 of 3 sidecar(s) answered; rates over 1s" in done.stdout

    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    by_pair = {(r["direction"], r["source"], r["destination"]): r for r in report["rows"]}
    ab = by_pair[("outbound", "a", "b")]
    assert ab["rps"] > 0 and ab["success"] == 1.0 and 0 < ab["p50_ms"] <= ab["p99_ms"]
    assert sorted((s["service"], s["ok"]) for s in report["sidecars"]) == \
        [("a", True), ("b", True), ("c", True)]


def test_mesh_status_names_the_sidecars_it_cannot_read(file_mesh):
    b = file_mesh.pod("b", "b1")
    closed = free_port()
    write_registry(file_mesh.path, {"b": [
        entry(b, "b1"),
        {"address": "127.0.0.1:9", "id": "ghost", "metadata": {"fastmesh.admin":
                                                               f"127.0.0.1:{closed}"}},
        {"address": "127.0.0.1:10", "id": "old"},                    # registered no admin
        entry(b, "b2"),                                 # b1's admin answers for b1, not b2
    ]})
    done = run_status("--registry", file_mesh.registry, "--once", "--interval", "0.2")
    assert done.returncode == 0, done.stderr
    assert "1 of 4 sidecar(s) answered" in done.stdout
    assert f"b/ghost: admin 127.0.0.1:{closed} unreachable" in done.stdout
    assert "b/old: no admin address registered" in done.stdout
    assert f"b/b2: admin 127.0.0.1:{b.admin} answers for b/b1, not this instance" in done.stdout
    assert "(no traffic recorded by any sidecar yet)" in done.stdout


def test_mesh_status_fails_clearly_without_a_registry(tmp_path):
    done = run_status("--registry", f"redis://127.0.0.1:{free_port()}/0", "--once")
    assert done.returncode == 1
    assert "fastmesh mesh status: registry redis://" in done.stderr and "did not answer" in \
        done.stderr
    done = run_status("--registry", "etcd://x", "--once")
    assert done.returncode == 2 and "unsupported registry 'etcd://x'" in done.stderr
    done = run_status("--registry", f"file:{tmp_path / 'none.yaml'}", "--once",
                      "--interval", "0")
    assert done.returncode == 2 and "--interval: must be 0.1..3600 seconds" in done.stderr
    # Nobody reachable: exit 1 after the table (a registry file listing one dead sidecar).
    path = tmp_path / "mesh.yaml"
    write_registry(path, {"b": [{"address": "127.0.0.1:9", "metadata": {
        "fastmesh.admin": f"127.0.0.1:{free_port()}"}}]})
    done = run_status("--registry", f"file:{path}", "--once", "--interval", "0.1")
    assert done.returncode == 1 and "0 of 1 sidecar(s) answered" in done.stdout


def test_mesh_status_count_prints_that_many_tables(file_mesh):
    b = file_mesh.pod("b", "b1")
    write_registry(file_mesh.path, {"b": [entry(b, "b1")]})
    get(b.inbound, "/", host="b")
    done = run_status("--registry", file_mesh.registry, "--count", "2", "--interval", "0.2",
                      "--json")
    assert done.returncode == 0, done.stderr
    tables = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(tables) == 2 and all(t["interval"] == 0.2 for t in tables)
    # The request before the first snapshot is in the totals, not in either interval.
    for t in tables:
        [row] = t["rows"]
        assert (row["source"], row["destination"], row["requests"], row["total_requests"]) == \
            (OUTSIDE, "b", 0, 1)


def test_live_mesh_status_ends_on_ctrl_c(mesh):
    mesh.pod("b", "b1")
    proc = subprocess.Popen(fastmesh_cmd("mesh", "status", "--registry", mesh.registry,
                                         "--interval", "0.1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Tables keep coming (no --once): wait for a few, then interrupt (at any point of a
        # round: sleeping, reading the registry or the sidecars).
        seen = 0
        deadline = time.monotonic() + 20
        while seen < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen += line.startswith("SOURCE")
        assert seen == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
