# cython: language_level=3, boundscheck=False, wraparound=False
"""The key-auth plugin's data path (native): key lookup and identity headers without Python calls
beyond one SHA-256 and one dict lookup.

Config parsing, consumers and the anonymous fallback stay in fastmesh/plugins/key_auth.py and
fastmesh/plugins/identity.py; `compile()` hands this class the tables it needs. The identity
headers a consumer gets are precomputed per credential, so authenticating a request is: find the
key header, hash, look up, drop any client copies of the identity headers, append ours.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from fastmesh._core.plugin cimport NativePlugin, Request

import hashlib

from fastmesh._core.plugin import Response

cdef object _sha256 = hashlib.sha256
cdef str ANONYMOUS_KEY = "fastmesh.anonymous"
cdef str CREDENTIAL_KEY = "fastmesh.credential"


cdef class KeyAuthFilter(NativePlugin):
    cdef dict keys              # SHA-256(key) -> (username, credential id, header lines)
    cdef tuple header_names     # lower-case bytes
    cdef tuple query_names      # str, for the query fallback
    cdef bint in_header
    cdef bint in_query
    cdef bint hide
    cdef object anonymous       # the Consumer for the fallback, or None
    cdef object on_anonymous    # identity.anonymous
    cdef frozenset identity_names   # lower-case names we set or remove (client copies dropped)
    cdef object missing         # the 401 answers (immutable, shared)
    cdef object invalid

    def __init__(self, dict config):
        NativePlugin.__init__(self, config)
        self.native_access = True

    def compile(self, dict keys, tuple header_names, tuple query_names, bint in_header,
                bint in_query, bint hide, anonymous, on_anonymous, frozenset identity_names,
                missing, invalid):
        self.keys = keys
        self.header_names = header_names
        self.query_names = query_names
        self.in_header = in_header
        self.in_query = in_query
        self.hide = hide
        self.anonymous = anonymous
        self.on_anonymous = on_anonymous
        self.identity_names = identity_names
        self.missing = missing
        self.invalid = invalid

    cdef object access_c(self, Request req):
        cdef bytes name
        cdef object key = None
        cdef object found
        if self.anonymous is not None and req.consumer is not None and req.ctx is not None \
                and not req.ctx.get(ANONYMOUS_KEY, False):
            return None                  # Kong's OR: an earlier plugin authenticated already
        if self.in_header:
            for name in self.header_names:
                key = req.header_c(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
                if key is not None:
                    if self.hide:
                        req.remove_header(name)
                    break
        if key is None and self.in_query:
            for qname in self.query_names:
                value = req.query_arg(qname)
                if value is not None:
                    key = value.encode()
                    break
        if key is None:
            return self._fail(req, self.missing)
        found = self.keys.get(_sha256((<bytes>key).strip()).digest())
        if found is None:
            return self._fail(req, self.invalid)
        username, credential, lines = <tuple>found
        req.consumer = username
        if req.ctx is None:
            req.ctx = {ANONYMOUS_KEY: False, CREDENTIAL_KEY: credential}
        else:
            req.ctx[ANONYMOUS_KEY] = False
            req.ctx[CREDENTIAL_KEY] = credential
        req.replace_c(self.identity_names, lines)
        return None

    cdef object _fail(self, Request req, object answer):
        if self.anonymous is None:
            return answer
        self.on_anonymous(req, self.anonymous)
        return None
