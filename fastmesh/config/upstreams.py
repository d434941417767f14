"""The `upstreams` entity (and Kong-style top-level `targets`): parsing, validation, the model.

```yaml
upstreams:
  - name: orders                  # a valid host name: services name it in `host`
    algorithm: round-robin        # round-robin | least-connections | consistent-hashing | p2c-ewma
    hash_on: header               # consistent-hashing only: ip (default) | header | cookie | path | query_arg
    hash_on_header: x-user-id     # with hash_on: header (hash_on_cookie / hash_on_query_arg likewise)
    targets: [{target: "10.0.0.1:8080", weight: 100},      # port defaults to 80, weight to 100
              {target: "10.0.9.1:8080", priority: 1}]      # tier 1: only while no tier-0 is healthy
    # a host name target is resolved by DNS (A/AAAA, TTL honoured); "_http._tcp.orders.internal"
    # (no port) is an SRV name: hosts, ports and weights come from DNS (docs/discovery.md)
    targets_file: targets.yaml    # optional: more targets, re-read on change (fastmesh.discovery)
    healthchecks:
      active:  {path: /healthz, interval: 2s, timeout: 1s,
                healthy: {successes: 2, http_statuses: [200, 302]},
                unhealthy: {failures: 3, timeouts: 3, http_failures: 3}}
      passive: {unhealthy: {http_statuses: [502, 503, 504], failures: 5, timeouts: 3},
                ejection_time: 30s}
    on_all_unhealthy: fail        # fail: 503 with a JSON body | open: use every target anyway
    circuit_breaker: {max_connections: 1024, max_pending: 256, max_requests: 4096}   # 0 = unlimited
targets:                          # optional, Kong style: more targets for a named upstream
  - {upstream: orders, target: "10.0.0.2:8080", weight: 50}
```

Semantics the rest of the code relies on:
- active checks run only when `healthchecks.active` is present; passive ejection only when
  `healthchecks.passive` is present (like Kong, both are off by default);
- active `healthy.http_statuses` empty means "any 2xx or 3xx"; any other status is an HTTP failure;
  an `unhealthy` threshold of 0 disables that kind of failure;
- an upstream needs `targets` (or top-level targets naming it) or a `targets_file`;
- `priority` (0..255, default 0) makes tiers: the balancer picks among the healthy targets of
  the lowest priority that has one, and a retry goes to a later tier when it has a healthy one
  (failing open: all tiers);
- an SRV target is stored with port 0 (its ports come from DNS); see fastmesh.discovery;
- a relative `targets_file` is relative to the config file's directory (stored absolute);
- a service whose `host` equals an upstream's name is balanced over it (`Service.upstream`);
- targets keep their declaration order: nested ones first, then top-level ones in file order.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from fastmesh.config.schema import (
    Fields, Invalid, address_host, duration, entities_version, hostname, integer, name,
    port_number, split_host_port, string, token,
)

ALGORITHMS = ("round-robin", "least-connections", "consistent-hashing", "p2c-ewma")
HASH_ON = ("ip", "header", "cookie", "path", "query_arg")
HASH_ON_NAMED = {"header": "hash_on_header", "cookie": "hash_on_cookie",
                 "query_arg": "hash_on_query_arg"}
ON_ALL_UNHEALTHY = ("fail", "open")

UPSTREAM_FIELDS = ("name", "algorithm", "hash_on", "hash_on_header", "hash_on_cookie",
                   "hash_on_query_arg", "targets", "healthchecks", "on_all_unhealthy",
                   "circuit_breaker", "targets_file")
TARGET_FIELDS = ("target", "weight", "priority")
TOP_TARGET_FIELDS = ("upstream", "target", "weight", "priority")
MAX_PRIORITY = 255
HEALTHCHECK_FIELDS = ("active", "passive")
ACTIVE_FIELDS = ("path", "interval", "timeout", "healthy", "unhealthy")
ACTIVE_HEALTHY_FIELDS = ("successes", "http_statuses")
ACTIVE_UNHEALTHY_FIELDS = ("failures", "timeouts", "http_failures")
PASSIVE_FIELDS = ("unhealthy", "ejection_time")
PASSIVE_UNHEALTHY_FIELDS = ("http_statuses", "failures", "timeouts")
BREAKER_FIELDS = ("max_connections", "max_pending", "max_requests")


# --- model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    host: str                           # lower-case name, IPv4, or IPv6 without brackets
    port: int
    weight: int = 100                   # 0..65535; 0 = never picked
    priority: int = 0                   # 0..255, lower first: a tier with no healthy target
                                        # hands its traffic to the next (failover, nginx `backup`)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ActiveHealthCheck:
    """healthchecks.active, flattened: healthy.* and unhealthy.* become prefixed fields."""

    path: str = "/"                     # request target of the probe (may carry a query)
    interval: float = 5.0               # seconds between probes of one target
    timeout: float = 1.0                # a probe slower than this is a timeout
    successes: int = 2                  # healthy.successes: consecutive to mark healthy
    http_statuses: tuple[int, ...] = () # healthy.http_statuses; () = any 2xx/3xx
    failures: int = 3                   # unhealthy.failures: connect/reset/bad response; 0 = off
    timeouts: int = 3                   # unhealthy.timeouts; 0 = off
    http_failures: int = 3              # unhealthy.http_failures: other statuses; 0 = off


@dataclass(frozen=True)
class PassiveHealthCheck:
    """healthchecks.passive, flattened (unhealthy.* fields at the top)."""

    http_statuses: tuple[int, ...] = (502, 503, 504)   # responses that count as failures
    failures: int = 5                   # consecutive failures of any kind to eject; 0 = off
    timeouts: int = 3                   # consecutive timeouts to eject; 0 = off
    ejection_time: float = 30.0         # then half-open: one probe request


@dataclass(frozen=True)
class HealthChecks:
    active: ActiveHealthCheck | None = None
    passive: PassiveHealthCheck | None = None


@dataclass(frozen=True)
class CircuitBreaker:
    max_connections: int = 0            # open upstream connections; 0 = unlimited
    max_pending: int = 0                # requests waiting for a new connection
    max_requests: int = 0               # requests in flight


@dataclass(frozen=True)
class Upstream:
    name: str
    algorithm: str = "round-robin"
    hash_on: str | None = None          # consistent-hashing: ip | header | cookie | path | query_arg
    hash_on_name: str | None = None     # header (lower-case) / cookie / query argument name
    targets: tuple[Target, ...] = ()
    healthchecks: HealthChecks = field(default_factory=HealthChecks)
    on_all_unhealthy: str = "fail"      # fail | open
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    targets_file: str | None = None     # YAML/JSON list of {target, weight}, watched at run time


# --- entry point ------------------------------------------------------------------------------

def read_upstreams(top: Fields, services: list) -> tuple[list[Upstream], list]:
    """(upstreams, services) from the top level: `upstreams`, top-level `targets`, and each
    service whose host names an upstream linked to it (Service.upstream). Issues go to
    top.issues with their paths."""
    upstreams: list[Upstream] = []
    where: dict[str, int] = {}
    first_seen: dict[str, str] = {}
    target_paths: list[dict[tuple[str, int], str]] = []
    for path, raw in top.items("upstreams", "list of upstreams"):
        fields = Fields.of(top.issues, path, raw, UPSTREAM_FIELDS)
        if fields is None:
            continue
        upstream, seen = read_upstream(fields)
        if upstream.name is not None:
            if upstream.name in first_seen:
                top.issues.add(fields.at("name"), f"duplicate upstream name '{upstream.name}' "
                                                  f"(first defined at {first_seen[upstream.name]})")
            else:
                first_seen[upstream.name] = path
                where[upstream.name] = len(upstreams)
        upstreams.append(upstream)
        target_paths.append(seen)
    read_top_targets(top, upstreams, where, target_paths)
    for index, upstream in enumerate(upstreams):
        if upstream.name is not None and not upstream.targets and not upstream.targets_file:
            top.issues.add(first_seen.get(upstream.name, f"upstreams[{index}]"),
                           f"upstream '{upstream.name}' has no targets: add 'targets' (or "
                           "top-level targets naming it)")
    upstreams = [u for u in upstreams if u.name is not None]
    return upstreams, link_services(services, upstreams)


def link_services(services: list, upstreams: list[Upstream]) -> list:
    """Services whose host is an upstream's name get `upstream` set to it."""
    names = {u.name for u in upstreams}
    return [dataclasses.replace(s, upstream=s.host) if s.host in names else s for s in services]


def upstreams_version(base: str, upstreams: list[Upstream]) -> str:
    """The config version including upstreams; unchanged when there are none."""
    return entities_version(base, upstreams=upstreams)


# --- one upstream -----------------------------------------------------------------------------

def read_upstream(fields: Fields) -> tuple[Upstream, dict[tuple[str, int], str]]:
    algorithm = fields.value("algorithm", choice(ALGORITHMS, "algorithm"), "round-robin")
    hash_on, hash_on_name = read_hash_on(fields, algorithm)
    targets: list[Target] = []
    seen: dict[tuple[str, int], str] = {}
    for path, raw in fields.items("targets", "list of targets"):
        target_fields = Fields.of(fields.issues, path, raw, TARGET_FIELDS)
        if target_fields is not None:
            add_target(target_fields, targets, seen)
    upstream = Upstream(
        name=fields.value("name", upstream_name, required=True),
        algorithm=algorithm, hash_on=hash_on, hash_on_name=hash_on_name,
        targets=tuple(targets),
        healthchecks=read_healthchecks(fields.section("healthchecks", HEALTHCHECK_FIELDS)),
        on_all_unhealthy=fields.value("on_all_unhealthy", choice(ON_ALL_UNHEALTHY,
                                                                 "on_all_unhealthy"), "fail"),
        circuit_breaker=read_breaker(fields.section("circuit_breaker", BREAKER_FIELDS)),
        targets_file=fields.value("targets_file", targets_file_path(fields.issues.source)),
    )
    return upstream, seen


def targets_file_path(source: str):
    """A targets_file path, made absolute against the config file's directory."""
    def parse(value: object) -> str:
        text = string(value)
        if not text:
            raise Invalid("targets_file must not be empty")
        base = os.path.dirname(source) if source and not source.startswith("<") else ""
        return os.path.abspath(os.path.join(base, text))
    return parse


def upstream_name(value: object) -> str:
    """Entity name rules plus a valid host name: a service names the upstream in `host`."""
    text = name(value)
    try:
        return hostname(text)
    except Invalid:
        raise Invalid(f"upstream name must be a valid host name (services name it in 'host'), "
                      f"found {text!r}") from None


def choice(options: tuple[str, ...], what: str):
    def parse(value: object) -> str:
        text = string(value)
        if text not in options:
            raise Invalid(f"{what} must be one of {', '.join(options)}, found {text!r}")
        return text
    return parse


def read_hash_on(fields: Fields, algorithm: str) -> tuple[str | None, str | None]:
    hash_on = fields.value("hash_on", choice(HASH_ON, "hash_on"))
    named = [key for key in HASH_ON_NAMED.values() if fields.has(key)]
    if algorithm != "consistent-hashing":
        for key in (["hash_on"] if fields.has("hash_on") else []) + named:
            fields.issues.add(fields.at(key), f"'{key}' applies only to algorithm "
                                              f"consistent-hashing (algorithm is {algorithm})")
        return None, None
    hash_on = hash_on or "ip"
    wanted = HASH_ON_NAMED.get(hash_on)
    for key in named:
        if key != wanted:
            fields.issues.add(fields.at(key), f"'{key}' does not apply to hash_on: {hash_on}")
    if wanted is None:
        return hash_on, None
    if not fields.has(wanted):
        fields.issues.add(fields.path, f"hash_on: {hash_on} needs '{wanted}' (the "
                                       f"{hash_on.replace('_', ' ')} name to hash)")
        return hash_on, None
    if hash_on == "header":
        parsed = fields.value(wanted, lambda v: token(v, "header name").lower())
    else:
        parsed = fields.value(wanted, key_name)
    return hash_on, parsed


_KEY_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def key_name(value: object) -> str:
    text = string(value)
    if not _KEY_NAME.fullmatch(text):
        raise Invalid(f"expected a cookie or query argument name (letters, digits, "
                      f"!#$%&'*+.^_`|~-), found {text!r}")
    return text


# --- targets ----------------------------------------------------------------------------------

_SRV_NAME = re.compile(r"_[a-z0-9-]+\._[a-z0-9-]+\.[^.]")


def is_srv_name(host: str) -> bool:
    """'_service._proto.name': an SRV target (its ports and weights come from DNS)."""
    return bool(_SRV_NAME.match(host))


def target_address(value: object) -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'host' (port 80) -> (host, port); an SRV name -> (name, 0)."""
    text = string(value)
    if not text:
        raise Invalid("target must not be empty")
    if "://" in text or "/" in text:
        raise Invalid(f"target is 'host:port' without a scheme or path, found {text!r}")
    host_part, port_part = split_host_port(text)
    if not host_part:
        raise Invalid(f"missing host in target {text!r}")
    host_name = address_host(host_part)
    if is_srv_name(host_name):
        if port_part is not None:
            raise Invalid(f"SRV target {host_name!r} takes its ports from DNS: drop ':{port_part}'")
        return host_name, 0
    return host_name, port_number(port_part) if port_part is not None else 80


def add_target(fields: Fields, targets: list[Target], seen: dict[tuple[str, int], str]) -> None:
    address = fields.value("target", target_address, required=True)
    weight = fields.value("weight", integer(0, 65535, "weight"), 100)
    priority = fields.value("priority", integer(0, MAX_PRIORITY, "priority"), 0)
    if address is None:
        return
    if address in seen:
        shown = Target(*address).address
        fields.issues.add(fields.at("target"), f"duplicate target '{shown}' "
                                               f"(first at {seen[address]})")
        return
    seen[address] = fields.at("target")
    targets.append(Target(address[0], address[1], weight, priority))


def read_top_targets(top: Fields, upstreams: list[Upstream], where: dict[str, int],
                     target_paths: list[dict[tuple[str, int], str]]) -> None:
    """Kong-style top-level targets: each names its upstream."""
    for path, raw in top.items("targets", "list of targets"):
        fields = Fields.of(top.issues, path, raw, TOP_TARGET_FIELDS)
        if fields is None:
            continue
        owner = fields.value("upstream", string, required=True)
        if owner is not None and owner.lower() not in where:
            known = ", ".join(sorted(where)[:10])
            fields.issues.add(fields.at("upstream"), f"unknown upstream '{owner}' "
                              + (f"(known: {known})" if known else "(no upstreams are defined)"))
            owner = None
        if owner is None:
            fields.value("target", target_address)   # still report a bad address
            fields.value("weight", integer(0, 65535, "weight"))
            fields.value("priority", integer(0, MAX_PRIORITY, "priority"))
            continue
        index = where[owner.lower()]
        targets = list(upstreams[index].targets)
        add_target(fields, targets, target_paths[index])
        upstreams[index] = dataclasses.replace(upstreams[index], targets=tuple(targets))


# --- health checks and circuit breaker ---------------------------------------------------------

def status_code(value: object) -> int:
    return integer(100, 599, "HTTP status")(value)


def threshold(what: str):
    return integer(0, 255, what)


def read_healthchecks(fields: Fields) -> HealthChecks:
    active = passive = None
    if fields.has("active"):
        active = read_active(fields.section("active", ACTIVE_FIELDS))
    if fields.has("passive"):
        passive = read_passive(fields.section("passive", PASSIVE_FIELDS))
    return HealthChecks(active=active, passive=passive)


def probe_path(value: object) -> str:
    text = string(value)
    if not text.startswith("/"):
        raise Invalid(f"path must start with '/', found {text!r}")
    if re.search(r"[\s#\x00-\x1f\x7f]", text):
        raise Invalid(f"path must not contain whitespace, control characters or '#', "
                      f"found {text!r}")
    return text


def read_active(fields: Fields) -> ActiveHealthCheck:
    defaults = ActiveHealthCheck()
    healthy = fields.section("healthy", ACTIVE_HEALTHY_FIELDS)
    unhealthy = fields.section("unhealthy", ACTIVE_UNHEALTHY_FIELDS)
    check = ActiveHealthCheck(
        path=fields.value("path", probe_path, defaults.path),
        interval=fields.value("interval", duration, defaults.interval),
        timeout=fields.value("timeout", duration, defaults.timeout),
        successes=healthy.value("successes", integer(1, 255, "successes"), defaults.successes),
        http_statuses=healthy.values("http_statuses", status_code, "list of HTTP statuses"),
        failures=unhealthy.value("failures", threshold("failures"), defaults.failures),
        timeouts=unhealthy.value("timeouts", threshold("timeouts"), defaults.timeouts),
        http_failures=unhealthy.value("http_failures", threshold("http_failures"),
                                      defaults.http_failures),
    )
    return check


def read_passive(fields: Fields) -> PassiveHealthCheck:
    defaults = PassiveHealthCheck()
    unhealthy = fields.section("unhealthy", PASSIVE_UNHEALTHY_FIELDS)
    statuses = defaults.http_statuses
    if unhealthy.raw("http_statuses") is not None:
        statuses = unhealthy.values("http_statuses", status_code, "list of HTTP statuses")
    return PassiveHealthCheck(
        http_statuses=tuple(sorted(statuses)),
        failures=unhealthy.value("failures", threshold("failures"), defaults.failures),
        timeouts=unhealthy.value("timeouts", threshold("timeouts"), defaults.timeouts),
        ejection_time=fields.value("ejection_time", duration, defaults.ejection_time),
    )


def read_breaker(fields: Fields) -> CircuitBreaker:
    limit = {key: integer(0, 2**31 - 1, key) for key in BREAKER_FIELDS}
    return CircuitBreaker(**{key: fields.value(key, parse, 0) for key, parse in limit.items()})


def describe_upstream(upstream: Upstream) -> dict[str, Any]:
    """A plain dict of an upstream (admin views, logs)."""
    return dataclasses.asdict(upstream)


__all__ = [
    "ActiveHealthCheck", "CircuitBreaker", "HealthChecks", "PassiveHealthCheck", "Target",
    "Upstream", "describe_upstream", "is_srv_name", "link_services", "read_upstreams",
    "upstreams_version",
]
