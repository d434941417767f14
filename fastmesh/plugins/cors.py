"""cors: preflight requests answered at the gateway; CORS headers added to responses."""
from __future__ import annotations

from fastmesh.config.schema import Invalid, boolean, integer, string, token
from fastmesh.plugins import Field, Plugin, Response


def strings(value) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise Invalid("expected a list of strings")
    return tuple(string(v) for v in value)


def methods(value) -> tuple:
    return tuple(token(v, "method").upper() for v in strings(value))


class Cors(Plugin):
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

    def setup(self, gateway_config) -> None:
        conf = self.config
        self.any_origin = "*" in conf["origins"]
        self.origins = {o.encode() for o in conf["origins"]}
        self.methods = ", ".join(conf["methods"]).encode()
        self.allow_headers = ", ".join(conf["headers"]).encode() if conf["headers"] else None
        self.expose = ", ".join(conf["exposed_headers"]).encode() if conf["exposed_headers"] else None

    def _allowed_origin(self, origin: bytes | None) -> bytes | None:
        if origin is None:
            return None
        if self.any_origin and not self.config["credentials"]:
            return b"*"
        return origin if (self.any_origin or origin in self.origins) else None

    def _common(self, origin: bytes) -> list:
        out = [(b"Access-Control-Allow-Origin", origin)]
        if origin != b"*":
            out.append((b"Vary", b"Origin"))
        if self.config["credentials"]:
            out.append((b"Access-Control-Allow-Credentials", b"true"))
        return out

    def access(self, request):
        if request.method != b"OPTIONS" or self.config["preflight_continue"]:
            return None
        wanted = request.get_header(b"access-control-request-method")
        if wanted is None:
            return None
        origin = self._allowed_origin(request.get_header(b"origin"))
        headers = []
        if origin is not None:
            headers = self._common(origin)
            headers.append((b"Access-Control-Allow-Methods", self.methods))
            allow = self.allow_headers or request.get_header(b"access-control-request-headers")
            if allow:
                headers.append((b"Access-Control-Allow-Headers", allow))
            if self.config["max_age"] is not None:
                headers.append((b"Access-Control-Max-Age", b"%d" % self.config["max_age"]))
        return Response(200, None, headers)

    def response(self, request, response):
        origin = self._allowed_origin(request.get_header(b"origin"))
        if origin is None:
            return
        for name, value in self._common(origin):
            response.set_header(name, value)
        if self.expose:
            response.set_header(b"Access-Control-Expose-Headers", self.expose)
