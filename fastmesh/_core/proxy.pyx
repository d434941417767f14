# cython: language_level=3, boundscheck=False, wraparound=False
"""The data path: client (downstream) and upstream connection state machines.

One request, start to end (DESIGN.md §3):
  data_received -> parse_request_head (one pass, offsets) -> Router.match_c
  -> build the upstream head in one C buffer (hop-by-hop removed, X-Forwarded-*
  and Via added, path rewritten) -> pooled upstream connection (or connect)
  -> parse_response_head -> build the client head -> relay the body as slices
  -> record histograms -> the upstream goes back to the pool if its framing
  ended cleanly.

Bodies stream with backpressure in both directions: when one side's write
buffer is over its high-water mark, reading from the other side pauses.
Timeouts are deadlines on the connection checked by one periodic sweep per
worker (no timer object per request).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memchr, memcpy, memset

from fastmesh._core.http1 cimport (
    Head, Header, Span, Chunked, Limits, limits_default, MAX_HEADERS, parse_request_head, parse_response_head,
    chunked_feed, span_ieq,
    PARSE_INCOMPLETE, ERR_BAD_REQUEST, ERR_URI_TOO_LONG, ERR_HEADERS_TOO_LARGE, ERR_VERSION,
    ERR_NOT_IMPLEMENTED, ERR_BAD_RESPONSE, ERR_BAD_CHUNK,
    H_HOST, H_X_FORWARDED_FOR, H_X_FORWARDED_PROTO, H_X_FORWARDED_HOST, H_X_FORWARDED_PORT,
    H_VIA, H_UPGRADE, H_TRANSFER_ENCODING,
    BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_UNTIL_CLOSE,
)
from fastmesh._core.buffer cimport (
    Buf, buf_add, buf_add_bytes, buf_add_int, buf_consume, buf_take, buf_free, buf_reserve,
)
from fastmesh._core.router cimport Router
from fastmesh._core.histogram cimport Histogram
from fastmesh._core.pool cimport Pool, PooledConnection
from fastmesh._core.balancer cimport (
    Balancer, Target, OUTCOME_RESPONSE, OUTCOME_CONNECT_FAIL, OUTCOME_TIMEOUT, OUTCOME_RESET,
    OUTCOME_ABORTED,
)
from fastmesh._core.includes.clock cimport now_ns, clock_gettime, timespec
from fastmesh._core.balancer import request_hash_key
from fastmesh._core.plugin cimport Chain, HeaderEdits, Pending, Request, ResponseHead
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF

cdef extern from "<time.h>" nogil:
    enum: CLOCK_MONOTONIC_COARSE
from cpython.bytes cimport PyBytes_CheckExact
from fastmesh._core.sockwrite cimport send_or_write, socket_fd

cdef extern from "Python.h":
    # the set iteration CPython's own set code uses (borrowed references, no iterator object)
    int _PySet_NextEntry(object s, Py_ssize_t* pos, PyObject** key, Py_hash_t* hash)
from fastmesh._core.plugin import (
    REASONS, REROUTE, Response, answer_payload as plugin_answer_payload, internal_error,
    plugin_failed,
)

import asyncio

import os
import socket
import time

from fastmesh.jsonbytes import dumps as json_dumps


# Downstream states
cdef enum:
    D_HEAD = 0       # waiting for (more of) a request head
    D_BODY = 1       # head forwarded, request body still arriving
    D_WAIT = 2       # request complete, waiting for the response to end
    D_TUNNEL = 3     # after 101 Switching Protocols: raw bytes both ways
    D_CLOSED = 4
    D_PLUGIN = 5     # an access phase is waiting (e.g. on Redis): the request is held
    D_BUFFER = 6     # a plugin reads bodies: the request body is collected before access
    D_DRAIN = 7      # a response ended with the client's write buffer full: the next request
                     # waits until it drains (else a client that never reads grows it unbounded)

# Reasons reading from the client is paused (bit set)
cdef enum:
    P_PIPELINE = 1   # the next request is buffered until the current response ends
    P_UPSTREAM = 2   # the upstream's write buffer is full
    P_CONNECT = 4    # the upstream connection is not established yet
    P_PLUGIN = 8     # an access phase is waiting; nothing more is read until it answers

# Results of the access phases
cdef enum:
    ACCESS_GO_ON = 0
    ACCESS_ANSWERED = 1
    ACCESS_HELD = 2      # an awaitable: the request waits in D_PLUGIN
    ACCESS_REROUTED = 3  # routed again (REROUTE): self.rerouted_n bytes were used

# How long an access phase may wait (its awaitable) before the request gets a 504.
cdef double PLUGIN_WAIT_MAX = 10.0

# Deadline kinds
cdef enum:
    K_NONE = 0
    K_HEADER = 1     # whole request head must arrive in time (slowloris)
    K_IDLE = 2       # keep-alive idle
    K_CONNECT = 3    # upstream connect
    K_READ = 4       # upstream response progress
    K_WRITE = 5      # upstream accepting the request body
    K_BODY = 6       # client sending the request body
    K_SEND = 7       # client accepting response bytes (its write buffer is full)

# Why a request may be resent (RouteTarget.retry_mask holds the configured ones)
cdef enum:
    RETRY_CONNECT = 1    # connection failed: nothing was sent, always safe
    RETRY_TIMEOUT = 2    # no response head in time (idempotent methods only)
    RETRY_5XX = 4        # 502/503/504 head (idempotent methods only; not relayed)
    RETRY_RESET = 8      # connection closed/reset before a response head (idempotent only)

cdef double RETRY_BACKOFF_BASE = 0.025
cdef double RETRY_BACKOFF_MAX = 0.25
cdef double RETRY_BUDGET_RATIO = 0.2
cdef double RETRY_BUDGET_BURST = 10.0

# Upstream states
cdef enum:
    U_CONNECTING = 0
    U_IDLE = 1       # in the pool
    U_HEAD = 2       # request sent (or being sent), response head expected
    U_BODY = 3
    U_TUNNEL = 4
    U_CLOSED = 5

cdef Py_ssize_t INLINE_BODY_MAX = 65536   # body bytes copied into the head's write; more are sent as slices
cdef Py_ssize_t PIPELINE_MAX = 65536      # pipelined input buffered before reading pauses
cdef double SWEEP_INTERVAL = 0.1

cdef bytes VIA_TOKEN = b"fastmesh"

# The head of the upstream response being read: one for the process, not one per upstream
# connection (2.6 KB each, MAX_HEADERS headers). A response head is parsed, written to the client
# and done with inside one UpstreamProtocol._parse_head call; nothing keeps a pointer into it
# after (the plugins' ResponseHead view is detached when its phase returns), and no other
# connection's callback can run in between.
cdef Head RESP_HEAD

# fastmesh._core.tls_transport, imported by the first HTTPS upstream connect: a gateway or
# sidecar without one never loads it (~0.3 MiB of RSS).
cdef object _tls_transport = None


cdef object tls_transport():
    global _tls_transport
    if _tls_transport is None:
        import fastmesh._core.tls_transport as module
        _tls_transport = module
    return _tls_transport


_PARSE_ERRORS = {
    ERR_BAD_REQUEST: (400, "malformed request"),
    ERR_URI_TOO_LONG: (414, "request line too long"),
    ERR_HEADERS_TOO_LARGE: (431, "request header block too large"),
    ERR_VERSION: (505, "HTTP version not supported"),
    ERR_NOT_IMPLEMENTED: (501, "transfer-coding not implemented"),
    ERR_BAD_CHUNK: (400, "malformed chunked body"),
}


cdef bint _idempotent(const char* m, Py_ssize_t n) noexcept:
    """RFC 9110 §9.2.2 idempotent methods (safe to resend)."""
    if n == 3:
        return (m[0] == 71 and m[1] == 69 and m[2] == 84) or (m[0] == 80 and m[1] == 85 and m[2] == 84)
    if n == 4:
        return m[0] == 72 and m[1] == 69 and m[2] == 65 and m[3] == 68
    if n == 6:
        return m[0] == 68 and m[1] == 69 and m[2] == 76 and m[3] == 69 and m[4] == 84 and m[5] == 69
    if n == 7:
        return m[0] == 79 and m[1] == 80 and m[2] == 84 and m[3] == 73 and m[4] == 79 \
            and m[5] == 78 and m[6] == 83
    if n == 5:
        return m[0] == 84 and m[1] == 82 and m[2] == 65 and m[3] == 67 and m[4] == 69
    return False


cdef inline double mono() noexcept nogil:
    """Seconds for deadlines and pool idle times. The coarse clock (the kernel's last tick, a
    few ms) is plenty for them and costs a fraction of a precise read, which the histograms
    keep (now_ns): a request sets or moves a deadline several times."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


class PeerRejected(ConnectionError):
    """A TLS upstream's verified certificate is not the identity the route expects."""


cdef inline bint _named(const char* b, Header* hd, bytes lower) noexcept:
    """Whether header `hd` is named `lower` (lowercase; None names no header)."""
    return lower is not None and hd.name.len == PyBytes_GET_SIZE(lower) \
        and span_ieq(b, hd.name, PyBytes_AS_STRING(lower), hd.name.len)


cdef void _source(DownstreamProtocol c, const char* b, Head* h, const char** host,
                  Py_ssize_t* host_len):
    """The request's source service, where routing by source (Gateway.set_source) looks for
    a host: a verified identity decides whatever the header says; empty when there is none."""
    cdef Header* hd
    cdef int i
    host[0] = b""
    host_len[0] = 0
    if c.peer is not None:
        if c.peer_source is not None:
            host[0] = PyBytes_AS_STRING(c.peer_source)
            host_len[0] = PyBytes_GET_SIZE(c.peer_source)
        return
    for i in range(h.nheaders):
        hd = &h.headers[i]
        if _named(b, hd, c.gw.source_lower):
            host[0] = b + hd.value.off
            host_len[0] = hd.value.len
            return


cdef bytes _header_safe(object value):
    """`value` when it can go in a header value as it is (bytes, no CR/LF/NUL), else None."""
    if type(value) is not bytes or not value:
        return None
    if b"\r" in value or b"\n" in value or b"\0" in value:
        return None
    return <bytes>value


def error_response(int status, str message, bint close) -> bytes:
    """A complete JSON error response: {"message": ...}."""
    body = json_dumps({"message": message})
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, b'Error').decode()}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
    ).encode()
    return head + body


cdef inline uint64_t _next_random(uint64_t* s) noexcept nogil:
    """xorshift128+: fast, good enough for ids that must be unique, not secret."""
    cdef uint64_t x = s[0]
    cdef uint64_t y = s[1]
    s[0] = y
    x ^= x << 23
    s[1] = x ^ y ^ (x >> 17) ^ (y >> 26)
    return s[1] + y


cdef const char* HEX_DIGITS = "0123456789abcdef"


cdef inline void _hex64(char* out, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(15, -1, -1):
        out[i] = HEX_DIGITS[v & 15]
        v >>= 4


cdef inline bint _lower_hex(const char* p, int n, bint* nonzero) noexcept nogil:
    cdef int i
    cdef char c
    for i in range(n):
        c = p[i]
        if not ((c >= 48 and c <= 57) or (c >= 97 and c <= 102)):
            return False
        if c != 48:
            nonzero[0] = True
    return True


cdef bint _valid_traceparent(const char* v, Py_ssize_t n) noexcept nogil:
    """version-traceid-parentid-flags, lower-case hex, ids not all zero; versions other than
    00 may append fields after a '-' (W3C Trace Context §3.2)."""
    cdef bint nz_version = False, nz_trace = False, nz_parent = False, nz_flags = False
    if n < 55 or v[2] != 45 or v[35] != 45 or v[52] != 45:
        return False
    if not _lower_hex(v, 2, &nz_version) or (v[0] == 102 and v[1] == 102):
        return False                                   # version ff is invalid
    if v[0] == 48 and v[1] == 48 and n != 55:
        return False
    if n > 55 and v[55] != 45:
        return False
    return _lower_hex(v + 3, 32, &nz_trace) and nz_trace \
        and _lower_hex(v + 36, 16, &nz_parent) and nz_parent \
        and _lower_hex(v + 53, 2, &nz_flags)


cdef bint _named_in(const char* b, Span name, object names, uint64_t lens):
    """Is the header name at b[name] (any case) one of `names` (a set or frozenset of lower-case
    bytes, `lens` their HeaderEdits.drop_lens)? Most names fail the length test; the others walk
    the set's table in place: no iterator object per header."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* low
    cdef Py_hash_t hash_
    if not (lens >> (name.len if name.len < 63 else 63)) & 1:
        return False
    while _PySet_NextEntry(names, &pos, &low, &hash_):
        if PyBytes_GET_SIZE(<object>low) == name.len \
                and span_ieq(b, name, PyBytes_AS_STRING(<object>low), name.len):
            return True
    return False


cdef int add_edits(Buf* w, HeaderEdits e) except -1:
    """What plugins added to a head: the native blocks held apart, then the `add` list."""
    if e.nblocks:
        add_lit(w, e.block0)
        if e.nblocks > 1:
            add_lit(w, e.block1)
            if e.nblocks > 2:
                add_lit(w, e.block2)
    if e.add:
        add_lines(w, e.add)
    return 0


cdef int add_lines(Buf* w, list lines) except -1:
    """Header lines that plugins added: (name, value) pairs, or a native's block of lines."""
    for entry in lines:
        if type(entry) is bytes:
            add_lit(w, <bytes>entry)
            continue
        name, value = entry
        add_lit(w, name)
        buf_add(w, ": ", 2)
        add_lit(w, value)
        buf_add(w, "\r\n", 2)
    return 0


cdef inline int add_span(Buf* w, const char* b, Span s) except -1:
    return buf_add(w, b + s.off, s.len)


cdef inline int add_lit(Buf* w, bytes s) except -1:
    return buf_add(w, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef inline int add_header(Buf* w, const char* b, Header* hd) except -1:
    """Copy one parsed header as a normalized 'Name: value' line."""
    add_span(w, b, hd.name)
    buf_add(w, ": ", 2)
    add_span(w, b, hd.value)
    return buf_add(w, "\r\n", 2)


cdef int add_values_of(Buf* w, const char* b, Head* h, int kind) except -1:
    """Every value of headers of one kind (X-Forwarded-For, Via), each followed by ', '."""
    cdef int i
    for i in range(h.nheaders):
        if h.headers[i].kind == kind and h.headers[i].value.len:
            add_span(w, b, h.headers[i].value)
            buf_add(w, ", ", 2)
    return 0


cdef int add_ms(Buf* w, int64_t ns) except -1:
    """Milliseconds with microsecond precision, e.g. 0.042."""
    if ns < 0:
        ns = 0
    cdef int64_t us = ns // 1000
    buf_add_int(w, us // 1000)
    buf_add(w, ".", 1)
    cdef int64_t frac = us % 1000
    cdef char d[3]
    d[0] = <char>(48 + frac // 100)
    d[1] = <char>(48 + (frac // 10) % 10)
    d[2] = <char>(48 + frac % 10)
    return buf_add(w, d, 3)


cdef inline int _send(int fd, bint* queued, object transport, object closing, object write,
                      object data) except -1:
    """Write `data` (a connection's next bytes): to its socket directly when it is bytes and
    the transport is open (sockwrite.send_or_write), else through transport.write."""
    if fd >= 0 and PyBytes_CheckExact(data) and not closing():
        return send_or_write(fd, queued, transport, write, PyBytes_AS_STRING(data),
                             PyBytes_GET_SIZE(data), data)
    write(data)
    return 0


cdef class RouteTarget:
    def __init__(self, str name, str service, Pool pool, str upstream_host, int upstream_port,
                 str base_path, bint strip_path, bint preserve_host, bint server_timing,
                 double connect_timeout, double read_timeout, double write_timeout,
                 long long max_body_size, Balancer balancer=None, str hash_on=None,
                 str hash_name=None, int retries=0, retry_on=("connect-failure",),
                 double per_try_timeout=0.0, plugins=None, consumer_plugins=None,
                 int https_only=0, int https_port=443):
        if https_only not in (0, 301, 302, 307, 308, 426):
            raise ValueError(f"https_only must be 0, 301, 302, 307, 308 or 426, not {https_only}")
        self.https_only = https_only
        self.https_port_suffix = b"" if https_port == 443 else b":%d" % https_port
        self.name = name
        self.plugins = Chain(plugins or (), consumer_plugins) if plugins or consumer_plugins else None
        self.plugins_log = self.plugins is not None and self.plugins.has_log
        self.plugins_response = self.plugins is not None and self.plugins.has_response
        self.service = service
        self.pool = pool
        if ":" in upstream_host and not upstream_host.startswith("["):
            upstream_host = f"[{upstream_host}]"
        default_port = 443 if pool is not None and pool.ssl is not None else 80
        self.host_header = (upstream_host if upstream_port == default_port
                            else f"{upstream_host}:{upstream_port}").encode()
        self.upstream_label = f"{upstream_host}:{upstream_port}" if balancer is None else upstream_host
        self.balancer = balancer
        self.hash_on = hash_on
        self.hash_name = hash_name
        self.retries = retries
        self.retry_mask = RETRY_CONNECT | (RETRY_TIMEOUT if "timeout" in retry_on else 0) \
            | (RETRY_5XX if "5xx" in retry_on else 0) | (RETRY_RESET if "reset" in retry_on else 0)
        self.per_try_timeout = per_try_timeout if per_try_timeout > 0 else read_timeout
        self.retry_tokens = RETRY_BUDGET_BURST
        base = base_path.rstrip("/")
        self.base_path = base.encode()
        self.strip_path = strip_path
        self.preserve_host = preserve_host
        self.server_timing = server_timing
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_body_size = max_body_size
        self.h_upstream = Histogram()
        self.h_added = Histogram()

    def __dealloc__(self):
        cdef int i
        for i in range(6):
            Py_XDECREF(self.h_total_by_class[i])

    cdef Histogram _class_histogram(self, int cls):
        """The total-time histogram of status class `cls` (0-5), made on its first response:
        a route that only ever answers 2xx holds one, as it held one total histogram before
        they were split by class (the mesh's latency per (source, destination, status class))."""
        cdef Histogram hist
        if self.h_total_by_class[cls] == NULL:
            hist = Histogram()
            Py_INCREF(hist)
            self.h_total_by_class[cls] = <PyObject*>hist
            return hist
        return <Histogram>self.h_total_by_class[cls]

    def class_histogram(self, int cls):
        """_class_histogram from Python (cls 0-5)."""
        if not 0 <= cls <= 5:
            raise ValueError(f"status class {cls} is not 0-5")
        return self._class_histogram(cls)

    def totals_by_class(self):
        """Total time by response status class: {"2xx": Histogram, ...}, classes seen only."""
        return {f"{i}xx": <Histogram>self.h_total_by_class[i] for i in range(6)
                if self.h_total_by_class[i] != NULL}

    def counts(self):
        """Responses by status class: {"2xx": n, ...} ("0xx": no response sent)."""
        return {f"{i}xx": self.status_counts[i] for i in range(6) if self.status_counts[i]}


cdef class Gateway:
    def __init__(self, loop, plan, *, int max_head_size=32768, int max_line_size=8192,
                 int max_headers=100, double header_timeout=10.0, double body_timeout=60.0,
                 double keepalive_timeout=60.0, double send_timeout=60.0,
                 Py_ssize_t max_requests_per_connection=10000,
                 Py_ssize_t max_connections=16384, int max_response_head_size=65536):
        self.loop = loop
        limits_default(&self.limits)
        self.limits.max_head_size = max_head_size
        self.limits.max_line_size = max_line_size
        self.limits.max_headers = max_headers
        limits_default(&self.resp_limits)
        self.resp_limits.max_head_size = max_response_head_size
        self.resp_limits.max_line_size = min(8192, max_response_head_size)
        self.resp_limits.max_headers = MAX_HEADERS
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.keepalive_timeout = keepalive_timeout
        self.send_timeout = send_timeout
        self.max_requests_per_connection = max_requests_per_connection
        self.max_connections = max_connections
        self.log_records = []
        self.request_id_prefix = os.urandom(4).hex().encode()
        seed = os.urandom(16)
        self.rng[0] = int.from_bytes(seed[:8], "little") | 1
        self.rng[1] = int.from_bytes(seed[8:], "little")
        self.set_plan(plan)
        self.sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def set_plan(self, plan):
        """Swap the active Plan. Requests already routed finish on the Plan they started with."""
        self.router = <Router?>plan.router
        self.rewrite = getattr(plan, "rewrite", None)
        self.plan = plan

    def enable_access_log(self, bint enabled=True):
        """Collect one record per request; take them with take_log_records()."""
        self.log_enabled = enabled

    def enable_request_id(self, bint enabled=True):
        """X-Request-Id on every request: the client's if sent, else generated; returned too."""
        self.request_id_enabled = enabled

    def set_tracing(self, bint enabled, double sample_rate=1.0):
        """W3C trace context: continue a valid `traceparent` with our own span id, or start
        a trace (sampled with probability `sample_rate`) when it is absent or invalid."""
        self.trace_enabled = enabled
        if sample_rate >= 1.0:
            self.trace_threshold = 0xFFFFFFFFFFFFFFFF
        elif sample_rate <= 0.0:
            self.trace_threshold = 0
        else:
            self.trace_threshold = <uint64_t>(sample_rate * 18446744073709551615.0)

    def take_log_records(self):
        """Records since the last call (oldest first), as tuples:
        (time, client_ip, method, target, host, user_agent, status, route, service, upstream,
         total_ns, upstream_ns, bytes_in, bytes_out, request_id). Absent values are None."""
        records = self.log_records
        self.log_records = []
        return records

    def protocol_factory(self):
        return DownstreamProtocol(self)

    def set_peer_identity(self, header=None, identify=None):
        """Forward each TLS client's verified identity upstream in `header`.

        identify(transport) -> bytes or None runs once per TLS connection (after the handshake,
        so the certificate it reads is verified). With a header set, a client's own header of
        that name is always dropped: only the gateway vouches for an identity. None turns it off.
        """
        if header is not None and (not header or any(c in header for c in " :\r\n\0")):
            raise ValueError(f"invalid header name {header!r}")
        self.peer_header = header.encode() if header else None
        self.peer_header_lower = header.lower().encode() if header else None
        self.identify = identify if header else None

    def set_source(self, header=None, stamp=None, bint route=False, peer_prefix=None):
        """The mesh source service (the calling service) in request header `header`.

        A client's own copies of `header` are always dropped. `stamp` (the outbound side):
        every upstream request carries `header: stamp`. `route` (the inbound side): routes'
        `hosts` are matched against each request's source instead of its Host: the service of
        a TLS client's verified identity (what follows `peer_prefix`; none for an identity
        without that prefix), else the value of `header`; a request without a source takes
        the routes without hosts. None turns it off.
        """
        if header is not None and (not header or any(c in header for c in " :\r\n\0")):
            raise ValueError(f"invalid header name {header!r}")
        if stamp is not None and (not stamp or any(c in stamp for c in "\r\n\0")):
            raise ValueError(f"invalid header value {stamp!r}")
        self.source_lower = header.lower().encode() if header else None
        self.source_line = f"{header}: {stamp}\r\n".encode() if header and stamp else None
        self.route_by_source = bool(header) and route
        self.source_peer_prefix = peer_prefix.encode() if header and peer_prefix else None

    def _sweep(self):
        cdef double now = mono()
        cdef DownstreamProtocol c = self.conns
        cdef DownstreamProtocol nxt
        while c is not None:
            nxt = c.next
            if c.dkind != K_NONE and now >= c.deadline:
                c._on_timeout()
            c = nxt
        self.sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def close_idle_connections(self):
        """Close client connections that wait between requests (for shutdown)."""
        cdef DownstreamProtocol c = self.conns
        cdef DownstreamProtocol nxt
        self.draining = True
        while c is not None:
            nxt = c.next
            if c.state == D_HEAD and c.ibuf.len == 0 and c.transport is not None:
                c.transport.close()
            c = nxt

    def stop(self):
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None

    def stats(self):
        return {
            "connections": self.connections,
            "requests": self.requests,
            "local_responses": self.local_responses,
            "send_timeouts": self.send_timeouts,
            "status": {f"{i}xx": self.status_counts[i] for i in range(6) if self.status_counts[i]},
        }


cdef class DownstreamProtocol:
    """One client connection: parses requests, routes them, relays responses."""

    def __cinit__(self, Gateway gw):
        self.gw = gw
        self.fd = -1
        self.state = D_HEAD
        self.keep_alive = True

    def __dealloc__(self):
        buf_free(&self.ibuf)
        buf_free(&self.wbuf)

    def set_default_host(self, bytes host):
        """Route requests without a Host header (HTTP/1.0) as if they named `host`: for a
        connection redirected by interception, the address the client dialled."""
        self.default_host = host

    # -- asyncio protocol ----------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.write = transport.write
        self.fd = socket_fd(transport)
        self.closing = transport.is_closing if self.fd >= 0 else None
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.client_ip = (peer[0] if peer else "unknown").encode()
        self.local_port = (str(sock[1]) if sock and len(sock) > 1 else "").encode()
        gw = self.gw
        if transport.get_extra_info("sslcontext") is not None:
            self.tls = True
            if gw.identify is not None:
                self.peer = _header_safe(gw.identify(transport))
                if self.peer is not None and gw.source_peer_prefix is not None \
                        and self.peer.startswith(gw.source_peer_prefix):
                    self.peer_source = self.peer[PyBytes_GET_SIZE(gw.source_peer_prefix):]
        self.next = gw.conns
        if gw.conns is not None:
            gw.conns.prev = self
        gw.conns = self
        gw.connections += 1
        if gw.connections > gw.max_connections:
            # Refuse cleanly rather than queue: the client learns at once and can retry elsewhere.
            self.keep_alive = False
            self._local_response(503, "too many connections", True)
            return
        self._set_deadline(gw.header_timeout, K_HEADER)

    def connection_lost(self, exc):
        cdef Gateway gw = self.gw
        self.state = D_CLOSED
        self.dkind = K_NONE
        if self.prev is not None:
            self.prev.next = self.next
        elif gw.conns is self:
            gw.conns = self.next
        if self.next is not None:
            self.next.prev = self.prev
        self.prev = self.next = None
        gw.connections -= 1
        self._end_target(OUTCOME_ABORTED, 0)
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        if self.up is not None:
            if not self.resp_started and self.route is not None:
                self.resp_status = 0
                self._finish_request_metrics()
            self._detach_upstream(False)
        self.transport = None
        self.write = self.closing = None
        self.fd = -1

    cdef int _out(self, object data) except -1:
        return _send(self.fd, &self.queued, self.transport, self.closing, self.write, data)

    def data_received(self, data):
        self._feed(data, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    def eof_received(self):
        # A client that half-closes still gets the response in flight; then we close.
        self.close_after = True
        if self.state == D_HEAD and self.ibuf.len == 0:
            return False
        return True

    def pause_writing(self):
        # The client reads slower than the upstream sends: stop reading the upstream
        # (and do not blame the upstream for the silence that follows); the client gets
        # send_timeout to accept bytes again.
        self.write_paused = True
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()
            self.up_read_paused = True
        if self.dkind == K_READ or self.dkind == K_NONE and self.state != D_TUNNEL:
            self._arm_send_deadline()

    def resume_writing(self):
        self.write_paused = False
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()
            self.up_read_paused = False
        if self.state == D_DRAIN:
            self._next_request()
        elif self.dkind == K_SEND or self.dkind == K_NONE and self.state != D_TUNNEL:
            if self.up is not None:
                self._set_deadline(self.route.read_timeout, K_READ)
            else:
                self.dkind = K_NONE

    cdef void _arm_send_deadline(self):
        self.send_mark = self.transport.get_write_buffer_size() if self.transport is not None else 0
        self._set_deadline(self.gw.send_timeout, K_SEND)

    def header_values(self, bytes lower_name):
        """Values of a request header (router callback; only for routes with header rules)."""
        cdef list out = []
        cdef int i
        cdef Header* hd
        for i in range(self.head.nheaders):
            hd = &self.head.headers[i]
            if _named(self.cur, hd, lower_name):
                out.append(PyBytes_FromStringAndSize(self.cur + hd.value.off, hd.value.len))
        return out

    # -- input ---------------------------------------------------------------------------
    cdef int _feed(self, object data, const char* p, Py_ssize_t n) except -1:
        """Consume client bytes: request heads, request bodies, pipelined requests."""
        cdef Py_ssize_t off = 0
        cdef Py_ssize_t r, taken
        cdef object out
        while off < n and self.transport is not None:
            if self.state == D_BODY:
                taken = self._take_body(p + off, n - off)
                if taken < 0:
                    return 0
                if taken:
                    if data is not None and off == 0 and taken == n:
                        out = data
                    else:
                        out = PyBytes_FromStringAndSize(p + off, taken)
                    self._send_upstream(out)
                    off += taken
                continue
            if self.state == D_BUFFER:
                buf_add(&self.ibuf, p + off, n - off)
                return self._body_progress()
            if self.state == D_WAIT or self.state == D_PLUGIN or self.state == D_DRAIN:
                # The next pipelined request, before this response ended (or drained): hold it.
                buf_add(&self.ibuf, p + off, n - off)
                if self.ibuf.len > PIPELINE_MAX:
                    self._pause(P_PIPELINE)
                return 0
            if self.state == D_TUNNEL:
                if self.up is not None and self.up.transport is not None:
                    self.up._out(data if data is not None and off == 0
                                 else PyBytes_FromStringAndSize(p + off, n - off))
                return 0
            if self.state != D_HEAD:
                return 0
            if self.ibuf.len:
                buf_add(&self.ibuf, p + off, n - off)
                # A head ends with a newline: re-parse only when one arrived (or a limit
                # may have been passed), so a byte-at-a-time client costs O(n), not O(n^2).
                if memchr(p + off, 10, n - off) == NULL \
                        and self.ibuf.len <= self.gw.limits.max_head_size \
                        and not (self.ibuf.len - (n - off) <= self.gw.limits.max_line_size
                                 < self.ibuf.len):
                    return 0
                return self._process_buffered()
            # Common case: the whole head is in this read; parse it in place.
            self.t_start = now_ns()
            r = parse_request_head(p + off, n - off, &self.head, &self.gw.limits)
            if r == PARSE_INCOMPLETE:
                buf_add(&self.ibuf, p + off, n - off)
                if self.dkind == K_IDLE:
                    self._set_deadline(self.gw.header_timeout, K_HEADER)
                return 0
            self.cur = p + off
            if r < 0:
                return self._parse_error(r)
            off += self._on_head(p + off, r, n - off)
        return 0

    cdef int _parse_error(self, Py_ssize_t code) except -1:
        status, message = _PARSE_ERRORS.get(code, (400, "malformed request"))
        return self._local_response(status, message, True)

    cdef int _process_buffered(self) except -1:
        """Go on with buffered input (a head that came in pieces, pipelined requests)."""
        cdef Py_ssize_t r
        cdef object rest
        if self.state != D_HEAD or self.ibuf.len == 0 or self.transport is None:
            return 0
        r = parse_request_head(self.ibuf.data, self.ibuf.len, &self.head, &self.gw.limits)
        if r == PARSE_INCOMPLETE:
            if self.dkind == K_IDLE:
                self._set_deadline(self.gw.header_timeout, K_HEADER)
            return 0
        # Hand the bytes to _feed as one object so ibuf can collect what comes next.
        rest = PyBytes_FromStringAndSize(self.ibuf.data, self.ibuf.len)
        self.ibuf.len = 0
        return self._feed(rest, PyBytes_AS_STRING(rest), PyBytes_GET_SIZE(rest))

    cdef Py_ssize_t _on_head(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail) except -1:
        """A complete request head is at b[0:consumed], avail bytes at b.

        Returns how many bytes were used (head plus the body bytes sent along with it).
        """
        cdef Gateway gw = self.gw
        cdef Head* h = &self.head
        cdef const char* path = b + h.path.off
        cdef Py_ssize_t path_len = h.path.len
        cdef Request rw
        gw.requests += 1
        self.served += 1
        self.dkind = K_NONE
        self.http10 = h.version_minor == 0
        self.keep_alive = h.keep_alive and not self.close_after and not gw.draining \
            and (gw.max_requests_per_connection == 0 or self.served < gw.max_requests_per_connection)
        self.method_head = h.method_head
        self.wants_upgrade = h.upgrade
        self.expect_continue = h.expect_continue
        self.resp_started = False
        self.dechunk = False
        self.replayed = False
        self.replay = None
        self.resp_status = 0
        self.route = None
        self.req_bytes = consumed
        self.resp_bytes = 0
        self.request_id = None
        self.preq = None
        self.routed_path = None
        if gw.log_enabled:
            self.log_request = (
                time.time(),
                PyBytes_FromStringAndSize(b + h.method.off, h.method.len),
                PyBytes_FromStringAndSize(b + h.target.off, h.target.len),
                PyBytes_FromStringAndSize(b + h.headers[h.host_index].value.off,
                                          h.headers[h.host_index].value.len) if h.host_index >= 0 else None,
                self.header_values(b"user-agent"),
            )
        if gw.request_id_enabled:
            ids = self.header_values(b"x-request-id")
            if ids:
                self.request_id = ids[len(ids) - 1]
            else:
                gw.request_id_counter += 1
                self.request_id = gw.request_id_prefix + b"%016x" % gw.request_id_counter
        self.traced = False
        self.rerouted = False
        if gw.trace_enabled:
            self._trace_context(b, h)
        if h.method_connect:
            self._local_response(405, "CONNECT is not supported", True)
            return avail
        if gw.rewrite is not None:
            # Global plugins' rewrite phases: before routing, so a new path is routed.
            rw = Request.__new__(Request)
            rw.attach(b, h, self.client_ip, None, None)
            rw.peer = self.peer
            self.preq = rw
            answer = gw.rewrite.run_rewrite(rw)
            if answer is not None:
                self._plugin_answer(answer)
                return avail if h.body_kind != BODY_NONE else consumed
            if rw.routed_path is not None:
                self.routed_path = rw.routed_path
                path = PyBytes_AS_STRING(self.routed_path)
                path_len = PyBytes_GET_SIZE(self.routed_path)
        return self._route(b, consumed, avail, path, path_len)

    cdef Py_ssize_t _route(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail,
                           const char* path, Py_ssize_t path_len) except -1:
        """Route the parsed request, run the route's access phases, forward it; like _on_head."""
        cdef Gateway gw = self.gw
        cdef Head* h = &self.head
        cdef Py_ssize_t mlen = 0
        cdef const char* host
        cdef Py_ssize_t host_len
        cdef RouteTarget rt
        cdef int r
        if gw.route_by_source:
            _source(self, b, h, &host, &host_len)
        elif h.absolute_form:
            host = b + h.authority.off
            host_len = h.authority.len
        elif h.host_index >= 0:
            host = b + h.headers[h.host_index].value.off
            host_len = h.headers[h.host_index].value.len
        elif self.default_host is not None:   # no Host (HTTP/1.0): where the client connected
            host = PyBytes_AS_STRING(self.default_host)
            host_len = PyBytes_GET_SIZE(self.default_host)
        else:
            host = b""
            host_len = 0
        rt = <RouteTarget>gw.router.match_c(
            host, host_len, path, path_len, b + h.method.off, h.method.len, self, &mlen)
        if rt is None:
            self.preq = None
            # Without a route the body is not read: close when one was announced.
            if h.body_kind != BODY_NONE:
                self._local_response(404, "no route matched the request", True)
                return avail
            self._local_response(404, "no route matched the request", False)
            return consumed
        if rt.https_only and not self.tls:
            self.preq = None
            self._https_required(b, h, rt)
            return avail if h.body_kind != BODY_NONE else consumed
        if rt.max_body_size and h.content_length > rt.max_body_size:
            self._local_response(413, "request body too large", True)
            return avail
        self.route = rt
        self.body_limit = rt.max_body_size if rt.max_body_size else -1
        if rt.plugins is not None:
            if (<Chain>rt.plugins).body_max >= 0 and h.body_kind != BODY_NONE:
                return self._buffer_body(b, consumed, avail, mlen)
            r = self._plugin_access(b, h, consumed, avail, mlen)
            if r == ACCESS_ANSWERED:
                return avail if h.body_kind != BODY_NONE else consumed
            if r == ACCESS_HELD:
                return avail
            if r == ACCESS_REROUTED:
                return self.rerouted_n
        return self._forward(b, consumed, avail, mlen)

    cdef Py_ssize_t _forward(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail,
                             Py_ssize_t mlen) except -1:
        """Routed and admitted by the access phases: send the head and the body bytes at hand.

        b[0:consumed] is the head (parsed into self.head), avail bytes at b; returns how many
        were used, like _on_head.
        """
        cdef Gateway gw = self.gw
        cdef Head* h = &self.head
        cdef RouteTarget rt = self.route
        cdef Py_ssize_t taken
        cdef object out
        if self.preq is not None:
            if rt.plugins is not None:
                self.preq.detach((<Chain>rt.plugins).keep_request, (<Chain>rt.plugins).keep_names)
            else:
                self.preq.detach(False, None)
            if self.preq.body_limit >= 0 and (self.body_limit < 0 or self.preq.body_limit < self.body_limit):
                self.body_limit = self.preq.body_limit
            if self.body_limit >= 0 and h.content_length > self.body_limit:
                self._local_response(413, "request body too large", True)
                return avail
        self.target = None
        self.tries = 1
        self.hash_key = None
        self.idempotent = _idempotent(b + h.method.off, h.method.len)
        # Retry budget: each request earns 0.2 retries; the bank holds a burst of 10 plus one
        # per open client connection, so one failure event can retry every request in flight
        # while a lasting outage costs at most 20 % extra load.
        rt.retry_tokens = min(rt.retry_tokens + RETRY_BUDGET_RATIO,
                              RETRY_BUDGET_BURST + gw.connections)
        if rt.balancer is not None and not self._choose_target(b, h):
            return avail if h.body_kind != BODY_NONE else consumed
        self.req_body_kind = h.body_kind
        self.req_remaining = h.content_length if h.body_kind == BODY_LENGTH else 0
        self.req_body_seen = 0
        memset(&self.req_chunked, 0, sizeof(Chunked))
        self.req_done = h.body_kind == BODY_NONE
        self.state = D_WAIT if self.req_done else D_BODY
        self._build_request_head(b, mlen)
        # Body bytes that came with the head go out in the same write when small.
        taken = 0
        if not self.req_done and avail > consumed:
            taken = self._take_body(b + consumed, min(avail - consumed, INLINE_BODY_MAX))
            if taken < 0:
                return avail
            buf_add(&self.wbuf, b + consumed, taken)
        out = buf_take(&self.wbuf)
        if self.req_done:
            self.replay = out
        self._send_upstream(out)
        return consumed + taken

    cdef bint _choose_target(self, const char* b, Head* h) except -1:
        """Pick the balanced target for this request; answers 503 itself when there is none."""
        cdef RouteTarget rt = self.route
        cdef Balancer bal = rt.balancer
        cdef Target t
        cdef bytes key = b""
        cdef bint close = h.body_kind != BODY_NONE
        if not bal.admit():
            self._local_response(503, f"upstream '{rt.upstream_label}' is over its circuit breaker limits", close)
            return False
        if rt.hash_on is not None:
            key = request_hash_key(
                rt.hash_on, rt.hash_name, self.client_ip,
                PyBytes_FromStringAndSize(b + h.path.off, h.path.len),
                PyBytes_FromStringAndSize(b + h.query.off, h.query.len),
                [(b"cookie", v) for v in self.header_values(b"cookie")] if rt.hash_on == "cookie"
                else [(rt.hash_name.encode(), v) for v in self.header_values(rt.hash_name.lower().encode())]
                if rt.hash_on == "header" else ())
            self.hash_key = key
        t = bal.pick(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), None)
        if t is None:
            self._local_response(503, f"no healthy target in upstream '{rt.upstream_label}'", close)
            return False
        bal.begin(t)
        self.target = t
        self.tries = 1
        return True

    cdef bint _retry(self, Target failed, int why) except -1:
        """Resend the kept request after a failure, if the retry rules allow it.

        Never after a response byte reached the client, never a body that was streamed (only a
        request kept whole in `replay`), timeouts and 5xx only for idempotent methods, within
        the service's `retries` and the route's retry budget; to another target when one
        exists; after an exponential backoff with jitter.
        """
        cdef RouteTarget rt = self.route
        cdef Target t = None
        cdef bytes key = self.hash_key if self.hash_key is not None else b""
        cdef double delay
        if not self._may_retry(why):
            return False
        if rt.balancer is not None:
            t = rt.balancer.pick(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), failed)
            if t is None:
                return False
            rt.balancer.begin(t)
            self.target = t
        rt.retry_tokens -= 1.0
        rt.retried += 1
        self.tries += 1
        self.pending_out = self.replay
        self.dkind = K_NONE
        self._pause(P_CONNECT)
        delay = min(RETRY_BACKOFF_BASE * (1 << min(self.tries - 2, 10)), RETRY_BACKOFF_MAX)
        jitter = (_next_random(self.gw.rng) >> 11) * (1.0 / 9007199254740992.0)   # [0, 1)
        self.retry_timer = self.gw.loop.call_later(delay * (0.5 + 0.5 * jitter),
                                                   self._retry_now)
        return True

    cdef bint _may_retry(self, int why):
        """Whether the rules allow resending this request after a failure of kind `why`."""
        cdef RouteTarget rt = self.route
        if rt is None or self.replay is None or self.resp_started or self.tries > rt.retries \
                or self.transport is None:
            return False
        if why != RETRY_CONNECT and not (self.idempotent and rt.retry_mask & why):
            return False
        return rt.retry_tokens >= 1.0

    def _retry_now(self):
        self.retry_timer = None
        if self.transport is not None and self.pending_out is not None and self.up is None:
            self._connect()

    cdef void _end_target(self, int outcome, int status):
        """Tell the balancer how the request to its target ended (once per begin)."""
        cdef Target t = self.target
        if t is None:
            return
        self.target = None
        # A response: the latency to its head, which _parse_head just timed (t_up_first).
        self.route.balancer.end(t, ((self.t_up_first if outcome == OUTCOME_RESPONSE
                                     else now_ns()) - self.t_up_start) if self.t_up_start else 0,
                                outcome, status)

    cdef bint _connect_failed_retry(self) except -1:
        """Record a connect failure on the target; True when the request is being resent."""
        cdef Target failed = self.target
        self._end_target(OUTCOME_CONNECT_FAIL, 0)
        return self._retry(failed, RETRY_CONNECT)

    cdef Pool _pick_pool(self):
        return <Pool>self.target.pool if self.target is not None else self.route.pool

    cdef Py_ssize_t _take_body(self, const char* p, Py_ssize_t n) except -2:
        """How many of these bytes belong to the request body; -1 after a framing error."""
        cdef Py_ssize_t take
        cdef int ndata = 0
        if self.req_body_kind == BODY_LENGTH:
            take = n if n < self.req_remaining else <Py_ssize_t>self.req_remaining
            self.req_remaining -= take
            if self.req_remaining == 0:
                self._request_complete()
        elif self.req_body_kind == BODY_CHUNKED:
            take = chunked_feed(&self.req_chunked, p, n, NULL, 0, &ndata)
            if take < 0:
                self._abort_request(400, "malformed chunked request body")
                return -1
            if self.req_chunked.done:
                self._request_complete()
        else:
            return 0
        # Limits count body bytes, not the chunked framing around them.
        self.req_body_seen = self.req_chunked.data_total if self.req_body_kind == BODY_CHUNKED \
            else self.req_body_seen + take
        self.req_bytes += take
        if self.dkind == K_BODY:
            self.deadline = mono() + self.gw.body_timeout
        if self.body_limit >= 0 and self.req_body_seen > self.body_limit:
            self._abort_request(413, "request body too large")
            return -1
        return take

    cdef int _request_complete(self) except -1:
        self.req_done = True
        if self.state == D_BODY:
            self.state = D_WAIT
        if self.up is not None and self.up.transport is not None:
            self._await_progress()
        return 0

    cdef void _await_progress(self):
        """Set the deadline for whoever we are waiting on now.

        While the request body arrives: the client (body_timeout, 408) unless the upstream's
        write buffer is full (write_timeout, 504); after it: the upstream (read_timeout, 504).
        """
        if self.req_done:
            self._set_deadline(self.route.per_try_timeout, K_READ)
        elif self.paused & P_UPSTREAM:
            self._set_deadline(self.route.write_timeout, K_WRITE)
        else:
            self._set_deadline(self.gw.body_timeout, K_BODY)

    cdef int _abort_request(self, int status, str message) except -1:
        """The request body broke its framing or a limit midway: answer if we still can, close."""
        self.close_after = True
        self._end_target(OUTCOME_ABORTED, 0)
        if self.up is not None:
            self._detach_upstream(False)
        if not self.resp_started:
            self._local_response(status, message, True)
        elif self.transport is not None:
            self.transport.close()
        return 0

    cdef int _send_upstream(self, object out) except -1:
        cdef UpstreamProtocol up = self.up
        cdef Pool pool
        if up is None:
            pool = self._pick_pool()
            up = <UpstreamProtocol>pool.acquire()
            if up is None:
                self.pending_out = out
                self._connect()
                return 0
            up.attach(self, True)
            self.t_up_start = now_ns()
            self._await_progress()
        elif up.transport is None:
            # Still connecting: queue behind what is already waiting.
            self.pending_out = out if self.pending_out is None else self.pending_out + out
            return 0
        up._out(out)
        return 0

    def _connect(self):
        cdef RouteTarget rt = self.route
        cdef Pool pool = self._pick_pool()
        cdef UpstreamProtocol up
        cdef Balancer bal = rt.balancer
        if bal is not None and not bal.admit_connection():
            # Circuit breaker: no new upstream connection past max_connections; answer at once.
            self._end_target(OUTCOME_ABORTED, 0)
            self.pending_out = None
            self._fail(503, f"upstream '{rt.upstream_label}' is at its connection limit")
            return
        up = UpstreamProtocol()
        up.attach(self, False)
        if bal is not None:
            up.balancer = bal
            up.pending = True
            bal.pending_begin()
        pool.opened(up)
        self._pause(P_CONNECT)
        self._set_deadline(rt.connect_timeout, K_CONNECT)
        if pool.ssl is None:
            connecting = self.gw.loop.create_connection(lambda: up, pool.host, pool.port)
        else:
            connecting = tls_transport().connect(self.gw.loop, up, pool.host, pool.port, pool.ssl,
                                                 pool.server_hostname, rt.connect_timeout)
        task = self.gw.loop.create_task(connecting)
        up.connect_task = task
        task.add_done_callback(up._connect_done)

    def _upstream_ready(self, UpstreamProtocol up):
        """The upstream connection is up: send what waited for it."""
        cdef object out = self.pending_out
        self.pending_out = None
        self.t_up_start = now_ns()
        self._await_progress()
        if out is not None:
            up._out(out)
        self._resume(P_CONNECT)

    def _upstream_connect_failed(self, exc):
        self.up = None
        self.pending_out = None
        if self._connect_failed_retry():
            return
        if _tls_transport is not None and isinstance(exc, _tls_transport.HandshakeTimeout):
            self.close_after = True
            self._fail(504, "upstream TLS handshake timed out")
            return
        if isinstance(exc, ConnectionRefusedError):
            msg = "upstream refused the connection"
        elif isinstance(exc, socket.gaierror):
            msg = "upstream host could not be resolved"
        elif isinstance(exc, PeerRejected):
            msg = f"upstream identity rejected: {exc}"
        elif getattr(exc, "verify_message", None):      # ssl.SSLCertVerificationError
            msg = f"upstream certificate rejected: {exc.verify_message}"
        elif getattr(exc, "library", None) is not None:  # another ssl.SSLError
            msg = f"upstream TLS handshake failed: {exc.reason or exc.__class__.__name__}"
        else:
            msg = f"upstream connection failed: {exc.__class__.__name__}"
        self._fail(502, msg)

    # -- output --------------------------------------------------------------------------
    cdef int _build_request_head(self, const char* b, Py_ssize_t mlen) except -1:
        """The upstream request head, in one pass over the parsed headers."""
        cdef Buf* w = &self.wbuf
        cdef Head* h = &self.head
        cdef Gateway gw = self.gw
        cdef RouteTarget rt = self.route
        cdef Header* hd
        cdef int i
        cdef object drop = self.preq.drop if self.preq is not None else None
        cdef bytes new_path = self.preq.new_path if self.preq is not None else None
        cdef bytes new_query = self.preq.new_query if self.preq is not None else None
        w.len = 0
        add_span(w, b, h.method)
        buf_add(w, " ", 1)
        if new_path is not None:
            # a plugin chose the upstream path (request-transformer replace.uri): verbatim
            add_lit(w, new_path)
        else:
            self._add_upstream_path(w, b, mlen)
        if new_query is not None:
            if PyBytes_GET_SIZE(new_query):
                buf_add(w, "?", 1)
                add_lit(w, new_query)
        elif h.has_query:
            buf_add(w, "?", 1)
            add_span(w, b, h.query)
        buf_add(w, " HTTP/1.1\r\nHost: ", 17)
        if rt.preserve_host and h.absolute_form:
            add_span(w, b, h.authority)      # RFC 9112 §3.2.2: Host comes from the target
        elif rt.preserve_host and h.host_index >= 0:
            add_span(w, b, h.headers[h.host_index].value)
        else:
            add_lit(w, rt.host_header)
        buf_add(w, "\r\n", 2)
        # end-to-end headers as sent; X-Forwarded-* and Via are rewritten below
        for i in range(h.nheaders):
            hd = &h.headers[i]
            if hd.hop or hd.kind == H_HOST or hd.kind == H_X_FORWARDED_FOR \
                    or hd.kind == H_X_FORWARDED_PROTO or hd.kind == H_X_FORWARDED_HOST \
                    or hd.kind == H_X_FORWARDED_PORT or hd.kind == H_VIA:
                continue
            if self.request_id is not None and hd.name.len == 12 and span_ieq(b, hd.name, "x-request-id", 12):
                continue
            if drop is not None and _named_in(b, hd.name, drop, self.preq.drop_lens):
                continue
            if _named(b, hd, gw.peer_header_lower) or _named(b, hd, gw.source_lower):
                continue
            if self.traced and (hd.name.len == 11 and span_ieq(b, hd.name, "traceparent", 11)
                                or self.trace_drop_state and hd.name.len == 10
                                and span_ieq(b, hd.name, "tracestate", 10)):
                continue
            add_header(w, b, hd)
        if self.preq is not None:
            add_edits(w, self.preq)
        if self.traced:
            buf_add(w, "traceparent: ", 13)
            buf_add(w, self.traceparent, 55)
            buf_add(w, "\r\n", 2)
        buf_add(w, "X-Forwarded-For: ", 17)
        add_values_of(w, b, h, H_X_FORWARDED_FOR)
        add_lit(w, self.client_ip)
        if self.tls:
            buf_add(w, "\r\nX-Forwarded-Proto: https\r\n", 28)
        else:
            buf_add(w, "\r\nX-Forwarded-Proto: http\r\n", 27)
        if self.peer is not None and gw.peer_header is not None:
            add_lit(w, gw.peer_header)
            buf_add(w, ": ", 2)
            add_lit(w, self.peer)
            buf_add(w, "\r\n", 2)
        if gw.source_line is not None:
            add_lit(w, gw.source_line)
        if h.absolute_form:
            buf_add(w, "X-Forwarded-Host: ", 18)
            add_span(w, b, h.authority)
            buf_add(w, "\r\n", 2)
        elif h.host_index >= 0:
            buf_add(w, "X-Forwarded-Host: ", 18)
            add_span(w, b, h.headers[h.host_index].value)
            buf_add(w, "\r\n", 2)
        buf_add(w, "X-Forwarded-Port: ", 18)
        add_lit(w, self.local_port)
        buf_add(w, "\r\n", 2)
        if self.request_id is not None:
            self._add_request_id(w)
        buf_add(w, "Via: ", 5)
        add_values_of(w, b, h, H_VIA)
        buf_add(w, "1.0 fastmesh\r\n" if self.http10 else "1.1 fastmesh\r\n", 14)
        if h.body_kind == BODY_CHUNKED:
            buf_add(w, "Transfer-Encoding: chunked\r\n", 28)
        elif h.content_length >= 0:
            buf_add(w, "Content-Length: ", 16)
            buf_add_int(w, h.content_length)
            buf_add(w, "\r\n", 2)
        if h.upgrade and h.upgrade_index >= 0:
            buf_add(w, "Connection: upgrade\r\nUpgrade: ", 30)
            add_span(w, b, h.headers[h.upgrade_index].value)
            buf_add(w, "\r\n", 2)
        buf_add(w, "\r\n", 2)
        return 0

    cdef int _add_upstream_path(self, Buf* w, const char* b, Py_ssize_t mlen) except -1:
        """Service path + (route-stripped) request path, exactly one '/' between."""
        cdef Head* h = &self.head
        cdef RouteTarget rt = self.route
        cdef const char* path = b + h.path.off
        cdef Py_ssize_t plen = h.path.len
        cdef Py_ssize_t base_len = PyBytes_GET_SIZE(rt.base_path)
        if self.routed_path is not None:
            path = PyBytes_AS_STRING(self.routed_path)
            plen = PyBytes_GET_SIZE(self.routed_path)
        if rt.strip_path and mlen > 0:
            path += mlen
            plen -= mlen
        if base_len:
            buf_add(w, PyBytes_AS_STRING(rt.base_path), base_len)
            if plen and path[0] != 47:
                buf_add(w, "/", 1)
        elif plen == 0 or path[0] != 47:
            buf_add(w, "/", 1)
        return buf_add(w, path, plen)

    cdef int _write_response_head(self, UpstreamProtocol up, const char* b, Head* h) except -1:
        cdef Buf* w = &self.wbuf
        cdef Header* hd
        cdef int i
        cdef int64_t now
        cdef int status = h.status
        cdef bint closing
        cdef ResponseHead resp = None
        if self.preq is not None and self.route.plugins_response:
            resp = self._plugin_response(b, h)
        w.len = 0
        buf_add(w, "HTTP/1.1 ", 9)
        buf_add_int(w, status)
        buf_add(w, " ", 1)
        add_span(w, b, h.reason)
        buf_add(w, "\r\n", 2)
        for i in range(h.nheaders):
            hd = &h.headers[i]
            if hd.hop or hd.kind == H_VIA:
                continue
            if self.http10 and hd.kind == H_TRANSFER_ENCODING:
                continue       # RFC 9112 §6.1: never a Transfer-Encoding to an HTTP/1.0 client
            if resp is not None and resp.drop is not None and _named_in(b, hd.name, resp.drop, resp.drop_lens):
                continue
            add_header(w, b, hd)
        if resp is not None:
            add_edits(w, resp)
        buf_add(w, "Via: ", 5)
        add_values_of(w, b, h, H_VIA)
        buf_add(w, "1.0 fastmesh\r\n" if h.version_minor == 0 else "1.1 fastmesh\r\n", 14)
        if status == 101:
            buf_add(w, "Connection: upgrade\r\n", 21)
            if h.upgrade_index >= 0:
                buf_add(w, "Upgrade: ", 9)
                add_span(w, b, h.headers[h.upgrade_index].value)
                buf_add(w, "\r\n", 2)
            buf_add(w, "\r\n", 2)
            return 0
        closing = not self.keep_alive or self.close_after or not self.req_done
        if up.body_kind == BODY_CHUNKED:
            if self.http10:
                self.dechunk = True     # HTTP/1.0 has no chunked coding: decode, close-delimit
                closing = True
            elif not h.te_passthrough:
                buf_add(w, "Transfer-Encoding: chunked\r\n", 28)
        elif up.body_kind == BODY_LENGTH or (h.content_length >= 0 and status != 204 and status >= 200):
            buf_add(w, "Content-Length: ", 16)
            buf_add_int(w, h.content_length)
            buf_add(w, "\r\n", 2)
        elif up.body_kind == BODY_UNTIL_CLOSE:
            closing = True
        if self.request_id is not None:
            self._add_request_id(w)
        if self.route.server_timing:
            now = now_ns()
            buf_add(w, "Server-Timing: gateway;dur=", 27)
            add_ms(w, (now - self.t_start) - (self.t_up_first - self.t_up_start))
            buf_add(w, ", upstream;dur=", 15)
            add_ms(w, self.t_up_first - self.t_up_start)
            buf_add(w, "\r\n", 2)
        if closing:
            self.close_after = True
            buf_add(w, "Connection: close\r\n", 19)
        elif self.http10:
            buf_add(w, "Connection: keep-alive\r\n", 24)
        buf_add(w, "\r\n", 2)
        return 0

    cdef void _trace_context(self, const char* b, Head* h):
        """The traceparent to send upstream: the client's trace with our span, or a new trace.

        W3C Trace Context: exactly one valid `traceparent` is continued (same trace id and
        flags, the gateway's own span id as parent); an invalid or repeated one restarts the
        trace and its `tracestate` is dropped; none starts a trace, sampled by sample_rate.
        """
        cdef Gateway gw = self.gw
        cdef int i, found = -1, count = 0
        cdef Header* hd
        cdef const char* v
        cdef char* out = self.traceparent
        for i in range(h.nheaders):
            hd = &h.headers[i]
            if hd.name.len == 11 and span_ieq(b, hd.name, "traceparent", 11):
                found = i
                count += 1
        self.trace_drop_state = False
        if count == 1 and _valid_traceparent(b + h.headers[found].value.off, h.headers[found].value.len):
            v = b + h.headers[found].value.off
            memcpy(out, "00-", 3)
            memcpy(out + 3, v + 3, 32)                  # trace id
            out[35] = 45
            _hex64(out + 36, _next_random(gw.rng))      # our span id
            out[52] = 45
            out[53] = v[53]                             # flags, as the caller decided
            out[54] = v[54]
        else:
            self.trace_drop_state = count > 0
            memcpy(out, "00-", 3)
            _hex64(out + 3, _next_random(gw.rng))       # new trace id
            _hex64(out + 19, _next_random(gw.rng))
            out[35] = 45
            _hex64(out + 36, _next_random(gw.rng))
            out[52] = 45
            out[53] = 48
            out[54] = 49 if _next_random(gw.rng) < gw.trace_threshold or gw.trace_threshold == 0xFFFFFFFFFFFFFFFF else 48
        out[55] = 0
        self.traced = True

    cdef int _add_request_id(self, Buf* w) except -1:
        buf_add(w, "X-Request-Id: ", 14)
        add_lit(w, self.request_id)
        return buf_add(w, "\r\n", 2)

    cdef int _relay_body(self, object data, const char* p, Py_ssize_t off, Py_ssize_t n) except -1:
        """Send response body bytes p[off:off+n] (data is their bytes object, or None)."""
        if n <= 0 or self.transport is None:
            return 0
        self.resp_bytes += n
        if data is not None and off == 0 and n == PyBytes_GET_SIZE(data):
            self._out(data)
        else:
            self._out(PyBytes_FromStringAndSize(p + off, n))
        return 0

    # -- response lifecycle --------------------------------------------------------------
    cdef int _response_done(self, bint upstream_reusable) except -1:
        """The response ended: return the upstream, record timings, go on with the next request."""
        if not self.req_done:
            upstream_reusable = False
            self.close_after = True
        self._detach_upstream(upstream_reusable)
        self._finish_request_metrics()
        self.route = None
        self.replay = None
        if self.transport is None:
            return 0
        if self.close_after or not self.keep_alive:
            self.state = D_CLOSED
            self.transport.close()
            return 0
        return self._next_request()

    cdef bint _hold_for_client(self):
        """The client's write buffer is full: take no next request until it drains (D_DRAIN)."""
        if not self.write_paused:
            return False
        self.state = D_DRAIN
        self._arm_send_deadline()
        return True

    cdef int _next_request(self) except -1:
        """Between requests: wait for the next one, or go on with one already buffered (once
        the client has taken what it was sent)."""
        if self._hold_for_client():
            return 0
        self.state = D_HEAD
        self._set_deadline(self.gw.keepalive_timeout, K_IDLE)
        self._resume(P_PIPELINE)
        if self.ibuf.len:
            self._process_buffered()
        return 0

    cdef void _finish_request_metrics(self):
        cdef RouteTarget rt = self.route
        cdef int64_t end, total, upstream
        cdef int cls = self.resp_status // 100
        if cls < 0 or cls > 5:
            cls = 0
        self.gw.status_counts[cls] += 1
        if rt is None:
            if self.gw.log_enabled:
                self._log(self.resp_status)
            return
        if self.preq is not None:
            self._plugin_log()
        rt.status_counts[cls] += 1
        rt.bytes_in += self.req_bytes
        rt.bytes_out += self.resp_bytes
        if self.t_up_start == 0:
            if self.gw.log_enabled:
                self._log(self.resp_status)
            return
        end = now_ns()
        total = end - self.t_start
        upstream = end - self.t_up_start
        rt._class_histogram(cls).record(total)
        rt.h_upstream.record(upstream)
        rt.h_added.record(total - upstream)
        if self.gw.log_enabled:
            self._log(self.resp_status)
        self.t_up_start = 0

    cdef void _log(self, int status):
        """Append this request's access-log record (only when the access log is on)."""
        cdef RouteTarget rt = self.route
        cdef object req = self.log_request
        cdef int64_t end = now_ns()
        cdef object ua = None
        if req is None:
            req = (time.time(), None, None, None, None)
        self.log_request = None
        if req[4]:
            ua = req[4][len(req[4]) - 1]
        self.gw.log_records.append((
            req[0], self.client_ip, req[1], req[2], req[3], ua, status,
            rt.name if rt is not None else None,
            rt.service if rt is not None else None,
            rt.upstream_label if rt is not None and self.t_up_start else None,
            end - self.t_start,
            end - self.t_up_start if self.t_up_start else None,
            self.req_bytes, self.resp_bytes, self.request_id, self.peer,
        ))

    cdef void _detach_upstream(self, bint reusable):
        cdef UpstreamProtocol up = self.up
        cdef bint read_paused = self.up_read_paused
        if up is None:
            return
        self.up = None
        self.up_read_paused = False
        up.down = None
        if up.connect_task is not None and up.transport is None:
            up.connect_task.cancel()
        if reusable and up.state == U_IDLE:
            if read_paused and up.transport is not None:
                # The response ended in the same read that filled the client's buffer (its
                # pause_writing came mid-callback): a pooled connection must read again.
                up.transport.resume_reading()
            up.reusable = True
            up.pool.release(up, mono())
        else:
            up.reusable = False
            up.state = U_CLOSED
            up.pool.discard(up)

    cdef int _fail(self, int status, str message) except -1:
        """The upstream failed us: an error response if none started, else cut the client off."""
        self._end_target(OUTCOME_TIMEOUT if status == 504 else OUTCOME_RESET, 0)
        if self.up is not None:
            self._detach_upstream(False)
        self.pending_out = None
        if not self.resp_started and self.transport is not None:
            self.close_after = self.close_after or not self.req_done
            self.resp_status = status
            payload = error_response(status, message, self.close_after or not self.keep_alive)
            self.resp_bytes = len(payload)
            self._finish_request_metrics()
            self.gw.local_responses += 1
            self._out(payload)
            self.route = None
            self.resp_started = False
            if self.close_after or not self.keep_alive:
                self.state = D_CLOSED
                self.transport.close()
            else:
                self._resume(P_CONNECT)
                self._next_request()
        elif self.transport is not None:
            self.state = D_CLOSED
            self.transport.close()
        return 0

    # --- plugins (fastmesh.plugins): reached only when the route's chain is not None -------------

    cdef int _plugin_access(self, const char* b, Head* h, Py_ssize_t consumed, Py_ssize_t avail,
                            Py_ssize_t mlen) except -1:
        """Run the route's access phases: ACCESS_GO_ON, ACCESS_ANSWERED or ACCESS_HELD."""
        cdef RouteTarget rt = self.route
        cdef Request req = self.preq             # set when a rewrite phase ran
        if req is None:
            req = self.spare_req
            if req is not None and (<Chain>rt.plugins).reuse:
                self.spare_req = None
                req.reset()
            else:
                req = Request.__new__(Request)
        req.attach(b, h, self.client_ip, rt.name, rt.service)
        req.peer = self.peer
        req.default_host = self.default_host
        self.preq = req
        return self._access_result((<Chain>rt.plugins).run_access(req, 0), b, consumed, avail, mlen)

    cdef int _access_result(self, object answer, const char* b, Py_ssize_t consumed,
                            Py_ssize_t avail, Py_ssize_t mlen) except -1:
        if answer is None:
            return ACCESS_GO_ON
        if isinstance(answer, Pending):
            if self.held is None:
                self._hold(b, consumed, avail, mlen)
            self._wait_for_plugin(<Pending>answer)
            return ACCESS_HELD
        if answer is REROUTE:
            if not self.rerouted:
                self._reroute(b, consumed, avail)
                return ACCESS_REROUTED
            answer = Response(508, {"message": "the request was routed again more than once"})
        self._plugin_answer(answer)
        return ACCESS_ANSWERED

    cdef int _reroute(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail) except -1:
        """An access phase asked for the request to be routed again under the active Plan."""
        cdef Head* h = &self.head
        self.rerouted = True
        self.preq.detach(False, None)
        self.preq = None
        self.held = None                # a caller holding the old copy keeps `b` alive
        self.route = None
        self.state = D_HEAD
        self.body_limit = -1
        if self.routed_path is not None:
            self.rerouted_n = self._route(b, consumed, avail, PyBytes_AS_STRING(self.routed_path),
                                          PyBytes_GET_SIZE(self.routed_path))
        else:
            self.rerouted_n = self._route(b, consumed, avail, b + h.path.off, h.path.len)
        return 0

    cdef int _plugin_answer(self, object answer) except -1:
        """A plugin answers: like a local response (a request body is not read: close)."""
        cdef Gateway gw = self.gw
        cdef bint close = self.head.body_kind != BODY_NONE or not self.keep_alive or self.close_after
        cdef RouteTarget rt = self.route          # None: a rewrite phase answered before routing
        status, payload = plugin_answer_payload(answer, close, rt.name if rt is not None else None)
        if rt is not None:
            self.preq.detach((<Chain>rt.plugins).keep_request, (<Chain>rt.plugins).keep_names)
        else:
            self.preq.detach(False, None)
            self.preq = None
        gw.local_responses += 1
        self.resp_status = status
        self.resp_bytes = len(payload)
        self.t_up_start = 0
        self._finish_request_metrics()
        self.route = None
        if self.transport is not None:
            self._send_local(payload, close)
        return 0

    cdef int _hold(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail, Py_ssize_t mlen) except -1:
        """Keep this request's bytes while an access phase waits; read nothing more meanwhile.

        The head's spans are offsets, so they stay valid over the copy.
        """
        self.held = PyBytes_FromStringAndSize(b, avail)
        self.held_consumed = consumed
        self.held_mlen = mlen
        self.cur = PyBytes_AS_STRING(self.held)
        self.preq.attach(self.cur, &self.head, self.client_ip, self.route.name, self.route.service)
        self.state = D_PLUGIN
        self._pause(P_PLUGIN)
        return 0

    cdef void _wait_for_plugin(self, Pending pending):
        self.pending = pending
        try:
            waiter = asyncio.ensure_future(asyncio.wait_for(pending.awaitable, PLUGIN_WAIT_MAX))
        except Exception as err:
            waiter = self.gw.loop.create_future()
            waiter.set_exception(err)
        waiter.add_done_callback(self._plugin_done)

    def _plugin_done(self, waiter):
        """An access phase's awaitable finished: answer, wait again, or forward the request."""
        cdef Pending pending = self.pending
        cdef Py_ssize_t n, r
        cdef const char* b
        self.pending = None
        if self.transport is None or self.state != D_PLUGIN or pending is None:
            if not waiter.cancelled():
                waiter.exception()       # retrieved: no "exception never retrieved" noise
            return
        plugin = pending.chain.plugins[pending.index - 1]
        try:
            answer = waiter.result()
        except asyncio.TimeoutError:
            answer = Response(504, {"message": f"plugin '{pending.plugin_name}' did not answer in time"})
        except Exception:
            plugin_failed(plugin, "access", self.route.name)
            answer = internal_error(plugin)
        else:
            if answer is None:
                answer = pending.chain.run_access(self.preq, pending.index)
            elif not isinstance(answer, Response) and answer is not REROUTE:
                answer = internal_error(plugin)
        self._release(answer)

    cdef int _release(self, object answer) except -1:
        """The access phases of a held request ended with `answer`: answer, wait, or forward;
        then go on with what followed it (in the held bytes and what arrived meanwhile)."""
        cdef bytes held = self.held
        cdef const char* b = PyBytes_AS_STRING(held)
        cdef Py_ssize_t n, r
        r = self._access_result(answer, b, self.held_consumed, PyBytes_GET_SIZE(held), self.held_mlen)
        if r == ACCESS_HELD:
            return 0
        if r == ACCESS_REROUTED and (self.state == D_PLUGIN or self.state == D_BUFFER):
            return 0                    # the new route's plugins hold it in turn (a new copy)
        self.held = None
        if r == ACCESS_ANSWERED:
            n = PyBytes_GET_SIZE(held) if self.head.body_kind != BODY_NONE else self.held_consumed
        elif r == ACCESS_REROUTED:
            n = self.rerouted_n
        else:
            self.state = D_HEAD
            n = self._forward(b, self.held_consumed, PyBytes_GET_SIZE(held), self.held_mlen)
        # What followed this request (in the held read and what arrived while waiting) goes on.
        rest = held[n:]
        if self.ibuf.len:
            rest += PyBytes_FromStringAndSize(self.ibuf.data, self.ibuf.len)
            self.ibuf.len = 0
        self._resume(P_PLUGIN)
        if rest and self.transport is not None:
            self._feed(rest, PyBytes_AS_STRING(rest), PyBytes_GET_SIZE(rest))
        return 0

    cdef Py_ssize_t _buffer_body(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail,
                                 Py_ssize_t mlen) except -1:
        """A plugin of this route reads request bodies: collect the body, then run access.

        The bytes are held as they came (head and body, chunked or not), so once admitted the
        request is forwarded exactly as if it had arrived in one read.
        """
        cdef RouteTarget rt = self.route
        cdef Request req = self.preq if self.preq is not None else Request.__new__(Request)
        self.preq = req
        self.held = PyBytes_FromStringAndSize(b, avail)
        self.held_consumed = consumed
        self.held_mlen = mlen
        self.cur = PyBytes_AS_STRING(self.held)
        req.attach(self.cur, &self.head, self.client_ip, rt.name, rt.service)
        self.state = D_BUFFER
        if self.head.expect_continue:
            self._out(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._set_deadline(self.gw.body_timeout, K_BODY)
        self._body_progress()
        return avail

    cdef int _body_progress(self) except -1:
        """More of a buffered body arrived: when it is complete, run the access phases."""
        cdef Head* h = &self.head
        cdef Chain chain = <Chain>self.route.plugins
        cdef Py_ssize_t have, r
        cdef Chunked dec
        cdef Span spans[64]
        cdef int nspans, i
        cdef const char* p
        cdef list parts
        if self.ibuf.len:
            self.held += PyBytes_FromStringAndSize(self.ibuf.data, self.ibuf.len)
            self.ibuf.len = 0
        p = PyBytes_AS_STRING(self.held) + self.held_consumed
        have = PyBytes_GET_SIZE(self.held) - self.held_consumed
        if h.body_kind == BODY_LENGTH:
            if h.content_length > chain.body_max:
                return self._local_response(413, "request body too large for the route's plugins", True)
            if have < h.content_length:
                return 0
            body = PyBytes_FromStringAndSize(p, h.content_length)
        else:
            memset(&dec, 0, sizeof(Chunked))
            parts = []
            while have > 0 and not dec.done:
                r = chunked_feed(&dec, p, have, spans, 64, &nspans)
                if r < 0:
                    return self._local_response(400, "malformed chunked request body", True)
                for i in range(nspans):
                    parts.append(PyBytes_FromStringAndSize(p + spans[i].off, spans[i].len))
                if dec.data_total > chain.body_max:
                    return self._local_response(413, "request body too large for the route's plugins", True)
                if r == 0:
                    break
                p += r
                have -= r
            if not dec.done:
                return 0
            body = b"".join(parts)
        self.dkind = K_NONE
        self.preq.body = body
        self.cur = PyBytes_AS_STRING(self.held)
        self.preq.attach(self.cur, h, self.client_ip, self.route.name, self.route.service)
        self.state = D_PLUGIN
        self._pause(P_PLUGIN)
        return self._release(chain.run_access(self.preq, 0))

    cdef ResponseHead _plugin_response(self, const char* b, Head* h):
        """Run the response phases over the upstream head (read in place, no copies)."""
        cdef ResponseHead resp = self.spare_resp
        if resp is not None and self.preq.chain.reuse:
            resp.reset()
        else:
            resp = ResponseHead.__new__(ResponseHead)
            if self.preq.chain.reuse:
                self.spare_resp = resp           # used by the caller only: reused next time
        resp.b = b
        resp.h = h
        resp.live = True
        resp.status = h.status
        self.preq.chain.run_response(self.preq, resp)
        resp.live = False
        resp.b = NULL
        resp.h = NULL
        return resp

    cdef void _plugin_log(self):
        """Schedule the log phases after this response (loop.call_soon: off the client's path)."""
        cdef RouteTarget rt = self.route
        cdef Request req = self.preq
        cdef int64_t end
        self.preq = None
        if rt.plugins is not None and (<Chain>rt.plugins).reuse and self.gw.rewrite is None:
            self.spare_req = req                 # no Python code saw it: the next one reuses it
            return
        if not rt.plugins_log or req.chain is None or not req.chain.has_log:
            return
        end = now_ns()
        timings = {"total_ms": (end - self.t_start) / 1e6,
                   "upstream_ms": (end - self.t_up_start) / 1e6 if self.t_up_start else None}
        try:
            self.gw.loop.call_soon(req.chain.run_log, req, self.resp_status, timings)
        except Exception:
            pass

    cdef int _local_response(self, int status, str message, bint close) except -1:
        """Answer from the gateway itself (routing and parse errors)."""
        cdef Gateway gw = self.gw
        gw.local_responses += 1
        gw.status_counts[status // 100] += 1
        close = close or not self.keep_alive or self.close_after
        if self.transport is None:
            return 0
        payload = error_response(status, message, close)
        self.resp_bytes = len(payload)
        if gw.log_enabled:
            self._log(status)
        return self._send_local(payload, close)

    cdef int _https_required(self, const char* b, Head* h, RouteTarget rt) except -1:
        """A plain-HTTP request to an HTTPS-only route: 426, or a redirect to the https:// URL.

        The redirect keeps the host (its port replaced by the TLS listener's) and the target
        as sent; without a host to redirect to, the answer is 426. A body announced with the
        request is not read: the connection closes after the answer.
        """
        cdef Gateway gw = self.gw
        cdef int status = rt.https_only
        cdef bint close = h.body_kind != BODY_NONE or not self.keep_alive or self.close_after
        cdef bytes host = None
        cdef bytes location
        if h.absolute_form:
            host = PyBytes_FromStringAndSize(b + h.authority.off, h.authority.len)
        elif h.host_index >= 0:
            host = PyBytes_FromStringAndSize(b + h.headers[h.host_index].value.off,
                                             h.headers[h.host_index].value.len)
        if not host:
            status = 426
        gw.local_responses += 1
        gw.status_counts[status // 100] += 1
        if self.transport is None:
            return 0
        conn = b"close" if close else b"keep-alive"
        if status == 426:
            body = b'{"message":"this route requires HTTPS"}'
            extra = b"Upgrade: TLS/1.2, HTTP/1.1\r\nConnection: Upgrade, " + conn
        else:
            if host.startswith(b"["):
                host = host[:host.index(b"]") + 1]
            else:
                host = host.partition(b":")[0]
            location = b"https://" + host + rt.https_port_suffix \
                + PyBytes_FromStringAndSize(b + h.path.off, h.path.len)
            if h.has_query:
                location += b"?" + PyBytes_FromStringAndSize(b + h.query.off, h.query.len)
            body = json_dumps({"message": "this route requires HTTPS",
                               "location": location.decode("latin-1")})
            extra = b"Location: " + location + b"\r\nConnection: " + conn
        payload = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
            b"%s\r\n\r\n%s" % (status, REASONS.get(status, b"Error"), len(body), extra, body)
        self.resp_bytes = len(payload)
        if gw.log_enabled:
            self._log(status)
        return self._send_local(payload, close)

    cdef int _send_local(self, bytes payload, bint close) except -1:
        """Write an answer the gateway made itself, then close or wait for the next request."""
        self._out(payload)
        if close:
            self.state = D_CLOSED
            self.dkind = K_NONE
            self.transport.close()
        elif not self._hold_for_client():
            self.state = D_HEAD
            self._set_deadline(self.gw.keepalive_timeout, K_IDLE)
        return 0

    def _on_timeout(self):
        cdef int kind = self.dkind
        self.dkind = K_NONE
        if self.transport is None:
            return
        if kind == K_HEADER:
            if self.ibuf.len:
                self._local_response(408, "request head not received in time", True)
            else:
                self.transport.close()
        elif kind == K_IDLE:
            self.transport.close()
        elif kind == K_SEND:
            size = self.transport.get_write_buffer_size()
            if size < self.send_mark:           # it did take bytes: give it another period
                self.send_mark = size
                self._set_deadline(self.gw.send_timeout, K_SEND)
                return
            self.gw.send_timeouts += 1
            self.close_after = True
            if self.up is not None:
                self._end_target(OUTCOME_ABORTED, 0)
                self._detach_upstream(False)
            self.state = D_CLOSED
            self.transport.abort()
        elif kind == K_CONNECT:
            if self.up is not None:
                self._detach_upstream(False)
            if self._connect_failed_retry():
                return
            self.close_after = True
            self._fail(504, "upstream connect timed out")
        elif kind == K_READ:
            if not self.resp_started and self.route is not None:
                failed = self.target
                self._end_target(OUTCOME_TIMEOUT, 0)
                if self.up is not None:
                    self._detach_upstream(False)
                if self._retry(failed, RETRY_TIMEOUT):
                    return
            self.close_after = True
            self._fail(504, "upstream timed out")
        elif kind == K_WRITE:
            self.close_after = True
            self._fail(504, "upstream timed out receiving the request body")
        elif kind == K_BODY:
            self.close_after = True
            self._end_target(OUTCOME_ABORTED, 0)
            if self.up is not None:
                self._detach_upstream(False)
            if not self.resp_started:
                self._local_response(408, "request body not received in time", True)
            else:
                self.transport.close()

    cdef void _set_deadline(self, double seconds, int kind):
        if seconds <= 0:
            self.dkind = K_NONE
            return
        self.deadline = mono() + seconds
        self.dkind = kind

    cdef void _pause(self, int reason):
        if self.paused == 0 and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    cdef void _resume(self, int reason):
        if not (self.paused & reason):
            return
        self.paused &= ~reason
        if self.paused == 0 and self.transport is not None:
            self.transport.resume_reading()


cdef class UpstreamProtocol(PooledConnection):
    """One connection to an upstream target; bound to a client request while in use."""

    def __cinit__(self):
        self.fd = -1

    def __dealloc__(self):
        buf_free(&self.rbuf)

    cdef int _out(self, object data) except -1:
        return _send(self.fd, &self.queued, self.transport, self.closing, self.write, data)

    cdef void attach(self, DownstreamProtocol down, bint reused):
        self.down = down
        down.up = self
        self.was_reused = reused
        self.got_bytes = False
        self.state = U_HEAD if reused else U_CONNECTING
        self.rbuf.len = 0

    cdef void _connecting_over(self, bint connected):
        """Move this connection out of the breaker's pending count (and into connections)."""
        if self.pending:
            self.pending = False
            self.balancer.pending_end()
            if connected:
                self.counted = True
                self.balancer.conn_opened()

    def _connect_done(self, task):
        cdef DownstreamProtocol down = self.down
        self.connect_task = None
        if task.cancelled():
            self._connecting_over(False)
            return
        exc = task.exception()
        if exc is not None:
            self._connecting_over(False)
            self.closed = True
            self.state = U_CLOSED
            if down is not None:
                self.pool.discard(self)
                down._upstream_connect_failed(exc)
            return

    def connection_made(self, transport):
        cdef DownstreamProtocol down = self.down
        if down is not None and self.pool.peer_check is not None:
            reason = self.pool.peer_check(transport)
            if reason is not None:
                # The handshake verified the chain, but this is not the peer we meant to reach.
                self._connecting_over(False)
                self.closed = True
                self.state = U_CLOSED
                self.down = None
                transport.close()
                self.pool.discard(self)
                down._upstream_connect_failed(PeerRejected(reason))
                return
        self._connecting_over(True)
        self.transport = transport
        self.write = transport.write
        self.fd = socket_fd(transport)
        self.closing = transport.is_closing if self.fd >= 0 else None
        if down is None:
            # The client gave up while we were connecting.
            self.closed = True
            transport.close()
            return
        self.state = U_HEAD
        down._upstream_ready(self)

    def connection_lost(self, exc):
        cdef DownstreamProtocol down = self.down
        cdef int state = self.state
        self.closed = True
        self.transport = None
        self.write = self.closing = None
        self.fd = -1
        if self.counted:
            self.counted = False
            self.balancer.conn_closed()
        self.state = U_CLOSED
        if down is None:
            return
        if state == U_BODY and self.body_kind == BODY_UNTIL_CLOSE:
            down._response_done(False)
        elif state == U_TUNNEL:
            down._detach_upstream(False)
            if down.transport is not None:
                down.transport.close()
        elif state == U_HEAD and not self.got_bytes and self.was_reused \
                and down.replay is not None and not down.replayed:
            # A pooled connection the upstream had already closed: resend on a fresh one.
            down._detach_upstream(False)
            down.replayed = True
            down.pending_out = down.replay
            down._connect()
        elif state == U_HEAD:
            failed = down.target
            down._end_target(OUTCOME_RESET, 0)
            down._detach_upstream(False)
            if not down._retry(failed, RETRY_RESET):
                down._fail(502, "upstream closed the connection before responding")
        else:
            down._fail(502, "upstream closed the connection mid-response")

    def eof_received(self):
        return False

    def pause_writing(self):
        # The upstream reads the request body slower than the client sends it.
        cdef DownstreamProtocol down = self.down
        if down is not None:
            down._pause(P_UPSTREAM)
            if down.state == D_BODY:
                down._await_progress()

    def resume_writing(self):
        cdef DownstreamProtocol down = self.down
        if down is not None:
            down._resume(P_UPSTREAM)
            if down.state == D_BODY:
                down._await_progress()

    def data_received(self, data):
        cdef DownstreamProtocol down = self.down
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if self.state == U_TUNNEL:
            if down is not None and down.transport is not None:
                down._out(data)
            return
        if down is None or self.state == U_IDLE or down.transport is None or down.state == D_CLOSED:
            # Bytes from an idle connection: its framing cannot be trusted any more.
            self.reusable = False
            self.close()
            return
        self.got_bytes = True
        if down.dkind == K_READ:
            down.deadline = mono() + down.route.read_timeout
        if self.state == U_HEAD:
            self._parse_head(data, p, n)
        elif self.state == U_BODY:
            self._body(data, p, 0, n)

    cdef int _parse_head(self, object data, const char* p, Py_ssize_t n) except -1:
        cdef DownstreamProtocol down = self.down
        cdef const char* b
        cdef Py_ssize_t avail, r, off
        cdef object owner
        cdef Head* h = &RESP_HEAD
        if self.rbuf.len:
            buf_add(&self.rbuf, p, n)
            owner = PyBytes_FromStringAndSize(self.rbuf.data, self.rbuf.len)
            self.rbuf.len = 0
        else:
            owner = data
        b = PyBytes_AS_STRING(owner)
        avail = PyBytes_GET_SIZE(owner)
        off = 0
        while True:
            r = parse_response_head(b + off, avail - off, h, &down.gw.resp_limits, down.method_head)
            if r == PARSE_INCOMPLETE:
                buf_add(&self.rbuf, b + off, avail - off)
                return 0
            if r < 0:
                self.reusable = False
                down._fail(502, "upstream sent an invalid response")
                return 0
            if h.status >= 100 and h.status < 200 and h.status != 101:
                # Interim response: relay 100 Continue to a client that asked for it.
                if h.status == 100 and down.expect_continue and not down.resp_started:
                    down._out(b"HTTP/1.1 100 Continue\r\n\r\n")
                off += r
                if off >= avail:
                    return 0
                continue
            break
        down.t_up_first = now_ns()
        if 502 <= h.status <= 504 and down._may_retry(RETRY_5XX):
            failed = down.target
            status = h.status
            down._end_target(OUTCOME_RESPONSE, status)
            down._detach_upstream(False)     # its body is not read: never reuse it
            if not down._retry(failed, RETRY_5XX):
                down._fail(status, f"upstream answered {status}")
            return 0
        down._end_target(OUTCOME_RESPONSE, h.status)
        if h.status == 101 and not down.wants_upgrade:
            down._fail(502, "upstream switched protocols without an upgrade request")
            return 0
        self.body_kind = h.body_kind
        self.remaining = h.content_length if self.body_kind == BODY_LENGTH else 0
        if self.body_kind == BODY_LENGTH and self.remaining == 0:
            self.body_kind = BODY_NONE
        self.resp_keep_alive = h.keep_alive
        memset(&self.chunked, 0, sizeof(Chunked))
        down.resp_status = h.status
        # Shift the spans' base: they are relative to b + off.
        down._write_response_head(self, b + off, h)
        down.resp_started = True
        off += r
        if self.body_kind == BODY_LENGTH and self.remaining <= avail - off \
                and self.remaining <= INLINE_BODY_MAX:
            # The whole (small) body came with the head: one write, one syscall.
            buf_add(&down.wbuf, b + off, <Py_ssize_t>self.remaining)
            off += <Py_ssize_t>self.remaining
            self.remaining = 0
            down.resp_bytes += down.wbuf.len
            down._out(buf_take(&down.wbuf))
            if off < avail:
                self.resp_keep_alive = False   # the upstream sent more than it framed
            self.state = U_IDLE
            down._response_done(self.resp_keep_alive)
            return 0
        down.resp_bytes += down.wbuf.len
        down._out(buf_take(&down.wbuf))
        if h.status == 101:
            self.state = U_TUNNEL
            down.state = D_TUNNEL
            down.dkind = K_NONE
            down.req_done = True
            if off < avail:
                down._out(PyBytes_FromStringAndSize(b + off, avail - off))
            down._resume(P_PIPELINE | P_UPSTREAM | P_CONNECT)
            if down.ibuf.len:
                self._out(PyBytes_FromStringAndSize(down.ibuf.data, down.ibuf.len))
                down.ibuf.len = 0
            return 0
        if self.body_kind == BODY_NONE:
            if off < avail:
                self.resp_keep_alive = False   # bytes after a bodiless response: not trustworthy
            self.state = U_IDLE
            down._response_done(self.resp_keep_alive)
            return 0
        self.state = U_BODY
        if off < avail:
            self._body(owner, b, off, avail - off)
        return 0

    cdef int _body(self, object data, const char* p, Py_ssize_t off, Py_ssize_t n) except -1:
        cdef DownstreamProtocol down = self.down
        cdef Py_ssize_t take
        cdef Span spans[32]
        cdef int ndata = 0
        cdef int i
        cdef Py_ssize_t r
        cdef bint done = False
        if self.body_kind == BODY_LENGTH:
            take = n if n < self.remaining else <Py_ssize_t>self.remaining
            self.remaining -= take
            down._relay_body(data, p, off, take)
            done = self.remaining == 0
        elif self.body_kind == BODY_CHUNKED:
            if down.dechunk:
                take = 0
                while take < n and not self.chunked.done:
                    r = chunked_feed(&self.chunked, p + off + take, n - take, spans, 32, &ndata)
                    if r < 0:
                        down._fail(502, "upstream sent a malformed chunked body")
                        return 0
                    for i in range(ndata):
                        down._out(PyBytes_FromStringAndSize(p + off + take + spans[i].off, spans[i].len))
                    take += r
                    if r == 0:
                        break
            else:
                take = chunked_feed(&self.chunked, p + off, n, NULL, 0, &ndata)
                if take < 0:
                    down._fail(502, "upstream sent a malformed chunked body")
                    return 0
                down._relay_body(data, p, off, take)
            done = self.chunked.done
        else:
            down._relay_body(data, p, off, n)
            return 0
        if done:
            if take < n:
                self.resp_keep_alive = False   # the upstream sent more than it framed
            self.state = U_IDLE
            down._response_done(self.resp_keep_alive)
        return 0
