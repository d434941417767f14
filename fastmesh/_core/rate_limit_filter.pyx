# cython: language_level=3, boundscheck=False, wraparound=False
"""The rate-limiting plugin's data path (native) for `policy: local`.

The counted key (scope prefix + kind tag + identity) is assembled in a stack buffer and checked
against the shared table (fastmesh/_core/ratelimit.pyx) without building Python objects, for
every `limit_by` kind; an
admitted request that shows the client its quota records it in the Request's C fields
(`Request.quota`). `policy: redis` goes through the Python subclass
(fastmesh/plugins/rate_limiting.py), which waits on Redis and records the same through
`record_quota`. The response phase writes every quota header into one stack buffer from parts
made at setup (names, the constant limits) and hands the data path a single bytes block.
"""
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize

from cpython.tuple cimport PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

from fastmesh._core.http1 cimport span_ieq
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
DEF KEY_MAX = 480
DEF BLOCK_MAX = 1024            # the response header block: 3 lines + 2 per period (at most 4)


cdef inline int64_t _seconds(int64_t ms) noexcept nogil:
    """Whole seconds, rounded up, at least 1 (a client must not retry at once)."""
    cdef int64_t s = (ms + 999) // 1000
    return s if s > 1 else 1


cdef inline Py_ssize_t _put(char* out, Py_ssize_t at, bytes part) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(part)
    memcpy(out + at, PyBytes_AS_STRING(part), n)
    return at + n


cdef inline Py_ssize_t _put_int(char* out, Py_ssize_t at, int64_t v) noexcept:
    """Decimal digits of v (>= 0 here; a negative is written as 0)."""
    cdef char digits[20]
    cdef int n = 0
    if v <= 0:
        out[at] = 48
        return at + 1
    while v > 0:
        digits[n] = <char>(48 + v % 10)
        v //= 10
        n += 1
    while n > 0:
        n -= 1
        out[at] = digits[n]
        at += 1
    return at


cdef class RateLimitFilter(NativePlugin):
    cdef Limiter limiter
    cdef bytes prefix               # b"<scope>|<limit_by>|"
    cdef int by
    cdef bytes header               # lower-case, limit_by header
    cdef bint hide
    cdef bint local                 # policy local: the whole access phase is native
    cdef bint single
    cdef tuple period_headers       # ((limit name, limit value, remaining name), ...)
    cdef tuple period_parts         # per period: b"<limit name>: <limit>\r\n<remaining name>: "
    cdef int error_code
    cdef object error_body

    def __init__(self, dict config):
        NativePlugin.__init__(self, config)
        self.native_access = True
        self.native_response = not config["hide_client_headers"]
        self.holds_request = True       # until compile() says the policy is local

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
        self.period_parts = tuple(limit_name + b": " + limit_value + b"\r\n" + remaining_name + b": "
                                  for limit_name, limit_value, remaining_name in period_headers)
        if len(period_headers) > 4 or 3 * 60 + sum(
                PyBytes_GET_SIZE(part) + 24 for part in self.period_parts) > BLOCK_MAX:
            raise ValueError("rate-limiting: at most 4 periods")
        self.holds_request = not local  # redis: an awaitable holds the request
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
            value = req.credential_c()
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

    cdef Py_ssize_t _identity_c(self, Request req, char* out, Py_ssize_t room) except -2:
        """_identity written into `out` without making objects (the str values' UTF-8 is
        cached in them); its length, or -1 where only _identity can tell (or it does not fit)."""
        cdef const char* tag = "ip:"
        cdef Py_ssize_t tlen = 3
        cdef const char* v = NULL
        cdef Py_ssize_t n = 0
        cdef object value
        cdef int i
        if self.by == BY_CONSUMER:
            value = req.consumer
            if value:
                if type(value) is not str:
                    return -1
                v = PyUnicode_AsUTF8AndSize(value, &n)
                tag, tlen = "c:", 2
        elif self.by == BY_CREDENTIAL:
            value = req.credential_c()
            if value is not None:
                if type(value) is str:
                    v = PyUnicode_AsUTF8AndSize(value, &n)
                elif type(value) is bytes:
                    v, n = PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)
                else:
                    return -1
                tag, tlen = "k:", 2
        elif self.by == BY_HEADER:
            if not req.live:
                return -1
            n = PyBytes_GET_SIZE(self.header)
            for i in range(req.h.nheaders - 1, -1, -1):
                if req.h.headers[i].name.len == n \
                        and span_ieq(req.b, req.h.headers[i].name, PyBytes_AS_STRING(self.header), n):
                    v = req.b + req.h.headers[i].value.off
                    n = req.h.headers[i].value.len
                    tag, tlen = "h:", 2
                    break
        elif self.by == BY_SERVICE or self.by == BY_ROUTE:
            value = req.service if self.by == BY_SERVICE else req.route
            if value is None:
                value = ""
            elif type(value) is not str:
                return -1
            v = PyUnicode_AsUTF8AndSize(value, &n)
            tag, tlen = ("s:" if self.by == BY_SERVICE else "r:"), 2
        if v == NULL:
            v, n = PyBytes_AS_STRING(req.client_ip), PyBytes_GET_SIZE(req.client_ip)
            tag, tlen = "ip:", 3
        if tlen + n > room:
            return -1
        memcpy(out, tag, tlen)
        memcpy(out + tlen, v, n)
        return tlen + n

    cdef object access_c(self, Request req):
        cdef char key[KEY_MAX]
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(self.prefix)
        cdef Py_ssize_t n = -1
        if not self.local:
            return self.remote_access(req)
        if plen < KEY_MAX:
            n = self._identity_c(req, key + plen, KEY_MAX - plen)
        if n < 0:
            return self._take_slow(req, self.prefix + self._identity(req))
        memcpy(key, PyBytes_AS_STRING(self.prefix), plen)
        return self._verdict(req, self.limiter.check(key, plen + n, 1, wall_ms()))

    def take_local(self, Request req, bytes key):
        """Count `key` in the local table: None (admitted, quota recorded) or the refusal."""
        return self._take_slow(req, key)

    cdef object _take_slow(self, Request req, bytes key):
        return self._verdict(req, self.limiter.check(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                                                     1, wall_ms()))

    cdef object _verdict(self, Request req, int admitted):
        cdef Limiter lim = self.limiter
        cdef int i
        if not admitted:
            return self.refuse(lim.limit, lim.reset_ms, lim.retry_ms)
        if not self.hide:
            req.quota.limit = lim.limit
            req.quota.remaining = lim.remaining
            req.quota.reset_ms = lim.reset_ms
            if self.single:
                req.quota.remainings[0] = lim.remaining
            else:
                for i in range(lim.n):
                    req.quota.remainings[i] = lim.remainings[i]
            req.quota.n = lim.n
        return None

    def record_quota(self, Request req, int64_t limit, int64_t remaining, int64_t reset_ms,
                     per_period):
        """An admitted request's quota for the response headers (the Redis policy's verdict):
        the most restrictive period's limit/remaining/reset and every period's remaining."""
        cdef int i = 0
        if self.hide:
            return
        for left in per_period:
            if i == 4:
                break
            req.quota.remainings[i] = left
            i += 1
        req.quota.limit = limit
        req.quota.remaining = remaining
        req.quota.reset_ms = reset_ms
        req.quota.n = i

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
        cdef char out[BLOCK_MAX]
        cdef Py_ssize_t at = 0
        cdef int i, n = req.quota.n
        cdef int64_t left
        if n == 0:
            return 0
        if n > PyTuple_GET_SIZE(self.period_parts):
            n = PyTuple_GET_SIZE(self.period_parts)
        memcpy(out, b"RateLimit-Limit: ", 17)
        at = _put_int(out, 17, req.quota.limit)
        memcpy(out + at, b"\r\nRateLimit-Remaining: ", 23)
        at = _put_int(out, at + 23, req.quota.remaining)
        memcpy(out + at, b"\r\nRateLimit-Reset: ", 19)
        at = _put_int(out, at + 19, _seconds(req.quota.reset_ms))
        out[at] = 13
        out[at + 1] = 10
        at += 2
        for i in range(n):
            at = _put(out, at, <bytes>self.period_parts[i])
            left = req.quota.remainings[i]
            at = _put_int(out, at, left)
            out[at] = 13
            out[at + 1] = 10
            at += 2
        resp.add_block(PyBytes_FromStringAndSize(out, at))
        return 0
