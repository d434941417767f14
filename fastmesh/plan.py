"""Compile a validated Config into a Plan: the routing table and one RouteTarget per route.

A Plan is immutable once built. Upstream connection pools are keyed by target
address and handed from one Plan to the next, so a config swap keeps warm
connections.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastmesh._core.balancer import Balancer
from fastmesh._core.pool import Pool
from fastmesh._core.proxy import RouteTarget
from fastmesh._core.router import Router
from fastmesh.config import Config, Route


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
    """Upstream pools by (host, port), shared by successive Plans."""

    def __init__(self):
        self._pools: dict[tuple[str, int], Pool] = {}

    def get(self, host: str, port: int, max_idle: int, idle_timeout: float) -> Pool:
        key = (host, port)
        pool = self._pools.get(key)
        if pool is None or pool.max_idle != max_idle or pool.idle_timeout != idle_timeout:
            if pool is not None:
                pool.close_idle()
            pool = self._pools[key] = Pool(host, port, max_idle, idle_timeout)
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
                 balancers: dict[str, Balancer] | None = None):
        self.config = config
        self.router = router
        self.targets = targets
        self.balancers = balancers or {}          # upstream name -> Balancer (this Plan's)
        self.version = config.version

    def health_entries(self) -> list[tuple]:
        """(Upstream, Balancer) pairs for fastmesh.health.HealthChecker."""
        return [(u, self.balancers[u.name]) for u in self.config.upstreams if u.name in self.balancers]


def compile_plan(config: Config, pools: PoolRegistry, previous: Plan | None = None) -> Plan:
    """Compile `config`; with `previous`, balancers inherit its targets' health and EWMA."""
    services = {s.name: s for s in config.services}
    gateway = config.gateway
    balancers = _balancers(config, pools, previous)
    upstreams = {u.name: u for u in config.upstreams}
    targets: list[RouteTarget] = []
    specs: list[RouteSpec] = []
    chains = plugin_chains(config)
    for route in config.routes:
        service = services[route.service]
        server_timing = gateway.server_timing if service.server_timing is None else service.server_timing
        balancer = balancers.get(service.upstream) if service.upstream else None
        upstream = upstreams.get(service.upstream) if service.upstream else None
        target = RouteTarget(
            route.name, service.name,
            _pool(pools, gateway, service.host, service.port),
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
        )
        targets.append(target)
        specs.append(_spec(route, target))
    return Plan(config, Router(specs), targets, balancers)


def plugin_chains(config: Config) -> dict[str, tuple]:
    """Route name -> its plugin chain (only routes that have one).

    Per plugin name the most specific entry wins (route, then service, then global: one instance
    of a plugin per request); a disabled entry switches the plugin off for its scope. The chain is
    sorted by priority, highest first. One instance per entry, shared by the routes it applies to.
    """
    entries = getattr(config, "plugins", ())
    if not entries:
        return {}
    from fastmesh.plugins import find_plugin
    instances = {}
    for entry in entries:
        cls = find_plugin(entry.name, entry.module)
        plugin = cls(dict(entry.config))
        setup = getattr(plugin, "setup", None)
        if setup is not None:
            setup(config)
        instances[id(entry)] = plugin
    chains: dict[str, tuple] = {}
    for route in config.routes:
        chosen: dict[str, tuple[int, object]] = {}
        for entry in entries:
            if entry.route is not None:
                rank = 2 if entry.route == route.name else -1
            elif entry.service is not None:
                rank = 1 if entry.service == route.service else -1
            else:
                rank = 0
            if rank >= 0 and (entry.name not in chosen or chosen[entry.name][0] < rank):
                chosen[entry.name] = (rank, entry)
        chain = [instances[id(e)] for _, e in chosen.values() if e.enabled]
        if chain:
            chain.sort(key=lambda p: (-getattr(p, "priority", 0), getattr(p, "name", "")))
            chains[route.name] = tuple(chain)
    return chains


def _pool(pools: PoolRegistry, gateway, host: str, port: int) -> Pool:
    keepalive = gateway.upstream_keepalive
    return pools.get(host, port, keepalive.max_idle, keepalive.idle_timeout)


def _balancers(config: Config, pools: PoolRegistry, previous: Plan | None) -> dict[str, Balancer]:
    """One Balancer per upstream that a service uses, each target with its pool."""
    used = {s.upstream for s in config.services if s.upstream}
    balancers: dict[str, Balancer] = {}
    for upstream in config.upstreams:
        if upstream.name not in used:
            continue
        balancer = Balancer.from_upstream(upstream)
        for target in balancer.targets:
            target.pool = _pool(pools, config.gateway, target.host, target.port)
        old = previous.balancers.get(upstream.name) if previous is not None else None
        if old is not None:
            balancer.inherit(old)
        balancers[upstream.name] = balancer
    return balancers


def _spec(route: Route, target: RouteTarget) -> RouteSpec:
    return RouteSpec(route.name, route.index, route.hosts, route.paths, route.methods,
                     route.headers, route.priority, target)
