"""`fastmesh sidecar` over loopback ports: real sidecar processes, a real redis-server, small apps.

Each "pod" is an app (a tiny HTTP server in a thread of this process that says which service and
instance it is, and may first call another service through its own sidecar's outbound listener)
plus its sidecar process. No network namespaces here: every listener is on 127.0.0.1 with its
own port. Every process is stopped at teardown; every loop is bounded.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from conftest import ROOT, Proc, RawClient, fastmesh_cmd, free_port, get, wait_until

TTL = "3"                   # registration TTL of the test sidecars (heartbeat every second)


# -- the pods ------------------------------------------------------------------------------------

class ThreadedApp:
    """What every test app shares: `serve(Handler)` answers on a free loopback port from daemon
    threads of this process until stop() (idempotent)."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)


def outbound_call(port: int, service: str, path: str = "/") -> tuple[int, dict]:
    """GET `path` from `service` through a sidecar's outbound listener on `port`, as an app
    does: (status, JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": service})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def answer_json(handler: BaseHTTPRequestHandler, status: int, answer: dict) -> None:
    """Head and body in one write, as most servers do for a small response: a pod killed
    mid-response is a truncated response no retry can repair."""
    data = json.dumps(answer).encode()
    handler.wfile.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (status, len(data), data))


class App(ThreadedApp):
    """A tiny app: answers {"service", "instance", "host", "path"}; with `calls` set to
    (service, outbound port) it first calls that service through the sidecar and nests the
    answer under "next" (with its status)."""

    def __init__(self, service: str, instance: str, calls: tuple[str, int] | None = None):
        self.service = service
        self.instance = instance
        self.calls = calls
        self.hits = 0
        self.lock = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                with app.lock:
                    app.hits += 1
                answer = {"service": app.service, "instance": app.instance,
                          "host": self.headers.get("Host"), "path": self.path}
                status = 200
                if app.calls is not None:
                    name, port = app.calls
                    status, answer["next"] = outbound_call(port, name, self.path)
                answer_json(self, status, answer)

            def log_message(self, *args):
                pass

        self.serve(Handler)


class Sidecar:
    """A `fastmesh sidecar` process; ready (admin /ready answers 200) when constructed."""

    def __init__(self, service: str, app: App, registry: str, *extra: str,
                 outbound: int | None = None, ready: bool = True):
        self.service = service
        self.app = app
        self.inbound = free_port()
        self.outbound = outbound or free_port()
        self.admin = free_port()
        self.proc = Proc(["sidecar", "--service", service, "--app-port", str(app.port),
                          "--registry", registry, "--inbound", f"127.0.0.1:{self.inbound}",
                          "--outbound", f"127.0.0.1:{self.outbound}",
                          "--admin", f"127.0.0.1:{self.admin}", "--ttl", TTL,
                          "--drain-timeout", "2", *extra], self.inbound)
        if ready:
            wait_until(lambda: admin_get(self.admin, "/ready")[0] == 200, 15,
                       f"sidecar {service} never became ready")

    def status(self) -> dict:
        return admin_get(self.admin, "/status")[1]

    def stop(self) -> str:
        return self.proc.stop()


def admin_get(port: int, path: str) -> tuple[int, dict]:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
    except OSError:
        return 0, {}
    return resp.status, json.loads(body) if body else {}


class Mesh:
    def __init__(self, registry: str):
        self.registry = registry
        self.apps: list[App] = []
        self.sidecars: list[Sidecar] = []

    def app(self, service: str, instance: str, calls=None) -> App:
        app = App(service, instance, calls)
        self.apps.append(app)
        return app

    def sidecar(self, service: str, app: App, *extra: str, **kw) -> Sidecar:
        sidecar = Sidecar(service, app, kw.pop("registry", self.registry), *extra, **kw)
        self.sidecars.append(sidecar)
        return sidecar

    def pod(self, service: str, instance: str, *extra: str, **kw) -> Sidecar:
        return self.sidecar(service, self.app(service, instance), "--instance-id", instance,
                            *extra, **kw)

    def close(self) -> None:
        for sidecar in self.sidecars:
            sidecar.stop()
        for app in self.apps:
            app.stop()


@pytest.fixture
def mesh(redis_server):
    m = Mesh(redis_server.url)
    m.redis = redis_server
    yield m
    m.close()


@pytest.fixture
def file_mesh(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text("services: {}\n")
    m = Mesh(f"file:{path}")
    m.path = path
    yield m
    m.close()


def call(port: int, service: str, path: str = "/") -> tuple[int, dict]:
    resp = get(port, path, host=service)
    return resp.status, resp.json()


def instance_key(service: str, instance: str) -> str:
    return f"fastmesh:svc:{service}:{instance}"


def write_entry(redis, service: str, instance: str, value: str) -> None:
    """Put a registry entry by hand, as no sidecar would keep it (no heartbeat), and announce it."""
    redis.command("SET", instance_key(service, instance), value, "PX", "600000")
    redis.command("SADD", f"fastmesh:idx:{service}", instance)
    redis.command("SADD", "fastmesh:services", service)
    redis.command("PUBLISH", "fastmesh:events", '{"op": "register"}')


def redis_exists(redis, key: str) -> bool:
    return redis.command("EXISTS", key) == b":1\r\n"


# -- routing -----------------------------------------------------------------------------------

def test_call_chain_a_to_b_to_c_through_three_sidecars(mesh):
    c = mesh.pod("c", "c1")
    b_out = free_port()
    b_app = mesh.app("b", "b1", calls=("c", b_out))
    b = mesh.sidecar("b", b_app, "--instance-id", "b1", outbound=b_out)
    a_out = free_port()
    a_app = mesh.app("a", "a1", calls=("b", a_out))
    a = mesh.sidecar("a", a_app, "--instance-id", "a1", outbound=a_out)
    wait_until(lambda: {"b", "c"} <= set(a.status()["destinations"]), 5, "a never saw b and c")
    wait_until(lambda: "c" in b.status()["destinations"], 5, "b never saw c")

    # A client enters at A's inbound: A's app -> A's outbound -> B's inbound -> B's app ->
    # B's outbound -> C's inbound -> C's app.
    status, body = call(a.inbound, "a", "/orders/7?x=1")
    assert status == 200
    assert (body["service"], body["instance"], body["host"]) == ("a", "a1", "a")
    assert (body["next"]["service"], body["next"]["host"]) == ("b", "b")
    leaf = body["next"]["next"]
    assert (leaf["service"], leaf["instance"], leaf["host"], leaf["path"]) == \
        ("c", "c1", "c", "/orders/7?x=1")
    assert c.app.hits == 1 and b_app.hits == 1 and a_app.hits == 1


def test_service_name_with_port_and_absolute_form_requests_are_routed(mesh):
    mesh.pod("payments", "p1")
    a = mesh.pod("a", "a1")
    wait_until(lambda: "payments" in a.status()["destinations"], 5, "a never saw payments")
    assert call(a.outbound, "payments:80", "/charge")[1]["instance"] == "p1"
    # The app uses the outbound listener as its HTTP proxy: absolute-form request target.
    with RawClient(a.outbound) as client:
        client.send(b"GET http://payments/charge?id=3 HTTP/1.1\r\nHost: payments\r\n\r\n")
        resp = client.read_response()
    assert resp.status == 200
    assert (resp.json()["instance"], resp.json()["path"]) == ("p1", "/charge?id=3")


def test_two_instances_of_a_service_both_get_traffic(mesh):
    b1 = mesh.pod("b", "b1")
    b2 = mesh.pod("b", "b2")
    a = mesh.pod("a", "a1")
    wait_until(lambda: len(admin_get(a.admin, "/registry")[1]["services"].get("b", ())) == 2, 5,
               "a never saw both b instances")

    # Concurrent callers: p2c-ewma weighs latency by requests in flight, so load spreads. (One
    # caller at a time would mostly stay on whichever instance answered its first call faster.)
    seen: dict = {}
    failures: list = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(40):
            status, body = call(a.outbound, "b")
            with lock:
                if status != 200:
                    failures.append((status, body))
                seen[body.get("instance")] = seen.get(body.get("instance"), 0) + 1

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    print(f"calls per instance: {seen}")
    assert set(seen) == {"b1", "b2"}, seen
    assert min(seen.values()) >= 16, seen          # at least 5 % each of 320
    assert b1.app.hits + b2.app.hits == 320


def test_unknown_service_is_503_json_naming_it(mesh):
    a = mesh.pod("a", "a1")
    started = time.monotonic()
    resp = get(a.outbound, "/charge", host="payments:8080")
    assert time.monotonic() - started < 2
    assert resp.status == 503
    assert resp.header("content-type") == "application/json"
    assert resp.json() == {"message": "unknown service 'payments': no instance of it in the "
                                      "registry", "service": "payments"}
    with RawClient(a.outbound) as client:         # absolute form, with and without a path
        for target in (b"http://ledger/x", b"http://ledger", b"http://ledger:81?q=1"):
            client.send(b"GET %s HTTP/1.1\r\nHost: ledger\r\n\r\n" % target)
            resp = client.read_response()
            assert (resp.status, resp.json()["service"]) == (503, "ledger"), target
    with RawClient(a.outbound) as client:         # HTTP/1.0 may leave out Host
        client.send(b"GET /x HTTP/1.0\r\n\r\n")
        resp = client.read_response()
    assert resp.status == 503
    assert resp.json()["message"].startswith("no service named")


def test_killing_one_instance_under_load_gives_no_client_errors(mesh):
    b1 = mesh.pod("b", "b1")
    b2 = mesh.pod("b", "b2")
    a = mesh.pod("a", "a1")
    wait_until(lambda: len(admin_get(a.admin, "/registry")[1]["services"].get("b", ())) == 2, 5,
               "a never saw both b instances")
    for _ in range(20):
        assert call(a.outbound, "b")[0] == 200

    errors: list[str] = []
    counts = {"b1": 0, "b2": 0}
    lock = threading.Lock()

    def client(n: int) -> None:
        for _ in range(n):
            try:
                resp = get(a.outbound, "/work", host="b")
                who = resp.json()["instance"] if resp.status == 200 else None
            except (OSError, ValueError) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                if resp.status != 200:
                    errors.append(f"{resp.status} {resp.body[:200]!r}")
                else:
                    counts[who] += 1

    threads = [threading.Thread(target=client, args=(150,)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    b2.proc.proc.send_signal(signal.SIGKILL)        # the pod dies: no deregistration
    b2.app.stop()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert counts["b1"] + counts["b2"] == 600
    assert counts["b2"] > 0                         # b2 did serve before it died
    assert b1.app.hits >= counts["b1"]
    # After the kill, b1 serves everything.
    assert [call(a.outbound, "b")[1]["instance"] for _ in range(20)] == ["b1"] * 20


def test_calls_stay_in_the_callers_zone_and_fail_over_when_the_zone_goes_down(mesh):
    b1 = mesh.pod("b", "b1", "--zone", "east")
    west = [mesh.pod("b", name, "--zone", "west") for name in ("b2", "b3")]
    a = mesh.pod("a", "a1", "--zone", "west")
    flat = mesh.pod("a", "a2", "--zone", "west", "--locality", "off")
    for caller in (a, flat):
        wait_until(lambda: len(admin_get(caller.admin, "/registry")[1]["services"].get("b", ()))
                   == 3, 5, "a caller never saw the three b instances")
    seen = {call(a.outbound, "b")[1]["instance"] for _ in range(30)}
    assert seen == {"b2", "b3"}                 # never east while the west has a healthy one
    call(flat.outbound, "b")

    def tiers(sidecar) -> dict[int, int]:
        upstream = admin_get(sidecar.admin, "/status")[1]["outbound"]["upstreams"]["b"]
        return {int(row["target"].rsplit(":", 1)[1]): row["priority"]
                for row in upstream["targets"]}

    assert tiers(a) == {b1.inbound: 1, west[0].inbound: 0, west[1].inbound: 0}
    assert set(tiers(flat).values()) == {0}     # --locality off: all alike

    # The whole zone goes down at once: no instance is ejected yet, so each call's retry must
    # leave the zone (else every attempt could land on a dead west instance); none fails.
    for sidecar in west:
        sidecar.proc.proc.send_signal(signal.SIGKILL)
        sidecar.app.stop()
    results = [call(a.outbound, "b") for _ in range(20)]
    assert [status for status, _ in results] == [200] * 20, results
    assert {body["instance"] for _, body in results} == {"b1"}


def test_new_instance_gets_traffic_within_one_second_of_registering(mesh):
    mesh.pod("b", "b1")
    a = mesh.pod("a", "a1")
    wait_until(lambda: "b" in a.status()["destinations"], 5, "a never saw b")
    b2_app = mesh.app("b", "b2")
    registered = {}

    def watch_registration() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "at" not in registered:
            if redis_exists(mesh.redis, instance_key("b", "b2")):
                registered["at"] = time.monotonic()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch_registration)
    watcher.start()
    mesh.sidecar("b", b2_app, "--instance-id", "b2", ready=False)
    watcher.join(timeout=25)
    assert "at" in registered, "b2 never registered"
    first = None
    while time.monotonic() - registered["at"] < 1.0:
        if call(a.outbound, "b")[1]["instance"] == "b2":
            first = time.monotonic()
            break
    assert first is not None, "b2 got no traffic within 1 s of registering"
    print(f"b2 got its first request {(first - registered['at']) * 1000:.0f} ms after registering")
    assert first - registered["at"] < 1.0


def test_expired_instance_drops_out_and_the_service_becomes_unknown(mesh):
    b1 = mesh.pod("b", "b1")
    a = mesh.pod("a", "a1")
    wait_until(lambda: "b" in a.status()["destinations"], 5, "a never saw b")
    b1.proc.proc.send_signal(signal.SIGKILL)        # no deregistration: the TTL must do it
    b1.proc.proc.wait(timeout=5)
    started = time.monotonic()
    wait_until(lambda: not redis_exists(mesh.redis, instance_key("b", "b1")), 10,
               "the key of a dead instance did not expire")
    wait_until(lambda: get(a.outbound, "/", host="b").status == 503, 5,
               "the expired instance is still routed to", interval=0.1)
    assert time.monotonic() - started < float(TTL) + 4
    assert get(a.outbound, "/", host="b").json()["service"] == "b"


# -- the registry --------------------------------------------------------------------------------

def test_redis_outage_keeps_routing_and_resyncs_when_it_returns(mesh):
    b1 = mesh.pod("b", "b1")
    a = mesh.pod("a", "a1")
    wait_until(lambda: "b" in a.status()["destinations"], 5, "a never saw b")
    mesh.redis.stop()
    wait_until(lambda: not a.status()["registry"]["reachable"], 10,
               "the sidecar did not notice that Redis went away", interval=0.1)
    # Longer than the TTL: without Redis nothing expires from the local view.
    deadline = time.monotonic() + float(TTL) + 1
    served = 0
    while time.monotonic() < deadline:
        status, body = call(a.outbound, "b")
        assert (status, body["instance"]) == (200, "b1")
        served += 1
        time.sleep(0.05)
    assert served > 10

    mesh.redis.start()                              # same port, empty
    b2 = mesh.pod("b", "b2")                        # registers in the new Redis
    wait_until(lambda: a.status()["registry"]["reachable"], 10, "the sidecar never reconnected",
               interval=0.1)
    # b1's sidecar re-registers itself on its next heartbeat.
    wait_until(lambda: redis_exists(mesh.redis, instance_key("b", "b1")), 5,
               "b1 did not re-register after Redis came back", interval=0.05)
    seen = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and seen != {"b1", "b2"}:
        status, body = call(a.outbound, "b")
        assert status == 200
        seen.add(body["instance"])
    assert seen == {"b1", "b2"}
    assert b1.app.hits > 0 and b2.app.hits > 0


def test_redis_restart_keeps_missing_instances_for_one_ttl_then_drops_them(mesh):
    c1 = mesh.pod("c", "c1")
    a = mesh.pod("a", "a1")
    # An instance of "x" that no sidecar heartbeats: written by hand, served by c1's pod.
    write_entry(mesh.redis, "x", "x1",
                json.dumps({"service": "x", "id": "x1", "address": f"127.0.0.1:{c1.inbound}"}))
    wait_until(lambda: "x" in a.status()["destinations"], 5, "a never saw x")
    mesh.redis.stop()
    wait_until(lambda: not a.status()["registry"]["reachable"], 10,
               "the sidecar did not notice that Redis went away", interval=0.1)
    mesh.redis.start()                              # empty: x1 is gone for good
    wait_until(lambda: a.status()["registry"]["reachable"], 10, "the sidecar never reconnected",
               interval=0.05)
    reconnected = time.monotonic()
    # c1's sidecar registers itself again; x1 is kept for one TTL, then dropped.
    status, body = call(a.outbound, "x")
    assert (status, body["service"]) == (200, "c")
    wait_until(lambda: get(a.outbound, "/", host="x").status == 503, float(TTL) + 5,
               "an instance missing after the restart was never dropped", interval=0.1)
    assert time.monotonic() - reconnected >= float(TTL) - 1.0
    assert call(a.outbound, "c")[0] == 200


def test_an_invalid_registry_entry_is_skipped_and_reported_once(mesh):
    b1 = mesh.pod("b", "b1")
    a = mesh.pod("a", "a1")
    write_entry(mesh.redis, "x", "x1", '{"service": "x", "id": "x1"}')   # no address: invalid
    first = a.status()["registry"]["resyncs"]
    # Several resyncs read the same invalid entry; the valid instance keeps serving.
    wait_until(lambda: a.status()["registry"]["resyncs"] >= first + 3, 15,
               "the sidecar stopped resyncing", interval=0.1)
    assert call(a.outbound, "b")[0] == 200
    assert "x" not in a.status()["destinations"]
    out = a.stop()
    assert out.count("skipping an invalid instance") == 1, out
    assert "Traceback" not in out, out
    b1.stop()


def test_sigterm_deregisters_and_exits_zero(mesh):
    b1 = mesh.pod("b", "b1")
    a = mesh.pod("a", "a1")
    wait_until(lambda: "b" in a.status()["destinations"], 5, "a never saw b")
    assert redis_exists(mesh.redis, instance_key("b", "b1"))
    assert mesh.redis.command("SISMEMBER", "fastmesh:idx:b", "b1") == b":1\r\n"
    b1.proc.proc.send_signal(signal.SIGTERM)
    assert b1.proc.proc.wait(timeout=15) == 0
    out = b1.proc.proc.stdout.read()
    assert "deregistered b/b1" in out
    assert not redis_exists(mesh.redis, instance_key("b", "b1"))
    assert mesh.redis.command("SISMEMBER", "fastmesh:idx:b", "b1") == b":0\r\n"
    # Callers learn at once (pub/sub), well before the TTL.
    wait_until(lambda: get(a.outbound, "/", host="b").status == 503, 1.0,
               "a still routes to the deregistered instance", interval=0.02)


def test_registration_records_the_instance_fields(mesh):
    mesh.pod("b", "b1", "--zone", "eu-1", "--version", "v2", "--weight", "7",
             "--meta", "team=ledger")
    raw = mesh.redis.command("GET", instance_key("b", "b1"))
    value = json.loads(raw.split(b"\r\n", 1)[1].rsplit(b"\r\n", 1)[0])
    sidecar = mesh.sidecars[-1]
    assert value == {"service": "b", "id": "b1", "address": f"127.0.0.1:{sidecar.inbound}",
                     "zone": "eu-1", "version": "v2", "weight": 7,
                     "metadata": {"team": "ledger", "fastmesh.admin": f"127.0.0.1:{sidecar.admin}"}}
    ttl_ms = int(mesh.redis.command("PTTL", instance_key("b", "b1"))[1:].split(b"\r\n")[0])
    assert 0 < ttl_ms <= float(TTL) * 1000


def test_more_addresses_are_registered_checked_and_routed(mesh):
    # --advertise-also (an IP address of the pod, or of its service; --meta fastmesh.addresses
    # too) goes into the registered metadata, normalized; calls with it as Host are calls to b.
    b1 = mesh.pod("b", "b1", "--advertise-also", "FD00::0005", "--meta",
                  "fastmesh.addresses=fd00::6,[fd00::5], 10.9.9.9")
    a = mesh.pod("a", "a1")
    raw = mesh.redis.command("GET", instance_key("b", "b1"))
    value = json.loads(raw.split(b"\r\n", 1)[1].rsplit(b"\r\n", 1)[0])
    assert value["metadata"]["fastmesh.addresses"] == "fd00::6,fd00::5,10.9.9.9"
    wait_until(lambda: get(a.outbound, "/", host="[fd00::5]:8080").status == 200, 5,
               "a never routed b's IPv6 address", interval=0.05)
    assert call(a.outbound, "10.9.9.9")[1]["instance"] == "b1"
    assert b1.proc.proc.poll() is None
    # Addresses only (a name would let an instance take HTTP for it), and no zone index.
    for bad, says in ((("--advertise-also", "b1.pods.local"), "expected one IP address"),
                      (("--advertise-also", "fe80::1%eth0"), "expected one IP address"),
                      (("--meta", "fastmesh.addresses=10.0.0.1:80"), "expected IP addresses")):
        done = subprocess.run(fastmesh_cmd("sidecar", "--service", "x", "--app-port", "1", *bad),
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 2, done
        assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_file_registry_reloads_on_change(file_mesh):
    b1 = file_mesh.pod("b", "b1")
    b2 = file_mesh.pod("b", "b2")
    a = file_mesh.pod("a", "a1")
    assert get(a.outbound, "/", host="b").status == 503       # the file lists nobody yet

    def write(instances: list[Sidecar]) -> None:
        document = {"services": {"b": [{"id": s.app.instance, "address": f"127.0.0.1:{s.inbound}"}
                                       for s in instances]}}
        tmp = file_mesh.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(document))
        os.replace(tmp, file_mesh.path)

    write([b1])
    wait_until(lambda: get(a.outbound, "/", host="b").status == 200, 5, "file change not seen",
               interval=0.05)
    assert {call(a.outbound, "b")[1]["instance"] for _ in range(10)} == {"b1"}
    write([b2])
    wait_until(lambda: call(a.outbound, "b")[1]["instance"] == "b2", 5,
               "second file change not seen", interval=0.05)
    assert {call(a.outbound, "b")[1]["instance"] for _ in range(10)} == {"b2"}

    # An invalid file is refused and the last view keeps serving.
    file_mesh.path.write_text("services:\n  b:\n    - {address: '127.0.0.1:notaport'}\n")
    wait_until(lambda: admin_get(a.admin, "/registry")[1]["error"], 5,
               "the invalid file was not noticed", interval=0.05)
    assert "services.b[0].address" in admin_get(a.admin, "/registry")[1]["error"]
    assert {call(a.outbound, "b")[1]["instance"] for _ in range(10)} == {"b2"}


# -- the command line ----------------------------------------------------------------------------

def test_bad_flags_are_refused_with_the_reason(tmp_path):
    cases = [
        (["--service", "Bad Name!", "--app-port", "8080"], "invalid host name"),
        (["--service", "b", "--app-port", "0"], "port"),
        (["--service", "b", "--app-port", "8080", "--advertise", "10.0.0.1"], "host:port"),
        (["--service", "b", "--app-port", "8080", "--registry", "etcd://x"],
         "unsupported registry"),
        (["--service", "b", "--app-port", "8080", "--opaque-ports", "3306,70000"],
         "--opaque-ports: ports are 1..65535, low to high, found '70000'"),
        (["--service", "b", "--app-port", "8080", "--opaque-ports", "9010-9000"],
         "found '9010-9000'"),
        (["--service", "b", "--app-port", "8080", "--opaque-ports", "mysql"],
         "expected PORT or LOW-HIGH, found 'mysql'"),
        (["--service", "b", "--app-port", "8080", "--detect-timeout", "0"],
         "--detect-timeout: must be 0.05..60 seconds, found 0"),
    ]
    for args, expected in cases:
        done = subprocess.run(fastmesh_cmd("sidecar", *args, "--admin", "off",
                                           "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"),
                              capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert done.returncode in (1, 2), (args, done.stdout, done.stderr)
        assert expected in done.stderr, (args, done.stderr)


def test_a_busy_inbound_port_is_refused_not_shared(mesh):
    b1 = mesh.pod("b", "b1")
    app = mesh.app("b", "b2")
    done = subprocess.run(fastmesh_cmd("sidecar", "--service", "b", "--app-port", str(app.port),
                                       "--registry", mesh.registry, "--admin", "off",
                                       "--inbound", f"127.0.0.1:{b1.inbound}",
                                       "--outbound", "127.0.0.1:0"),
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 1
    assert "cannot listen" in done.stderr
    assert not redis_exists(mesh.redis, instance_key("b", "b2"))


# -- the generated config and the registry file, in process --------------------------------------

def test_one_address_registered_twice_is_one_target():
    from fastmesh.mesh.registry import Instance, make_view
    from fastmesh.mesh.routes import outbound_config
    view = make_view([Instance("b", "old", "127.0.0.1", 7001, weight=5),
                      Instance("b", "new", "127.0.0.1", 7001),
                      Instance("b", "other", "127.0.0.1", 7002)])
    config = outbound_config(view)
    (upstream,) = config.upstreams
    assert [(t.address, t.weight) for t in upstream.targets] == \
        [("127.0.0.1:7001", 100), ("127.0.0.1:7002", 100)]     # "new" sorts before "old"
    assert (upstream.algorithm, upstream.healthchecks.passive.failures) == ("p2c-ewma", 3)
    assert [r.hosts for r in config.routes] == [("b",), ()]


def test_registry_file_problems_are_reported_with_their_paths(tmp_path):
    from fastmesh.mesh.file_registry import read_registry_file
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"services": {
        "Bad Name": [{"address": "127.0.0.1:1"}],
        "b": [{"address": "127.0.0.1:99999"}, {"address": "127.0.0.1:2", "weight": -1},
              {"address": "127.0.0.1:3", "id": "x"}, {"address": "127.0.0.1:4", "id": "x"},
              {"address": "127.0.0.1:5", "colour": "red"}, "127.0.0.1:6"],
    }}))
    with pytest.raises(ValueError) as caught:
        read_registry_file(str(path))
    lines = str(caught.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "services.Bad Name", "services.b[0].address", "services.b[1].weight", "services.b[3]",
        "services.b[4].colour", "services.b[5]"]
    assert "duplicate instance id 'x' (first at services.b[2])" in lines[3]
    assert "unknown field 'colour'" in lines[4]
