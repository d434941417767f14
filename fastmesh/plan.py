"""Compile a validated Config into a Plan: the routing table and one RouteTarget per route.

A Plan is immutable once built. Upstream connection pools are keyed by target
address and handed from one Plan to the next, so a config swap keeps warm
connections.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def __init__(self, config: Config, router: Router, targets: list[RouteTarget]):
        self.config = config
        self.router = router
        self.targets = targets
        self.version = config.version


def compile_plan(config: Config, pools: PoolRegistry) -> Plan:
    services = {s.name: s for s in config.services}
    gateway = config.gateway
    targets: list[RouteTarget] = []
    specs: list[RouteSpec] = []
    for route in config.routes:
        service = services[route.service]
        server_timing = gateway.server_timing if service.server_timing is None else service.server_timing
        target = RouteTarget(
            route.name, service.name,
            pools.get(service.host, service.port, gateway.upstream_keepalive.max_idle,
                      gateway.upstream_keepalive.idle_timeout),
            service.host, service.port, service.path,
            route.strip_path, route.preserve_host, server_timing,
            service.connect_timeout, service.read_timeout, service.write_timeout,
            gateway.limits.max_body_size,
        )
        targets.append(target)
        specs.append(_spec(route, target))
    return Plan(config, Router(specs), targets)


def _spec(route: Route, target: RouteTarget) -> RouteSpec:
    return RouteSpec(route.name, route.index, route.hosts, route.paths, route.methods,
                     route.headers, route.priority, target)
