# The plugin contract's data-path side: the request and response views every plugin sees,
# the base class of native (Cython) plugins, and a route's compiled chain.
#
# One contract for both kinds: Python plugins call the views' Python methods; native plugins
# are cdef classes deriving NativePlugin whose phases the chain calls through the C vtable,
# reading headers straight from the parsed head (no per-header objects).
from fastmesh._core.http1 cimport Head


cdef class HeaderEdits:
    cdef public list add             # [(name, value)] added (to the upstream request / response)
    cdef public set drop             # lower-case names not forwarded

    # For native plugins: set these headers (names lower-case in `lower`, already validated).
    cdef int replace_c(self, frozenset lower, object lines) except -1


cdef class Request(HeaderEdits):
    cdef const char* b               # the request head's buffer, valid while `live`
    cdef Head* h
    cdef bint live
    cdef readonly bytes client_ip    # TCP peer address (text)
    cdef public bytes peer           # the client's verified TLS identity (mesh mTLS), or None
    cdef public str route
    cdef public str service
    cdef public object consumer      # username of the authenticated consumer (auth plugins)
    cdef public object credential    # identifier of the credential that authenticated it
    cdef public object ctx           # free per-request slot for plugins (response/log phases)
    cdef public bytes new_path       # set_path: the upstream path, verbatim
    cdef public bytes new_query      # set_query: the upstream query (without '?')
    cdef public bytes routed_path    # set_path in the rewrite phase: routing and upstream use it
    cdef public bint rewriting       # the rewrite phase is running (set_path means routed_path)
    cdef public long long body_limit # set_body_limit: 413 past this many body bytes (-1: none)
    cdef public object body          # the whole request body (bytes) when a plugin reads bodies
    cdef public Chain chain          # the chain running for this request (a consumer's, maybe)
    cdef object _method, _path, _query, _headers    # copies, made on first Python access

    cdef void attach(self, const char* b, Head* h, bytes client_ip, str route, str service)
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


cdef class NativePlugin:
    cdef public dict config
    cdef bint native_access          # set by subclasses that implement access_c
    cdef bint native_response        # ... response_c
    cdef tuple response_headers      # request headers (lower-case) its response phase reads

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
