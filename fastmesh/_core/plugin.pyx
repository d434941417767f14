# cython: language_level=3, boundscheck=False, wraparound=False
"""Plugin views, native plugin base class, compiled chains and their runners.

Why in Cython: a route's chain runs on every request of that route. The views read headers
straight from the parsed head (no list of header tuples unless a Python plugin asks for
`request.headers`), and native plugins are called through the C vtable, so a chain of
built-ins costs a few hundred nanoseconds, not a Python object per header.

Lifetimes: a Request is `live` (its header accessors read the client's buffer) during the
rewrite and access phases. Afterwards the data path calls `detach(keep)`: with `keep`
(some Python plugin has a response or log phase) the request line and headers are copied
first, so those phases still see them; natives copy what they need in `access_c`.

Per-request cost of a native chain (the edge's key-auth + rate-limiting + cors): natives keep
their state in C fields of the Request (auth outcome, quota, a memo for the response phase)
rather than in a ctx dict, add header lines as prepared blocks held in three slots (no list,
no tuples), and, when a chain has no Python phase at all (`Chain.reuse`), the data path keeps
one Request and one ResponseHead per connection and resets them instead of allocating.
"""
import logging
import sys
from urllib.parse import parse_qsl

from fastmesh.jsonbytes import dumps as json_dumps

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from fastmesh._core.http1 cimport Head, Header, Span, span_ieq

log = logging.getLogger("fastmesh.plugins")

# A plugin with `read_body = True` sees request bodies up to this size unless it says otherwise.
DEFAULT_BODY_MAX = 1 << 20

# Framing and hop-by-hop headers stay the gateway's business: a plugin cannot add or remove them.
RESERVED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade",
                      b"te", b"trailer", b"keep-alive", b"proxy-connection"})

# The ctx keys of fastmesh.plugins.identity (Request.set_auth records the same facts).
cdef str ANONYMOUS_KEY = "fastmesh.anonymous"
cdef str CREDENTIAL_KEY = "fastmesh.credential"

cdef bytes _TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
cdef set _TOKEN_SET = set(_TOKEN_CHARS)


cdef bytes _b(object value):
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


# Header names plugins have used, already checked: name -> (name bytes, lower-case bytes).
# Plugins use a handful of fixed names, so this stays tiny; it is capped all the same.
cdef dict _CHECKED_NAMES = {}


cdef tuple _checked(object value):
    cdef tuple known = _CHECKED_NAMES.get(value)
    if known is not None:
        return known
    cdef bytes name = _b(value)
    if not name or any(c not in _TOKEN_SET for c in name):
        raise ValueError(f"invalid header name {name!r}")
    if name.lower() in RESERVED:
        raise ValueError(f"header {name.decode()!r} is managed by the gateway; plugins cannot change it")
    known = (name, name.lower())
    if len(_CHECKED_NAMES) < 4096:
        _CHECKED_NAMES[value] = known
    return known


cdef bytes _name(object value):
    return <bytes>_checked(value)[0]


cdef bytes _clean(object value):
    cdef bytes text = _b(value)
    if b"\r" in text or b"\n" in text or b"\x00" in text:
        raise ValueError(f"header text must not contain CR, LF or NUL: {text!r}")
    return text


cdef list _copy_headers(const char* b, Head* h):
    cdef int i
    cdef Header* hd
    cdef list out = []
    for i in range(h.nheaders):
        hd = &h.headers[i]
        out.append((PyBytes_FromStringAndSize(b + hd.name.off, hd.name.len),
                    PyBytes_FromStringAndSize(b + hd.value.off, hd.value.len)))
    return out


cdef object _last_value(const char* b, Head* h, const char* lower, Py_ssize_t n):
    cdef int i
    cdef Header* hd
    for i in range(h.nheaders - 1, -1, -1):
        hd = &h.headers[i]
        if hd.name.len == n and span_ieq(b, hd.name, lower, n):
            return PyBytes_FromStringAndSize(b + hd.value.off, hd.value.len)
    return None


cdef object _find_in(list headers, bytes lower):
    found = None
    for key, value in headers:
        if key.lower() == lower:
            found = value
    return found


cdef list _split_block(bytes block):
    """A native plugin's block of "Name: value\r\n" lines as (name, value) pairs."""
    cdef list out = []
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            out.append((name, value))
    return out


cdef list _without(list add, object lower):
    """`add` minus the lines named in `lower` (lower-case); blocks are split to filter them."""
    cdef list out = []
    for entry in add:
        if type(entry) is bytes:
            out.extend(kv for kv in _split_block(<bytes>entry) if kv[0].lower() not in lower)
        elif (<tuple>entry)[0].lower() not in lower:
            out.append(entry)
    return out


cdef uint64_t name_lens(object names) except? 0:
    cdef uint64_t lens = 0
    cdef Py_ssize_t n
    for name in names:
        n = len(name)
        lens |= (<uint64_t>1) << (n if n < 63 else 63)
    return lens


cdef class HeaderEdits:
    """Header changes a phase asks for; the data path applies them while writing the head.

    `add` and `drop` change only through these methods (`drop_lens` must follow `drop`)."""

    cdef int _own_drop(self) except -1:
        """`drop` may be a native plugin's shared frozenset: make it a set of our own first."""
        if self.drop is None:
            self.drop = set()
        elif type(self.drop) is not set:
            self.drop = set(self.drop)
        return 0

    cdef int replace_c(self, frozenset lower, object lines) except -1:
        """set_header for several trusted lines at once (no per-call validation)."""
        return self._replace(lower, name_lens(lower), lines, None)

    cdef int replace_block(self, frozenset lower, uint64_t lens, bytes block) except -1:
        return self._replace(lower, lens, None, block)

    cdef int _replace(self, frozenset lower, uint64_t lens, object lines, bytes block) except -1:
        if self.drop is None:
            self.drop = lower
        else:
            self._own_drop()
            (<set>self.drop).update(lower)
        self.drop_lens |= lens
        if block is not None and self.nblocks == 0 and not self.add:
            self.block0 = block          # nothing added before: nothing to replace
            self.nblocks = 1
            return 0
        self._to_list()
        if self.add:
            self.add = _without(self.add, lower)
        if block is not None:
            self.add.append(block)
        else:
            self.add.extend(lines)
        return 0

    cdef int add_block(self, bytes block) except -1:
        if not self.add and self.nblocks < 3:
            if self.nblocks == 0:
                self.block0 = block
            elif self.nblocks == 1:
                self.block1 = block
            else:
                self.block2 = block
            self.nblocks += 1
            return 0
        self._to_list()
        self.add.append(block)
        return 0

    cdef int _to_list(self) except -1:
        """Move the native blocks into `add` (they come first: `add` was empty meanwhile)."""
        cdef list out
        if self.nblocks:
            out = [self.block0]
            if self.nblocks > 1:
                out.append(self.block1)
            if self.nblocks > 2:
                out.append(self.block2)
            if self.add:
                out.extend(self.add)
            self.add = out
            self.block0 = self.block1 = self.block2 = None
            self.nblocks = 0
        elif self.add is None:
            self.add = []
        return 0

    cdef void _clear(self):
        """Empty for reuse."""
        self.add = None
        if self.nblocks:
            self.block0 = self.block1 = self.block2 = None
            self.nblocks = 0
        self.drop = None
        self.drop_lens = 0

    def remove_header(self, name):
        """Do not forward header `name` (also drops values added earlier)."""
        cdef bytes low = <bytes>_checked(name)[1]
        self._own_drop()
        (<set>self.drop).add(low)
        self.drop_lens |= name_lens((low,))
        self._to_list()
        if self.add:
            self.add = _without(self.add, (low,))

    def add_header(self, name, value):
        """Add a header line."""
        self._to_list()
        self.add.append((_name(name), _clean(value)))

    def set_header(self, name, value):
        """Replace every value of header `name` with `value`."""
        self.remove_header(name)
        self.add_header(name, value)


cdef class Request(HeaderEdits):
    """The request as plugins see it (built only for routes that have a chain)."""

    def __cinit__(self):
        self.body_limit = -1

    cdef void attach(self, const char* b, Head* h, bytes client_ip, str route, str service):
        self.b = b
        self.h = h
        self.live = True
        self.client_ip = client_ip
        self.route = route
        self.service = service

    cdef void reset(self):
        self._clear()
        self.live = False
        self.b = NULL
        self.h = NULL
        self.peer = None
        self.default_host = None
        self.consumer = None
        self.credential = None
        self._ctx = None
        self.auth_state = 0
        self.auth_credential = None
        self.quota.n = 0
        self.memo_owner = None
        self.memo = None
        self.new_path = None
        self.new_query = None
        self.routed_path = None
        self.rewriting = False
        self.body_limit = -1
        self.body = None
        self.chain = None
        self._method = self._path = self._query = self._headers = None

    @property
    def ctx(self):
        """Free per-request dict for plugins (None until someone sets it)."""
        if self._ctx is None and self.auth_state:
            self._ctx = {ANONYMOUS_KEY: self.auth_state == 2, CREDENTIAL_KEY: self.auth_credential}
            self.auth_state = 0
            self.auth_credential = None
        return self._ctx

    @ctx.setter
    def ctx(self, value):
        self._ctx = value
        self.auth_state = 0
        self.auth_credential = None

    cdef int set_auth(self, object credential, bint anonymous) except -1:
        """What fastmesh.plugins.identity records in ctx, without a dict unless one exists."""
        if self._ctx is not None:
            self._ctx[ANONYMOUS_KEY] = anonymous
            self._ctx[CREDENTIAL_KEY] = credential
        else:
            self.auth_state = 2 if anonymous else 1
            self.auth_credential = credential
        return 0

    cdef bint authenticated_c(self) except -1:
        """ctx is not None and not ctx.get("fastmesh.anonymous"): someone recorded a real consumer
        (or a Python plugin made ctx for its own use, as before)."""
        if self._ctx is not None:
            return not self._ctx.get(ANONYMOUS_KEY, False)
        return self.auth_state == 1

    cdef object credential_c(self):
        if self._ctx is not None:
            return self._ctx.get(CREDENTIAL_KEY)
        return self.auth_credential if self.auth_state else None

    cdef int detach(self, bint keep, tuple names) except -1:
        """The client's buffer is about to go: copy what later phases read (see Chain)."""
        cdef bytes name
        if self.live and keep:
            self.method
            self.path
            self.query
            self.headers
        elif self.live and names:
            self._headers = []
            for name in names:
                value = _last_value(self.b, self.h, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
                if value is not None:
                    self._headers.append((name, value))
        self.live = False
        self.b = NULL
        self.h = NULL
        return 0

    cdef object header_c(self, const char* lower, Py_ssize_t n):
        if self.live:
            return _last_value(self.b, self.h, lower, n)
        if self._headers is None:
            return None
        return _find_in(self._headers, PyBytes_FromStringAndSize(lower, n))

    cdef bint has_header_c(self, const char* lower, Py_ssize_t n):
        cdef int i
        if not self.live:
            return self.header_c(lower, n) is not None
        for i in range(self.h.nheaders):
            if self.h.headers[i].name.len == n and span_ieq(self.b, self.h.headers[i].name, lower, n):
                return True
        return False

    @staticmethod
    def for_test(method, path, query, headers, client_ip=b"127.0.0.1", route="r", service="s"):
        """A detached request from Python values (unit tests of plugins)."""
        cdef Request req = Request.__new__(Request)
        req._method, req._path, req._query = method, path, query
        req._headers = list(headers)
        req.client_ip = client_ip
        req.route, req.service = route, service
        return req

    @property
    def method(self):
        if self._method is None and self.live:
            self._method = PyBytes_FromStringAndSize(self.b + self.h.method.off, self.h.method.len)
        return self._method

    @property
    def path(self):
        """The path as received (before strip_path), b"/" for an empty absolute-form path."""
        if self._path is None and self.live:
            self._path = PyBytes_FromStringAndSize(self.b + self.h.path.off, self.h.path.len) \
                if self.h.path.len else b"/"
        return self._path

    @property
    def query(self):
        """The query as received, without '?' (b"" when none)."""
        if self._query is None and self.live:
            self._query = PyBytes_FromStringAndSize(self.b + self.h.query.off, self.h.query.len) \
                if self.h.has_query else b""
        return self._query

    @property
    def headers(self):
        """[(name, value)] as received (bytes; copied on first use)."""
        if self._headers is None and self.live:
            self._headers = _copy_headers(self.b, self.h)
        return self._headers

    def get_header(self, name):
        """The last value of header `name` (case-insensitive), or None."""
        cdef bytes low = _b(name).lower()
        return self.header_c(PyBytes_AS_STRING(low), PyBytes_GET_SIZE(low))

    def query_arg(self, name):
        """The first value of query argument `name` (decoded text), or None."""
        name = name if isinstance(name, str) else name.decode()
        query = self.query
        if not query:
            return None
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if key == name:
                return value
        return None

    def set_path(self, path):
        """In the rewrite phase: the path routing sees (and strip_path etc. then apply to it).
        Later: send this path upstream verbatim (no strip_path, no service path joined)."""
        cdef bytes p = _clean(path)
        if not p.startswith(b"/") or b" " in p or b"?" in p or b"#" in p:
            raise ValueError(f"upstream path must start with '/' and contain no space, '?' or '#': {p!r}")
        if self.rewriting:
            self.routed_path = p
            self._path = p
        else:
            self.new_path = p

    def set_query(self, query):
        """Send this query upstream instead of the client's (b"" or None: no query)."""
        cdef bytes q = _clean(query or b"")
        if b" " in q or b"#" in q:
            raise ValueError(f"query must contain no space or '#': {q!r}")
        self.new_query = q

    def set_body_limit(self, long long limit):
        """Answer 413 when the request body passes `limit` bytes (the lowest limit set wins)."""
        if limit < 0:
            raise ValueError("body limit must be >= 0")
        if self.body_limit < 0 or limit < self.body_limit:
            self.body_limit = limit


cdef class ResponseHead(HeaderEdits):
    """The upstream response's status and headers, as the response phase sees them."""

    @staticmethod
    def for_test(status, headers):
        cdef ResponseHead resp = ResponseHead.__new__(ResponseHead)
        resp.status = status
        resp._headers = list(headers)
        return resp

    cdef object header_c(self, const char* lower, Py_ssize_t n):
        if self.live:
            return _last_value(self.b, self.h, lower, n)
        if self._headers is None:
            return None
        return _find_in(self._headers, PyBytes_FromStringAndSize(lower, n))

    cdef void reset(self):
        self._clear()
        self._headers = None
        self.live = False
        self.b = NULL
        self.h = NULL

    @property
    def headers(self):
        if self._headers is None:
            self._headers = _copy_headers(self.b, self.h) if self.live else []
        return self._headers

    def get_header(self, name):
        cdef bytes low = _b(name).lower()
        return self.header_c(PyBytes_AS_STRING(low), PyBytes_GET_SIZE(low))



class Reroute:
    """What an access phase returns to have the request routed again, under the Plan that is
    active now (it changed meanwhile: e.g. the sidecar compiled in the destination asked for).
    Once per request; the request then runs the new route's plugins from the start."""

    __slots__ = ()

    def __repr__(self):
        return "REROUTE"


REROUTE = Reroute()


class Response:
    """A response a plugin answers with (access phase); `body` a dict/list is sent as JSON."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status, body=None, headers=None):
        self.status = status
        self.body = body
        self.headers = list(headers or ())

    def payload(self, bint close):
        body = self.body
        ctype = b"application/json"
        if body is None:
            body = b""
        elif isinstance(body, (dict, list)):
            body = json_dumps(body)
        elif isinstance(body, str):
            body = json_dumps({"message": body})
        elif not isinstance(body, bytes):
            raise TypeError(f"Response body must be dict, list, str, bytes or None, "
                            f"not {type(body).__name__}")
        else:
            ctype = b"application/octet-stream"
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, REASONS.get(self.status, b"Status"))]
        names = set()
        for name, value in self.headers:
            name, value = _b(name), _clean(value)
            names.add(name.lower())
            lines.append(name + b": " + value + b"\r\n")
        if body and b"content-type" not in names:
            lines.append(b"Content-Type: " + ctype + b"\r\n")
        if self.status != 204 and self.status >= 200:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"Connection: close\r\n\r\n" if close else b"Connection: keep-alive\r\n\r\n")
        return b"".join(lines) + (body if self.status != 204 else b"")


# Reason phrases of every status fastmesh answers itself (plugins and the data path).
REASONS = {
    200: b"OK", 204: b"No Content",
    301: b"Moved Permanently", 302: b"Found", 307: b"Temporary Redirect", 308: b"Permanent Redirect",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 411: b"Length Required",
    413: b"Content Too Large", 414: b"URI Too Long", 426: b"Upgrade Required",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
    508: b"Loop Detected",
}


cdef class NativePlugin:
    """Base of built-in plugins written in Cython: same phases, called through the vtable.

    A subclass sets `name`/`priority`/`schema` like a Python plugin, and in `__init__`
    sets `native_access`/`native_response` for the phases it implements as cdef methods.
    Python-level `access`/`response` wrappers are provided for tests and for Python callers.
    """

    def __init__(self, dict config):
        self.config = config

    @classmethod
    def check(cls, config):
        return []

    def setup(self, gateway_config):
        pass

    cdef object access_c(self, Request req):
        return None

    cdef int response_c(self, Request req, ResponseHead resp) except -1:
        return 0


# --- failures -------------------------------------------------------------------------------

cdef void _report(object plugin, str phase, object route):
    name = getattr(plugin, "name", "?")
    err = sys.exc_info()[1]
    log.error("plugin '%s' failed in its %s phase (route '%s')", name, phase, route, exc_info=True)
    print(f"fastmesh: plugin '{name}' failed in its {phase} phase (route '{route}'): "
          f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)


def plugin_failed(plugin, str phase, route):
    """Log the exception being handled with the plugin's name (also used by the data path)."""
    _report(plugin, phase, route)


def internal_error(plugin=None):
    body = {"message": "An unexpected error occurred"}
    if plugin is not None:
        body["plugin"] = getattr(plugin, "name", "?")
    return Response(500, body)


# --- chains ---------------------------------------------------------------------------------

cdef object _phase(object plugin, str name):
    fn = getattr(plugin, name, None)
    return fn if callable(fn) else None


cdef class Pending:
    def __init__(self, awaitable, Chain chain, Py_ssize_t index, str plugin_name):
        self.awaitable = awaitable
        self.chain = chain
        self.index = index
        self.plugin_name = plugin_name


cdef class Chain:
    """A route's plugins, ordered and with their phases looked up once (Plan compile time)."""

    def __init__(self, plugins, dict by_consumer=None):
        cdef list acc = [], resp = [], logs = [], rewrites = []
        cdef bint keep = False
        cdef bint reuse = True
        cdef NativePlugin nat
        cdef list names = []
        self.plugins = tuple(plugins or ())
        for p in self.plugins:
            rewrites.append(_phase(p, "rewrite"))
            reuse = reuse and rewrites[len(rewrites) - 1] is None
            if isinstance(p, NativePlugin):
                nat = <NativePlugin>p
                acc.append(p if nat.native_access else None)
                resp.append(p if nat.native_response else None)
                # a memo needs its own access phase to have run: it has, if it is in this chain
                if nat.native_response and nat.response_headers and not nat.response_memo:
                    names.extend(n for n in nat.response_headers if n not in names)
                fn = _phase(p, "log")
                logs.append(fn)
                keep = keep or fn is not None
                reuse = reuse and fn is None and not nat.holds_request
            else:
                reuse = False
                acc.append(_phase(p, "access"))
                fn = _phase(p, "response")
                resp.append(fn)
                fn2 = _phase(p, "log")
                logs.append(fn2)
                keep = keep or fn is not None or fn2 is not None
        # Body access is opt-in (`read_body = True`): only then is a body buffered before the
        # access phases, up to the largest `max_body_bytes` of those plugins (default 1 MiB).
        self.body_max = -1
        for p in self.plugins:
            if getattr(p, "read_body", False):
                self.body_max = max(self.body_max, int(getattr(p, "max_body_bytes", DEFAULT_BODY_MAX)))
        self.access_fns = tuple(acc)
        self.rewrite_fns = tuple(rewrites)
        self.has_rewrite = any(f is not None for f in rewrites)
        self.response_fns = tuple(resp)
        self.log_fns = tuple(logs)
        self.has_response = any(f is not None for f in resp)
        self.has_log = any(f is not None for f in logs)
        self.keep_request = keep
        self.reuse = reuse and self.body_max < 0
        self.by_consumer = None
        if by_consumer:
            self.by_consumer = {name: (c if isinstance(c, Chain) else Chain(c))
                                for name, c in by_consumer.items()}
            for c in self.by_consumer.values():
                # a later plugin may identify another consumer (anonymous, then a real one)
                (<Chain>c).by_consumer = self.by_consumer
                self.has_response = self.has_response or (<Chain>c).has_response
                self.has_log = self.has_log or (<Chain>c).has_log
                self.keep_request = self.keep_request or (<Chain>c).keep_request
                self.reuse = self.reuse and (<Chain>c).reuse
                names.extend(n for n in (<Chain>c).keep_names if n not in names)
                # After a switch, the consumer's chain runs only the plugins after the auth
                # plugin: one that sorts before it left a memo only if it also ran in this chain.
                for p in (<Chain>c).plugins:
                    if isinstance(p, NativePlugin) and (<NativePlugin>p).native_response \
                            and (<NativePlugin>p).response_memo and (<NativePlugin>p).response_headers \
                            and not any(q is p for q in self.plugins):
                        names.extend(n for n in (<NativePlugin>p).response_headers if n not in names)
                self.body_max = max(self.body_max, (<Chain>c).body_max)
        self.keep_names = tuple(names)

    def __len__(self):
        return len(self.plugins)

    def __iter__(self):
        return iter(self.plugins)

    cdef object run_access(self, Request req, Py_ssize_t start):
        """Access phases from `start`: None (go on), a Response (answer), or a Pending."""
        cdef Py_ssize_t i, n = len(self.plugins)
        cdef object fn, answer, before
        cdef Chain switched
        req.chain = self
        for i in range(start, n):
            fn = self.access_fns[i]
            if fn is None:
                continue
            before = req.consumer
            try:
                if isinstance(fn, NativePlugin):
                    answer = (<NativePlugin>fn).access_c(req)
                else:
                    answer = fn(req)
            except Exception:
                _report(self.plugins[i], "access", req.route)
                return internal_error(self.plugins[i])
            if answer is not None:
                if isinstance(answer, Response) or answer is REROUTE:
                    return answer
                if hasattr(answer, "__await__"):
                    return Pending(answer, self, i + 1, getattr(self.plugins[i], "name", "?"))
                return _invalid_answer(self.plugins[i], answer, req)
            if req.consumer is not before and self.by_consumer is not None \
                    and req.consumer in self.by_consumer:
                # An auth plugin identified a consumer with plugins of its own: the rest of
                # the request runs that consumer's chain (Kong's consumer scope).
                switched = <Chain>self.by_consumer[req.consumer]
                return switched.run_access(req, switched.after(self.plugins[i]))
        return None

    cdef object run_rewrite(self, Request req):
        """Rewrite phases (before routing): None to go on, or a Response that answers."""
        cdef Py_ssize_t i
        cdef object fn, answer
        req.rewriting = True
        try:
            for i in range(len(self.plugins)):
                fn = self.rewrite_fns[i]
                if fn is None:
                    continue
                try:
                    answer = fn(req)
                except Exception:
                    _report(self.plugins[i], "rewrite", None)
                    return internal_error(self.plugins[i])
                if answer is not None:
                    if isinstance(answer, Response):
                        return answer
                    return _invalid_answer(self.plugins[i], answer, req)
        finally:
            req.rewriting = False
        return None

    def rewrite(self, Request req):
        """Python entry to run_rewrite (tests)."""
        return self.run_rewrite(req)

    cdef Py_ssize_t after(self, object plugin):
        """Index of the first plugin that sorts after `plugin` (by priority, then name)."""
        key = (-getattr(plugin, "priority", 0), getattr(plugin, "name", ""))
        cdef Py_ssize_t i
        for i in range(len(self.plugins)):
            p = self.plugins[i]
            if (-getattr(p, "priority", 0), getattr(p, "name", "")) > key:
                return i
        return len(self.plugins)

    cdef int run_response(self, Request req, ResponseHead resp) except -1:
        cdef Py_ssize_t i
        cdef object fn
        for i in range(len(self.plugins)):
            fn = self.response_fns[i]
            if fn is None:
                continue
            try:
                if isinstance(fn, NativePlugin):
                    (<NativePlugin>fn).response_c(req, resp)
                else:
                    fn(req, resp)
            except Exception:
                _report(self.plugins[i], "response", req.route)
        return 0

    def run_log(self, Request req, int status, dict timings):
        """Each log phase; scheduled with loop.call_soon, never on the client's path."""
        cdef ResponseHead resp = ResponseHead.__new__(ResponseHead)
        resp.status = status
        for i in range(len(self.plugins)):
            fn = self.log_fns[i]
            if fn is None:
                continue
            try:
                fn(req, resp, timings)
            except Exception:
                _report(self.plugins[i], "log", req.route)

    def access(self, Request req, Py_ssize_t start=0):
        """Python entry to run_access (tests)."""
        return self.run_access(req, start)

    def response(self, Request req, ResponseHead resp):
        return self.run_response(req, resp)


cdef object _invalid_answer(object plugin, object answer, Request req):
    log.error("plugin '%s' returned %s from access(), expected Response, an awaitable or None",
              getattr(plugin, "name", "?"), type(answer).__name__)
    print(f"fastmesh: plugin '{getattr(plugin, 'name', '?')}' returned {type(answer).__name__} "
          f"from access() (route '{req.route}'), expected Response, an awaitable or None",
          file=sys.stderr, flush=True)
    return internal_error(plugin)


def answer_payload(answer, bint close, route=None):
    """(status, bytes) of a plugin's Response; one that cannot be encoded becomes a logged 500."""
    try:
        return answer.status, answer.payload(close)
    except Exception:
        log.error("plugin answer for route '%s' is invalid", route, exc_info=True)
        print(f"fastmesh: invalid plugin answer (route '{route}'): "
              f"{sys.exc_info()[0].__name__}: {sys.exc_info()[1]}", file=sys.stderr, flush=True)
        return 500, internal_error().payload(close)
