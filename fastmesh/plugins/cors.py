"""cors: preflight requests answered at the gateway; CORS headers added to responses.

The config schema lives here; the per-request work is native (fastmesh/_core/cors.pyx).
"""
from __future__ import annotations

from fastmesh.config.schema import Invalid, boolean, integer, string, token
from fastmesh._core.cors import CorsFilter
from fastmesh.plugins import Field


def strings(value) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise Invalid("expected a list of strings")
    return tuple(string(v) for v in value)


def methods(value) -> tuple:
    return tuple(token(v, "method").upper() for v in strings(value))


class Cors(CorsFilter):
    name = "cors"
    priority = 2000
    schema = {
        "origins": Field(strings, ("*",)),
        "methods": Field(methods, ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS")),
        "headers": Field(strings, ()),
        "exposed_headers": Field(strings, ()),
        "credentials": Field(boolean, False),
        "max_age": Field(integer(0, None, "max_age"), None),
        "preflight_continue": Field(boolean, False),
    }

    @classmethod
    def check(cls, config):
        if config["credentials"] and "*" in config["origins"]:
            return [("credentials", "credentials: true cannot be used with origin '*' "
                                    "(browsers refuse it); list the allowed origins")]
        return []
