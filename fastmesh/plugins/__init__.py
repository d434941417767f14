"""The plugin contract, the registry of built-ins, and the runners the data path calls.

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

The data path only looks at a route's chain (a tuple, sorted by priority, or None). A route whose
chain is None pays one pointer test per request and nothing else.
"""
from __future__ import annotations

import importlib
import re
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

import orjson

log = logging.getLogger("fastmesh.plugins")

ENTRY_POINT_GROUP = "fastmesh.plugins"


@dataclass(frozen=True)
class Field:
    parse: Callable[[Any], Any]
    default: Any = None
    required: bool = False


class Response:
    """A response a plugin answers with (access phase); `body` a dict/list is sent as JSON."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: Any = None, headers: list | None = None):
        self.status = status
        self.body = body
        self.headers = list(headers or ())

    def payload(self, close: bool) -> bytes:
        body = self.body
        ctype = b"application/json"
        if body is None:
            body = b""
        elif isinstance(body, (dict, list)):
            body = orjson.dumps(body)
        elif isinstance(body, str):
            body = orjson.dumps({"message": body})
        else:
            ctype = b"application/octet-stream"
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, _reason(self.status))]
        names = set()
        for name, value in self.headers:
            name, value = _b(name), _b(value)
            names.add(name.lower())
            lines.append(name + b": " + value + b"\r\n")
        if body and b"content-type" not in names:
            lines.append(b"Content-Type: " + ctype + b"\r\n")
        if self.status != 204 and self.status >= 200:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"Connection: close\r\n\r\n" if close else b"Connection: keep-alive\r\n\r\n")
        return b"".join(lines) + (body if self.status != 204 else b"")


_REASONS = {200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
            403: b"Forbidden", 404: b"Not Found", 429: b"Too Many Requests",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"Status")


def _b(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


def _clean(value) -> bytes:
    value = _b(value)
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        raise ValueError(f"header text must not contain CR, LF or NUL: {value!r}")
    return value


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Framing and hop-by-hop headers stay the gateway's business: a plugin cannot add or remove them.
RESERVED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade",
                      b"te", b"trailer", b"keep-alive", b"proxy-connection"})


def _name(value) -> bytes:
    name = _b(value)
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    if name.lower() in RESERVED:
        raise ValueError(f"header {name.decode()!r} is managed by the gateway; plugins cannot change it")
    return name


class Request:
    """The request as plugins see it; built only for routes with plugins."""

    __slots__ = ("method", "path", "query", "headers", "client_ip", "route", "service",
                 "add", "drop", "consumer", "ctx")

    def __init__(self, method, path, query, headers, client_ip, route, service):
        self.method = method            # bytes, e.g. b"GET"
        self.path = path                # bytes, as received (before strip_path)
        self.query = query              # bytes, without '?' (b"" when none)
        self.headers = headers          # [(name bytes, value bytes)] as received
        self.client_ip = client_ip      # bytes
        self.route = route              # route name
        self.service = service          # service name
        self.add = None                 # [(name, value)] added to the upstream request
        self.drop = None                # {lower-case name} removed from the upstream request
        self.consumer = None            # set by an auth plugin: the authenticated consumer name
        self.ctx = None                 # free per-request dict for plugins (response/log phases)

    def get_header(self, name) -> bytes | None:
        """The last value of header `name` (case-insensitive), or None."""
        name = _b(name).lower()
        found = None
        for key, value in self.headers:
            if key.lower() == name:
                found = value
        return found

    def query_arg(self, name) -> str | None:
        from urllib.parse import parse_qsl
        name = name if isinstance(name, str) else name.decode()
        for key, value in parse_qsl(self.query.decode("latin-1"), keep_blank_values=True):
            if key == name:
                return value
        return None

    def remove_header(self, name) -> None:
        """Do not forward header `name` upstream (also drops values added earlier)."""
        low = _name(name).lower()
        if self.drop is None:
            self.drop = set()
        self.drop.add(low)
        if self.add:
            self.add = [(k, v) for k, v in self.add if k.lower() != low]

    def add_header(self, name, value) -> None:
        """Add a header line to the upstream request."""
        if self.add is None:
            self.add = []
        self.add.append((_name(name), _clean(value)))

    def set_header(self, name, value) -> None:
        """Replace every value of header `name` upstream with `value`."""
        self.remove_header(name)
        self.add_header(name, value)


class ResponseHead:
    """The upstream response's status and headers, as the response phase sees them."""

    __slots__ = ("status", "headers", "add", "drop")

    def __init__(self, status, headers):
        self.status = status
        self.headers = headers          # [(name bytes, value bytes)] from upstream
        self.add = None
        self.drop = None

    def get_header(self, name) -> bytes | None:
        name = _b(name).lower()
        found = None
        for key, value in self.headers:
            if key.lower() == name:
                found = value
        return found

    remove_header = Request.remove_header
    add_header = Request.add_header
    set_header = Request.set_header


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
    "cors": "fastmesh.plugins.cors",
    "request-transformer": "fastmesh.plugins.transformers",
    "response-transformer": "fastmesh.plugins.transformers",
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


# --- runners (called by the data path, only for routes with a chain) ---------------------------

def _error(plugin, phase: str, request) -> None:
    log.error("plugin '%s' failed in its %s phase (route '%s')",
              getattr(plugin, "name", "?"), phase, request.route, exc_info=True)
    print(f"fastmesh: plugin '{getattr(plugin, 'name', '?')}' failed in its {phase} phase "
          f"(route '{request.route}'): {sys.exc_info()[0].__name__}: {sys.exc_info()[1]}",
          file=sys.stderr, flush=True)


def run_access(chain: tuple, request: Request):
    """Each plugin's access phase in order; the first Response returned answers the request."""
    for plugin in chain:
        access = getattr(plugin, "access", None)
        if access is None:
            continue
        try:
            answer = access(request)
        except Exception:
            _error(plugin, "access", request)
            return Response(500, {"message": "An unexpected error occurred",
                                  "plugin": getattr(plugin, "name", "?")})
        if answer is not None:
            return answer
    return None


def run_response(chain: tuple, request: Request, status: int, headers: list):
    """Each plugin's response phase; returns (drop set or None, add list or None)."""
    head = ResponseHead(status, headers)
    for plugin in chain:
        phase = getattr(plugin, "response", None)
        if phase is None:
            continue
        try:
            phase(request, head)
        except Exception:
            _error(plugin, "response", request)
    return head.drop, head.add


def run_log(chain: tuple, request: Request, status: int, timings: dict) -> None:
    """Each plugin's log phase; scheduled with loop.call_soon, never on the client's path."""
    response = ResponseHead(status, ())
    for plugin in chain:
        phase = getattr(plugin, "log", None)
        if phase is None:
            continue
        try:
            phase(request, response, timings)
        except Exception:
            _error(plugin, "log", request)


def has_log(chain: tuple) -> bool:
    return any(getattr(p, "log", None) is not None for p in chain)


def answer_payload(answer, close: bool, request: Request) -> tuple[int, bytes]:
    """(status, bytes) of a plugin's Response; a malformed one becomes a logged 500."""
    try:
        if not isinstance(answer, Response):
            raise TypeError(f"access() returned {type(answer).__name__}, expected Response or None")
        return answer.status, answer.payload(close)
    except Exception:
        log.error("plugin answer for route '%s' is invalid", request.route, exc_info=True)
        print(f"fastmesh: invalid plugin answer (route '{request.route}'): "
              f"{sys.exc_info()[0].__name__}: {sys.exc_info()[1]}", file=sys.stderr, flush=True)
        return 500, Response(500, {"message": "An unexpected error occurred"}).payload(close)
