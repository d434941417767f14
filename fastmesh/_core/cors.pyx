# cython: language_level=3, boundscheck=False, wraparound=False
"""The cors plugin's data path (native): preflights answered at the gateway, CORS headers added.

Config parsing and validation stay in fastmesh/plugins/cors.py; this class holds the compiled
config as bytes and sets so a request costs a method compare and one or two header lookups.

The response headers for an allowed origin are one prepared block of lines (per configured
origin, made at setup; per echoed origin, cached and bounded). The access phase, while the
request's head is still readable in place, picks the block and leaves it as the Request's memo
for the response phase: nothing is copied from the request for it.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcmp

from libc.stdint cimport uint64_t

from fastmesh._core.plugin cimport NativePlugin, Request, ResponseHead, name_lens
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
    cdef uint64_t names_lens        # name_lens(names)
    cdef dict lines_for             # allowed origin -> the response header block (bounded)
    cdef tuple listed               # ((origin, block), ...) for configured origins, no '*'
    cdef bytes star_block           # the block for '*' (any origin, no credentials), or None

    def __init__(self, dict config):
        NativePlugin.__init__(self, config)
        self.native_access = True
        self.native_response = True
        self.response_headers = (b"origin",)
        self.response_memo = True
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
        self.names_lens = name_lens(self.names)
        self.lines_for = {}
        self.star_block = self._block(b"*") if self.any_origin and not self.credentials else None
        self.listed = tuple((o, self._block(o)) for o in sorted(self.origins) if o != b"*")

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

    cdef bytes _block(self, bytes origin):
        """The response header lines for an allowed `origin` (as sent back)."""
        cdef list lines = self._common(origin)
        if self.expose is not None:
            lines.append((b"Access-Control-Expose-Headers", self.expose))
        return b"".join(name + b": " + value + b"\r\n" for name, value in lines)

    cdef object _block_for(self, object origin):
        """The block for the request's Origin value (bytes or None), or None: not allowed."""
        allowed = self._allowed(origin)
        if allowed is None:
            return None
        block = self.lines_for.get(allowed)
        if block is None:
            block = self._block(allowed)
            if len(self.lines_for) < 1024:       # configured origins, or '*' echoed: bounded
                self.lines_for[allowed] = block
        return block

    cdef object _block_live(self, Request req):
        """_block_for, reading Origin in place: no objects made for a listed origin."""
        cdef int i
        cdef Py_ssize_t n
        cdef const char* v
        cdef tuple pair
        for i in range(req.h.nheaders - 1, -1, -1):
            if req.h.headers[i].name.len == 6 and span_ieq(req.b, req.h.headers[i].name, "origin", 6):
                break
        else:
            return None
        if self.star_block is not None:
            return self.star_block
        if self.any_origin:
            return self._block_for(req.header_c("origin", 6))
        n = req.h.headers[i].value.len
        v = req.b + req.h.headers[i].value.off
        for pair in self.listed:
            origin = <bytes>pair[0]
            if PyBytes_GET_SIZE(origin) == n and memcmp(PyBytes_AS_STRING(origin), v, n) == 0:
                return pair[1]
        return None

    cdef object access_c(self, Request req):
        # the memo for response_c (see the module docstring)
        req.memo_owner = self
        req.memo = self._block_live(req) if req.live else self._block_for(req.header_c("origin", 6))
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
        if req.memo_owner is self:
            block = req.memo
        else:
            block = self._block_for(req.header_c("origin", 6))
        if block is not None:
            resp.replace_block(self.names, self.names_lens, <bytes>block)
        return 0

    def access(self, Request request):
        """Python entry (tests, Python callers): the same as the native phase."""
        return self.access_c(request)

    def response(self, Request request, ResponseHead response):
        self.response_c(request, response)
