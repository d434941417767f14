# The plugin contract's data-path side: the request and response views every plugin sees,
# the base class of native (Cython) plugins, and a route's compiled chain.
#
# One contract for both kinds: Python plugins call the views' Python methods; native plugins
# are cdef classes deriving NativePlugin whose phases the chain calls through the C vtable,
# reading headers straight from the parsed head (no per-header objects).
from fastmesh._core.http1 cimport Head


from libc.stdint cimport int64_t, uint64_t


# rate-limiting's verdict for an admitted request, kept for its response phase.
ctypedef struct Quota:
    int n                            # periods recorded (0: nothing to show)
    int64_t limit                    # of the most restrictive period
    int64_t remaining
    int64_t reset_ms
    int64_t remainings[4]            # per period, in config order


cdef uint64_t name_lens(object names) except? 0   # the drop_lens bits of `names`


cdef class HeaderEdits:
    # Added lines (to the upstream request / response), in order: (name, value) pairs, or a bytes
    # block of whole "Name: value\r\n" lines that a native plugin prepared (one object, no tuples).
    cdef public list add
    # Up to three native blocks, kept here (no list) while `add` holds nothing: the data path
    # writes block0..block{nblocks-1}, then `add`. Anything else moves them into `add` first.
    cdef readonly bytes block0, block1, block2
    cdef readonly int nblocks
    cdef readonly object drop        # lower-case names not forwarded: a set, or a native's frozenset
    # Bit min(len, 63) set for the length of every name in `drop`: the data path tests a header
    # name against `drop` only when its length bit is set (most headers: one AND, no lookup).
    cdef readonly uint64_t drop_lens

    # For native plugins: set these headers (names lower-case in `lower`, already validated).
    cdef int replace_c(self, frozenset lower, object lines) except -1
    # The same with the new lines as one prepared block (`lower` is kept, not copied;
    # `lens` = name_lens(lower), made once by the plugin).
    cdef int replace_block(self, frozenset lower, uint64_t lens, bytes block) except -1
    cdef int add_block(self, bytes block) except -1
    cdef int _replace(self, frozenset lower, uint64_t lens, object lines, bytes block) except -1
    cdef int _own_drop(self) except -1
    cdef int _to_list(self) except -1
    cdef void _clear(self)


cdef class Request(HeaderEdits):
    cdef const char* b               # the request head's buffer, valid while `live`
    cdef Head* h
    cdef bint live
    cdef readonly bytes client_ip    # TCP peer address (text)
    cdef public bytes peer           # the client's verified TLS identity (mesh mTLS), or None
    cdef public bytes default_host   # what a request without Host was routed by, or None
    cdef public str route
    cdef public str service
    cdef public object consumer      # username of the authenticated consumer (auth plugins)
    cdef public object credential    # identifier of the credential that authenticated it
    cdef object _ctx                 # `ctx`: free per-request dict for plugins, made on demand
    # Native auth plugins record their outcome here instead of in ctx (no dict per request);
    # `ctx` shows them as ctx["fastmesh.anonymous"/"fastmesh.credential"] once Python asks.
    cdef int auth_state              # 0: nothing here, 1: authenticated, 2: anonymous
    cdef object auth_credential
    cdef Quota quota                 # rate-limiting's verdict (its response headers)
    cdef object memo_owner           # a native plugin's note from its access to its response
    cdef object memo                 # phase (cors: its header block), valid if owner is it
    cdef public bytes new_path       # set_path: the upstream path, verbatim
    cdef public bytes new_query      # set_query: the upstream query (without '?')
    cdef public bytes routed_path    # set_path in the rewrite phase: routing and upstream use it
    cdef public bint rewriting       # the rewrite phase is running (set_path means routed_path)
    cdef public long long body_limit # set_body_limit: 413 past this many body bytes (-1: none)
    cdef public object body          # the whole request body (bytes) when a plugin reads bodies
    cdef public Chain chain          # the chain running for this request (a consumer's, maybe)
    cdef object _method, _path, _query, _headers    # copies, made on first Python access

    cdef void attach(self, const char* b, Head* h, bytes client_ip, str route, str service)
    cdef void reset(self)            # back to a fresh Request (reuse, see Chain.reuse)
    cdef int set_auth(self, object credential, bint anonymous) except -1
    cdef bint authenticated_c(self) except -1   # a real (not anonymous) consumer was recorded
    cdef object credential_c(self)
    cdef int detach(self, bint keep, tuple names) except -1
    cdef object header_c(self, const char* lower, Py_ssize_t n)
    cdef bint has_header_c(self, const char* lower, Py_ssize_t n)


cdef class ResponseHead(HeaderEdits):
    cdef const char* b               # the upstream response head's buffer, valid during the phase
    cdef Head* h
    cdef bint live
    cdef public int status
    cdef object _headers

    cdef object header_c(self, const char* lower, Py_ssize_t n)
    cdef void reset(self)


cdef class NativePlugin:
    cdef public dict config
    cdef bint native_access          # set by subclasses that implement access_c
    cdef bint native_response        # ... response_c
    cdef tuple response_headers      # request headers (lower-case) its response phase reads
    cdef bint response_memo          # ... unless its access phase left a memo (Request.memo)
    cdef bint holds_request          # its access phase may hand the request to Python code

    # None to go on, or a Response that answers the request (only built on that path).
    cdef object access_c(self, Request req)
    cdef int response_c(self, Request req, ResponseHead resp) except -1


cdef class Chain:
    cdef readonly tuple plugins      # sorted: priority high to low, then name
    cdef tuple access_fns            # per plugin: the NativePlugin, a Python callable, or None
    cdef tuple response_fns
    cdef tuple log_fns
    cdef tuple rewrite_fns           # Python `rewrite` phases (global plugins, before routing)
    cdef readonly bint has_rewrite
    cdef readonly bint has_response
    cdef readonly bint has_log
    cdef readonly bint keep_request  # a Python phase runs after access: copy the request view
    cdef readonly tuple keep_names   # else: the request headers native response phases read
    cdef readonly dict by_consumer   # username -> that consumer's Chain on this route, or None
    cdef readonly long long body_max # a plugin reads request bodies: buffer up to this; -1: none
    # Only native phases that keep no reference to the Request (nor its ResponseHead) past the
    # request: the data path reuses one of each per connection instead of allocating.
    cdef readonly bint reuse

    cdef object run_access(self, Request req, Py_ssize_t start)
    cdef object run_rewrite(self, Request req)
    cdef Py_ssize_t after(self, object plugin)
    cdef int run_response(self, Request req, ResponseHead resp) except -1


# An access phase returned an awaitable: the chain goes on at `index` when it is done.
cdef class Pending:
    cdef readonly object awaitable
    cdef readonly Chain chain
    cdef readonly Py_ssize_t index
    cdef readonly str plugin_name
