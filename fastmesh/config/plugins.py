"""Read `plugins` (top level, and nested under services and routes) and `consumers`.

Every plugin entry is validated against its plugin class's `schema` here, at load time, so a bad
plugin config is reported like any other config problem (e.g. `plugins[2].config.header_name`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastmesh.config.schema import Fields, Invalid, boolean, child, describe, item, name, string

PLUGIN_FIELDS = ("name", "module", "config", "service", "route", "enabled")
NESTED_FIELDS = ("name", "module", "config", "enabled")
CONSUMER_FIELDS = ("username", "custom_id", "keyauth_credentials")


@dataclass(frozen=True)
class PluginEntry:
    name: str
    config: dict                        # validated, normalized by the plugin's schema
    module: str | None = None           # Python module holding the class; None: built-in/entry point
    service: str | None = None          # scope; both None: global
    route: str | None = None
    enabled: bool = True
    path: str = ""                      # where it was declared, for messages


@dataclass(frozen=True)
class Consumer:
    username: str
    custom_id: str | None = None
    keyauth_keys: tuple[str, ...] = field(default=(), repr=False)


def read_plugins(top: Fields) -> tuple[PluginEntry, ...]:
    """Every plugin entry of the file with its scope; problems go to top.issues."""
    issues = top.issues
    data = top.data
    services = [s for s in (data.get("services") or []) if isinstance(s, dict)] \
        if isinstance(data.get("services"), list) else []
    service_names = {s.get("name") for s in services if isinstance(s.get("name"), str)}
    route_names: set = set()
    declared: list[tuple[str, Any, str | None, str | None]] = []   # (path, raw, service, route)
    for path, raw in top.items("plugins", "list of plugins"):
        declared.append((path, raw, None, None))
    for si, svc in enumerate(data.get("services") or [] if isinstance(data.get("services"), list) else []):
        if not isinstance(svc, dict):
            continue
        spath = item("services", si)
        for pi, raw in enumerate(_list(issues, child(spath, "plugins"), svc.get("plugins"))):
            declared.append((item(child(spath, "plugins"), pi), raw, svc.get("name"), ""))
        routes = svc.get("routes") if isinstance(svc.get("routes"), list) else []
        for ri, route in enumerate(routes):
            _nested_route(issues, item(child(spath, "routes"), ri), route, declared, route_names)
    top_routes = data.get("routes") if isinstance(data.get("routes"), list) else []
    for ri, route in enumerate(top_routes):
        _nested_route(issues, item("routes", ri), route, declared, route_names)
    entries: list[PluginEntry] = []
    seen: dict[tuple, str] = {}
    for path, raw, service, route in declared:
        nested = route is not None
        fields = Fields.of(issues, path, raw, NESTED_FIELDS if nested else PLUGIN_FIELDS)
        if fields is None:
            continue
        if nested:
            scope_service = service if route == "" else None
            scope_route = route or None
        else:
            scope_service = fields.value("service", name)
            scope_route = fields.value("route", name)
            if scope_service is not None and scope_service not in service_names:
                issues.add(fields.at("service"), f"unknown service '{scope_service}'")
            if scope_route is not None and scope_route not in route_names:
                issues.add(fields.at("route"), f"unknown route '{scope_route}'")
        entry = read_plugin(fields, scope_service, scope_route)
        if entry is None:
            continue
        key = (entry.name, entry.service, entry.route)
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
                         rname if isinstance(rname, str) else "?"))


def read_plugin(fields: Fields, service: str | None, route: str | None) -> PluginEntry | None:
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
    config = read_plugin_config(fields, cls)
    if config is None:
        return None
    return PluginEntry(name=plugin_name, config=config, module=module, service=service,
                       route=route, enabled=enabled, path=fields.path)


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


def read_consumers(top: Fields) -> tuple[Consumer, ...]:
    consumers: list[Consumer] = []
    users: dict[str, str] = {}
    keys: dict[str, str] = {}
    for path, raw in top.items("consumers", "list of consumers"):
        fields = Fields.of(top.issues, path, raw, CONSUMER_FIELDS)
        if fields is None:
            continue
        username = fields.value("username", string, required=True)
        custom_id = fields.value("custom_id", string)
        if username is not None:
            if username in users:
                fields.issues.add(fields.at("username"), f"duplicate consumer '{username}' "
                                                         f"(first at {users[username]})")
            users.setdefault(username, path)
        found: list[str] = []
        for cpath, cred in fields.items("keyauth_credentials", "list of credentials"):
            cfields = Fields.of(top.issues, cpath, cred, ("key",))
            if cfields is None:
                continue
            key = cfields.value("key", _key, required=True)
            if key is None:
                continue
            if key in keys:
                cfields.issues.add(cfields.at("key"), f"duplicate key (also at {keys[key]})")
                continue
            keys[key] = cfields.at("key")
            found.append(key)
        if username is not None:
            consumers.append(Consumer(username, custom_id, tuple(found)))
    return tuple(consumers)


def _key(value) -> str:
    text = string(value)
    if not text or text != text.strip() or any(c in text for c in "\r\n\x00"):
        raise Invalid("key must be non-empty, without surrounding spaces, CR, LF or NUL")
    return text


def plugins_version(version: str, plugins: tuple, consumers: tuple) -> str:
    """`version` unchanged without plugins or consumers; else a hash that also covers them."""
    if not plugins and not consumers:
        return version
    import dataclasses
    import hashlib
    import json
    canonical = json.dumps({"base": version,
                            "plugins": [dataclasses.asdict(p) for p in plugins],
                            "consumers": [dataclasses.asdict(c) for c in consumers]},
                           sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
