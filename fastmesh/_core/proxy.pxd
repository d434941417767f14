# The per-connection state machines of the data path and the worker's shared state.
from libc.stdint cimport int64_t, uint64_t
from cpython.object cimport PyObject

from fastmesh._core.http1 cimport Head, Chunked, Limits
from fastmesh._core.buffer cimport Buf
from fastmesh._core.router cimport Router
from fastmesh._core.histogram cimport Histogram
from fastmesh._core.pool cimport Pool, PooledConnection
from fastmesh._core.balancer cimport Balancer, Target
from fastmesh._core.plugin cimport Chain, Pending, Request, ResponseHead


cdef class RouteTarget:
    """One route of a Plan, compiled: where it goes and how, plus its counters."""
    cdef readonly str name
    cdef readonly str service
    cdef readonly Pool pool
    cdef bytes host_header          # Host sent upstream when preserve_host is off
    cdef bytes base_path            # service path: b"" or b"/base"
    cdef bint strip_path
    cdef bint preserve_host
    cdef bint server_timing
    cdef double connect_timeout
    cdef double read_timeout
    cdef double write_timeout
    cdef int64_t max_body_size      # 0: unlimited
    cdef PyObject* h_total_by_class[6]  # Histogram per status class, made on the class's first response
    cdef readonly Histogram h_upstream
    cdef readonly Histogram h_added
    cdef uint64_t status_counts[6]  # index: status // 100 (0 = no response)
    cdef readonly uint64_t bytes_in     # request bytes received from clients (head + body)
    cdef readonly uint64_t bytes_out    # response bytes sent to clients (head + body)
    cdef readonly str upstream_label    # "host:port", for logs and metrics
    cdef readonly Balancer balancer     # None: the service has one plain host
    cdef str hash_on                    # consistent hashing key source (None: no key)
    cdef str hash_name                  # header / cookie / query arg name for hash_on
    cdef int retries                    # connect failures retried on another target
    cdef readonly uint64_t retried      # requests resent (to another target when one exists)
    cdef int retry_mask                 # RETRY_* conditions beyond connect failures
    cdef double per_try_timeout         # read timeout of one attempt
    cdef double retry_tokens            # retry budget: +0.2 per request, -1 per retry (burst cap)
    # plugins (fastmesh.plugins): the route's chain, or None, which costs one pointer test
    cdef readonly object plugins        # fastmesh._core.plugin.Chain, or None
    cdef bint plugins_log               # some plugin of the chain has a log phase
    cdef bint plugins_response          # some plugin of the chain has a response phase
    # protocols: [https] (fastmesh.tls): what a plain-HTTP request gets instead of the route:
    # 0 = served; 426 = refused (Upgrade: TLS); 301/302/307/308 = redirected to https://
    cdef int https_only
    cdef bytes https_port_suffix        # b"" (port 443) or b":8443", appended in redirects

    cdef Histogram _class_histogram(self, int cls)


cdef class Gateway:
    """Everything one worker's connections share: the active Plan, limits, clocks."""
    cdef readonly object loop
    cdef public object plan          # the Python Plan object (kept alive while active)
    cdef Chain rewrite               # global plugins' rewrite phases (before routing), or None
    cdef Router router
    cdef Limits limits
    cdef Limits resp_limits          # for upstream response heads (502 past them)
    cdef double header_timeout
    cdef double body_timeout
    cdef double keepalive_timeout
    cdef double send_timeout         # a client that accepts no response bytes this long is cut off
    cdef Py_ssize_t max_requests_per_connection
    cdef Py_ssize_t max_connections
    cdef object sweeper
    cdef DownstreamProtocol conns    # intrusive list of live client connections
    cdef readonly Py_ssize_t connections
    cdef readonly uint64_t requests
    cdef readonly uint64_t local_responses   # answered by the gateway itself (404, 4xx, 5xx)
    cdef readonly uint64_t send_timeouts     # clients cut off for accepting no bytes (send_timeout)
    cdef uint64_t status_counts[6]
    cdef readonly bint draining
    cdef bint log_enabled            # collect one record per request (access log)
    cdef list log_records            # taken in batches by take_log_records()
    cdef bint request_id_enabled     # X-Request-Id: reuse the client's or generate one
    cdef bytes request_id_prefix
    cdef uint64_t request_id_counter
    # W3C trace context (fastmesh/_core/proxy.pyx: _trace_context)
    cdef bint trace_enabled
    cdef uint64_t trace_threshold    # start sampled when a random 64-bit draw is below this
    cdef uint64_t rng[2]             # xorshift128+ state for trace and span ids
    # Verified peer identity (mesh mTLS): identify(transport) -> bytes or None, called once per
    # TLS connection; the identity goes upstream in `peer_header` (a client's own is dropped).
    cdef object identify
    cdef bytes peer_header           # as sent, e.g. b"X-Fastmesh-Peer"; None: off
    cdef bytes peer_header_lower
    # Mesh source service (set_source): client copies of `source_lower` are dropped; the
    # outbound side writes `source_line` on every upstream request; the inbound side matches
    # routes' hosts against each request's source (route_by_source) instead of its Host.
    cdef bytes source_lower          # e.g. b"x-fastmesh-source"; None: off
    cdef bytes source_line           # b"X-Fastmesh-Source: orders\r\n", or None
    cdef bint route_by_source
    cdef bytes source_peer_prefix    # b"spiffe://<domain>/svc/": a TLS peer's source follows it


cdef class DownstreamProtocol:
    cdef Gateway gw
    cdef object transport
    cdef object write                # transport.write, looked up once per connection
    cdef int fd                      # its socket, when _send may write to it directly; else -1
    cdef bint queued                 # bytes were left to the transport: write through it
    cdef object closing              # transport.is_closing
    cdef bytes client_ip
    cdef bytes local_port
    cdef bint tls                    # the client connection is TLS (X-Forwarded-Proto: https)
    cdef bytes peer                  # the client's verified identity (Gateway.identify), or None
    cdef bytes peer_source           # the service named by `peer` (source_peer_prefix), or None
    cdef bytes default_host          # routes requests without Host (set_default_host), or None
    cdef DownstreamProtocol prev
    cdef DownstreamProtocol next
    cdef int state
    cdef Py_ssize_t served           # requests started on this connection
    cdef int paused                  # bit set of reasons reading from the client is paused
    cdef Buf ibuf                    # partial head / pipelined input
    cdef Buf wbuf                    # head being built
    cdef Head head
    cdef const char* cur             # buffer the current head's spans point into
    # the request in flight
    cdef RouteTarget route
    cdef Target target               # the balanced target this request went to (or None)
    cdef bytes hash_key
    cdef int tries
    cdef bint idempotent
    cdef object retry_timer
    cdef UpstreamProtocol up
    cdef bint up_read_paused         # pause_writing stopped reading `up`; undone before reuse
    cdef bint write_paused           # the client's write buffer is over its high-water mark
    cdef Py_ssize_t send_mark        # that buffer's size when the send deadline was armed
    cdef object pending_out          # request bytes waiting for the upstream connection
    cdef object replay               # the whole request, kept while it can be resent
    cdef bint replayed
    cdef int req_body_kind
    cdef int64_t req_remaining
    cdef int64_t req_body_seen
    cdef Chunked req_chunked
    cdef bint req_done
    cdef bint keep_alive
    cdef bint close_after
    cdef bint http10
    cdef bint method_head
    cdef bint wants_upgrade
    cdef bint expect_continue
    cdef bint resp_started
    cdef bint dechunk                # HTTP/1.0 client: relay a chunked response decoded
    cdef int resp_status
    cdef int64_t t_start
    cdef int64_t t_up_start
    cdef int64_t t_up_first
    cdef int64_t req_bytes           # request bytes received (head + body)
    cdef int64_t resp_bytes          # response bytes sent
    cdef object log_request          # (wall time, method, target, host, user agent) when logging
    cdef bytes request_id
    cdef char traceparent[56]        # the traceparent sent upstream (55 chars + NUL)
    cdef bint traced                 # traceparent above is set for this request
    cdef bint rerouted               # an access phase had it routed again (REROUTE): once only
    cdef Py_ssize_t rerouted_n       # bytes used by that second routing
    cdef bint trace_drop_state       # the client's traceparent was invalid: drop its tracestate
    cdef Request preq                # plugins: the request view (routes with a chain only)
    cdef Request spare_req           # a finished one, reused when its chain allows (Chain.reuse)
    cdef ResponseHead spare_resp
    cdef bytes routed_path           # the path a rewrite phase set: routed and sent upstream
    cdef bytes held                  # the request's bytes while an access phase waits
    cdef Py_ssize_t held_consumed
    cdef Py_ssize_t held_mlen
    cdef Pending pending
    cdef int64_t body_limit          # 413 past this many request body bytes; -1: no limit
    cdef double deadline
    cdef int dkind

    cdef int _out(self, object data) except -1
    cdef int _feed(self, object data, const char* p, Py_ssize_t n) except -1
    cdef int _parse_error(self, Py_ssize_t code) except -1
    cdef int _process_buffered(self) except -1
    cdef Py_ssize_t _on_head(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail) except -1
    cdef Py_ssize_t _route(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail,
                           const char* path, Py_ssize_t path_len) except -1
    cdef int _reroute(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail) except -1
    cdef int _request_complete(self) except -1
    cdef void _await_progress(self)
    cdef int _abort_request(self, int status, str message) except -1
    cdef Py_ssize_t _take_body(self, const char* p, Py_ssize_t n) except -2
    cdef int _send_upstream(self, object out) except -1
    cdef int _build_request_head(self, const char* b, Py_ssize_t mlen) except -1
    cdef int _write_response_head(self, UpstreamProtocol up, const char* b, Head* h) except -1
    cdef int _relay_body(self, object data, const char* p, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int _response_done(self, bint upstream_reusable) except -1
    cdef int _next_request(self) except -1
    cdef bint _hold_for_client(self)
    cdef int _fail(self, int status, str message) except -1
    cdef void _end_target(self, int outcome, int status)
    cdef bint _choose_target(self, const char* b, Head* h) except -1
    cdef bint _retry(self, Target failed, int why) except -1
    cdef bint _may_retry(self, int why)
    cdef bint _connect_failed_retry(self) except -1
    cdef Pool _pick_pool(self)
    cdef int _local_response(self, int status, str message, bint close) except -1
    cdef int _https_required(self, const char* b, Head* h, RouteTarget rt) except -1
    cdef int _send_local(self, bytes payload, bint close) except -1
    cdef void _pause(self, int reason)
    cdef void _resume(self, int reason)
    cdef void _finish_request_metrics(self)
    cdef void _log(self, int status)
    cdef int _add_request_id(self, Buf* w) except -1
    cdef void _trace_context(self, const char* b, Head* h)
    cdef void _detach_upstream(self, bint reusable)
    cdef void _set_deadline(self, double seconds, int kind)
    cdef void _arm_send_deadline(self)
    # plugins
    cdef Py_ssize_t _forward(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail,
                             Py_ssize_t mlen) except -1
    cdef int _add_upstream_path(self, Buf* w, const char* b, Py_ssize_t mlen) except -1
    cdef int _plugin_access(self, const char* b, Head* h, Py_ssize_t consumed, Py_ssize_t avail,
                            Py_ssize_t mlen) except -1
    cdef int _access_result(self, object answer, const char* b, Py_ssize_t consumed,
                            Py_ssize_t avail, Py_ssize_t mlen) except -1
    cdef int _plugin_answer(self, object answer) except -1
    cdef int _hold(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail, Py_ssize_t mlen) except -1
    cdef void _wait_for_plugin(self, Pending pending)
    cdef int _release(self, object answer) except -1
    cdef Py_ssize_t _buffer_body(self, const char* b, Py_ssize_t consumed, Py_ssize_t avail,
                                 Py_ssize_t mlen) except -1
    cdef int _body_progress(self) except -1
    cdef ResponseHead _plugin_response(self, const char* b, Head* h)
    cdef void _plugin_log(self)


cdef class UpstreamProtocol(PooledConnection):
    cdef object write                # transport.write, looked up once per connection
    cdef int fd                      # its socket, when _send may write to it directly; else -1
    cdef bint queued                 # bytes were left to the transport: write through it
    cdef object closing              # transport.is_closing
    cdef Balancer balancer           # circuit-breaker counters of a balanced target (or None)
    cdef bint pending                # counted in balancer.pending (connecting)
    cdef bint counted                # counted in balancer.connections (connected)
    cdef DownstreamProtocol down
    cdef int state
    cdef Buf rbuf                    # a response head in pieces (parsed into proxy.RESP_HEAD)
    cdef int body_kind
    cdef int64_t remaining
    cdef Chunked chunked
    cdef bint resp_keep_alive
    cdef bint was_reused
    cdef bint got_bytes
    cdef object connect_task

    cdef void attach(self, DownstreamProtocol down, bint reused)
    cdef int _out(self, object data) except -1
    cdef void _connecting_over(self, bint connected)
    cdef int _parse_head(self, object data, const char* p, Py_ssize_t n) except -1
    cdef int _body(self, object data, const char* p, Py_ssize_t off, Py_ssize_t n) except -1
