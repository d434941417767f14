"""The validated configuration: plain frozen dataclasses.

The loader/validator (fastmesh.config.loader) produces these from YAML/JSON;
the plan compiler (fastmesh.plan) turns them into the data path's tables.
Durations are float seconds; sizes are int bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Request limits applied by every listener (issue 3 extends this)."""

    max_head_size: int = 32768          # whole request head -> 431
    max_line_size: int = 8192           # request line -> 414
    max_headers: int = 100              # header count -> 431
    max_body_size: int = 0              # 0 = unlimited -> 413
    header_timeout: float = 10.0        # time to receive a whole request head -> 408
    body_timeout: float = 60.0          # longest silence while a request body arrives -> 408
    keepalive_timeout: float = 60.0     # idle client keep-alive connection is closed
    send_timeout: float = 60.0          # a client that accepts no response bytes is cut off
    max_requests_per_connection: int = 10000   # then "Connection: close"; 0 = unlimited
    max_connections: int = 16384        # per worker; more are answered 503 and closed
    max_response_head_size: int = 65536 # upstream response head -> 502


@dataclass(frozen=True)
class UpstreamKeepalive:
    """Upstream connection pool settings, per target."""

    max_idle: int = 64                  # idle connections kept per target
    idle_timeout: float = 60.0          # an idle pooled connection older than this is closed


@dataclass(frozen=True)
class AdminSettings:
    """The admin API listener (parsed by fastmesh.config.operations)."""

    listen: str | None = None           # None: the default 127.0.0.1:8001; "off": disabled
    token: str | None = None            # when set: "Authorization: Bearer <token>" required


@dataclass(frozen=True)
class TracingSettings:
    enabled: bool = False               # take part in W3C trace context (traceparent)
    sample_rate: float = 1.0            # share of traces started here that are marked sampled


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:8000"
    server_timing: bool = False         # add Server-Timing to responses (services may override)
    limits: Limits = field(default_factory=Limits)
    upstream_keepalive: UpstreamKeepalive = field(default_factory=UpstreamKeepalive)
    admin: AdminSettings = field(default_factory=AdminSettings)
    access_log: str = "off"            # "off", "-" (stdout) or a file path: JSON lines
    request_id: bool = False           # X-Request-Id: reuse the client's or generate; returned
    tracing: TracingSettings = field(default_factory=TracingSettings)


@dataclass(frozen=True)
class Service:
    name: str
    protocol: str                       # "http" or "https"
    host: str
    port: int
    path: str                           # "" or "/base" (no trailing slash unless it is "/")
    connect_timeout: float = 60.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0
    retries: int = 5
    retry_on: tuple[str, ...] = ("connect-failure", "timeout", "reset")   # all but connect-failure: idempotent only
    per_try_timeout: float = 0.0        # read timeout of one attempt; 0 = read_timeout
    server_timing: bool | None = None   # None: use GatewaySettings.server_timing
    upstream: str | None = None         # set when `host` names an upstream: balanced over it
    # protocol "https" (fastmesh.upstream_tls): how the upstream's certificate is checked
    tls_verify: bool = True             # False only when written explicitly
    tls_ca: str | None = None           # CA bundle file; None: the system's CA bundle
    tls_server_name: str | None = None  # SNI and the name verified; None: `host`
    tls_client_cert: str | None = None  # present this certificate (PEM file; mesh mTLS) ...
    tls_client_key: str | None = None   # ... with this key
    tls_peer_identity: str | None = None  # a URI SAN the upstream must hold (spiffe://...)


@dataclass(frozen=True)
class Route:
    name: str
    service: str                        # name of a Service
    index: int                          # declaration order across the whole file
    hosts: tuple[str, ...] = ()         # lower-case; "*.example.com" wildcards
    paths: tuple[str, ...] = ()         # "/prefix", "=/exact", "~regex" (as written)
    methods: tuple[str, ...] = ()       # upper-case
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (lower-case name, allowed values)
    strip_path: bool = True
    preserve_host: bool = False
    priority: int = 0                   # regex paths: higher is tried first
    max_body_size: int | None = None    # overrides gateway.limits.max_body_size (0 = unlimited)
    protocols: tuple[str, ...] = ("http", "https")   # ("https",): plain HTTP is refused/redirected
    https_redirect_status_code: int = 426   # what plain HTTP gets on an https-only route


@dataclass(frozen=True)
class Config:
    source: str                         # file name, or "<embedded default>"
    services: tuple[Service, ...]
    routes: tuple[Route, ...]
    gateway: GatewaySettings
    version: str                        # short hash of the canonical config
    upstreams: tuple = ()               # fastmesh.config.upstreams.Upstream, declaration order
    plugins: tuple = ()                 # fastmesh.config.plugins.PluginEntry, declaration order
    consumers: tuple = ()               # fastmesh.config.plugins.Consumer
    listeners: tuple = ()               # fastmesh.config.tls.Listener (beyond gateway.listen)
    certificates: tuple = ()            # fastmesh.config.tls.Certificate
    streams: tuple = ()                 # fastmesh.config.streams.Stream (L4 proxying)


@dataclass(frozen=True)
class ConfigIssue:
    source: str                         # file name
    path: str                           # e.g. "services[0].routes[2].paths[1]" ("" = whole file)
    message: str                        # what is wrong, with expected vs found where useful

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """Every problem found in a config, all at once."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))
