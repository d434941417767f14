# cython: language_level=3, boundscheck=False, wraparound=False
"""The mesh-authorization plugin's data path (native): may this caller make this request?

The rules are compiled by fastmesh/plugins/mesh_authorization.py into tuples of bytes; a request
costs the compare of its verified peer identity (`Request.peer`, set once per TLS connection),
its method and its path against them: no Python calls, no allocation on the allow path.

Decisions are counted in a `Decisions` object per protected service, shared by every instance of
the plugin for that service, so a policy change (a new Plan, new plugin instances) keeps the
counts going.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcmp

from fastmesh._core.plugin cimport NativePlugin, Request

from fastmesh._core.plugin import Response

DEF XFCC_LEN = 23


cdef class Decisions:
    """Allowed and denied requests to one service (one per service name, process-wide)."""
    cdef readonly long long allowed
    cdef readonly long long denied

    def as_dict(self):
        return {"allowed": self.allowed, "denied": self.denied}

    def count(self, bint allowed):
        """One decision made outside the HTTP data path (opaque TCP, fastmesh.mesh.opaque_mtls)."""
        if allowed:
            self.allowed += 1
        else:
            self.denied += 1


cdef dict _decisions = {}


def decisions(str service):
    """The Decisions of `service` (created on first use)."""
    found = _decisions.get(service)
    if found is None:
        found = _decisions[service] = Decisions()
    return found


cdef bint _canonical(const char* p, Py_ssize_t n) noexcept:
    """False for a path an app could read as another one: a dot segment, an empty segment, a
    backslash, or a percent-encoded dot, slash or backslash. Such a path matches no `paths`."""
    cdef Py_ssize_t i
    cdef char c, d
    for i in range(n):
        c = p[i]
        if c == b'\\':
            return False
        if c == b'%' and i + 2 < n:
            d = p[i + 2] | 0x20
            if p[i + 1] == b'2' and (d == b'e' or d == b'f'):
                return False
            if p[i + 1] == b'5' and d == b'c':
                return False
        if c == b'/' and i + 1 < n:
            if p[i + 1] == b'/':
                return False
            if p[i + 1] == b'.':
                # "/." or "/.." followed by the end or by '/'
                if i + 2 == n or p[i + 2] == b'/':
                    return False
                if p[i + 2] == b'.' and (i + 3 == n or p[i + 3] == b'/'):
                    return False
    return True


cdef bint _under(const char* p, Py_ssize_t n, bytes prefix) noexcept:
    """Segment-wise prefix: `/orders` matches `/orders` and `/orders/...`, not `/ordersx`;
    a prefix ending in '/' matches whatever follows it."""
    cdef Py_ssize_t k = PyBytes_GET_SIZE(prefix)
    cdef const char* q = PyBytes_AS_STRING(prefix)
    if n < k or memcmp(p, q, k) != 0:
        return False
    return n == k or q[k - 1] == b'/' or p[k] == b'/'


cdef bint _peer_allowed(bytes peer, object peers):
    """`peers`: a frozenset of exact ids, or (that frozenset, prefixes ending in '/') when the
    rule has patterns (`spiffe://example.org/*`)."""
    cdef bytes prefix
    cdef Py_ssize_t n, k
    if type(peers) is frozenset:
        return peer in <frozenset>peers
    if peer in <frozenset>(<tuple>peers)[0]:
        return True
    n = PyBytes_GET_SIZE(peer)
    for prefix in <tuple>(<tuple>peers)[1]:
        k = PyBytes_GET_SIZE(prefix)
        if n > k and memcmp(PyBytes_AS_STRING(peer), PyBytes_AS_STRING(prefix), k) == 0:
            return True
    return False


cdef class AuthzFilter(NativePlugin):
    # rules: tuple of (peers, methods, paths); peers: frozenset of identities (bytes), or
    # (frozenset, prefixes) with patterns (_peer_allowed), None for "any authenticated caller",
    # True for anyone (`from: ["*"]`, plaintext callers too); methods/paths: tuples of bytes,
    # or None for "any".
    cdef tuple rules
    cdef bint enforce              # some rule names this service: what no rule allows is denied
    cdef Decisions counts
    cdef object deny_answer
    cdef frozenset xfcc

    def __init__(self, dict config):
        NativePlugin.__init__(self, config)
        self.native_access = True
        self.xfcc = frozenset({b"x-forwarded-client-cert"})

    def compile(self, tuple rules, str service, deny_answer):
        self.rules = rules
        self.enforce = len(rules) > 0
        self.counts = decisions(service)
        self.deny_answer = deny_answer

    cdef object access_c(self, Request req):
        cdef const char* m
        cdef const char* p
        cdef Py_ssize_t mlen, plen
        cdef bytes method, path
        cdef tuple rule
        cdef object peers, methods, paths
        cdef bint ok
        # A client-sent certificate header would look like a proxy's: never forwarded.
        if req.has_header_c("x-forwarded-client-cert", XFCC_LEN):
            req.replace_c(self.xfcc, ())
        if not self.enforce:
            return None
        if req.live:
            m = req.b + req.h.method.off
            mlen = req.h.method.len
            if req.h.path.len:
                p = req.b + req.h.path.off
                plen = req.h.path.len
            else:
                p = "/"
                plen = 1
        else:
            method = req.method
            path = req.path
            m, mlen = PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method)
            p, plen = PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path)
        for rule in self.rules:
            peers, methods, paths = rule
            if peers is None:
                if req.peer is None:
                    continue
            elif peers is not True:
                if req.peer is None or not _peer_allowed(req.peer, peers):
                    continue
            if methods is not None:
                ok = False
                for name in <tuple>methods:
                    if PyBytes_GET_SIZE(name) == mlen and memcmp(PyBytes_AS_STRING(name), m, mlen) == 0:
                        ok = True
                        break
                if not ok:
                    continue
            if paths is not None:
                if not _canonical(p, plen):
                    continue
                ok = False
                for prefix in <tuple>paths:
                    if _under(p, plen, <bytes>prefix):
                        ok = True
                        break
                if not ok:
                    continue
            self.counts.allowed += 1
            return None
        self.counts.denied += 1
        return self.deny_answer
