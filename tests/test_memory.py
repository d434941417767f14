"""Idle memory: the RSS we publish for a serving process stays under 30 MiB.

Real processes on loopback, as elsewhere: `fastmesh run` (one worker, the embedded default; and a
supervisor with two worker processes) and `fastmesh sidecar` with a file registry. Each is started
twice: the first start fills a bytecode cache in a temporary folder, the second is measured, as
an installed package or the container image runs (bytecode compiled at install). Without bytecode
every start compiles fastmesh from source, and what the compiler frees stays scattered in the heap
(about 0.8 MiB more here): a development-tree artefact, not what a deployment carries.

Besides the totals, the single-process gateway is checked for what it must not load or start:
modules that only other commands or unused features need (the `-X importtime` log of the real
process lists everything it imported, lazily too), and the resolver threads of libuv's pool.
"""
from __future__ import annotations

import http.client
import time
from pathlib import Path

import pytest

from conftest import Proc, free_port, wait_for_port, wait_until

IDLE_RSS_LIMIT_KB = 30 * 1024          # /proc reports kB that are KiB: 30 MiB
SETTLE_TIMEOUT = 5.0

# Imported only where used: by other subcommands (the mesh's CLI and what it imports), by
# features the embedded default leaves off, or by error paths.
NOT_IN_IDLE_GATEWAY = (
    "yaml",                          # config files only (fastmesh.config.loader, discovery)
    "difflib",                       # "did you mean" in config errors
    "shutil", "lzma", "bz2",         # argparse's help formatter, the mesh-init command
    "fastmesh.mesh.cli", "fastmesh.mesh.status", "fastmesh.mesh.interception",
    "http.client", "email",          # `fastmesh mesh status`, `reload`, `health`
    "encodings.idna",                # uvloop's getaddrinfo for listen addresses
    "fastmesh.accesslog",            # access_log: off
    "ctypes",                        # malloc_trim: for big configs (or without bytecode)
    "fastmesh.streams", "fastmesh.sni",   # L4 streams: only when the config has some
)


@pytest.fixture
def bytecode(tmp_path, monkeypatch):
    """Processes started from here on keep their bytecode under tmp_path (see the docstring)."""
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path / "pycache"))


def status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


def settled(pid: int) -> dict[str, int]:
    """/proc status once VmRSS stopped moving (startup is over), at most SETTLE_TIMEOUT."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = status(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = status(pid)
        if now["VmRSS"] == last["VmRSS"]:
            return now
        last = now
    return last


def worker_pids(supervisor: int, count: int) -> list[int] | None:
    """The supervisor's child processes, once there are `count` of them."""
    listed = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    pids = [int(pid) for pid in listed.split()]
    return pids if len(pids) == count else None


def describe(fields: dict[str, int]) -> str:
    return (f"VmRSS {fields['VmRSS'] / 1024:.2f} MiB (anon {fields['RssAnon'] / 1024:.2f}, "
            f"file {fields['RssFile'] / 1024:.2f}), {fields['Threads']} thread(s)")


def start_gateway(*extra: str) -> tuple[Proc, int]:
    port, admin = free_port(), free_port()
    proc = Proc(["run", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", *extra],
                port)
    wait_for_port(admin, proc.proc)               # the admin API starts last
    return proc, admin


def start_twice(start):
    """Start, stop (the bytecode cache is filled), start again: the second one is measured."""
    first = start()
    first[0].stop()
    return start()


def test_idle_gateway_worker_stays_under_30_mib(bytecode):
    proc, _ = start_twice(lambda: start_gateway("--workers", "1"))
    try:
        idle = settled(proc.pid)
    finally:
        proc.stop()
    assert idle["VmRSS"] < IDLE_RSS_LIMIT_KB, describe(idle)
    # Listeners are bound without getaddrinfo: no libuv pool threads (nor their malloc arenas).
    assert idle["Threads"] == 1, describe(idle)


def test_idle_supervisor_and_its_workers_stay_under_30_mib(bytecode, echo, tmp_path):
    config = tmp_path / "fastmesh.yaml"
    config.write_text(f'_format_version: "1"\nservices:\n  - {{name: echo, url: "{echo.url}", '
                      'routes: [{name: all, paths: [/]}]}\n')
    proc, _ = start_twice(lambda: start_gateway("--workers", "2", "--config", str(config)))
    try:
        workers = wait_until(lambda: worker_pids(proc.pid, 2), 10, "two worker processes")
        measured = {"supervisor": settled(proc.pid)}
        measured.update((f"worker pid {pid}", settled(pid)) for pid in workers)
    finally:
        proc.stop()
    over = {who: describe(f) for who, f in measured.items() if f["VmRSS"] >= IDLE_RSS_LIMIT_KB}
    assert not over, over


def test_idle_sidecar_with_a_file_registry_stays_under_30_mib(bytecode, tmp_path):
    registry = tmp_path / "mesh.yaml"
    registry.write_text("services: {}\n")

    def start() -> tuple[Proc, int]:
        inbound, outbound, admin = free_port(), free_port(), free_port()
        proc = Proc(["sidecar", "--service", "orders", "--app-port", str(free_port()),
                     "--registry", f"file:{registry}", "--inbound", f"127.0.0.1:{inbound}",
                     "--outbound", f"127.0.0.1:{outbound}", "--admin", f"127.0.0.1:{admin}"],
                    inbound)
        wait_until(lambda: ready(admin), 15, "the sidecar never became ready")
        return proc, admin

    proc, _ = start_twice(start)
    try:
        idle = settled(proc.pid)
    finally:
        proc.stop()
    assert idle["VmRSS"] < IDLE_RSS_LIMIT_KB, describe(idle)


def ready(admin: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=2)
        conn.request("GET", "/ready")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def test_idle_gateway_does_not_import_what_it_does_not_use(bytecode, monkeypatch):
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")    # as -X importtime: one line per import
    proc, _ = start_twice(lambda: start_gateway("--workers", "1"))
    settled(proc.pid)
    output = proc.stop()
    imported = {line.rsplit("|", 1)[1].strip() for line in output.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "fastmesh.server" in imported and "fastmesh.admin" in imported, output[-2000:]
    loaded = sorted(name for name in imported
                    if any(name == m or name.startswith(m + ".") for m in NOT_IN_IDLE_GATEWAY))
    assert loaded == []
