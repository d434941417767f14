# cython: language_level=3, boundscheck=False, wraparound=False
"""The cors plugin's data path (native): preflights answered at the gateway, CORS headers added.

Config parsing and validation stay in fastmesh/plugins/cors.py; this class holds the compiled
config as bytes and sets so a request costs a method compare and one or two header lookups.
"""
from cpython.bytes cimport PyBytes_GET_SIZE

from fastmesh._core.plugin cimport NativePlugin, Request, ResponseHead
from fastmesh._core.http1 cimport span_ieq

from fastmesh._core.plugin import Response


cdef class CorsFilter(NativePlugin):
    cdef bint any_origin
    cdef bint credentials
    cdef bint preflight_continue
    cdef frozenset origins
    cdef bytes methods
    cdef bytes allow_headers
    cdef bytes expose
    cdef bytes max_age
    cdef frozenset names            # lower-case names of the response headers cors sets
    cdef dict lines_for             # allowed origin -> the response header lines (bounded)

    def __init__(self, dict config):
        NativePlugin.__init__(self, config)
        self.native_access = True
        self.native_response = True
        self.response_headers = (b"origin",)
        self.any_origin = "*" in config["origins"]
        self.origins = frozenset(o.encode() for o in config["origins"])
        self.credentials = config["credentials"]
        self.preflight_continue = config["preflight_continue"]
        self.methods = ", ".join(config["methods"]).encode()
        self.allow_headers = ", ".join(config["headers"]).encode() if config["headers"] else None
        self.expose = ", ".join(config["exposed_headers"]).encode() if config["exposed_headers"] else None
        self.max_age = b"%d" % config["max_age"] if config["max_age"] is not None else None
        self.names = frozenset({b"access-control-allow-origin", b"vary",
                                b"access-control-allow-credentials", b"access-control-expose-headers"})
        self.lines_for = {}

    cdef object _allowed(self, object origin):
        if origin is None:
            return None
        if self.any_origin and not self.credentials:
            return b"*"
        return origin if (self.any_origin or origin in self.origins) else None

    cdef list _common(self, bytes origin):
        cdef list out = [(b"Access-Control-Allow-Origin", origin)]
        if origin != b"*":
            out.append((b"Vary", b"Origin"))
        if self.credentials:
            out.append((b"Access-Control-Allow-Credentials", b"true"))
        return out

    cdef object access_c(self, Request req):
        if self.preflight_continue or not req.live or req.h.method.len != 7 \
                or not span_ieq(req.b, req.h.method, "options", 7) \
                or not req.has_header_c("access-control-request-method", 29):
            return None
        origin = self._allowed(req.header_c("origin", 6))
        cdef list headers = []
        if origin is not None:
            headers = self._common(origin)
            headers.append((b"Access-Control-Allow-Methods", self.methods))
            allow = self.allow_headers or req.header_c("access-control-request-headers", 30)
            if allow:
                headers.append((b"Access-Control-Allow-Headers", allow))
            if self.max_age is not None:
                headers.append((b"Access-Control-Max-Age", self.max_age))
        return Response(200, None, headers)

    cdef int response_c(self, Request req, ResponseHead resp) except -1:
        origin = self._allowed(req.header_c("origin", 6))
        if origin is None:
            return 0
        lines = self.lines_for.get(origin)
        if lines is None:
            lines = self._common(origin)
            if self.expose is not None:
                lines.append((b"Access-Control-Expose-Headers", self.expose))
            lines = tuple(lines)
            if len(self.lines_for) < 1024:       # configured origins, or '*' echoed: bounded
                self.lines_for[origin] = lines
        resp.replace_c(self.names, lines)
        return 0

    def access(self, Request request):
        """Python entry (tests, Python callers): the same as the native phase."""
        return self.access_c(request)

    def response(self, Request request, ResponseHead response):
        self.response_c(request, response)
