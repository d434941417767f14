"""Compile a validated Config into a Plan: the routing table and one RouteTarget per route.

A Plan is immutable once built. Upstream connection pools are keyed by target
address and handed from one Plan to the next, so a config swap keeps warm
connections.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastmesh._core.balancer import Balancer
from fastmesh._core.plugin import Chain
from fastmesh._core.pool import Pool
from fastmesh._core.proxy import RouteTarget
from fastmesh._core.router import Router
from fastmesh.config import Config, Route
from fastmesh.config.tls import first_tls_port
from fastmesh.upstream_tls import UpstreamTLS, pool_options, settings_for
from fastmesh.upstream_tls import refresh as refresh_tls


@dataclass(frozen=True)
class RouteSpec:
    """What the router needs of a route (see fastmesh/_core/router.pyx)."""

    name: str
    index: int
    hosts: tuple
    paths: tuple
    methods: tuple
    headers: tuple
    priority: int
    target: object


class PoolRegistry:
    """Upstream pools by (host, port, TLS settings or None), shared by successive Plans."""

    def __init__(self):
        self._pools: dict[tuple[str, int, UpstreamTLS | None], Pool] = {}

    def get(self, host: str, port: int, max_idle: int, idle_timeout: float,
            tls: UpstreamTLS | None = None) -> Pool:
        key = (host, port, tls)
        pool = self._pools.get(key)
        if pool is None or pool.max_idle != max_idle or pool.idle_timeout != idle_timeout:
            if pool is not None:
                pool.close_idle()
            pool = self._pools[key] = Pool(host, port, max_idle, idle_timeout,
                                           **pool_options(tls))
        return pool

    def sweep(self, now: float) -> None:
        for pool in self._pools.values():
            pool.sweep(now)

    def stats(self) -> list[dict]:
        return [p.stats() for p in self._pools.values()]

    def close_idle(self) -> None:
        for pool in self._pools.values():
            pool.close_idle()


class Plan:
    """The compiled, immutable form of a Config."""

    def __init__(self, config: Config, router: Router, targets: list[RouteTarget],
                 balancers: dict[str, Balancer] | None = None, rewrite: Chain | None = None):
        self.config = config
        self.rewrite = rewrite                    # global plugins' rewrite phases, or None
        self.router = router
        self.targets = targets
        self.balancers = balancers or {}          # upstream name -> Balancer (this Plan's)
        self.version = config.version

    def health_entries(self) -> list[tuple]:
        """(Upstream, Balancer) pairs for fastmesh.health.HealthChecker."""
        return [(u, self.balancers[u.name]) for u in self.config.upstreams if u.name in self.balancers]


def compile_plan(config: Config, pools: PoolRegistry, previous: Plan | None = None) -> Plan:
    """Compile `config`; with `previous`, balancers inherit its targets' health and EWMA."""
    refresh_tls()       # TLS contexts pools share: certificate files changed since, reloaded
    services = {s.name: s for s in config.services}
    gateway = config.gateway
    balancers = _balancers(config, pools, previous)
    upstreams = {u.name: u for u in config.upstreams}
    targets: list[RouteTarget] = []
    specs: list[RouteSpec] = []
    instances = plugin_instances(config)
    chains = plugin_chains(config, instances)
    by_consumer = consumer_chains(config, instances)
    for route in config.routes:
        service = services[route.service]
        server_timing = gateway.server_timing if service.server_timing is None else service.server_timing
        balancer = balancers.get(service.upstream) if service.upstream else None
        upstream = upstreams.get(service.upstream) if service.upstream else None
        target = RouteTarget(
            route.name, service.name,
            _pool(pools, gateway, service.host, service.port, settings_for(service)),
            service.host, service.port, service.path,
            route.strip_path, route.preserve_host, server_timing,
            service.connect_timeout, service.read_timeout, service.write_timeout,
            gateway.limits.max_body_size if route.max_body_size is None else route.max_body_size,
            balancer=balancer,
            hash_on=upstream.hash_on if upstream is not None and upstream.algorithm == "consistent-hashing" else None,
            hash_name=upstream.hash_on_name if upstream is not None else None,
            retries=service.retries,
            retry_on=service.retry_on,
            per_try_timeout=service.per_try_timeout,
            plugins=chains.get(route.name),
            consumer_plugins=by_consumer.get(route.name),
            # protocols: [https]: plain HTTP gets 426 or a redirect to the first TLS listener
            https_only=0 if "http" in route.protocols else route.https_redirect_status_code,
            https_port=first_tls_port(config.listeners),
        )
        targets.append(target)
        specs.append(_spec(route, target))
    return Plan(config, Router(specs), targets, balancers, rewrite_chain(config, instances))


# Kong's precedence of scopes, most specific first (its documented order without consumer groups):
# consumer+route+service, consumer+route, consumer+service, route+service, consumer, route,
# service, global. Keys: (has consumer, has route, has service).
_SCOPE_RANK = {(True, True, True): 7, (True, True, False): 6, (True, False, True): 5,
               (False, True, True): 4, (True, False, False): 3, (False, True, False): 2,
               (False, False, True): 1, (False, False, False): 0}


def plugin_instances(config: Config) -> dict:
    """One plugin instance per entry (id(entry) -> instance), set up with the whole Config.

    Shared by every chain the entry appears in (route chains and consumer chains alike), so a
    plugin with state (counters, caches) has one copy per configured entry.
    """
    from fastmesh.plugins import find_plugin
    instances = {}
    for entry in getattr(config, "plugins", ()):
        cls = find_plugin(entry.name, entry.module)
        plugin = cls(dict(entry.config))
        try:
            plugin.scope = entry.scope      # where it is configured (e.g. keys of its counters)
        except AttributeError:              # a class with __slots__ does not take it: fine
            pass
        setup = getattr(plugin, "setup", None)
        if setup is not None:
            setup(config)
        instances[id(entry)] = plugin
    return instances


def _rank(entry, route: Route, consumer: str | None) -> int:
    """How specific `entry` is for (route, consumer); -1 when it does not apply."""
    if entry.consumer is not None and entry.consumer != consumer:
        return -1
    if entry.route is not None and entry.route != route.name:
        return -1
    if entry.service is not None and entry.service != route.service:
        return -1
    return _SCOPE_RANK[(entry.consumer is not None, entry.route is not None,
                        entry.service is not None)]


class _Scopes:
    """The plugin entries by the (route, service) they are scoped to, in config order: a
    route's chain looks only at the four groups that may apply to it. Looking at every entry
    for every route made a Plan's compilation quadratic: a sidecar's inbound config with 1,000
    caller routes, each with its authorization entry, spent ~0.3 s there."""

    def __init__(self, entries):
        self.groups: dict[tuple, list] = {}
        for entry in entries:
            self.groups.setdefault((entry.route, entry.service), []).append(entry)

    def of(self, route: Route) -> list:
        """The entries that may apply to `route`, each group in config order."""
        found = []
        for key in ((None, None), (None, route.service), (route.name, None),
                    (route.name, route.service)):
            found += self.groups.get(key, ())
        return found


def _chain(entries, instances: dict, route: Route, consumer: str | None) -> tuple:
    """`entries`: those that may apply (_Scopes.of); per plugin name the highest rank wins,
    the first in config order among equals (entries of one rank are in one group)."""
    chosen: dict[str, tuple[int, object]] = {}
    for entry in entries:
        rank = _rank(entry, route, consumer)
        if rank >= 0 and (entry.name not in chosen or chosen[entry.name][0] < rank):
            chosen[entry.name] = (rank, entry)
    chain = [instances[id(e)] for _, e in chosen.values() if e.enabled]
    chain.sort(key=lambda p: (-getattr(p, "priority", 0), getattr(p, "name", "")))
    return tuple(chain)


def rewrite_chain(config: Config, instances: dict) -> Chain | None:
    """Global plugins with a `rewrite` phase, which runs before routing (as in Kong, only
    global plugins can rewrite: a route's plugins are known only once it is chosen)."""
    chosen = [instances[id(e)] for e in getattr(config, "plugins", ())
              if e.enabled and e.service is None and e.route is None and e.consumer is None
              and callable(getattr(instances[id(e)], "rewrite", None))]
    if not chosen:
        return None
    chosen.sort(key=lambda p: (-getattr(p, "priority", 0), getattr(p, "name", "")))
    return Chain(chosen)


def plugin_chains(config: Config, instances: dict | None = None) -> dict[str, tuple]:
    """Route name -> its plugin chain (only routes that have one), before any consumer is known.

    Per plugin name the most specific entry wins (route+service, route, service, global: one
    instance of a plugin per request); a disabled entry switches the plugin off for its scope.
    The chain is sorted by priority, highest first. Consumer-scoped entries are left out here:
    see consumer_chains.
    """
    entries = getattr(config, "plugins", ())
    if not entries:
        return {}
    if instances is None:
        instances = plugin_instances(config)
    chains: dict[str, tuple] = {}
    scopes = _Scopes(entries)
    for route in config.routes:
        chain = _chain(scopes.of(route), instances, route, None)
        if chain:
            chains[route.name] = chain
    return chains


def consumer_chains(config: Config, instances: dict | None = None) -> dict[str, dict[str, tuple]]:
    """{route name: {username: the FULL chain for that consumer on that route}}.

    Only routes that have a chain of their own and where some consumer-scoped entry applies, and
    only the consumers such entries name. The data path starts a request with the route's chain; once an access phase sets
    `request.consumer` to one of these usernames, the rest of the request (the remaining access
    phases, then response and log) runs this chain instead. An empty tuple means the consumer's
    entries switch every plugin off.
    """
    entries = getattr(config, "plugins", ())
    scoped = [e for e in entries if e.consumer is not None]
    if not scoped:
        return {}
    if instances is None:
        instances = plugin_instances(config)
    result: dict[str, dict[str, tuple]] = {}
    scopes = _Scopes(entries)
    for route in config.routes:
        applying = scopes.of(route)
        users = {e.consumer for e in applying
                 if e.consumer is not None and _rank(e, route, e.consumer) >= 0}
        # a route without a chain of its own has nothing that could identify a consumer: it stays
        # plugin-free (chain None) rather than paying for a consumer chain that never runs
        if users and _chain(applying, instances, route, None):
            result[route.name] = {u: _chain(applying, instances, route, u) for u in sorted(users)}
    return result


def _pool(pools: PoolRegistry, gateway, host: str, port: int,
          tls: UpstreamTLS | None = None) -> Pool:
    keepalive = gateway.upstream_keepalive
    return pools.get(host, port, keepalive.max_idle, keepalive.idle_timeout, tls)


def _balancers(config: Config, pools: PoolRegistry, previous: Plan | None) -> dict[str, Balancer]:
    """One Balancer per upstream that a service uses, each target with its pool."""
    # services sharing an upstream have equal TLS settings (checked at load)
    used = {s.upstream: settings_for(s) for s in config.services if s.upstream}
    balancers: dict[str, Balancer] = {}
    for upstream in config.upstreams:
        if upstream.name not in used:
            continue
        balancer = Balancer.from_upstream(upstream)
        for target in balancer.targets:
            target.pool = _pool(pools, config.gateway, target.host, target.port,
                                used[upstream.name])
        old = previous.balancers.get(upstream.name) if previous is not None else None
        if old is not None:
            balancer.inherit(old)
        balancers[upstream.name] = balancer
    return balancers


def _spec(route: Route, target: RouteTarget) -> RouteSpec:
    return RouteSpec(route.name, route.index, route.hosts, route.paths, route.methods,
                     route.headers, route.priority, target)
