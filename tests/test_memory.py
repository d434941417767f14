"""Idle memory: the RSS we publish for a serving process stays under 30 MiB.

Real processes on loopback, as elsewhere: `fastmesh run` (one worker, the embedded default; and a
supervisor with two worker processes) and `fastmesh sidecar` with a file registry. Each is started
twice: the first start fills a bytecode cache in a temporary folder, the second is measured, as
an installed package or the container image runs (bytecode compiled at install). Without bytecode
every start compiles fastmesh from source, and what the compiler frees stays scattered in the heap
(about 0.8 MiB more here): a development-tree artefact, not what a deployment carries.

Besides the totals, the single-process gateway and the sidecar are checked for what they must
not load or start: modules that only other commands or unused features need (the `-X importtime`
log of the real process lists everything it imported, lazily too), and the resolver threads of
libuv's pool. The sidecar is also started as benches/mesh_chain.py starts it (a JSON registry of
five services, a call through both listeners to a real app).
"""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, Proc, fastmesh_cmd, free_port, get, wait_for_port, wait_until

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
    "orjson", "uuid",                # the access log's JSON (fastmesh.jsonbytes for the rest)
    "fastmesh._core.tls_transport",  # the first HTTPS upstream connect
)

# Not in a plaintext sidecar with a JSON registry file, after a call through it.
NOT_IN_IDLE_SIDECAR = (
    "yaml",                          # JSON registry files are read with json (file_registry)
    "hashlib", "_hashlib", "hmac",   # OpenSSL's digest tables: SHA-256 from CPython's (osutil)
    "secrets", "random",             # the instance id's random part comes from os.urandom
    "msgpack",                       # histograms in the admin API: a /status with traffic only
    "cryptography",                  # mTLS only; and not to read certificate files (workload_cert)
    "fastmesh.mesh.ca",              # `fastmesh ca ...`; the sidecar reads SPIFFE ids (registry)
    "fastmesh.mesh.status",          # `fastmesh mesh status`
    "fastmesh.mesh.interception", "fastmesh.mesh.transparent",   # --intercept only
    "orjson", "uuid", "datetime",    # JSON answers come from fastmesh.jsonbytes
    "fastmesh._core.tls_transport",  # mTLS and HTTPS upstreams only
)
BENCH_SERVICES = 5                     # benches/mesh_chain.py: s1 .. s5


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


def assert_idle_and_single_threaded(proc) -> None:
    """The settled process's RSS under the limit, and one thread: listeners are bound without
    getaddrinfo, so no libuv pool threads (nor their malloc arenas). Stops the process."""
    try:
        idle = settled(proc.pid)
    finally:
        proc.stop()
    assert idle["VmRSS"] < IDLE_RSS_LIMIT_KB, describe(idle)
    assert idle["Threads"] == 1, describe(idle)


def test_idle_gateway_worker_stays_under_30_mib(bytecode):
    proc, _ = start_twice(lambda: start_gateway("--workers", "1"))
    assert_idle_and_single_threaded(proc)


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


def start_bench_sidecar(tmp_path: Path, app_port: int) -> tuple[Proc, int]:
    """`fastmesh sidecar` for s2 with the chain bench's flags and its JSON registry file (every
    service listed, s2 at this sidecar's inbound listener); ready, and one call made through its
    outbound listener, its inbound one and the app. Returns the process and its outbound port."""
    inbound, outbound, admin = free_port(), free_port(), free_port()
    registry = tmp_path / f"mesh-{inbound}.yaml"
    services = {f"s{i + 1}": [{"address": f"127.0.0.1:{inbound if i == 1 else free_port()}",
                               "id": f"s{i + 1}-1", "metadata": {"fastmesh.admin": "127.0.0.1:1"}}]
                for i in range(BENCH_SERVICES)}
    registry.write_text(json.dumps({"services": services}, indent=1) + "\n")   # JSON is YAML
    proc = Proc(["sidecar", "--service", "s2", "--app-port", str(app_port),
                 "--registry", f"file:{registry}", "--inbound", f"127.0.0.1:{inbound}",
                 "--advertise", f"127.0.0.1:{inbound}", "--outbound", f"127.0.0.1:{outbound}",
                 "--admin", f"127.0.0.1:{admin}", "--instance-id", "s2-1"], inbound)
    try:
        wait_until(lambda: ready(admin), 15, "the sidecar never became ready")
        wait_until(lambda: get(outbound, "/chain", host="s2").status == 200, 10,
                   "no 200 through outbound -> inbound -> app")
    except BaseException:
        proc.stop()
        raise
    return proc, outbound


def test_idle_sidecar_as_the_chain_bench_starts_it_stays_under_30_mib(bytecode, echo, tmp_path):
    proc, _ = start_twice(lambda: start_bench_sidecar(tmp_path, echo.port))
    assert_idle_and_single_threaded(proc)


def test_idle_sidecar_does_not_import_what_it_does_not_use(bytecode, echo, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    proc, _ = start_twice(lambda: start_bench_sidecar(tmp_path, echo.port))
    settled(proc.pid)
    output = proc.stop()
    imported = {line.rsplit("|", 1)[1].strip() for line in output.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "fastmesh.mesh.sidecar" in imported and "fastmesh.mesh.admin" in imported, \
        output[-2000:]
    loaded = sorted(name for name in imported
                    if any(name == m or name.startswith(m + ".") for m in NOT_IN_IDLE_SIDECAR))
    assert loaded == []


CHECK_WORKLOAD_FILES = """
import asyncio, json, sys
from fastmesh.mesh.mtls import peer_id
from fastmesh.mesh.registry import service_of
from fastmesh.mesh.workload_cert import CertificateError, CertificateSource

async def check(out):
    source = CertificateSource.from_dir(out, "orders", start_timeout=0.3)
    try:
        await source.start(lambda: None)
    except CertificateError as exc:
        return {"refused": str(exc)}
    await source.stop()
    peer = peer_id({"subjectAltName": (("URI", source.identity),)})
    return {"identity": source.identity, "service": service_of(peer),
            "state": source.status()["state"]}

async def main(dirs):
    found = {out: await check(out) for out in dirs}
    found["cryptography"] = sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")
    print(json.dumps(found))

asyncio.run(main(sys.argv[1:]))
"""


def test_workload_certificate_files_are_checked_without_cryptography(tmp_path):
    """What a sidecar in mTLS does with its --tls-dir (load and check the pair, watch it, read
    SPIFFE ids) needs the ssl module alone: `cryptography` is ~12 MiB of RSS. Every check still
    refuses what it refused, in the same words."""
    ca, ca2 = tmp_path / "ca", tmp_path / "ca2"
    good, expired, foreign, mismatched = (tmp_path / n for n in ("good", "expired", "foreign",
                                                                 "mismatched"))
    steps = [("init", "--trust-domain", "mem.test", "--dir", str(ca)),
             ("init", "--trust-domain", "mem.test", "--dir", str(ca2)),
             ("issue", "--dir", str(ca), "--service", "orders", "--out", str(expired),
              "--ttl", "1s")]
    steps += [("issue", "--dir", str(authority), "--service", "orders", "--out", str(out))
              for authority, out in ((ca, good), (ca2, foreign), (ca, mismatched))]
    for argv in steps:
        subprocess.run(fastmesh_cmd("ca", *argv), check=True, capture_output=True, timeout=60,
                       cwd=ROOT)
    (foreign / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())     # another CA's pair
    (mismatched / "key.pem").write_bytes((foreign / "key.pem").read_bytes())
    wait_until(lambda: time.time() > (expired / "cert.pem").stat().st_mtime + 2, 5, "expiry")
    done = subprocess.run([sys.executable, "-c", CHECK_WORKLOAD_FILES, str(good), str(expired),
                           str(foreign), str(mismatched)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert found[str(good)] == {"identity": "spiffe://mem.test/svc/orders", "service": "orders",
                                "state": "ok"}
    assert f"{expired}: cert.pem (spiffe://mem.test/svc/orders) expired at" in \
        found[str(expired)]["refused"]
    assert f"{foreign}: cert.pem was not issued by ca.pem" in found[str(foreign)]["refused"]
    assert f"{mismatched}: key.pem does not belong to cert.pem" in \
        found[str(mismatched)]["refused"]
    assert found["cryptography"] == []


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
