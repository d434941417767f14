# cython: language_level=3, boundscheck=False, wraparound=False
"""The key-auth plugin's data path (native): key lookup and identity headers without Python calls
beyond one dict lookup for a key seen before (one SHA-256 and two lookups the first time).

Config parsing, consumers and the anonymous fallback stay in fastmesh/plugins/key_auth.py and
fastmesh/plugins/identity.py; `compile()` hands this class the tables it needs. The identity
headers a consumer gets are precomputed per credential as one block of header lines, so
authenticating a request is: find the key header, look up, drop any client copies of the
identity headers, append ours.

**Why a cache of presented keys, and why it is safe.** Hashing the key with SHA-256 on every
request was the largest part of key-auth's cost (a hashlib object, a digest object, ~0.5 µs).
The stored credentials stay hashed (`keys`: SHA-256 digest -> consumer). A key that *matched*
is remembered in `recent` (presented bytes -> the same entry), so a client that repeats its key
(every keep-alive request) costs one dict lookup. What this changes:
- Only keys that matched a credential are cached, so a client cannot fill the cache with
  guesses, and only in the form they are stored in (no surrounding blanks, at most
  `RECENT_KEY_MAX` bytes), so one valid key cannot be padded into many entries: at most one
  entry per credential, `RECENT_MAX` entries (emptied when full), in one plugin instance,
  which a reload replaces (credentials removed by a reload are forgotten with it).
- Timing: a lookup in `recent` hashes the presented bytes with the interpreter's keyed SipHash
  (a per-process random key) and compares bytes only when the 64-bit hashes match, so a wrong
  key's time does not depend on how much of a cached key it shares (as with the digest lookup
  before it). A hit is faster than a miss, but a hit is a valid key: the answer (200 vs 401)
  says as much already.
- Memory: the keys of recently active clients are held in clear in the worker, as their
  requests' buffers hold them anyway while they are read.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from libc.stdint cimport uint64_t

from fastmesh._core.plugin cimport NativePlugin, Request, name_lens

import hashlib

from fastmesh._core.plugin import Response

cdef object _sha256 = hashlib.sha256
DEF RECENT_MAX = 4096           # cached keys per plugin instance
DEF RECENT_KEY_MAX = 256        # longer keys are not cached


cdef class KeyAuthFilter(NativePlugin):
    cdef dict keys              # SHA-256(key) -> (username, credential id, header block)
    cdef dict recent            # presented key (bytes) -> the same tuple: keys that matched
    cdef tuple header_names     # lower-case bytes
    cdef tuple query_names      # str, for the query fallback
    cdef bint in_header
    cdef bint in_query
    cdef bint hide
    cdef object anonymous       # the Consumer for the fallback, or None
    cdef object on_anonymous    # identity.anonymous
    cdef frozenset identity_names   # lower-case names we set or remove (client copies dropped)
    cdef uint64_t identity_lens     # name_lens(identity_names)
    cdef object missing         # the 401 answers (immutable, shared)
    cdef object invalid

    def __init__(self, dict config):
        NativePlugin.__init__(self, config)
        self.native_access = True

    def compile(self, dict keys, tuple header_names, tuple query_names, bint in_header,
                bint in_query, bint hide, anonymous, on_anonymous, frozenset identity_names,
                missing, invalid):
        self.keys = {digest: (username, credential, b"".join(
                         name + b": " + value + b"\r\n" for name, value in lines))
                     for digest, (username, credential, lines) in keys.items()}
        self.recent = {}
        self.header_names = header_names
        self.query_names = query_names
        self.in_header = in_header
        self.in_query = in_query
        self.hide = hide
        self.anonymous = anonymous
        self.on_anonymous = on_anonymous
        self.identity_names = identity_names
        self.identity_lens = name_lens(identity_names)
        self.missing = missing
        self.invalid = invalid

    cdef object access_c(self, Request req):
        cdef bytes name
        cdef object key = None
        cdef object found
        if self.anonymous is not None and req.consumer is not None and req.authenticated_c():
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
        found = self.recent.get(key)
        if found is None:
            stripped = (<bytes>key).strip()
            found = self.keys.get(_sha256(stripped).digest())
            if found is None:
                return self._fail(req, self.invalid)
            # One cached form per credential: as stored (no blanks around it), not too long
            if PyBytes_GET_SIZE(stripped) == PyBytes_GET_SIZE(key) <= RECENT_KEY_MAX:
                if len(self.recent) >= RECENT_MAX:
                    self.recent.clear()
                self.recent[key] = found
        username, credential, block = <tuple>found
        req.consumer = username
        req.set_auth(credential, False)
        req.replace_block(self.identity_names, self.identity_lens, <bytes>block)
        return None

    cdef object _fail(self, Request req, object answer):
        if self.anonymous is None:
            return answer
        self.on_anonymous(req, self.anonymous)
        return None
