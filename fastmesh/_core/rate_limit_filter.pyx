# cython: language_level=3, boundscheck=False, wraparound=False
"""The rate-limiting plugin's data path (native) for `policy: local`.

The counted key (scope prefix + kind tag + identity) is assembled in a stack buffer and checked
against the shared table (fastmesh/_core/ratelimit.pyx) without building Python objects; only an
admitted request that shows the client its quota stores one small tuple for the response phase.
`policy: redis` goes through the Python subclass (fastmesh/plugins/rate_limiting.py), which
waits on Redis; both record the same tuple, which response_c turns into headers.
"""
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromFormat

from fastmesh._core.plugin cimport NativePlugin, Request, ResponseHead
from fastmesh._core.ratelimit cimport Limiter, wall_ms

from fastmesh._core.plugin import Response

# limit_by kinds
cdef enum:
    BY_CONSUMER = 0
    BY_CREDENTIAL = 1
    BY_IP = 2
    BY_HEADER = 3
    BY_SERVICE = 4
    BY_ROUTE = 5

cdef dict BY_KIND = {"consumer": BY_CONSUMER, "credential": BY_CREDENTIAL, "ip": BY_IP,
                     "header": BY_HEADER, "service": BY_SERVICE, "route": BY_ROUTE}
cdef str CREDENTIAL_KEY = "fastmesh.credential"
cdef str CTX_KEY = "rate-limiting"
DEF KEY_MAX = 480


cdef inline int64_t _seconds(int64_t ms) noexcept nogil:
    """Whole seconds, rounded up, at least 1 (a client must not retry at once)."""
    cdef int64_t s = (ms + 999) // 1000
    return s if s > 1 else 1


# Small numbers (seconds to reset, most remaining counts) as ready-made bytes.
cdef tuple _SMALL = tuple(b"%d" % i for i in range(4096))


cdef inline bytes _num(long v):
    if 0 <= v < 4096:
        return <bytes>_SMALL[v]
    return PyBytes_FromFormat("%ld", v)


cdef class RateLimitFilter(NativePlugin):
    cdef Limiter limiter
    cdef bytes prefix               # b"<scope>|<limit_by>|"
    cdef int by
    cdef bytes header               # lower-case, limit_by header
    cdef bint hide
    cdef bint local                 # policy local: the whole access phase is native
    cdef bint single
    cdef tuple period_headers       # ((limit name, limit value, remaining name), ...)
    cdef int error_code
    cdef object error_body

    def __init__(self, dict config):
        NativePlugin.__init__(self, config)
        self.native_access = True
        self.native_response = not config["hide_client_headers"]

    def compile(self, Limiter limiter, bytes prefix, str limit_by, bytes header, bint hide,
                bint local, tuple period_headers, int error_code, error_message):
        self.limiter = limiter
        self.prefix = prefix
        self.by = BY_KIND[limit_by]
        self.header = header
        self.hide = hide
        self.local = local
        self.single = len(period_headers) == 1
        self.period_headers = period_headers
        self.error_code = error_code
        self.error_body = {"message": error_message}

    def identity(self, Request req):
        """The counted identity, tagged by kind so that no value can pose as another kind (a
        header value "ip:10.0.0.1" is not that client's IP); the IP when the kind is missing."""
        return self._identity(req)

    cdef bytes _identity(self, Request req):
        cdef object value
        if self.by == BY_CONSUMER:
            if req.consumer:
                return b"c:" + req.consumer.encode()
        elif self.by == BY_CREDENTIAL:
            value = req.ctx.get(CREDENTIAL_KEY) if req.ctx else None
            if value is not None:
                return b"k:" + (value.encode() if isinstance(value, str) else value)
        elif self.by == BY_HEADER:
            value = req.header_c(PyBytes_AS_STRING(self.header), PyBytes_GET_SIZE(self.header))
            if value is not None:
                return b"h:" + value
        elif self.by == BY_SERVICE:
            return b"s:" + (req.service or "").encode()
        elif self.by == BY_ROUTE:
            return b"r:" + (req.route or "").encode()
        return b"ip:" + req.client_ip

    cdef object access_c(self, Request req):
        cdef char key[KEY_MAX]
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(self.prefix)
        cdef Py_ssize_t n
        cdef bytes ident
        cdef Limiter lim = self.limiter
        if not self.local:
            return self.remote_access(req)
        if self.by == BY_IP:
            ident = req.client_ip          # the common case: no Python object made
            n = PyBytes_GET_SIZE(ident)
            if plen + 3 + n > KEY_MAX:
                return self._take_slow(req, self.prefix + b"ip:" + ident)
            memcpy(key, PyBytes_AS_STRING(self.prefix), plen)
            memcpy(key + plen, b"ip:", 3)
            memcpy(key + plen + 3, PyBytes_AS_STRING(ident), n)
            admitted = lim.check(key, plen + 3 + n, 1, wall_ms())
        else:
            return self._take_slow(req, self.prefix + self._identity(req))
        return self._verdict(req, admitted)

    def take_local(self, Request req, bytes key):
        """Count `key` in the local table: None (admitted, quota recorded) or the refusal."""
        return self._take_slow(req, key)

    cdef object _take_slow(self, Request req, bytes key):
        return self._verdict(req, self.limiter.check(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                                                     1, wall_ms()))

    cdef object _verdict(self, Request req, int admitted):
        cdef Limiter lim = self.limiter
        if not admitted:
            return self.refuse(lim.limit, lim.reset_ms, lim.retry_ms)
        if not self.hide:
            seen = (lim.limit, lim.remaining, lim.reset_ms,
                    (lim.remaining,) if self.single else
                    tuple([lim.remainings[i] for i in range(lim.n)]))
            if req.ctx is None:
                req.ctx = {CTX_KEY: seen}
            else:
                req.ctx[CTX_KEY] = seen
        return None

    def refuse(self, int64_t limit, int64_t reset_ms, int64_t retry_ms):
        """The answer to a refused request: error_code, Retry-After and (unless hidden) quota."""
        headers = [(b"Retry-After", b"%d" % _seconds(retry_ms))]
        if not self.hide:
            headers += [(b"RateLimit-Limit", b"%d" % limit), (b"RateLimit-Remaining", b"0"),
                        (b"RateLimit-Reset", b"%d" % _seconds(reset_ms))]
        return Response(self.error_code, self.error_body, headers)

    def remote_access(self, Request req):
        """`policy: redis`: provided by the Python subclass."""
        raise NotImplementedError

    cdef int response_c(self, Request req, ResponseHead resp) except -1:
        seen = req.ctx.get(CTX_KEY) if req.ctx else None
        if seen is None:
            return 0
        limit, remaining, reset_ms, per_period = seen
        cdef bytes left_bytes = _num(remaining)
        cdef list lines = [(b"RateLimit-Limit", _num(limit)),
                           (b"RateLimit-Remaining", left_bytes),
                           (b"RateLimit-Reset", _num(_seconds(reset_ms)))]
        for (limit_name, limit_value, remaining_name), left in zip(self.period_headers, per_period):
            lines.append((limit_name, limit_value))
            lines.append((remaining_name, left_bytes if left == remaining else _num(left)))
        if resp.add is None:
            resp.add = lines
        else:
            resp.add.extend(lines)
        return 0
