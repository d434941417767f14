"""Operations settings of the `gateway` section: the admin listener (`gateway.admin`),
the access log (`gateway.access_log`) and trace context (`gateway.tracing`).

    gateway:
      admin:
        listen: 127.0.0.1:8001   # default; `off` (or false) disables the admin API
        token: s3cret            # required when `listen` is not a loopback address

When a token is set every admin request must carry `Authorization: Bearer <token>`.
The admin listener is bound at start; a changed `listen` takes effect at the next start, a changed
token at once.
"""
from __future__ import annotations

import ipaddress

from fastmesh.config.model import AdminSettings, TracingSettings
from fastmesh.config.schema import (
    Fields, Invalid, boolean, describe, listen_address, split_host_port, string,
)

ADMIN_FIELDS = ("listen", "token")
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8001"


def admin_listen(value: object) -> str:
    """'host:port', or 'off' / false to disable the admin API (returned as 'off')."""
    if value is False or (isinstance(value, str) and value.lower() == "off"):
        return "off"
    if value is True:
        raise Invalid("expected 'host:port' or off, found bool true")
    return listen_address(value)


def admin_token(value: object) -> str:
    text = string(value)
    if len(text) < 8:
        raise Invalid(f"token must be at least 8 characters, found {len(text)}")
    if any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7e for c in text):
        raise Invalid("token must be printable ASCII without spaces")
    return text


def is_loopback(listen: str) -> bool:
    """True when a listen address ('host:port') binds only loopback ('localhost' counts)."""
    host, _ = split_host_port(listen)
    host = host[1:-1] if host.startswith("[") else host
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(listen: str | None, token: str | None) -> str | None:
    """Why this admin listener must not start (non-loopback without a token), else None."""
    if listen is None or listen == "off" or token or is_loopback(listen):
        return None
    return (f"the admin API on {listen} is reachable from other hosts: set gateway.admin.token "
            "(clients then send 'Authorization: Bearer <token>'), or bind it to 127.0.0.1")


def read_admin(gateway: Fields) -> AdminSettings:
    """`gateway.admin` -> AdminSettings; a non-loopback listen without a token is an issue."""
    raw = gateway.raw("admin")
    if raw is False or (isinstance(raw, str) and raw.lower() == "off"):
        return AdminSettings(listen="off")
    if raw is not None and not isinstance(raw, dict):
        gateway.issues.add(gateway.at("admin"), "expected a mapping (listen, token) or off, "
                                                f"found {describe(raw)}")
        return AdminSettings()
    fields = gateway.section("admin", ADMIN_FIELDS)
    settings = AdminSettings(listen=fields.value("listen", admin_listen),
                             token=fields.value("token", admin_token))
    problem = exposure_problem(settings.listen, settings.token)
    if problem:
        fields.issues.add(fields.at("listen"), problem)
    return settings


TRACING_FIELDS = ("enabled", "sample_rate")


def sample_rate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise Invalid(f"sample_rate must be a number from 0 to 1, found {describe(value)}")
    return float(value)


def read_tracing(gateway: Fields) -> TracingSettings:
    """`gateway.tracing`: true/false, or {enabled, sample_rate}.

        gateway:
          tracing: {enabled: true, sample_rate: 0.1}
    """
    raw = gateway.raw("tracing")
    if raw is None:
        return TracingSettings()
    if isinstance(raw, bool):
        return TracingSettings(enabled=raw)
    if not isinstance(raw, dict):
        gateway.issues.add(gateway.at("tracing"), "expected true/false or a mapping (enabled, "
                                                  f"sample_rate), found {describe(raw)}")
        return TracingSettings()
    fields = gateway.section("tracing", TRACING_FIELDS)
    return TracingSettings(enabled=fields.value("enabled", boolean, True),
                           sample_rate=fields.value("sample_rate", sample_rate, 1.0))


def access_log_target(value: object) -> str:
    """`off`/false (default), `-` or `stdout` for standard output, or a file path."""
    if value is False or (isinstance(value, str) and value.lower() == "off"):
        return "off"
    if value is True:
        return "-"
    text = string(value)
    if text in ("-", "stdout"):
        return "-"
    if not text.strip() or "\x00" in text:
        raise Invalid(f"expected off, '-' or a file path, found {text!r}")
    return text
