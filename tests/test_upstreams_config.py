"""The `upstreams` entity in the declarative config: parsing, defaults, errors with paths,
services linked by host, and a Balancer built from the result."""
from __future__ import annotations

import textwrap

import pytest

from fastmesh._core.balancer import Balancer
from fastmesh.config import ConfigError, load_config, load_config_data
from fastmesh.config.upstreams import (
    ActiveHealthCheck, CircuitBreaker, PassiveHealthCheck, Target, Upstream,
)

FULL = """
_format_version: "1"
upstreams:
  - name: orders
    algorithm: consistent-hashing
    hash_on: header
    hash_on_header: X-User-Id
    targets:
      - {target: "127.0.0.1:8080", weight: 100}
      - {target: "[::1]:8081", weight: 50}
      - {target: "Orders.Internal"}
    healthchecks:
      active:  {path: /healthz, interval: 2s, timeout: 1s,
                healthy: {successes: 2, http_statuses: [200, 302]},
                unhealthy: {failures: 3, timeouts: 3, http_failures: 3}}
      passive: {unhealthy: {http_statuses: [504, 502, 503], failures: 5, timeouts: 3},
                ejection_time: 30s}
    on_all_unhealthy: open
    circuit_breaker: {max_connections: 1024, max_pending: 256, max_requests: 4096}
  - name: billing
    targets: [{target: "10.0.0.1:9000"}]
targets:
  - {upstream: billing, target: "10.0.0.2:9000", weight: 5}
services:
  - name: orders
    host: orders
    routes: [{name: o, paths: [/orders]}]
  - name: plain
    url: http://127.0.0.1:9001
    routes: [{name: p, paths: [/plain]}]
"""


def data_issues(data: object) -> dict[str, list[str]]:
    with pytest.raises(ConfigError) as caught:
        load_config_data(data)
    found: dict[str, list[str]] = {}
    for issue in caught.value.issues:
        found.setdefault(issue.path, []).append(issue.message)
    return found


def with_upstream(**upstream) -> dict:
    return {"upstreams": [{"name": "u", "targets": [{"target": "127.0.0.1:8080"}], **upstream}]}


def test_full_upstream_parses(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text(textwrap.dedent(FULL))
    config = load_config(str(path))
    orders, billing = config.upstreams
    assert orders == Upstream(
        name="orders", algorithm="consistent-hashing", hash_on="header", hash_on_name="x-user-id",
        targets=(Target("127.0.0.1", 8080, 100), Target("::1", 8081, 50),
                 Target("orders.internal", 80, 100)),
        healthchecks=orders.healthchecks, on_all_unhealthy="open",
        circuit_breaker=CircuitBreaker(1024, 256, 4096))
    assert orders.healthchecks.active == ActiveHealthCheck(
        path="/healthz", interval=2.0, timeout=1.0, successes=2, http_statuses=(200, 302),
        failures=3, timeouts=3, http_failures=3)
    assert orders.healthchecks.passive == PassiveHealthCheck(
        http_statuses=(502, 503, 504), failures=5, timeouts=3, ejection_time=30.0)
    assert [t.address for t in billing.targets] == ["10.0.0.1:9000", "10.0.0.2:9000"]
    assert billing.targets[1].weight == 5
    services = {s.name: s for s in config.services}
    assert services["orders"].upstream == "orders"
    assert services["plain"].upstream is None


def test_defaults():
    config = load_config_data(with_upstream())
    (u,) = config.upstreams
    assert u.algorithm == "round-robin" and u.hash_on is None
    assert u.healthchecks.active is None and u.healthchecks.passive is None
    assert u.on_all_unhealthy == "fail"
    assert u.circuit_breaker == CircuitBreaker(0, 0, 0)
    assert u.targets == (Target("127.0.0.1", 8080, 100),)


def test_empty_sections_take_defaults():
    config = load_config_data(with_upstream(healthchecks={"active": {}, "passive": {}},
                                            algorithm="consistent-hashing"))
    (u,) = config.upstreams
    assert u.healthchecks.active == ActiveHealthCheck()
    assert u.healthchecks.passive == PassiveHealthCheck()
    assert u.hash_on == "ip"


def test_balancer_from_upstream():
    config = load_config_data({"upstreams": [{
        "name": "u", "algorithm": "least-connections", "on_all_unhealthy": "open",
        "targets": [{"target": "127.0.0.1:1", "weight": 2},
                    {"target": "127.0.0.1:2", "priority": 1}],
        "healthchecks": {"passive": {"unhealthy": {"failures": 2}, "ejection_time": "5s"}},
        "circuit_breaker": {"max_requests": 1}}]})
    b = Balancer.from_upstream(config.upstreams[0], seed=1)
    assert b.name == "u" and b.algorithm_name == "least-connections" and b.fail_open
    assert [(t.host, t.port, t.weight, t.priority) for t in b.targets] == \
        [("127.0.0.1", 1, 2, 0), ("127.0.0.1", 2, 100, 1)]
    assert b.max_requests == 1
    t = b.targets[0]
    b.set_clock(0)
    for _ in range(2):
        b.begin_py(t)
        b.end_py(t, 0, "response", 503)
    assert t.state_name == "ejected"
    b.advance_clock(5)
    assert b.pick_py(b"", b.targets[1]) is t         # half-open: eligible again (the probe)
    assert t.state_name == "probing"


def test_version_changes_with_upstreams_only_when_present():
    base = {"services": [{"name": "s", "host": "u", "routes": [{"name": "r", "paths": ["/"]}]}]}
    plain = load_config_data(base).version
    one = load_config_data({**base, **with_upstream()}).version
    two = load_config_data({**base, **with_upstream(algorithm="p2c-ewma")}).version
    assert len({plain, one, two}) == 3
    assert load_config_data({**base, **with_upstream()}).version == one


# --- errors, each at its path ---------------------------------------------------------------

@pytest.mark.parametrize("upstream, path, message", [
    ({"algorithm": "random"}, "upstreams[0].algorithm",
     "algorithm must be one of round-robin, least-connections, consistent-hashing, p2c-ewma, "
     "found 'random'"),
    ({"hash_on": "ip"}, "upstreams[0].hash_on",
     "'hash_on' applies only to algorithm consistent-hashing (algorithm is round-robin)"),
    ({"algorithm": "consistent-hashing", "hash_on": "header"}, "upstreams[0]",
     "hash_on: header needs 'hash_on_header' (the header name to hash)"),
    ({"algorithm": "consistent-hashing", "hash_on": "path", "hash_on_header": "x"},
     "upstreams[0].hash_on_header", "'hash_on_header' does not apply to hash_on: path"),
    ({"algorithm": "consistent-hashing", "hash_on": "body"}, "upstreams[0].hash_on",
     "hash_on must be one of ip, header, cookie, path, query_arg, found 'body'"),
    ({"on_all_unhealthy": "maybe"}, "upstreams[0].on_all_unhealthy",
     "on_all_unhealthy must be one of fail, open, found 'maybe'"),
    ({"circuit_breaker": {"max_requests": -1}}, "upstreams[0].circuit_breaker.max_requests",
     "max_requests must be 0..2147483647, found -1"),
    ({"circuit_breaker": {"max_conns": 1}}, "upstreams[0].circuit_breaker.max_conns",
     "unknown field 'max_conns' (did you mean 'max_connections'?)"),
    ({"healthchecks": {"active": {"interval": "soon"}}},
     "upstreams[0].healthchecks.active.interval",
     "expected a duration like '250ms', '5s', '1m', '1.5s' or an integer number of "
     "milliseconds, found str 'soon'"),
    ({"healthchecks": {"active": {"path": "healthz"}}}, "upstreams[0].healthchecks.active.path",
     "path must start with '/', found 'healthz'"),
    ({"healthchecks": {"active": {"healthy": {"http_statuses": [200, 99]}}}},
     "upstreams[0].healthchecks.active.healthy.http_statuses[1]",
     "HTTP status must be 100..599, found 99"),
    ({"healthchecks": {"active": {"healthy": {"successes": 0}}}},
     "upstreams[0].healthchecks.active.healthy.successes", "successes must be 1..255, found 0"),
    ({"healthchecks": {"passive": {"unhealthy": {"failures": "five"}}}},
     "upstreams[0].healthchecks.passive.unhealthy.failures",
     "expected an integer, found str 'five'"),
    ({"healthchecks": {"passive": {"ejection_time": 0}}},
     "upstreams[0].healthchecks.passive.ejection_time", "duration must be greater than 0, found 0"),
    ({"healthchecks": {"pasive": {}}}, "upstreams[0].healthchecks.pasive",
     "unknown field 'pasive' (did you mean 'passive'?)"),
])
def test_upstream_errors(upstream, path, message):
    assert data_issues(with_upstream(**upstream)) == {path: [message]}


@pytest.mark.parametrize("target, path, message", [
    ({"target": "http://a:80"}, "upstreams[0].targets[1].target",
     "target is 'host:port' without a scheme or path, found 'http://a:80'"),
    ({"target": "a:99999"}, "upstreams[0].targets[1].target", "port must be 1..65535, found 99999"),
    ({"target": "::1:80"}, "upstreams[0].targets[1].target",
     "IPv6 addresses must be written in brackets, e.g. '[::1]:8000', found '::1:80'"),
    ({"target": "bad_host!:1"}, "upstreams[0].targets[1].target",
     "invalid host name 'bad_host!': expected dot-separated labels of letters, digits and '-' "
     "(1-63 characters each)"),
    ({"target": "127.0.0.1:8080"}, "upstreams[0].targets[1].target",
     "duplicate target '127.0.0.1:8080' (first at upstreams[0].targets[0].target)"),
    ({"target": "b:1", "weight": 70000}, "upstreams[0].targets[1].weight",
     "weight must be 0..65535, found 70000"),
    ({"target": "b:1", "priority": 256}, "upstreams[0].targets[1].priority",
     "priority must be 0..255, found 256"),
    ({"weight": 1}, "upstreams[0].targets[1]", "missing required field 'target'"),
    ({"target": "b:1", "wieght": 1}, "upstreams[0].targets[1].wieght",
     "unknown field 'wieght' (did you mean 'weight'?)"),
])
def test_target_errors(target, path, message):
    data = {"upstreams": [{"name": "u", "targets": [{"target": "127.0.0.1:8080"}, target]}]}
    assert data_issues(data) == {path: [message]}


def test_name_errors_and_duplicates():
    data = {"upstreams": [
        {"name": "a b", "targets": [{"target": "x:1"}]},
        {"targets": [{"target": "x:1"}]},
        {"name": "ok", "targets": [{"target": "x:1"}]},
        {"name": "OK", "targets": [{"target": "x:1"}]},
        {"name": "empty"},
        "nope",
    ]}
    assert data_issues(data) == {
        "upstreams[0].name": ["name may contain only letters, digits and . _ ~ -, found 'a b'"],
        "upstreams[1]": ["missing required field 'name'"],
        "upstreams[3].name": ["duplicate upstream name 'ok' (first defined at upstreams[2])"],
        "upstreams[4]": ["upstream 'empty' has no targets: add 'targets' (or top-level "
                         "targets naming it)"],
        "upstreams[5]": ["expected a mapping, found str 'nope'"],
    }


def test_upstream_name_must_be_a_host_name():
    data = {"upstreams": [{"name": "a~b", "targets": [{"target": "x:1"}]}]}
    assert data_issues(data) == {"upstreams[0].name": [
        "upstream name must be a valid host name (services name it in 'host'), found 'a~b'"]}


def test_top_level_target_errors():
    data = {**with_upstream(), "targets": [
        {"upstream": "nope", "target": "x:1"},
        {"target": "x:1"},
        {"upstream": "u", "target": "127.0.0.1:8080"},
        {"upstream": "nope", "target": "x:0"},
    ]}
    assert data_issues(data) == {
        "targets[0].upstream": ["unknown upstream 'nope' (known: u)"],
        "targets[1]": ["missing required field 'upstream'"],
        "targets[2].target": ["duplicate target '127.0.0.1:8080' (first at "
                              "upstreams[0].targets[0].target)"],
        "targets[3].upstream": ["unknown upstream 'nope' (known: u)"],
        "targets[3].target": ["port must be 1..65535, found 0"],
    }


def test_upstreams_must_be_a_list():
    assert data_issues({"upstreams": {"name": "u"}}) == {
        "upstreams": ["expected a list of upstreams, found a mapping"]}


def test_errors_elsewhere_still_reported_with_upstream_errors():
    data = {**with_upstream(algorithm="x"),
            "services": [{"name": "s", "host": "u", "retries": -1,
                          "routes": [{"name": "r", "paths": ["/"]}]}]}
    found = data_issues(data)
    assert set(found) == {"upstreams[0].algorithm", "services[0].retries"}
