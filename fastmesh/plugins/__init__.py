"""The plugin contract (Python side) and the registry of built-in and installed plugins.

A plugin is a class:

    class MyPlugin(Plugin):
        name = "my-plugin"
        priority = 1000                     # higher runs first
        schema = {"header_name": Field(string, default="X-Hello")}

        def access(self, request):          # may answer: return Response(401, {"message": ...})
            request.set_header("X-Hello", "world")

        def response(self, request, response):
            response.remove_header("Server")

        def log(self, request, response, timings):   # after the response, off the client path
            ...

`schema` maps each config field to a `Field` (a parser from fastmesh.config.schema plus a default);
`check(config)` may add cross-field problems; both are reported with paths such as
`plugins[2].config.header_name`. An instance is made per (plugin, scope) at Plan compile time with
the validated config dict; `setup(config)` gets the whole fastmesh Config (key-auth reads consumers).

At Plan compile time a route's plugins become a `Chain` (fastmesh._core.plugin: sorted by
priority, phases looked up once); the data path only looks at that chain or None, so a route
without plugins pays one pointer test per request and nothing else. Built-ins that most routes
use are native (`NativePlugin` subclasses in Cython, called through the C vtable); Python plugins
see the very same `Request`/`ResponseHead` views.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("fastmesh.plugins")

ENTRY_POINT_GROUP = "fastmesh.plugins"


@dataclass(frozen=True)
class Field:
    parse: Callable[[Any], Any]
    default: Any = None
    required: bool = False


# The views and the answer type live in the Cython data path (fastmesh._core.plugin) so that
# native plugins and the chain runner use them without Python calls; re-exported here.
from fastmesh._core.plugin import (  # noqa: E402
    REROUTE, RESERVED, Chain, NativePlugin, Request, Response, ResponseHead, answer_payload,
)


class Plugin:
    """Base class (optional: any class with `name` and the phases works)."""

    name: str = ""
    priority: int = 0
    schema: dict = {}

    def __init__(self, config: dict):
        self.config = config

    @classmethod
    def check(cls, config: dict) -> list[tuple[str, str]]:
        """Cross-field problems as (field, message); the field may be "" for the whole config."""
        return []

    def setup(self, gateway_config) -> None:
        """Called once per Plan with the whole validated fastmesh Config."""


# --- registry ---------------------------------------------------------------------------------

_BUILTIN_MODULES = {
    "request-termination": "fastmesh.plugins.request_termination",
    "key-auth": "fastmesh.plugins.key_auth",
    "basic-auth": "fastmesh.plugins.basic_auth",
    "jwt": "fastmesh.plugins.jwt_auth",
    "acl": "fastmesh.plugins.acl",
    "cors": "fastmesh.plugins.cors",
    "request-transformer": "fastmesh.plugins.transformers",
    "response-transformer": "fastmesh.plugins.transformers",
    "ip-restriction": "fastmesh.plugins.ip_restriction",
    "request-size-limiting": "fastmesh.plugins.request_size_limiting",
    "correlation-id": "fastmesh.plugins.correlation_id",
    "rate-limiting": "fastmesh.plugins.rate_limiting",
    "mesh-authorization": "fastmesh.plugins.mesh_authorization",
}
BUILTINS = tuple(_BUILTIN_MODULES)


class PluginNotFound(Exception):
    pass


def _from_module(module_name: str, plugin_name: str):
    try:
        module = importlib.import_module(module_name)
    except Exception as err:         # ImportError, or the module raised while importing
        raise PluginNotFound(f"cannot import module '{module_name}': {type(err).__name__}: {err}")
    for value in vars(module).values():
        if isinstance(value, type) and getattr(value, "name", None) == plugin_name \
                and value.__module__ == module.__name__:
            return value
    raise PluginNotFound(f"module '{module_name}' has no plugin class with name = '{plugin_name}'")


def _from_entry_point(plugin_name: str):
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == plugin_name:
            try:
                cls = ep.load()
            except Exception as err:
                raise PluginNotFound(f"entry point '{ep.value}' for plugin '{plugin_name}' "
                                     f"failed to load: {type(err).__name__}: {err}")
            return cls
    return None


def find_plugin(plugin_name: str, module_name: str | None = None):
    """The plugin class: from `module_name`, else a built-in, else the entry point group."""
    if module_name:
        return _from_module(module_name, plugin_name)
    if plugin_name in _BUILTIN_MODULES:
        return _from_module(_BUILTIN_MODULES[plugin_name], plugin_name)
    cls = _from_entry_point(plugin_name)
    if cls is None:
        raise PluginNotFound(f"unknown plugin '{plugin_name}' (built-ins: {', '.join(BUILTINS)}; "
                             f"others need 'module' or a '{ENTRY_POINT_GROUP}' entry point)")
    return cls
