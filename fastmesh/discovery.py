"""Service discovery: upstream targets from DNS (A/AAAA, SRV) and from a watched targets file.

Each worker runs one `Discovery` on its own loop (see `Worker` in fastmesh.server). It never
touches a request: it keeps, per name, the last good answer, and when the set of addresses of an
upstream changes the worker compiles a new Plan from `Discovery.resolve(config)` (the declared
config with each dynamic upstream's targets replaced by addresses) against the active Plan, so the
balancers inherit health and EWMA state for every address that did not change.

Sources (only for upstreams that a service uses):
- a target written as a host name (`orders.internal:8080`): A and AAAA, re-queried when the
  shortest TTL expires (clamped to [MIN_TTL, MAX_TTL]); every address becomes a target with the
  configured port and weight;
- a target written as an SRV name (`_http._tcp.orders.internal`, no port): the SRV records of the
  lowest priority give host names, ports and weights (weight 0 counts as 1); their addresses come
  from the answer's additional section or from A/AAAA queries;
- `targets_file:` a YAML/JSON list of `{target, weight}` (targets as in the config, names allowed),
  checked every FILE_POLL_INTERVAL seconds and re-read when its mtime, size or inode changes.
IP literals are used as written.

Failures never empty a set: a lookup that fails (timeout, SERVFAIL, NXDOMAIN, no records) or a
targets file that cannot be read or is invalid keeps the last good set and logs why; a name that
was never resolved contributes no target (an upstream with none answers 503).

The nameserver: FASTMESH_DNS_SERVER=HOST[:PORT][,HOST[:PORT]...] (port 53 by default; IPv6 as
[::1]:53) makes every query go there and only there. Without it, the system's resolv.conf
nameservers are used, and for A/AAAA a failed DNS lookup falls back to the OS resolver
(getaddrinfo: /etc/hosts and friends) with a TTL of FALLBACK_TTL.
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import socket
from typing import Callable

from fastmesh.config import Config
from fastmesh.config.datafile import read_data_file
from fastmesh.config.schema import Fields, Issues, item
from fastmesh.config.upstreams import TARGET_FIELDS, Target, Upstream, add_target, is_srv_name
from fastmesh.osutil import file_stamp

log = logging.getLogger("fastmesh.discovery")

MIN_TTL = 1.0               # re-resolve no more often than this, whatever the TTL says
MAX_TTL = 300.0             # and at least this often
FALLBACK_TTL = 30.0         # answers from getaddrinfo carry no TTL
RETRY_MIN = 1.0             # after a failed lookup: 1 s, 2 s, 4 s ... up to RETRY_MAX
RETRY_MAX = 30.0
QUERY_TIMEOUT = 1.0         # one query to one nameserver
QUERY_LIFETIME = 2.0        # one lookup, retries included
FILE_POLL_INTERVAL = 1.0
INITIAL_WAIT = 3.0          # Worker.start waits this long at most for the first answers
DNS_SERVER_ENV = "FASTMESH_DNS_SERVER"

Result = tuple[tuple[str, int, int | None], ...]     # (address, port or 0, SRV weight or None)


class LookupFailed(Exception):
    pass


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_dynamic(upstream: Upstream) -> bool:
    return bool(upstream.targets_file) or any(not is_ip(t.host) for t in upstream.targets)


def used_upstreams(config: Config) -> list[Upstream]:
    used = {s.upstream for s in config.services if s.upstream} | \
        {d.upstream for s in config.streams for d in s.destinations() if d.upstream}
    return [u for u in config.upstreams if u.name in used]


def parse_servers(text: str) -> list[tuple[str, int]]:
    """'127.0.0.1:5353,[::1]:53,10.0.0.2' -> [(host, port), ...]."""
    servers = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else "53"
        elif part.count(":") == 1:
            host, _, port = part.partition(":")
        else:
            host, port = part, "53"
        if not is_ip(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{DNS_SERVER_ENV}: expected IP[:PORT] entries, found {part!r}")
        servers.append((host, int(port)))
    if not servers:
        raise ValueError(f"{DNS_SERVER_ENV} is empty")
    return servers


def make_resolver(servers: str | None = None):
    """(dnspython async resolver or None, explicit?) from FASTMESH_DNS_SERVER or resolv.conf."""
    import dns.asyncresolver
    import dns.nameserver
    import dns.resolver
    text = servers if servers is not None else os.environ.get(DNS_SERVER_ENV)
    if text:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in parse_servers(text)]
        explicit = True
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            return None, False
        explicit = False
    resolver.timeout = QUERY_TIMEOUT
    resolver.lifetime = QUERY_LIFETIME
    resolver.cache = None
    return resolver, explicit


def _sorted_addresses(addresses) -> list[str]:
    parsed = {ipaddress.ip_address(a) for a in addresses}
    return [a.compressed for a in sorted(parsed, key=lambda a: (a.version, int(a)))]


async def lookup_addresses(resolver, name: str, explicit: bool = True,
                           loop: asyncio.AbstractEventLoop | None = None) -> tuple[list[str], float]:
    """A and AAAA addresses of `name` and the smallest TTL; LookupFailed if there are none."""
    import dns.exception
    import dns.resolver
    addresses: list[str] = []
    ttls: list[float] = []
    problem = None
    if resolver is not None:
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(name, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                problem = problem or "no such name (NXDOMAIN)"
                continue
            except dns.exception.DNSException as exc:
                problem = f"{rdtype} query failed: {exc}"
                addresses = []        # half an answer would drop the other family's addresses
                break
            if answer.rrset is not None:
                addresses.extend(rd.address for rd in answer.rrset)
                ttls.append(answer.rrset.ttl)
        if addresses:
            return _sorted_addresses(addresses), min(ttls)
    if not explicit:              # the OS resolver: /etc/hosts, nsswitch
        loop = loop or asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), QUERY_LIFETIME)
        except (OSError, asyncio.TimeoutError) as exc:
            problem = problem or f"getaddrinfo: {exc or 'timed out'}"
        else:
            found = [info[4][0].split("%")[0] for info in infos]
            if found:
                return _sorted_addresses(found), FALLBACK_TTL
    raise LookupFailed(problem or "no A/AAAA records")


async def lookup_srv(resolver, name: str) -> tuple[list[tuple[str, int, int]], float]:
    """(address, port, weight) for the lowest-priority SRV records of `name`, and the TTL."""
    import dns.exception
    import dns.name
    import dns.rdatatype
    if resolver is None:
        raise LookupFailed("no DNS nameserver configured (set FASTMESH_DNS_SERVER)")
    try:
        answer = await resolver.resolve(name, "SRV")
    except dns.exception.DNSException as exc:
        raise LookupFailed(f"SRV query failed: {exc}") from None
    records = [r for r in answer.rrset if r.target != dns.name.root]
    if not records:
        raise LookupFailed("the SRV records say the service is not available here ('.')")
    best = min(r.priority for r in records)
    ttl = float(answer.rrset.ttl)
    additional = [rrset for rrset in answer.response.additional
                  if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)]
    found: list[tuple[str, int, int]] = []
    problems = []
    for record in sorted((r for r in records if r.priority == best),
                         key=lambda r: (r.target.to_text(), r.port)):
        host = record.target.to_text(omit_final_dot=True).lower()
        glue = [rrset for rrset in additional if rrset.name == record.target]
        if glue:
            addresses = _sorted_addresses(rd.address for rrset in glue for rd in rrset)
            ttl = min([ttl] + [rrset.ttl for rrset in glue])
        else:
            try:
                addresses, host_ttl = await lookup_addresses(resolver, host)
            except LookupFailed as exc:
                problems.append(f"{host}: {exc}")
                continue
            ttl = min(ttl, host_ttl)
        found.extend((a, record.port, max(1, record.weight)) for a in addresses)
    if not found:
        raise LookupFailed("; ".join(problems) or "no addresses")
    for problem in problems:
        log.warning("discovery: SRV %s: skipping a target: %s", name, problem)
    return found, ttl


def read_targets_file(path: str) -> tuple[Target, ...]:
    """The targets in `path` (a YAML/JSON list of {target, weight}); ValueError naming the file,
    the path inside it and what is wrong."""
    data = read_data_file(path)
    issues = Issues(path)
    targets: list[Target] = []
    if not isinstance(data, list):
        issues.add("", f"expected a list of {{target, weight}}, found {type(data).__name__}")
    else:
        seen: dict = {}
        for index, raw in enumerate(data):
            fields = Fields.of(issues, item("", index), raw, TARGET_FIELDS)
            if fields is not None:
                add_target(fields, targets, seen)
    if issues:
        raise ValueError("\n".join(str(i) for i in issues.items))
    return tuple(targets)


class _NameWatch:
    """Keeps one name resolved: kind 'A' (A + AAAA) or 'SRV'."""

    def __init__(self, discovery: "Discovery", kind: str, name: str):
        self.discovery = discovery
        self.kind = kind
        self.name = name
        self.result: Result | None = None       # last good answer; None: never resolved
        self.error: str | None = None
        self.first = asyncio.Event()
        self.task = discovery.loop.create_task(self._run(), name=f"discovery {kind} {name}")

    async def _run(self) -> None:
        delay_on_failure = RETRY_MIN
        while True:
            try:
                result, ttl = await self.discovery.lookup(self.kind, self.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:          # LookupFailed, or anything unexpected
                what = str(exc) if isinstance(exc, LookupFailed) else f"{type(exc).__name__}: {exc}"
                kept = f"keeping the last {len(self.result)} address(es)" if self.result else \
                    "no address yet"
                log.warning("discovery: %s %s: %s (%s; retry in %.0fs)", self.kind, self.name,
                            what, kept, delay_on_failure)
                self.error = what
                delay = delay_on_failure
                delay_on_failure = min(delay_on_failure * 2, RETRY_MAX)
            else:
                if self.error is not None:
                    log.warning("discovery: %s %s resolves again", self.kind, self.name)
                self.error = None
                delay_on_failure = RETRY_MIN
                result = tuple(result)
                if result != self.result:
                    self.result = result
                    self.discovery.changed()
                delay = min(max(float(ttl), MIN_TTL), MAX_TTL)
            self.first.set()
            await asyncio.sleep(delay)


class _FileWatch:
    """Keeps one targets file read: polls its stat, re-reads on change, keeps the last good list."""

    def __init__(self, discovery: "Discovery", path: str):
        self.discovery = discovery
        self.path = path
        self.targets: tuple[Target, ...] | None = None
        self.stamp = None
        self.error: str | None = None
        self.check()                            # read at once: prepare/start see the targets
        self.task = discovery.loop.create_task(self._run(), name=f"discovery file {path}")

    def check(self) -> bool:
        """Re-read when changed; True when the targets changed."""
        stamp = file_stamp(self.path)
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            targets = read_targets_file(self.path)
        except ValueError as exc:
            kept = f"keeping the previous {len(self.targets)} target(s)" if self.targets is not None \
                else "no targets from it yet"
            log.warning("discovery: targets_file %s\n%s", kept, exc)
            self.error = str(exc)
            return False
        self.error = None
        if targets == self.targets:
            return False
        self.targets = targets
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FILE_POLL_INTERVAL)
            try:
                changed = self.check()
            except Exception:                   # never let the watcher die
                log.exception("discovery: targets_file %s", self.path)
                continue
            if changed:
                self.discovery.sync()           # the file may name new hosts
                self.discovery.changed()


class Discovery:
    """The dynamic targets of one worker. `on_change()` is called (soon, coalesced) whenever an
    answer or a targets file changed; the worker then swaps in a Plan from `resolve(config)`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None],
                 servers: str | None = None):
        self.loop = loop
        self.on_change = on_change
        self.servers = servers                  # None: FASTMESH_DNS_SERVER or resolv.conf
        self.declared: Config | None = None     # the config as written (targets unresolved)
        self.prepared: dict[str, Config] = {}   # version -> declared config being prepared
        self.names: dict[tuple[str, str], _NameWatch] = {}
        self.files: dict[str, _FileWatch] = {}
        self._resolver = None
        self._explicit = False
        self._resolver_ready = False
        self._scheduled = False
        self.stopped = False

    # -- the worker's side ---------------------------------------------------------------------
    async def start(self, config: Config, wait: float = INITIAL_WAIT) -> Config:
        """Watch `config`'s sources; wait (bounded) for the first answers; the resolved config."""
        self.declared = config
        self.sync()
        pending = [w.first.wait() for w in self.names.values() if not w.first.is_set()]
        if pending:
            await asyncio.wait([asyncio.ensure_future(p) for p in pending], timeout=wait)
        return self.resolve(config)

    def prepare(self, config: Config) -> Config:
        """`config` is about to be compiled: start watching its sources; the resolved config."""
        self.prepared = {config.version: config}
        self.sync()
        return self.resolve(config)

    def commit(self, version: str) -> None:
        config = self.prepared.pop(version, None)
        self.prepared = {}
        if config is not None:
            self.declared = config
        self.sync()
        self.changed()          # answers may have moved between prepare and commit

    def abort(self, version: str) -> None:
        self.prepared.pop(version, None)
        self.sync()

    async def stop(self) -> None:
        self.stopped = True
        tasks = [w.task for w in self.names.values()] + [w.task for w in self.files.values()]
        self.names, self.files = {}, {}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def resolve(self, config: Config | None = None) -> Config:
        """`config` (default: the declared one) with every dynamic upstream's targets replaced by
        the addresses known now. The version is kept: this is the same config, resolved."""
        config = config if config is not None else self.declared
        upstreams = list(config.upstreams)
        changed = False
        used = {u.name for u in used_upstreams(config)}
        for index, upstream in enumerate(upstreams):
            if upstream.name in used and is_dynamic(upstream):
                upstreams[index] = dataclasses.replace(upstream, targets=self._expand(upstream))
                changed = True
        return dataclasses.replace(config, upstreams=tuple(upstreams)) if changed else config

    def state(self) -> dict:
        """What discovery knows now (logs, admin views)."""
        return {
            "names": [{"kind": w.kind, "name": w.name, "error": w.error,
                       "addresses": [f"{a}:{p}" if p else a for a, p, _ in (w.result or ())]}
                      for w in self.names.values()],
            "files": [{"path": w.path, "error": w.error,
                       "targets": None if w.targets is None else len(w.targets)}
                      for w in self.files.values()],
        }

    # -- internals -----------------------------------------------------------------------------
    def changed(self) -> None:
        if self._scheduled or self.stopped:
            return
        self._scheduled = True
        self.loop.call_soon(self._fire)

    def _fire(self) -> None:
        self._scheduled = False
        if self.stopped:
            return
        try:
            self.on_change()
        except Exception:
            log.exception("discovery: applying new targets failed")

    def _specs(self, upstream: Upstream) -> tuple[Target, ...]:
        specs = tuple(upstream.targets)
        if upstream.targets_file:
            watch = self.files.get(upstream.targets_file)
            if watch is not None and watch.targets:
                specs += watch.targets
        return specs

    def _expand(self, upstream: Upstream) -> tuple[Target, ...]:
        targets: list[Target] = []
        seen: set[tuple[str, int]] = set()

        def add(host: str, port: int, weight: int, priority: int) -> None:
            if (host, port) not in seen:          # first one wins (a balancer refuses duplicates)
                seen.add((host, port))
                targets.append(Target(host, port, weight, priority))

        for spec in self._specs(upstream):
            if is_ip(spec.host):
                add(spec.host, spec.port, spec.weight, spec.priority)
                continue
            kind = "SRV" if spec.port == 0 and is_srv_name(spec.host) else "A"
            watch = self.names.get((kind, spec.host))
            for address, port, weight in (watch.result if watch is not None and watch.result else ()):
                if kind == "SRV":       # (only its best SRV priority; the tier is the config's)
                    add(address, port, weight, spec.priority)
                else:
                    add(address, spec.port, spec.weight, spec.priority)
        return tuple(targets)

    def sync(self) -> None:
        """Start watches for the sources of the declared and prepared configs; stop the rest."""
        if self.stopped:
            return
        configs = [c for c in [self.declared, *self.prepared.values()] if c is not None]
        wanted_files = {u.targets_file for c in configs for u in used_upstreams(c) if u.targets_file}
        for path in wanted_files - set(self.files):
            self.files[path] = _FileWatch(self, path)
        for path in set(self.files) - wanted_files:
            self.files.pop(path).task.cancel()
        wanted_names = set()
        for c in configs:
            for upstream in used_upstreams(c):
                for spec in self._specs(upstream):
                    if not is_ip(spec.host):
                        kind = "SRV" if spec.port == 0 and is_srv_name(spec.host) else "A"
                        wanted_names.add((kind, spec.host))
        for key in wanted_names - set(self.names):
            self.names[key] = _NameWatch(self, *key)
        for key in set(self.names) - wanted_names:
            self.names.pop(key).task.cancel()

    async def lookup(self, kind: str, name: str) -> tuple[Result, float]:
        if not self._resolver_ready:
            self._resolver, self._explicit = make_resolver(self.servers)
            self._resolver_ready = True
        if kind == "SRV":
            found, ttl = await lookup_srv(self._resolver, name)
            return tuple(found), ttl
        addresses, ttl = await lookup_addresses(self._resolver, name, self._explicit, self.loop)
        return tuple((a, 0, None) for a in addresses), ttl


__all__ = ["Discovery", "LookupFailed", "is_dynamic", "lookup_addresses", "lookup_srv",
           "make_resolver", "parse_servers", "read_targets_file"]
