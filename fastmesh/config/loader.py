"""Load a declarative config file (YAML or JSON) and validate it into a frozen `Config`.

Validation never stops at the first problem: every issue found in the file is collected (with the
path inside the file, e.g. `services[0].routes[2].paths[1]`) and raised together as one
ConfigError, so a user fixes a config in one pass instead of one error per run.

Normalization choices the plan compiler can rely on:
- service `path` is "" or "/base" with no trailing slash (a written "/" becomes "");
- service `host` is lower-case; an IPv6 literal is stored without brackets ("::1");
- route `hosts` are lower-case; IPv6 literals are stored bracketed ("[::1]"), as they appear in a
  Host header; duplicates are dropped (also for paths and methods);
- route `methods` are upper-case, `headers` names lower-case and sorted by name;
- route `paths` are kept as written ("/p", "=/exact", "~regex"); regexes are checked with
  `re.compile(pattern.encode())`, as the data path compiles them on bytes;
- durations are float seconds (a bare number in the file is milliseconds), sizes int bytes;
- route `index` is declaration order across the file: nested routes in file order, then
  top-level `routes`.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from fastmesh.config.model import (
    Config, ConfigError, ConfigIssue, GatewaySettings, Limits, Route, Service, UpstreamKeepalive,
)
from fastmesh.config.operations import access_log_target, read_admin, read_tracing
from fastmesh.config.upstreams import read_upstreams, upstreams_version
from fastmesh.config.plugins import plugins_version, read_consumers, read_plugins
from fastmesh.config.tls import read_route_protocols, read_tls, tls_version, wildcard_name
from fastmesh.config.streams import read_streams, streams_version
from fastmesh.upstream_tls import TLS_FIELDS, check_upstream_tls, read_service_tls
from fastmesh.osutil import sha256
from fastmesh.config.schema import (
    Fields, Invalid, Issues, address_host, boolean, child, describe, duration, host, integer,
    ip_literal, hostname, listen_address, name, port_number, size, split_host_port, string,
    token, version_json,
)

TOP_FIELDS = ("_format_version", "gateway", "services", "routes", "upstreams", "targets",
              "listeners", "certificates", "streams")
NOT_YET_SUPPORTED: tuple[str, ...] = ()
PLUGIN_ENTITIES = ("plugins", "consumers")   # read by fastmesh.config.plugins
GATEWAY_FIELDS = ("listen", "server_timing", "limits", "upstream_keepalive", "admin",
                  "access_log", "request_id", "tracing")
SERVICE_FIELDS = ("name", "url", "protocol", "host", "port", "path", "connect_timeout",
                  "read_timeout", "write_timeout", "retries", "retry_on", "per_try_timeout",
                  "server_timing", "routes", "plugins") + TLS_FIELDS
URL_PARTS = ("protocol", "host", "port", "path")
ROUTE_FIELDS = ("name", "service", "hosts", "paths", "methods", "headers", "strip_path",
                "preserve_host", "priority", "max_body_size", "plugins", "protocols",
                "https_redirect_status_code")
MATCH_CRITERIA = ("hosts", "paths", "methods", "headers")

LIMIT_PARSERS = {
    "max_head_size": size(1, "max_head_size"),
    "max_line_size": size(1, "max_line_size"),
    "max_headers": integer(1, None, "max_headers"),
    "max_body_size": size(0, "max_body_size"),
    "header_timeout": duration,
    "body_timeout": duration,
    "keepalive_timeout": duration,
    "send_timeout": duration,
    "max_requests_per_connection": integer(0, None, "max_requests_per_connection"),
    "max_connections": integer(1, None, "max_connections"),
    "max_response_head_size": size(1024, "max_response_head_size"),
}
KEEPALIVE_PARSERS = {
    "max_idle": integer(0, None, "max_idle"),
    "idle_timeout": duration,
}
SERVICE_TUNING_PARSERS = {
    "connect_timeout": duration,
    "read_timeout": duration,
    "write_timeout": duration,
    "retries": integer(0, 32, "retries"),
    "per_try_timeout": duration,
    "server_timing": boolean,
}


# --- entry points -----------------------------------------------------------------------------

def load_config(path: str) -> Config:
    """Read and validate one config file; raises ConfigError naming the file on any problem."""
    return load_config_data(read_document(path), source=path)


def load_config_data(data: object, source: str = "<config>") -> Config:
    """Validate already-parsed data; raises ConfigError with every issue found, or returns Config."""
    issues = Issues(source)
    top = read_top(issues, data)
    if top is None:
        raise ConfigError(issues.items)
    check_format_version(top)
    gateway = read_gateway(top.section("gateway", GATEWAY_FIELDS))
    services, nested = read_services(top)
    upstreams, services = read_upstreams(top, services)
    check_upstream_tls(top, services)
    routes = read_routes(top, nested, list(dict.fromkeys(s.name for s in services if s.name)))
    plugins, consumers = read_plugins(top), read_consumers(top)
    listeners, certificates = read_tls(top, gateway.listen)
    streams = read_streams(top, upstreams, gateway)
    if issues:
        raise ConfigError(issues.items)
    return Config(source=source, services=tuple(services), routes=tuple(routes), gateway=gateway,
                  version=streams_version(tls_version(plugins_version(
                      upstreams_version(config_version(gateway, services, routes), upstreams),
                      plugins, consumers), listeners, certificates), streams),
                  upstreams=tuple(upstreams), plugins=plugins, consumers=consumers,
                  listeners=listeners, certificates=certificates, streams=streams)


def read_document(path: str) -> object:
    """The parsed YAML (JSON is YAML) of a file; read and syntax errors become a ConfigError."""
    def fail(message: str) -> ConfigError:
        return ConfigError([ConfigIssue(path, "", message)])
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise fail(f"cannot read config file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise fail(f"config file is not UTF-8 text (bad byte at offset {err.start})") from None
    import yaml          # here, not at the top: worker processes get their config over IPC
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as err:
        raise fail(yaml_error_message(err)) from None
    except yaml.YAMLError as err:
        raise fail(f"YAML error: {err}") from None


def yaml_error_message(err: yaml.MarkedYAMLError) -> str:
    """'YAML syntax error at line 3, column 5: <problem> (<context> at line 2, column 1)'."""
    mark = err.problem_mark or err.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    message = f"YAML syntax error{where}: {err.problem or err.context or 'invalid YAML'}"
    if err.context and err.problem and err.context_mark:
        message += (f" ({err.context} at line {err.context_mark.line + 1}, "
                    f"column {err.context_mark.column + 1})")
    return message


def config_version(gateway: GatewaySettings, services: list[Service], routes: list[Route]) -> str:
    """First 12 hex digits of sha256 over the canonical JSON of the normalized config.

    Computed from the validated values (not the file text), so comments, key order, formatting,
    "60s" vs 60000 and the file name do not change it; any effective change does.
    """
    canonical = version_json({"gateway": gateway, "services": services, "routes": routes},
                             ensure_ascii=False)
    return sha256(canonical.encode()).hexdigest()[:12]


# --- top level and gateway --------------------------------------------------------------------

def read_top(issues: Issues, data: object) -> Fields | None:
    if data is None:
        issues.add("", "config file is empty")
        return None
    if not isinstance(data, dict):
        issues.add("", "expected a mapping at the top level (with services, routes, gateway), "
                       f"found {describe(data)}")
        return None
    top = Fields(issues, "", data, TOP_FIELDS + NOT_YET_SUPPORTED + PLUGIN_ENTITIES)
    for entity in NOT_YET_SUPPORTED:
        if entity in data:
            issues.add(entity, f"'{entity}' is not supported yet")
    return top


def check_format_version(top: Fields) -> None:
    """Optional; when present it must be "1" (or the number 1) so future formats are refused."""
    raw = top.raw("_format_version")
    if raw is not None and raw != "1" and not (_is_number(raw) and raw == 1):
        top.issues.add(top.at("_format_version"), f"expected \"1\", found {describe(raw)}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_gateway(fields: Fields) -> GatewaySettings:
    defaults = GatewaySettings()
    return GatewaySettings(
        listen=fields.value("listen", listen_address, defaults.listen),
        server_timing=fields.value("server_timing", boolean, defaults.server_timing),
        limits=read_limits(fields.section("limits", LIMIT_PARSERS)),
        upstream_keepalive=read_table(fields.section("upstream_keepalive", KEEPALIVE_PARSERS),
                                      KEEPALIVE_PARSERS, UpstreamKeepalive()),
        admin=read_admin(fields),
        access_log=fields.value("access_log", access_log_target, defaults.access_log),
        request_id=fields.value("request_id", boolean, defaults.request_id),
        tracing=read_tracing(fields),
    )


def read_table(fields: Fields, parsers: dict, defaults: Any) -> Any:
    """A settings dataclass whose every field is optional with one parser each."""
    values = {key: fields.value(key, parse, getattr(defaults, key)) for key, parse in parsers.items()}
    return dataclasses.replace(defaults, **values)


def read_limits(fields: Fields) -> Limits:
    limits = read_table(fields, LIMIT_PARSERS, Limits())
    if limits.max_line_size > limits.max_head_size:
        fields.issues.add(fields.at("max_line_size"),
                          f"max_line_size ({limits.max_line_size}) must not exceed max_head_size "
                          f"({limits.max_head_size}): the request line is part of the head")
    return limits


# --- services ---------------------------------------------------------------------------------

def read_services(top: Fields) -> tuple[list[Service], list[tuple[str, Any, str]]]:
    """The services, plus their nested routes as (path, raw route, parent name) in file order."""
    services: list[Service] = []
    nested: list[tuple[str, Any, str]] = []
    first_seen: dict[str, str] = {}
    for path, raw in top.items("services", "list of services"):
        fields = Fields.of(top.issues, path, raw, SERVICE_FIELDS)
        if fields is None:
            continue
        service = read_service(fields)
        check_unique(fields, service.name, first_seen, "service")
        services.append(service)
        for route_path, route in fields.items("routes", "list of routes"):
            nested.append((route_path, route, service.name or ""))  # "": parent name invalid
    return services, nested


def read_service(fields: Fields) -> Service:
    protocol, host_name, port, path = read_upstream_address(fields)
    tuning = {key: fields.value(key, parse) for key, parse in SERVICE_TUNING_PARSERS.items()}
    tuning = {key: value for key, value in tuning.items() if value is not None}
    if fields.has("retry_on"):
        tuning["retry_on"] = fields.values("retry_on", retry_condition, "list of strings")
    return Service(name=fields.value("name", name, required=True), protocol=protocol,
                   host=host_name, port=port, path=path, **tuning,
                   **read_service_tls(fields, protocol))


RETRY_CONDITIONS = ("connect-failure", "timeout", "reset", "5xx")


def retry_condition(value: object) -> str:
    """One of RETRY_CONDITIONS (timeout, reset and 5xx apply to idempotent methods only)."""
    text = string(value)
    if text not in RETRY_CONDITIONS:
        raise Invalid(f"expected one of {', '.join(RETRY_CONDITIONS)}, found {text!r}")
    return text


def read_upstream_address(fields: Fields) -> tuple[str, str, int, str]:
    """(protocol, host, port, path) from `url`, or from the separate fields; never both."""
    parts = [key for key in URL_PARTS if fields.has(key)]
    if fields.has("url"):
        if parts:
            fields.issues.add(fields.path, f"set either 'url' or {_quoted(parts)}, not both: "
                                           "the url already gives protocol, host, port and path")
        return fields.value("url", service_url, ("http", "", 80, ""))
    if not fields.has("host"):
        fields.issues.add(fields.path, "missing required field 'url' (or 'host')")
    protocol = fields.value("protocol", protocol_name, "http")
    return (protocol,
            fields.value("host", host, ""),
            fields.value("port", integer(1, 65535, "port"), 443 if protocol == "https" else 80),
            fields.value("path", service_path, ""))


def _quoted(keys: list[str]) -> str:
    return ", ".join(f"'{key}'" for key in keys)


def protocol_name(value: object) -> str:
    text = string(value).lower()
    if text not in ("http", "https"):
        raise Invalid(f"protocol must be http or https, found {value!r}")
    return text


_PATH_FORBIDDEN = re.compile(r"[\s?#\x00-\x1f\x7f]")


def plain_path(text: str, what: str = "path") -> str:
    """A literal URL path: starts with '/', no whitespace, control characters, '?' or '#'."""
    if not text.startswith("/"):
        raise Invalid(f"{what} must start with '/', found {text!r}")
    if _PATH_FORBIDDEN.search(text):
        raise Invalid(f"{what} must not contain whitespace, control characters, '?' or '#', "
                      f"found {text!r}")
    return text


def service_path(value: object) -> str:
    """The upstream base path, "" or "/base": trailing slashes removed, so "/" becomes ""."""
    return plain_path(string(value)).rstrip("/")


def service_url(value: object) -> tuple[str, str, int, str]:
    """`http[s]://host[:port][/path]` -> (protocol, host, port, path); every problem names the
    URL. The port defaults to 80, or 443 for https."""
    text = string(value)
    try:
        return _split_url(text)
    except Invalid as problem:
        raise Invalid(f"invalid URL {text!r}: {problem.message}") from None


def _split_url(text: str) -> tuple[str, str, int, str]:
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise Invalid("scheme must be http or https")
    authority, slash, path = rest.partition("/")
    if "?" in text or "#" in text:
        raise Invalid("a query string or fragment is not allowed")
    if "@" in authority:
        raise Invalid("user info is not allowed")
    if not authority:
        raise Invalid("missing host")
    host_part, port_part = split_host_port(authority)
    if not host_part:
        raise Invalid("missing host")
    port = port_number(port_part) if port_part is not None else 443 if scheme == "https" else 80
    return scheme, address_host(host_part), port, service_path(slash + path) if slash else ""


# --- routes -----------------------------------------------------------------------------------

def read_routes(top: Fields, nested: list[tuple[str, Any, str]], known: list[str]) -> list[Route]:
    """Nested routes (already in file order), then top-level ones; index counts every route."""
    declared = nested + [(path, raw, None) for path, raw in top.items("routes", "list of routes")]
    routes: list[Route] = []
    first_seen: dict[str, str] = {}
    for index, (path, raw, parent) in enumerate(declared):
        fields = Fields.of(top.issues, path, raw, ROUTE_FIELDS)
        if fields is None:
            continue
        route = read_route(fields, index, parent, known)
        check_unique(fields, route.name, first_seen, "route")
        routes.append(route)
    return routes


def read_route(fields: Fields, index: int, parent: str | None, known: list[str]) -> Route:
    if not any(fields.raw(key) for key in MATCH_CRITERIA):
        fields.issues.add(fields.path, "route has no match criteria: set at least one of "
                                       + ", ".join(MATCH_CRITERIA))
    return Route(
        name=fields.value("name", name, required=True),
        service=read_route_service(fields, parent, known),
        index=index,
        hosts=fields.values("hosts", route_host, "list of strings"),
        paths=fields.values("paths", route_path, "list of strings"),
        methods=fields.values("methods", method, "list of strings"),
        headers=read_headers(fields),
        strip_path=fields.value("strip_path", boolean, True),
        preserve_host=fields.value("preserve_host", boolean, False),
        priority=fields.value("priority", integer(-2**31, 2**31 - 1, "priority"), 0),
        max_body_size=fields.value("max_body_size", size(0, "max_body_size")),
        **read_route_protocols(fields),
    )


def read_route_service(fields: Fields, parent: str | None, known: list[str]) -> str:
    """A nested route belongs to its parent; a top-level route must name a defined service."""
    if parent is not None:
        named = fields.value("service", string)
        if named is not None and parent and named != parent:
            fields.issues.add(fields.at("service"),
                              f"route is nested under service '{parent}' but names service "
                              f"'{named}': remove 'service' or move the route")
        return parent
    named = fields.value("service", name, required=True)
    if named is not None and named not in known:
        shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        fields.issues.add(fields.at("service"), f"unknown service '{named}' "
                          + (f"(known: {shown})" if known else "(no services are defined)"))
    return named


def check_unique(fields: Fields, entity_name: str | None, first_seen: dict[str, str],
                 kind: str) -> None:
    if entity_name is None:
        return
    if entity_name in first_seen:
        fields.issues.add(fields.at("name"), f"duplicate {kind} name '{entity_name}' "
                                             f"(first defined at {first_seen[entity_name]})")
    else:
        first_seen[entity_name] = fields.path


def route_host(value: object) -> str:
    """A Host to match: name or "*.name" wildcard (leading label only) or IP literal; no port."""
    text = string(value)
    wildcard = wildcard_name(text)
    if wildcard is not None:
        return wildcard
    if not text:
        raise Invalid("host must not be empty")
    address = ip_literal(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
    if address is not None:
        return f"[{address.compressed}]" if address.version == 6 else address.compressed
    host_part, port_part = split_host_port(text)
    if port_part is not None:
        raise Invalid(f"port not allowed in route hosts, found {text!r}: "
                      "routes match on the host name only")
    return hostname(host_part)


def route_path(value: object) -> str:
    """'/prefix', '=/exact' or '~regex', kept as written after checking it."""
    text = string(value)
    if text.startswith("~"):
        check_regex(text[1:])
    elif text.startswith("="):
        plain_path(text[1:], "an exact path after '='")
    elif text.startswith("/"):
        plain_path(text)
    else:
        raise Invalid("path must start with '/' (prefix), '=/' (exact) or '~' (regex), "
                      f"found {text!r}")
    return text


def check_regex(pattern: str) -> None:
    """Compile as the data path will (on bytes); the position is in characters of the regex."""
    if not pattern:
        raise Invalid("regex path '~' has an empty pattern")
    encoded = pattern.encode()
    try:
        re.compile(encoded)
    except re.error as err:
        where = ""
        if err.pos is not None:
            position = len(encoded[:err.pos].decode("utf-8", "ignore"))
            where = f" at position {position}"
        raise Invalid(f"invalid regex: {err.msg}{where} (in regex {pattern!r})") from None
    except (RecursionError, OverflowError) as err:
        raise Invalid(f"invalid regex: too complex ({type(err).__name__})") from None


def method(value: object) -> str:
    return token(value, "method").upper()


# --- route headers ----------------------------------------------------------------------------

_BAD_HEADER_VALUE = re.compile(r"[\r\n\x00]")


def read_headers(fields: Fields) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`{name: value | [values]}` -> sorted ((lower-case name, values), ...)."""
    raw = fields.raw("headers")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        fields.issues.add(fields.at("headers"), "expected a mapping of header name to a string or "
                                                f"list of strings, found {describe(raw)}")
        return ()
    headers: dict[str, tuple[str, ...]] = {}
    for key, values in raw.items():
        path = child(fields.at("headers"), str(key))
        header = fields.parse_at(path, key, header_name)
        allowed = read_header_values(fields, path, values)
        if header in headers:
            fields.issues.add(path, f"duplicate header '{header}' (header names are case-insensitive)")
        elif header is not None:
            headers[header] = allowed
    return tuple(sorted(headers.items()))


def header_name(value: object) -> str:
    lowered = token(value, "header name").lower()
    if lowered == "host":
        raise Invalid("match the Host header with the route's 'hosts', not 'headers'")
    return lowered


def read_header_values(fields: Fields, path: str, raw: object) -> tuple[str, ...]:
    """One string or a non-empty list of strings; each problem at `headers.<name>[i]`."""
    if isinstance(raw, list):
        if not raw:
            fields.issues.add(path, "expected at least one header value, found an empty list")
        values = (fields.parse_at(f"{path}[{i}]", v, header_value) for i, v in enumerate(raw))
        return tuple(dict.fromkeys(v for v in values if v is not None))
    value = fields.parse_at(path, raw, header_value)
    return (value,) if value is not None else ()


def header_value(value: object) -> str:
    if not isinstance(value, str):
        hint = f" (quote it: \"{value}\")" if _is_number(value) or isinstance(value, bool) else ""
        raise Invalid(f"expected a string or list of strings, found {describe(value)}{hint}")
    if not value:
        raise Invalid("header value must not be empty")
    if _BAD_HEADER_VALUE.search(value):
        raise Invalid(f"header value must not contain CR, LF or NUL, found {value!r}")
    return value
