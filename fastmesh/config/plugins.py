"""Read `plugins` (top level, and nested under services, routes and consumers) and `consumers`.

Every plugin entry is validated against its plugin class's `schema` here, at load time, so a bad
plugin config is reported like any other config problem (e.g. `plugins[2].config.header_name`).
Consumers and their credentials are read by fastmesh.config.consumers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastmesh.config.consumers import Consumer, consumer_names, read_consumers
from fastmesh.config.schema import (
    Fields, boolean, child, describe, item, name, string, version_json,
)

PLUGIN_FIELDS = ("name", "module", "config", "service", "route", "consumer", "enabled")
NESTED_FIELDS = ("name", "module", "config", "enabled")

__all__ = ["PluginEntry", "Consumer", "read_plugins", "read_consumers", "plugins_version"]


@dataclass(frozen=True)
class PluginEntry:
    name: str
    config: dict                        # validated, normalized by the plugin's schema
    module: str | None = None           # Python module holding the class; None: built-in/entry point
    service: str | None = None          # scope; all three None: global
    route: str | None = None
    enabled: bool = True
    path: str = ""                      # where it was declared, for messages
    consumer: str | None = None         # consumer scope (username)

    @property
    def scope(self) -> str:
        """'global', or e.g. 'service:orders', 'route:checkout,consumer:alice'."""
        parts = [f"{kind}:{value}" for kind, value in
                 (("service", self.service), ("route", self.route), ("consumer", self.consumer))
                 if value is not None]
        return ",".join(parts) or "global"


def read_plugins(top: Fields) -> tuple[PluginEntry, ...]:
    """Every plugin entry of the file with its scope; problems go to top.issues."""
    issues = top.issues
    data = top.data
    services = [s for s in (data.get("services") or []) if isinstance(s, dict)] \
        if isinstance(data.get("services"), list) else []
    service_names = {s.get("name") for s in services if isinstance(s.get("name"), str)}
    users = consumer_names(data)
    route_names: set = set()
    # (path, raw, service, route, consumer); route "" marks a service-nested entry, consumer ""
    # a consumer-nested one (scope filled in below)
    declared: list[tuple[str, Any, str | None, str | None, str | None]] = []
    for path, raw in top.items("plugins", "list of plugins"):
        declared.append((path, raw, None, None, None))
    for si, svc in enumerate(data.get("services") or [] if isinstance(data.get("services"), list) else []):
        if not isinstance(svc, dict):
            continue
        spath = item("services", si)
        for pi, raw in enumerate(_list(issues, child(spath, "plugins"), svc.get("plugins"))):
            declared.append((item(child(spath, "plugins"), pi), raw, svc.get("name"), "", None))
        routes = svc.get("routes") if isinstance(svc.get("routes"), list) else []
        for ri, route in enumerate(routes):
            _nested_route(issues, item(child(spath, "routes"), ri), route, declared, route_names)
    top_routes = data.get("routes") if isinstance(data.get("routes"), list) else []
    for ri, route in enumerate(top_routes):
        _nested_route(issues, item("routes", ri), route, declared, route_names)
    consumers = data.get("consumers") if isinstance(data.get("consumers"), list) else []
    for ci, consumer in enumerate(consumers):
        if not isinstance(consumer, dict):
            continue
        cpath = item("consumers", ci)
        username = consumer.get("username") if isinstance(consumer.get("username"), str) else "?"
        for pi, raw in enumerate(_list(issues, child(cpath, "plugins"), consumer.get("plugins"))):
            declared.append((item(child(cpath, "plugins"), pi), raw, None, None, username))
    entries: list[PluginEntry] = []
    seen: dict[tuple, str] = {}
    for path, raw, service, route, consumer in declared:
        nested = route is not None or consumer is not None
        fields = Fields.of(issues, path, raw, NESTED_FIELDS if nested else PLUGIN_FIELDS)
        if fields is None:
            continue
        if nested:
            scope_service = service if route == "" else None
            scope_route = route or None
            scope_consumer = consumer
        else:
            scope_service = fields.value("service", name)
            scope_route = fields.value("route", name)
            scope_consumer = fields.value("consumer", string)
            if scope_service is not None and scope_service not in service_names:
                issues.add(fields.at("service"), f"unknown service '{scope_service}'")
            if scope_route is not None and scope_route not in route_names:
                issues.add(fields.at("route"), f"unknown route '{scope_route}'")
            if scope_consumer is not None and scope_consumer not in users:
                issues.add(fields.at("consumer"), f"unknown consumer '{scope_consumer}'")
        entry = read_plugin(fields, scope_service, scope_route, scope_consumer, users)
        if entry is None:
            continue
        key = (entry.name, entry.service, entry.route, entry.consumer)
        if key in seen:
            issues.add(fields.at("name"), f"plugin '{entry.name}' is configured twice for the same "
                                          f"scope (first at {seen[key]})")
            continue
        seen[key] = path
        entries.append(entry)
    return tuple(entries)


def _list(issues, path: str, raw) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        issues.add(path, f"expected a list of plugins, found {describe(raw)}")
        return []
    return raw


def _nested_route(issues, rpath: str, route, declared: list, route_names: set) -> None:
    if not isinstance(route, dict):
        return
        
    rname = route.get("name")
    if isinstance(rname, str):
        route_names.add(rname)
    for pi, raw in enumerate(_list(issues, child(rpath, "plugins"), route.get("plugins"))):
        declared.append((item(child(rpath, "plugins"), pi), raw, None,
                         rname if isinstance(rname, str) else "?", None))


def read_plugin(fields: Fields, service: str | None, route: str | None,
                consumer: str | None = None, users: set | None = None) -> PluginEntry | None:
    from fastmesh.plugins import PluginNotFound, find_plugin
    plugin_name = fields.value("name", string, required=True)
    module = fields.value("module", string)
    enabled = fields.value("enabled", boolean, True)
    if plugin_name is None:
        return None
    try:
        cls = find_plugin(plugin_name, module)
    except PluginNotFound as err:
        fields.issues.add(fields.at("module" if module else "name"), str(err))
        return None
    if consumer is not None and getattr(cls, "no_consumer", False):
        # an authentication plugin finds the consumer: it cannot depend on it (Kong refuses too)
        fields.issues.add(fields.path if fields.path.startswith("consumers[") else fields.at("consumer"),
                          f"plugin '{plugin_name}' cannot be scoped to a consumer")
        return None
    config = read_plugin_config(fields, cls)
    if config is None:
        return None
    for key in getattr(cls, "consumer_fields", ()):      # config fields that name a consumer
        value = config.get(key)
        if value is not None and users is not None and value not in users:
            fields.issues.add(child(fields.at("config"), key), f"unknown consumer '{value}'")
            return None
    return PluginEntry(name=plugin_name, config=config, module=module, service=service,
                       route=route, enabled=enabled, path=fields.path, consumer=consumer)


def read_plugin_config(fields: Fields, cls) -> dict | None:
    schema = getattr(cls, "schema", {}) or {}
    before = len(fields.issues.items)
    conf = fields.section("config", tuple(schema))
    values = {key: conf.value(key, spec.parse, spec.default, spec.required)
              for key, spec in schema.items()}
    if len(fields.issues.items) == before:
        check = getattr(cls, "check", None)
        for key, message in (check(values) if check is not None else ()):
            fields.issues.add(conf.at(key) if key else conf.path, message)
    return values if len(fields.issues.items) == before else None


def plugins_version(version: str, plugins: tuple, consumers: tuple) -> str:
    """`version` unchanged without plugins or consumers; else a hash that also covers them."""
    if not plugins and not consumers:
        return version
    from fastmesh.osutil import sha256
    canonical = version_json({"base": version, "plugins": plugins, "consumers": consumers},
                             fallback=repr)
    return sha256(canonical.encode()).hexdigest()[:12]
