"""Service discovery through the real gateway: a local DNS stub (A and SRV, TTL 1 s) and a
targets file the test edits. Every wait is bounded."""
from __future__ import annotations

import asyncio
import collections
import signal
import socket
import threading
import time

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import yaml

from conftest import get, read_request_head
from fastmesh.config import ConfigError, load_config_data
from fastmesh.discovery import (
    LookupFailed, lookup_addresses, lookup_srv, make_resolver, parse_servers, read_targets_file,
)

TTL = 1


# --- a DNS stub the test controls -------------------------------------------------------------

class DnsStub:
    """UDP DNS server on 127.0.0.1: answers A from `a`, SRV from `srv` (with A glue), empty
    NOERROR for other types of known names, NXDOMAIN otherwise. mode 'servfail' answers
    SERVFAIL to everything, 'silent' drops every query."""

    def __init__(self):
        self.a: dict[str, list[str]] = {}
        self.srv: dict[str, list[tuple[int, int, int, str]]] = {}   # (priority, weight, port, host)
        self.mode = "answer"
        self.queries: collections.Counter = collections.Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                reply = self._answer(dns.message.from_wire(data))
            except Exception:
                continue
            if reply is not None:
                self.sock.sendto(reply.to_wire(), peer)

    def _answer(self, query: dns.message.Message):
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = question.rdtype
        self.queries[(name, dns.rdatatype.to_text(rdtype))] += 1
        if self.mode == "silent":
            return None
        reply = dns.message.make_response(query)
        if self.mode == "servfail":
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply
        if name not in self.a and name not in self.srv:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply
        if rdtype == dns.rdatatype.A and self.a.get(name):
            reply.answer.append(dns.rrset.from_text(question.name, TTL, "IN", "A", *self.a[name]))
        elif rdtype == dns.rdatatype.SRV and self.srv.get(name):
            records = [f"{p} {w} {port} {host}." for p, w, port, host in self.srv[name]]
            reply.answer.append(dns.rrset.from_text(question.name, TTL, "IN", "SRV", *records))
            for host in sorted({host for _, _, _, host in self.srv[name]}):
                if self.a.get(host):
                    reply.additional.append(dns.rrset.from_text(host + ".", TTL, "IN", "A",
                                                                *self.a[host]))
        return reply

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.thread.join(timeout=2)


@pytest.fixture
def dns_stub(monkeypatch):
    stub = DnsStub()
    monkeypatch.setenv("FASTMESH_DNS_SERVER", stub.address)   # the gateway inherits it
    yield stub
    stub.stop()


# --- upstreams on several loopback addresses --------------------------------------------------

class NamedServer:
    """Answers every request (keep-alive) with its name, or `status` with its name."""

    def __init__(self, host: str, port: int, name: str, status: int = 200):
        self.name = name
        self.status = status
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.host, self.port = self.sock.getsockname()[:2]
        self.requests = 0
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            while not self.stopped.is_set():
                if not read_request_head(conn):
                    return
                self.requests += 1
                body = self.name.encode()
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                             % (self.status, len(body), body))
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.accepter.join(timeout=2)
        for thread in self.threads:
            thread.join(timeout=2)


@pytest.fixture
def servers():
    """Factory: servers(names, status=...) -> NamedServers on 127.0.0.2, .3, ... sharing one port."""
    started: list[NamedServer] = []

    def start(names: str, statuses: dict | None = None) -> list[NamedServer]:
        for attempt in range(20):
            made: list[NamedServer] = []
            try:
                port = 0
                for i, name in enumerate(names):
                    server = NamedServer(f"127.0.0.{i + 2}", port, name,
                                         (statuses or {}).get(name, 200))
                    made.append(server)
                    port = server.port
            except OSError:
                for server in made:
                    server.stop()
                continue
            started.extend(made)
            return made
        raise RuntimeError("no common free port on 127.0.0.2..")

    yield start
    for server in started:
        server.stop()


def upstream_config(targets: list[dict], **upstream) -> dict:
    return {
        "_format_version": "1",
        "gateway": {"admin": {"listen": "off"}},
        "upstreams": [{"name": "backend", "targets": targets, **upstream}],
        "services": [{"name": "svc", "host": "backend", "port": 80,
                      "routes": [{"name": "all", "paths": ["/"]}]}],
    }


def answers(port: int, n: int = 12) -> collections.Counter:
    return collections.Counter(get(port).body.decode() for _ in range(n))


def wait_for_answers(port: int, expected: set, timeout: float, n: int = 12) -> float:
    """Seconds until `n` requests are answered by exactly `expected`; fails after `timeout`."""
    start = time.monotonic()
    seen = None
    while time.monotonic() - start < timeout:
        seen = set(answers(port, n))
        if seen == expected:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"still answered by {seen}, expected {expected} after {timeout}s")


# --- DNS A records ----------------------------------------------------------------------------

def test_a_records_are_balanced_and_a_new_answer_moves_traffic(dns_stub, servers, gateway):
    a, b, c = servers("abc")
    dns_stub.a["orders.test"] = [a.host, b.host]
    gw = gateway(upstream_config([{"target": f"orders.test:{a.port}"}]))
    # Resolved before serving (bounded start wait): round-robin over both addresses at once.
    assert answers(gw.port, 12) == {"a": 6, "b": 6}
    dns_stub.a["orders.test"] = [b.host, c.host]
    took = wait_for_answers(gw.port, {"b", "c"}, timeout=2 * TTL + 1.5)
    assert took < 2 * TTL + 1.0
    assert answers(gw.port, 12) == {"b": 6, "c": 6}


def test_every_worker_resolves_and_a_reload_switches_names(dns_stub, servers, gateway):
    a, b, c = servers("abc")
    dns_stub.a.update({"orders.test": [a.host, b.host], "other.test": [c.host]})
    gw = gateway(upstream_config([{"target": f"orders.test:{a.port}"}]), "--workers", "2")
    assert set(answers(gw.port, 20)) == {"a", "b"}
    gw.config_path.write_text(yaml.safe_dump(upstream_config([{"target": f"other.test:{a.port}"}])))
    gw.proc.send_signal(signal.SIGHUP)
    wait_for_answers(gw.port, {"c"}, timeout=5, n=20)
    dns_stub.a["other.test"] = [a.host]
    wait_for_answers(gw.port, {"a"}, timeout=2 * TTL + 1.5, n=20)


def test_srv_records_give_ports_weights_and_lowest_priority(dns_stub, scripted, gateway):
    def named(name):
        def handler(conn, index):
            while read_request_head(conn):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + name.encode())
        return scripted(handler)
    a, b, c, backup = named("a"), named("b"), named("c"), named("z")
    dns_stub.a.update({"a.orders.test": ["127.0.0.1"], "b.orders.test": ["127.0.0.1"],
                       "c.orders.test": ["127.0.0.1"], "z.orders.test": ["127.0.0.1"]})
    dns_stub.srv["_http._tcp.orders.test"] = [
        (10, 30, a.port, "a.orders.test"), (10, 10, b.port, "b.orders.test"),
        (20, 100, backup.port, "z.orders.test")]        # a higher priority value: backup only
    gw = gateway(upstream_config([{"target": "_http._tcp.orders.test"}]))
    counts = answers(gw.port, 40)
    assert set(counts) == {"a", "b"}
    assert 27 <= counts["a"] <= 33, counts            # SRV weights 30:10, smooth round-robin
    dns_stub.srv["_http._tcp.orders.test"] = [(10, 0, c.port, "c.orders.test")]   # weight 0 → 1
    wait_for_answers(gw.port, {"c"}, timeout=2 * TTL + 1.5)


def test_srv_name_with_a_port_is_a_config_error():
    with pytest.raises(ConfigError, match="takes its ports from DNS"):
        load_config_data(upstream_config([{"target": "_http._tcp.orders.test:80"}]))


def test_health_state_survives_re_resolution(dns_stub, servers, gateway):
    good, sick, fresh = servers("gsf", statuses={"s": 500})
    dns_stub.a["orders.test"] = [good.host, sick.host]
    gw = gateway(upstream_config(
        [{"target": f"orders.test:{good.port}"}],
        healthchecks={"passive": {"unhealthy": {"http_statuses": [500], "failures": 1},
                                  "ejection_time": "60s"}}))
    first = [get(gw.port).status for _ in range(4)]
    assert first.count(500) == 1                       # one failure ejects the sick address
    assert answers(gw.port, 6) == {"g": 6}
    dns_stub.a["orders.test"] = [good.host, sick.host, fresh.host]
    wait_for_answers(gw.port, {"g", "f"}, timeout=2 * TTL + 1.5)
    # The sick address was in both answers: it stays ejected (a fresh balancer would try it).
    assert set(answers(gw.port, 20)) == {"g", "f"}
    assert sick.requests == 1


def test_failed_resolution_keeps_the_last_good_set(dns_stub, servers, gateway):
    a, b = servers("ab")
    dns_stub.a["orders.test"] = [a.host, b.host]
    gw = gateway(upstream_config([{"target": f"orders.test:{a.port}"}]))
    assert set(answers(gw.port)) == {"a", "b"}
    asked = dns_stub.queries[("orders.test", "A")]
    dns_stub.mode = "servfail"
    time.sleep(2.5 * TTL)
    assert dns_stub.queries[("orders.test", "A")] > asked     # it did ask, and failed
    assert set(answers(gw.port)) == {"a", "b"}
    dns_stub.mode = "answer"
    dns_stub.a["orders.test"] = [b.host]
    wait_for_answers(gw.port, {"b"}, timeout=10)              # recovers (after its backoff)
    out = gw.stop()
    assert "orders.test" in out and "keeping the last 2 address(es)" in out, out


def test_a_name_that_never_resolves_means_no_target(dns_stub, gateway):
    gw = gateway(upstream_config([{"target": "missing.test:8080"}]))
    resp = get(gw.port)
    assert resp.status == 503
    assert "no healthy" in resp.json()["message"]


# --- targets_file -----------------------------------------------------------------------------

def test_targets_file_is_watched_and_a_broken_one_keeps_the_targets(servers, gateway, tmp_path):
    a, b = servers("ab")
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump([{"target": f"{a.host}:{a.port}"}]))
    cfg = upstream_config([])
    del cfg["upstreams"][0]["targets"]
    cfg["upstreams"][0]["targets_file"] = str(path)
    gw = gateway(cfg)
    assert set(answers(gw.port)) == {"a"}
    path.write_text(yaml.safe_dump([{"target": f"{b.host}:{b.port}", "weight": 5}]))
    took = wait_for_answers(gw.port, {"b"}, timeout=3.5)
    assert took < 2.5
    path.write_text('[{"target": "%s:%d"}, {"target": "%s:99999"}]' % (a.host, a.port, a.host))
    time.sleep(2.0)
    assert set(answers(gw.port)) == {"b"}
    path.write_text("[{target: unclosed")                    # not even YAML
    time.sleep(1.5)
    assert set(answers(gw.port)) == {"b"}
    path.write_text(yaml.safe_dump([{"target": f"{a.host}:{a.port}"},
                                    {"target": f"{b.host}:{b.port}"}]))
    wait_for_answers(gw.port, {"a", "b"}, timeout=3.5)
    out = gw.stop()
    assert f"{path}: [1].target: port must be 1..65535, found 99999" in out, out
    assert f"{path}: invalid YAML/JSON" in out, out


def test_relative_targets_file_is_relative_to_the_config_file(tmp_path):
    cfg = upstream_config([])
    del cfg["upstreams"][0]["targets"]
    cfg["upstreams"][0]["targets_file"] = "targets.yaml"
    config = load_config_data(cfg, source=str(tmp_path / "fastmesh.yaml"))
    assert config.upstreams[0].targets_file == str(tmp_path / "targets.yaml")


def test_read_targets_file_names_file_and_path(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"target": "10.0.0.1:80", "weight": 7}, {"target": "x.test"}]')
    targets = read_targets_file(str(path))
    assert [(t.host, t.port, t.weight) for t in targets] == [("10.0.0.1", 80, 7), ("x.test", 80, 100)]
    path.write_text('[{"target": "10.0.0.1:80", "wieght": 7}]')
    with pytest.raises(ValueError, match=r"t\.json: \[0\]\.wieght: unknown field"):
        read_targets_file(str(path))
    path.write_text('{"target": "10.0.0.1:80"}')
    with pytest.raises(ValueError, match="expected a list"):
        read_targets_file(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        read_targets_file(str(tmp_path / "absent.yaml"))


# --- the lookups on their own ------------------------------------------------------------------

def test_lookups_against_the_stub(dns_stub):
    dns_stub.a.update({"two.test": ["127.0.0.3", "127.0.0.2"], "h.test": ["127.0.0.9"]})
    dns_stub.srv["_x._tcp.s.test"] = [(0, 5, 1234, "h.test"), (0, 0, 99, "gone.test")]

    async def run():
        resolver, explicit = make_resolver(dns_stub.address)
        assert explicit
        addresses, ttl = await lookup_addresses(resolver, "two.test")
        assert addresses == ["127.0.0.2", "127.0.0.3"] and ttl == TTL
        found, _ = await lookup_srv(resolver, "_x._tcp.s.test")
        assert found == [(("127.0.0.9"), 1234, 5)]        # gone.test: no address, skipped
        with pytest.raises(LookupFailed, match="NXDOMAIN"):
            await lookup_addresses(resolver, "nope.test")
        dns_stub.mode = "servfail"
        with pytest.raises(LookupFailed):
            await lookup_addresses(resolver, "two.test")
    asyncio.run(asyncio.wait_for(run(), 10))


def test_parse_servers():
    assert parse_servers("127.0.0.1:5353, [::1]:53,10.0.0.2") == [
        ("127.0.0.1", 5353), ("::1", 53), ("10.0.0.2", 53)]
    with pytest.raises(ValueError):
        parse_servers("dns.example:53")
