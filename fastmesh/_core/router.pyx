# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled routing table (Kong-like, deterministic).

Route rules
-----------
A route matches a request when every rule it has holds:

* ``hosts``: the request host equals one of the exact hosts, or ends with the
  suffix of one of the wildcards: ``*.example.com`` matches ``a.example.com`` and
  ``a.b.example.com`` but not ``example.com``. Only a leading ``*.`` wildcard is
  supported. The request host is the raw ``Host`` value, ASCII-lower-cased, with
  surrounding blanks, the ``:port`` and trailing dots removed; an IPv6 literal
  keeps its brackets (``[::1]:8000`` -> ``[::1]``; a route host written as a bare
  ``::1`` is bracketed at build time). Ports are ignored on both sides. A host
  longer than 255 bytes (or a malformed ``[...`` literal) matches no route that
  has hosts. No ``hosts`` = any host.
* ``paths`` (raw bytes of the request path, no decoding or normalisation):
  ``=/x`` exact (the path equals ``/x``); ``~re`` regex (Python ``re`` on bytes,
  ``re.match``: anchored at the start of the path, not at its end); anything
  else is a prefix, a plain *byte* prefix as in Kong: ``/orders`` matches
  ``/orders``, ``/orders/1`` and also ``/orders-old`` (write ``/orders/`` to
  avoid that). No ``paths`` = any path.
* ``methods``: the request method is one of them (case-sensitive, as HTTP
  methods are). No ``methods`` = any method.
* ``headers``: for every rule ``(name, values)`` some request value of header
  ``name`` equals one of ``values`` (ASCII case-insensitive, surrounding blanks
  ignored); a rule with an empty value list only requires the header to be
  present. A missing header fails the rule; without a headers object, routes
  with header rules never match.

Precedence
----------
Among the matching routes the winner has the smallest key::

    (host_rank, path_rank, -priority, index, position in the route list)

host_rank  (0,)  one of its exact hosts equals the request host
           (1, -len(suffix))  its longest matching wildcard (longer suffix first)
           (2,)  the route has no hosts
path_rank  (0,)  an exact path equals the request path
           (1, -len(prefix))  its longest matching prefix (longer first)
           (2,)  one of its regexes matches (regex routes are therefore ordered
                 by priority desc, then index asc)
           (3,)  the route has no paths

So a route for a more specific host always wins over a less specific one, even
if the latter has a "better" path; when a host-specific route's path/method/
header rules fail, less specific host groups are searched next.

matched_len is the length of the matched exact path, of the longest matching
prefix, of ``m.end()`` of the route's first (in declared order) regex that
matches, or 0 for a route without paths. strip_path removes that many bytes.

Implementation
--------------
Routes are grouped by host key (each exact host, each wildcard suffix, and one
"no host" group); a route with several hosts is in several groups. Each group
holds: exact paths and prefixes in one shared open-addressing hash table over C
strings (keyed by group id + kind + bytes, FNV-1a + splitmix), the distinct
prefix lengths of the group (descending), its regex entries and its pathless
routes, every candidate list pre-sorted by (-priority, index, position).

match_c normalises the host into a 256-byte stack buffer, walks it once from
the end computing the FNV hash of every suffix (so each wildcard suffix at a
'.' costs one probe, and only for suffix lengths some wildcard has), probes the
exact host, then visits the candidate groups most specific first: exact path
probe, prefix probes (one forward pass over the path hashing it, one probe per
distinct prefix length of that group, hits tried longest first), regexes (only
here a Python bytes object of the path is created), pathless routes. The first
candidate that passes the method bitmask and the header rules (Python, only for
routes that have them) wins. Nothing on that path depends on the number of
routes except the length of the candidate lists themselves.
"""

from libc.stdint cimport uint64_t, uint32_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_ITEM

import re as _re
import time as _time

__all__ = ["Router"]


cdef enum:
    MAX_HOST = 255
    MAX_HITS = 64
    MAX_GROUPS = 130      # 1 exact + <=127 wildcard suffixes + no-host
    C_DOT = 46
    C_COLON = 58
    C_LBRACK = 91
    C_RBRACK = 93
    C_SPACE = 32
    C_TAB = 9
    C_A = 65
    C_Z = 90
    TAG_EXACT_HOST = 0
    TAG_WILD_HOST = 1

cdef uint64_t FNV_OFF = 14695981039346656037ULL
cdef uint64_t FNV_PRIME = 1099511628211ULL


ctypedef struct Entry:
    uint64_t hash
    uint32_t key_off
    uint32_t key_len
    uint32_t tag
    uint32_t v_start
    uint32_t v_count
    uint32_t used

ctypedef struct Group:
    uint32_t n_exact
    uint32_t plen_start
    uint32_t plen_count
    uint32_t rx_start
    uint32_t rx_count
    uint32_t pl_start
    uint32_t pl_count

ctypedef struct RouteC:
    uint64_t method_mask      # 0 = any method
    uint32_t has_headers

ctypedef struct RxEntry:
    uint32_t rid
    uint32_t rx_idx


# ----------------------------------------------------------------------------- hashing

cdef inline uint64_t _mix(uint64_t h, uint32_t tag) noexcept nogil:
    h ^= (<uint64_t>tag + 1) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 30
    h *= 0xBF58476D1CE4E5B9ULL
    h ^= h >> 27
    h *= 0x94D049BB133111EBULL
    h ^= h >> 31
    return h


cdef inline uint64_t _fnv(const char* s, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = FNV_OFF
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>s[i]) * FNV_PRIME
    return h


cdef inline uint64_t _rfnv(const char* s, Py_ssize_t n) noexcept nogil:
    """FNV-1a over the bytes in reverse order (so suffix hashes chain)."""
    cdef uint64_t h = FNV_OFF
    cdef Py_ssize_t i = n - 1
    while i >= 0:
        h = (h ^ <unsigned char>s[i]) * FNV_PRIME
        i -= 1
    return h


cdef inline Entry* _find(Entry* entries, uint64_t mask, const char* arena, uint64_t h,
                         uint32_t tag, const char* key, Py_ssize_t klen) noexcept nogil:
    cdef uint64_t i = h & mask
    cdef Entry* e
    while True:
        e = &entries[i]
        if not e.used:
            return NULL
        if (e.hash == h and e.tag == tag and e.key_len == <uint32_t>klen
                and memcmp(arena + e.key_off, key, <size_t>klen) == 0):
            return e
        i = (i + 1) & mask


cdef Py_ssize_t _norm_host(const char* h, Py_ssize_t n, char* out) noexcept nogil:
    """Lower-case, strip blanks/':port'/trailing dots into out (>= 256 bytes).

    Returns the length, 0 for no host, -1 for a host that cannot match any
    host rule (too long or malformed IPv6 literal)."""
    cdef Py_ssize_t s = 0, end, i
    cdef unsigned char c
    if h == NULL or n <= 0:
        return 0
    while s < n and (h[s] == C_SPACE or h[s] == C_TAB):
        s += 1
    while n > s and (h[n - 1] == C_SPACE or h[n - 1] == C_TAB):
        n -= 1
    if s >= n:
        return 0
    if h[s] == C_LBRACK:
        end = s
        while end < n and h[end] != C_RBRACK:
            end += 1
        if end == n:
            return -1
        end += 1
    else:
        end = s
        while end < n and h[end] != C_COLON:
            end += 1
    while end > s and h[end - 1] == C_DOT:
        end -= 1
    n = end - s
    if n <= 0:
        return 0
    if n > MAX_HOST:
        return -1
    for i in range(n):
        c = <unsigned char>h[s + i]
        if C_A <= c <= C_Z:
            c += 32
        out[i] = <char>c
    return n


def _normalize_host(host):
    """Python view of the request-host normalisation: bytes, b'' or None."""
    cdef char buf[256]
    cdef bytes b = _to_bytes(host)
    cdef Py_ssize_t n = _norm_host(b, len(b), buf)
    if n < 0:
        return None
    return PyBytes_FromStringAndSize(buf, n)


# ----------------------------------------------------------------------------- helpers

cdef bytes _to_bytes(object s):
    if s is None:
        return b""
    if isinstance(s, bytes):
        return <bytes>s
    if isinstance(s, str):
        return (<str>s).encode("utf-8", "surrogateescape")
    return bytes(s)


class _DictHeaders:
    """Adapts {name: value-or-list} (str or bytes) to the header_values protocol."""
    __slots__ = ("_d",)

    def __init__(self, d):
        norm = {}
        for k, v in d.items():
            kb = _to_bytes(k).lower()
            if isinstance(v, (str, bytes)):
                v = (v,)
            norm.setdefault(kb, []).extend(_to_bytes(x) for x in v)
        self._d = norm

    def header_values(self, name):
        return self._d.get(_to_bytes(name).lower(), [])


def _wrap_headers(headers):
    if headers is None or hasattr(headers, "header_values"):
        return headers
    return _DictHeaders(headers)


cdef int _headers_ok(list rules, object headers) except -1:
    cdef bytes name
    cdef frozenset allowed
    if headers is None:
        return 0
    for name, allowed in rules:
        vals = headers.header_values(name)
        if not vals:
            return 0
        if not allowed:          # presence-only rule
            continue
        for v in vals:
            if _to_bytes(v).strip().lower() in allowed:
                break
        else:
            return 0
    return 1


def _header_reason(list rules, object headers):
    """None if the rules hold, else a short reason (for explain)."""
    if headers is None:
        return "route has header rules but the request has no headers"
    for name, allowed in rules:
        vals = headers.header_values(name) or []
        if not vals:
            return "header %r missing" % name.decode("latin-1")
        if allowed and not any(_to_bytes(v).strip().lower() in allowed for v in vals):
            return "header %r: no value in %r" % (
                name.decode("latin-1"), sorted(x.decode("latin-1") for x in allowed))
    return None


class _Spec:
    """A route normalised for building (and for explain/shadowed)."""
    __slots__ = ("pos", "name", "index", "priority", "target", "hosts_raw", "exact_hosts",
                 "wild_hosts", "exact_paths", "prefixes", "regexes", "methods",
                 "header_rules", "order", "paths_raw")

    def __init__(self, r, pos, rx_cache):
        self.pos = pos
        self.name = getattr(r, "name", None)
        self.index = int(getattr(r, "index", pos))
        self.priority = int(getattr(r, "priority", 0) or 0)
        self.target = getattr(r, "target", None)
        self.order = (-self.priority, self.index, pos)
        hosts = tuple(getattr(r, "hosts", ()) or ())
        self.hosts_raw = hosts
        ex, wild = [], []
        for h in hosts:
            kind, key = _parse_host(h, self.name)
            lst = wild if kind else ex
            if key not in lst:
                lst.append(key)
        self.exact_hosts = ex
        self.wild_hosts = wild
        paths = tuple(getattr(r, "paths", ()) or ())
        self.paths_raw = paths
        exact, pref, rxs = [], [], []
        for p in paths:
            pb = _to_bytes(p)
            if pb[:1] == b"=":
                if pb[1:] not in exact:
                    exact.append(pb[1:])
            elif pb[:1] == b"~":
                src = pb[1:]
                rx = rx_cache.get(src)
                if rx is None:
                    try:
                        rx = _re.compile(src)
                    except _re.error as exc:
                        raise ValueError("route %r: invalid regex %r: %s" % (self.name, p, exc))
                    rx_cache[src] = rx
                if all(x is not rx for x in rxs):
                    rxs.append(rx)
            else:
                if pb not in pref:
                    pref.append(pb)
        self.exact_paths = exact
        self.prefixes = pref
        self.regexes = rxs
        self.methods = frozenset(_to_bytes(m).upper() for m in (getattr(r, "methods", ()) or ()))
        rules = []
        for hname, values in (getattr(r, "headers", ()) or ()):
            if isinstance(values, (str, bytes)):
                values = (values,)
            rules.append((_to_bytes(hname).strip().lower(),
                          frozenset(_to_bytes(v).strip().lower() for v in values)))
        self.header_rules = rules

    @property
    def has_paths(self):
        return bool(self.exact_paths or self.prefixes or self.regexes)

    @property
    def has_hosts(self):
        return bool(self.exact_hosts or self.wild_hosts)


def _parse_host(h, name):
    """-> (0, normalised exact host) or (1, wildcard suffix incl. the leading dot)."""
    hb = _to_bytes(h).strip().lower()
    if hb.startswith(b"*."):
        rest = hb[2:]
        if not rest or b"*" in rest:
            raise ValueError("route %r: unsupported host pattern %r" % (name, h))
        n = _normalize_host(rest)
        if not n:
            raise ValueError("route %r: invalid host %r" % (name, h))
        return 1, b"." + n
    if b"*" in hb:
        raise ValueError("route %r: unsupported host pattern %r (only a leading '*.' wildcard)"
                         % (name, h))
    if hb.count(b":") > 1 and not hb.startswith(b"["):
        hb = b"[" + hb + b"]"
    n = _normalize_host(hb)
    if n is None:
        n = hb          # too long: kept, can never match a (<= 255 byte) request host
    if not n:
        raise ValueError("route %r: invalid host %r" % (name, h))
    return 0, n


class _PyGroup:
    __slots__ = ("gid", "kind", "key", "exact", "prefix", "rx", "pathless")

    def __init__(self, gid, kind, key):
        self.gid = gid
        self.kind = kind
        self.key = key
        self.exact = {}
        self.prefix = {}
        self.rx = []
        self.pathless = []


# ----------------------------------------------------------------------------- compiled table

cdef class _Impl:
    cdef Entry* host_entries
    cdef uint64_t host_mask
    cdef Entry* path_entries
    cdef uint64_t path_mask
    cdef char* arena
    cdef uint32_t* rids
    cdef uint32_t* plens
    cdef Group* groups
    cdef RouteC* routes
    cdef RxEntry* rx
    cdef uint32_t* method_off
    cdef uint32_t* method_len
    cdef Py_ssize_t n_methods
    cdef Py_ssize_t nohost_gid
    cdef Py_ssize_t n_exact_hosts
    cdef Py_ssize_t n_wild_hosts
    cdef uint64_t wild_len_mask[4]
    cdef Py_ssize_t c_bytes
    cdef list targets
    cdef list regexes
    cdef list header_rules
    cdef public list specs

    def __cinit__(self):
        self.nohost_gid = -1

    def __dealloc__(self):
        free(self.host_entries)
        free(self.path_entries)
        free(self.arena)
        free(self.rids)
        free(self.plens)
        free(self.groups)
        free(self.routes)
        free(self.rx)
        free(self.method_off)
        free(self.method_len)

    cdef void* _alloc(self, size_t n) except NULL:
        cdef void* p = calloc(n if n else 1, 1)
        if p == NULL:
            raise MemoryError()
        self.c_bytes += n
        return p

    cdef _build(self, list routes):
        cdef Py_ssize_t i, n = len(routes), gid
        cdef dict rx_cache = {}
        specs = [_Spec(r, i, rx_cache) for i, r in enumerate(routes)]
        self.specs = specs
        self.targets = [s.target for s in specs]
        self.header_rules = [s.header_rules for s in specs]

        # methods -> bits
        mnames = sorted({m for s in specs for m in s.methods})
        if len(mnames) > 64:
            raise ValueError("more than 64 distinct methods")
        mbit = {m: (1 << k) for k, m in enumerate(mnames)}

        # groups, filled in precedence order so every candidate list comes out sorted
        groups = {}
        glist = []
        regexes = []
        rx_index = {}
        for s in sorted(specs, key=lambda s: s.order):
            keys = [(0, h) for h in s.exact_hosts] + [(1, w) for w in s.wild_hosts]
            if not s.has_hosts:
                keys = [(2, b"")]
            for gk in keys:
                g = groups.get(gk)
                if g is None:
                    g = groups[gk] = _PyGroup(len(glist), gk[0], gk[1])
                    glist.append(g)
                for p in s.exact_paths:
                    g.exact.setdefault(p, []).append(s.pos)
                for p in s.prefixes:
                    g.prefix.setdefault(p, []).append(s.pos)
                for rx in s.regexes:
                    k = rx_index.get(id(rx))
                    if k is None:
                        k = rx_index[id(rx)] = len(regexes)
                        regexes.append(rx)
                    g.rx.append((s.pos, k))
                if not s.has_paths:
                    g.pathless.append(s.pos)
        self.regexes = regexes

        # flatten
        arena = bytearray()
        rids = []
        plens = []
        rxs = []
        host_items = []      # (hash, tag, off, len, gid)
        path_items = []      # (hash, tag, off, len, start, count)
        key_off = {}

        def put_key(b):
            off = key_off.get(b)
            if off is None:
                off = key_off[b] = len(arena)
                arena.extend(b)
            return off

        self.groups = <Group*>self._alloc(sizeof(Group) * len(glist))
        for g in glist:
            gid = g.gid
            if g.kind == 2:
                self.nohost_gid = gid
            else:
                hk = g.key
                tag = TAG_EXACT_HOST if g.kind == 0 else TAG_WILD_HOST
                host_items.append((_mix(_rfnv(hk, len(hk)), tag), tag, put_key(hk), len(hk), gid))
                if g.kind == 0:
                    self.n_exact_hosts += 1
                else:
                    self.n_wild_hosts += 1
                    if len(hk) <= MAX_HOST:
                        self.wild_len_mask[len(hk) >> 6] |= (<uint64_t>1) << (len(hk) & 63)
            for p, lst in g.exact.items():
                tag = gid * 2
                path_items.append((_mix(_fnv(p, len(p)), tag), tag, put_key(p), len(p),
                                   len(rids), len(lst)))
                rids.extend(lst)
            for p, lst in g.prefix.items():
                tag = gid * 2 + 1
                path_items.append((_mix(_fnv(p, len(p)), tag), tag, put_key(p), len(p),
                                   len(rids), len(lst)))
                rids.extend(lst)
            lens = sorted({len(p) for p in g.prefix}, reverse=True)
            self.groups[gid].n_exact = len(g.exact)
            self.groups[gid].plen_start = len(plens)
            self.groups[gid].plen_count = len(lens)
            plens.extend(lens)
            self.groups[gid].rx_start = len(rxs)
            self.groups[gid].rx_count = len(g.rx)
            rxs.extend(g.rx)
            self.groups[gid].pl_start = len(rids)
            self.groups[gid].pl_count = len(g.pathless)
            rids.extend(g.pathless)

        mmmeth = bytearray()
        self.n_methods = len(mnames)
        self.method_off = <uint32_t*>self._alloc(sizeof(uint32_t) * len(mnames))
        self.method_len = <uint32_t*>self._alloc(sizeof(uint32_t) * len(mnames))
        for i, m in enumerate(mnames):
            self.method_off[i] = put_key(m)
            self.method_len[i] = len(m)

        if len(arena) >= 0xFFFFFFFF:
            raise ValueError("routing table too large")
        cdef bytes arena_b = bytes(arena)
        self.arena = <char*>self._alloc(len(arena_b))
        if len(arena_b):
            memcpy(self.arena, <const char*>arena_b, len(arena_b))

        self.rids = <uint32_t*>self._alloc(sizeof(uint32_t) * len(rids))
        for i, v in enumerate(rids):
            self.rids[i] = v
        self.plens = <uint32_t*>self._alloc(sizeof(uint32_t) * len(plens))
        for i, v in enumerate(plens):
            self.plens[i] = v
        self.rx = <RxEntry*>self._alloc(sizeof(RxEntry) * len(rxs))
        for i, (a, b) in enumerate(rxs):
            self.rx[i].rid = a
            self.rx[i].rx_idx = b

        self.routes = <RouteC*>self._alloc(sizeof(RouteC) * n)
        for s in specs:
            mm = 0
            for m in s.methods:
                mm |= mbit[m]
            self.routes[s.pos].method_mask = mm
            self.routes[s.pos].has_headers = 1 if s.header_rules else 0

        self.host_mask = self._table(host_items, &self.host_entries)
        self.path_mask = self._table(path_items, &self.path_entries)

    cdef uint64_t _table(self, list items, Entry** out) except? 0:
        cdef uint64_t cap = 8, i
        cdef Entry* t
        while cap < 2 * <uint64_t>len(items):
            cap <<= 1
        t = <Entry*>self._alloc(sizeof(Entry) * cap)
        out[0] = t
        for it in items:
            i = <uint64_t>it[0] & (cap - 1)
            while t[i].used:
                i = (i + 1) & (cap - 1)
            t[i].hash = it[0]
            t[i].tag = it[1]
            t[i].key_off = it[2]
            t[i].key_len = it[3]
            t[i].v_start = it[4]
            t[i].v_count = it[5] if len(it) > 5 else 0
            t[i].used = 1
        return cap - 1

    # ------------------------------------------------------------------ matching

    cdef inline int _route_ok(self, uint32_t rid, const char* method, Py_ssize_t method_len,
                              uint64_t* mbit, int* mres, object headers) except -1:
        cdef RouteC* r = &self.routes[rid]
        if r.method_mask and not self._method_only(rid, method, method_len, mbit, mres):
            return 0
        if r.has_headers:
            return _headers_ok(<list>PyList_GET_ITEM(self.header_rules, rid), headers)
        return 1

    cdef inline Py_ssize_t _pick(self, uint32_t start, uint32_t count, const char* method,
                                 Py_ssize_t method_len, uint64_t* mbit, int* mres,
                                 object headers) except -2:
        cdef uint32_t i, rid
        for i in range(start, start + count):
            rid = self.rids[i]
            if self._route_ok(rid, method, method_len, mbit, mres, headers):
                return rid
        return -1

    cdef Py_ssize_t find(self, const char* host, Py_ssize_t host_len,
                         const char* path, Py_ssize_t path_len,
                         const char* method, Py_ssize_t method_len,
                         object headers, Py_ssize_t* matched_len) except -2:
        cdef char hb[256]
        cdef uint32_t gids[MAX_GROUPS]
        cdef uint32_t wild[MAX_GROUPS]
        cdef Entry* hits[MAX_HITS]
        cdef int ng = 0, nw = 0, nh, gi, overflow
        cdef Py_ssize_t hn, j, slen, k, kk, pos, L, r
        cdef uint64_t h, fh = 0, mbit = 0
        cdef int mres = 0, have_fh = 0
        cdef uint32_t gid, tag, i, rid
        cdef unsigned char c
        cdef Group* g
        cdef Entry* e
        cdef uint32_t* lens
        cdef object path_obj = None
        cdef object m

        matched_len[0] = 0
        if path == NULL:
            path_len = 0
        # ---- candidate host groups, most specific first
        if self.n_exact_hosts or self.n_wild_hosts:
            hn = _norm_host(host, host_len, hb)
            if hn > 0:
                h = FNV_OFF
                j = hn - 1
                while j >= 0:
                    c = <unsigned char>hb[j]
                    h = (h ^ c) * FNV_PRIME
                    if c == C_DOT and j > 0 and self.n_wild_hosts:
                        slen = hn - j
                        if self.wild_len_mask[slen >> 6] & ((<uint64_t>1) << (slen & 63)):
                            e = _find(self.host_entries, self.host_mask, self.arena,
                                      _mix(h, TAG_WILD_HOST), TAG_WILD_HOST, hb + j, slen)
                            if e != NULL:
                                wild[nw] = e.v_start
                                nw += 1
                    j -= 1
                if self.n_exact_hosts:
                    e = _find(self.host_entries, self.host_mask, self.arena,
                              _mix(h, TAG_EXACT_HOST), TAG_EXACT_HOST, hb, hn)
                    if e != NULL:
                        gids[ng] = e.v_start
                        ng += 1
                while nw > 0:           # collected shortest suffix first
                    nw -= 1
                    gids[ng] = wild[nw]
                    ng += 1
        if self.nohost_gid >= 0:
            gids[ng] = <uint32_t>self.nohost_gid
            ng += 1

        # ---- per group: exact path, prefixes longest first, regexes, pathless
        for gi in range(ng):
            gid = gids[gi]
            g = &self.groups[gid]
            if g.n_exact:
                if not have_fh:
                    fh = _fnv(path, path_len)
                    have_fh = 1
                tag = gid * 2
                e = _find(self.path_entries, self.path_mask, self.arena, _mix(fh, tag), tag,
                          path, path_len)
                if e != NULL:
                    r = self._pick(e.v_start, e.v_count, method, method_len, &mbit, &mres, headers)
                    if r >= 0:
                        matched_len[0] = path_len
                        return r
            if g.plen_count:
                lens = self.plens + g.plen_start
                tag = gid * 2 + 1
                k = 0
                while k < g.plen_count and lens[k] > path_len:
                    k += 1
                # ascending walk over the path, one probe per distinct prefix length
                h = FNV_OFF
                pos = 0
                nh = 0
                overflow = 0
                kk = <Py_ssize_t>g.plen_count - 1
                while kk >= k:
                    L = lens[kk]
                    while pos < L:
                        h = (h ^ <unsigned char>path[pos]) * FNV_PRIME
                        pos += 1
                    e = _find(self.path_entries, self.path_mask, self.arena, _mix(h, tag), tag,
                              path, L)
                    if e != NULL:
                        if nh == MAX_HITS:
                            overflow = 1
                            break
                        hits[nh] = e
                        nh += 1
                    kk -= 1
                if overflow:
                    # pathological (> 64 nested prefixes of one path): rehash per length
                    for kk in range(k, g.plen_count):
                        L = lens[kk]
                        e = _find(self.path_entries, self.path_mask, self.arena,
                                  _mix(_fnv(path, L), tag), tag, path, L)
                        if e != NULL:
                            r = self._pick(e.v_start, e.v_count, method, method_len,
                                           &mbit, &mres, headers)
                            if r >= 0:
                                matched_len[0] = L
                                return r
                else:
                    while nh > 0:
                        nh -= 1
                        e = hits[nh]
                        r = self._pick(e.v_start, e.v_count, method, method_len,
                                       &mbit, &mres, headers)
                        if r >= 0:
                            matched_len[0] = e.key_len
                            return r
            if g.rx_count:
                for i in range(g.rx_start, g.rx_start + g.rx_count):
                    rid = self.rx[i].rid
                    if self.routes[rid].method_mask:
                        # method check first (cheap); headers after the regex
                        if not self._method_only(rid, method, method_len, &mbit, &mres):
                            continue
                    if path_obj is None:
                        path_obj = PyBytes_FromStringAndSize(path, path_len)
                    m = (<object>PyList_GET_ITEM(self.regexes, self.rx[i].rx_idx)).match(path_obj)
                    if m is None:
                        continue
                    if self.routes[rid].has_headers and not _headers_ok(
                            <list>PyList_GET_ITEM(self.header_rules, rid), headers):
                        continue
                    matched_len[0] = m.end()
                    return rid
            if g.pl_count:
                r = self._pick(g.pl_start, g.pl_count, method, method_len, &mbit, &mres, headers)
                if r >= 0:
                    return r
        return -1

    cdef inline int _method_only(self, uint32_t rid, const char* method, Py_ssize_t method_len,
                                 uint64_t* mbit, int* mres) noexcept:
        cdef Py_ssize_t k
        if not mres[0]:
            mres[0] = 1
            mbit[0] = 0
            if method != NULL:
                for k in range(self.n_methods):
                    if (self.method_len[k] == <uint32_t>method_len and
                            memcmp(self.arena + self.method_off[k], method,
                                   <size_t>method_len) == 0):
                        mbit[0] = (<uint64_t>1) << k
                        break
        return 1 if (self.routes[rid].method_mask & mbit[0]) else 0


# ----------------------------------------------------------------------------- explain

def _explain_one(s, hn, bytes path, bytes method, headers):
    """Evaluate one route like the matcher does; -> dict (with a private '_key')."""
    d = {"route": s.name, "index": s.index, "priority": s.priority, "matched": False,
         "winner": False, "host": None, "path": None, "matched_len": None, "reason": None}
    # host
    if not s.has_hosts:
        hrank = (2,)
        d["host"] = "any host"
    elif hn and hn in s.exact_hosts:
        hrank = (0,)
        d["host"] = "exact host %s" % hn.decode("latin-1")
    else:
        best = None
        if hn:
            for w in s.wild_hosts:
                if hn.endswith(w) and len(hn) > len(w) and (best is None or len(w) > len(best)):
                    best = w
        if best is None:
            d["reason"] = "host %r matches none of %r" % (
                (hn or b"").decode("latin-1"), list(s.hosts_raw))
            return d, None
        hrank = (1, -len(best))
        d["host"] = "wildcard host *%s" % best.decode("latin-1")
    # path
    mlen = None
    if not s.has_paths:
        prank = (3,)
        mlen = 0
        d["path"] = "any path"
    elif path in s.exact_paths:
        prank = (0,)
        mlen = len(path)
        d["path"] = "exact =%s" % path.decode("latin-1")
    else:
        best = None
        for p in s.prefixes:
            if path.startswith(p) and (best is None or len(p) > len(best)):
                best = p
        if best is not None:
            prank = (1, -len(best))
            mlen = len(best)
            d["path"] = "prefix %s" % best.decode("latin-1")
        else:
            for rx in s.regexes:
                m = rx.match(path)
                if m is not None:
                    prank = (2,)
                    mlen = m.end()
                    d["path"] = "regex ~%s" % rx.pattern.decode("latin-1")
                    break
            else:
                d["reason"] = "path %r matches none of %r" % (
                    path.decode("latin-1"), list(s.paths_raw))
                return d, None
    if s.methods and method not in s.methods:
        d["reason"] = "method %r not in %r" % (method.decode("latin-1"),
                                               sorted(x.decode("latin-1") for x in s.methods))
        return d, None
    if s.header_rules:
        why = _header_reason(s.header_rules, headers)
        if why is not None:
            d["reason"] = why
            return d, None
    d["matched"] = True
    d["matched_len"] = mlen
    return d, (hrank, prank) + s.order


# ----------------------------------------------------------------------------- Router

cdef class Router:
    """Routing table; see the module docstring for the matching rules."""

    def __init__(self, routes=()):
        cdef _Impl impl = _Impl()
        routes = list(routes)
        impl._build(routes)
        self._impl_state = impl
        self.size = len(routes)

    def __len__(self):
        return self.size

    cdef object match_c(self, const char* host, Py_ssize_t host_len,
                        const char* path, Py_ssize_t path_len,
                        const char* method, Py_ssize_t method_len,
                        object headers, Py_ssize_t* matched_len):
        cdef Py_ssize_t rid
        if self._impl_state is None:
            matched_len[0] = 0
            return None
        rid = (<_Impl>self._impl_state).find(host, host_len, path, path_len, method, method_len,
                                             headers, matched_len)
        if rid < 0:
            return None
        return <object>PyList_GET_ITEM((<_Impl>self._impl_state).targets, rid)

    def match(self, host, path, method, headers=None):
        """-> (target, matched_len) or None. Accepts str or bytes; headers may be a
        dict {name: value or list of values} or an object with header_values()."""
        cdef bytes hb = _to_bytes(host), pb = _to_bytes(path), mb = _to_bytes(method)
        cdef Py_ssize_t ml = 0, rid
        cdef _Impl impl = <_Impl>self._impl_state
        if impl is None:
            return None
        rid = impl.find(hb, len(hb), pb, len(pb), mb, len(mb), _wrap_headers(headers), &ml)
        if rid < 0:
            return None
        return impl.targets[rid], ml

    def _match_c(self, bytes host, bytes path, bytes method, headers=None):
        """match_c exactly as the proxy calls it (tests): -> (target or None, matched_len)."""
        cdef Py_ssize_t ml = -1
        t = self.match_c(host, len(host), path, len(path), method, len(method), headers, &ml)
        return t, ml

    def explain(self, host, path, method, headers=None):
        """Every route in the order the matcher ranks them: matching routes best first
        (the first one, winner=True, is what match() returns), then the routes that do
        not match, in declaration order, each with the reason."""
        cdef _Impl impl = <_Impl>self._impl_state
        if impl is None:
            return []
        hn = _normalize_host(host)
        pb = _to_bytes(path)
        mb = _to_bytes(method)
        headers = _wrap_headers(headers)
        ok, bad = [], []
        for s in impl.specs:
            d, key = _explain_one(s, hn, pb, mb, headers)
            if key is None:
                bad.append(d)
            else:
                ok.append((key, d))
        ok.sort(key=lambda kd: kd[0])
        out = [d for _, d in ok]
        if out:
            out[0]["winner"] = True
        return out + bad

    def shadowed(self):
        """(route, shadowed_by) pairs for routes that can never win: another route with
        the same hosts and paths, methods and header rules at least as permissive, ranks
        before it (priority desc, index asc). Conservative: misses other kinds of overlap."""
        cdef _Impl impl = <_Impl>self._impl_state
        if impl is None:
            return []
        buckets = {}
        out = []
        for s in sorted(impl.specs, key=lambda s: s.order):
            key = (frozenset(s.exact_hosts), frozenset(s.wild_hosts), frozenset(s.exact_paths),
                   frozenset(s.prefixes), frozenset(rx.pattern for rx in s.regexes))
            lst = buckets.setdefault(key, [])
            for a in lst:
                if a.methods and not (s.methods and s.methods <= a.methods):
                    continue
                brules = dict(s.header_rules)
                if all(n in brules and (not allowed or (brules[n] and brules[n] <= allowed))
                       for n, allowed in a.header_rules):
                    out.append((s.name, a.name))
                    break
            lst.append(s)
        return out

    def memory_usage(self):
        """Bytes of C memory held by the compiled table (Python objects not counted)."""
        cdef _Impl impl = <_Impl>self._impl_state
        return 0 if impl is None else impl.c_bytes

    def _bench_match_c(self, host, path, method, Py_ssize_t n=1000000, headers=None):
        """Time n calls of match_c from C; -> ns per call."""
        cdef bytes hb = _to_bytes(host), pb = _to_bytes(path), mb = _to_bytes(method)
        cdef const char* hp = hb
        cdef const char* pp = pb
        cdef const char* mp = mb
        cdef Py_ssize_t hl = len(hb), pl = len(pb), mlen = len(mb), ml = 0, i
        t0 = _time.perf_counter_ns()
        for i in range(n):
            self.match_c(hp, hl, pp, pl, mp, mlen, headers, &ml)
        t1 = _time.perf_counter_ns()
        return (t1 - t0) / n
