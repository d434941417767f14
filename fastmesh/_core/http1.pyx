# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Strict HTTP/1.1 head parser and chunked decoder (RFC 9112 / RFC 9110).

The cdef functions declared in http1.pxd make one pass over the caller's bytes,
allocate nothing and touch no Python object; they are what the proxy cimports.
The Python-visible helpers at the bottom (parse_request, parse_response,
ChunkedDecoder, error_status) wrap them for tests and the echo server.

Documented choices (stricter than llhttp in places):
  * request-target must be printable ASCII (0x21-0x7E) without '#'.
  * absolute-form only for the http/https schemes, no userinfo.
  * Content-Length may be a comma list of identical values ("5, 5").
  * CL + TE in a request -> 400; any non-chunked transfer-coding in a request -> 501.
  * TE in an HTTP/1.0 request -> 400, in an HTTP/1.0 response -> 502.
  * a response with CL + TE: TE wins, keep_alive is forced to 0 (smuggling signal).
  * a response whose last coding is not chunked: BODY_UNTIL_CLOSE and te_passthrough=1
    (the body is still coded, the TE header must travel with it).
  * chunk extensions: no whitespace around ';' / '=' (RFC 9112 allows BWS; llhttp and we reject it).
  * Expect: 100-continue is ignored in HTTP/1.0 requests (RFC 9110 10.1.1).
  * a request with a body is not an upgrade (upgrade=0; Upgrade/Connection are still dropped).
  * a trailer field named Content-Length or Transfer-Encoding -> bad chunk (RFC 9110 6.5.1
    forbids framing fields in trailers; llhttp rejects them too).
  * a Connection option naming "Host" does not mark Host hop-by-hop (the proxy decides).
"""
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from fastmesh._core.includes.clock cimport now_ns

# ---------------------------------------------------------------------------
# character classes

cdef enum:
    C_TCHAR = 1      # RFC 9110 token char
    C_VALUE = 2      # field-vchar / SP / HTAB / obs-text (allowed inside a field value)
    C_TARGET = 4     # request-target char we accept: VCHAR except '#'
    C_HEX = 8
    C_HOST = 16      # reg-name / IP-literal / port chars (no '@', '/', '?', '#')
    C_QDTEXT = 32    # quoted-string text: HTAB SP 0x21 0x23-0x5B 0x5D-0x7E obs-text
    C_DIGIT = 64

cdef enum:
    _HT = 9
    _LF = 10
    _CR = 13
    _SP = 32
    _DQUOTE = 34
    _STAR = 42
    _COMMA = 44
    _DOT = 46
    _SLASH = 47
    _COLON = 58
    _SEMI = 59
    _EQ = 61
    _QMARK = 63
    _BSLASH = 92

cdef enum:
    MAX_LEADING_CRLF = 4
    CHUNK_LINE_MAX = 4096
    CHUNK_TRAILER_MAX = 16384

cdef uint8_t CC[256]
cdef uint8_t LOWER[256]
cdef int8_t HEXV[256]

cdef void _init_tables() noexcept:
    cdef int i
    cdef uint8_t f
    tchar = b"!#$%&'*+-.^_`|~"
    hostc = b"-._~!$&'()*+,;=:[]%"
    for i in range(256):
        f = 0
        if (48 <= i <= 57) or (65 <= i <= 90) or (97 <= i <= 122):
            f |= C_TCHAR | C_HOST
        elif i < 128 and bytes([i]) in tchar:
            f |= C_TCHAR
        if i < 128 and bytes([i]) in hostc:
            f |= C_HOST
        if i == _HT or (0x20 <= i <= 0x7E) or i >= 0x80:
            f |= C_VALUE
        if 0x21 <= i <= 0x7E and i != 35:
            f |= C_TARGET
        if (48 <= i <= 57) or (65 <= i <= 70) or (97 <= i <= 102):
            f |= C_HEX
        if 48 <= i <= 57:
            f |= C_DIGIT
        if (i == _HT or i == _SP or i == 0x21 or (0x23 <= i <= 0x5B)
                or (0x5D <= i <= 0x7E) or i >= 0x80):
            f |= C_QDTEXT
        CC[i] = f
        LOWER[i] = i + 32 if 65 <= i <= 90 else i
        if 48 <= i <= 57:
            HEXV[i] = i - 48
        elif 65 <= i <= 70:
            HEXV[i] = i - 55
        elif 97 <= i <= 102:
            HEXV[i] = i - 87
        else:
            HEXV[i] = -1

_init_tables()

# ---------------------------------------------------------------------------
# small helpers

cdef inline bint _ieq(const unsigned char* s, const char* lower, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if LOWER[s[i]] != <unsigned char>lower[i]:
            return False
    return True


cdef inline bint _is_ows(unsigned char c) noexcept nogil:
    return c == _SP or c == _HT


cdef void limits_default(Limits* lim) noexcept nogil:
    lim.max_head_size = 32768
    lim.max_line_size = 8192
    lim.max_headers = 100


cdef bint span_ieq(const char* buf, Span s, const char* lower, Py_ssize_t lower_len) noexcept nogil:
    if <Py_ssize_t>s.len != lower_len:
        return False
    return _ieq(<const unsigned char*>buf + s.off, lower, lower_len)


cdef uint8_t _classify(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Header kind from its name (case-insensitive)."""
    cdef unsigned char c0
    if n < 2:
        return H_OTHER
    c0 = LOWER[s[0]]
    if n == 2:
        if _ieq(s, b"te", 2):
            return H_TE
    elif n == 3:
        if _ieq(s, b"via", 3):
            return H_VIA
    elif n == 4:
        if _ieq(s, b"host", 4):
            return H_HOST
    elif n == 6:
        if _ieq(s, b"expect", 6):
            return H_EXPECT
    elif n == 7:
        if c0 == b't':
            if _ieq(s, b"trailer", 7):
                return H_TRAILER
        elif c0 == b'u':
            if _ieq(s, b"upgrade", 7):
                return H_UPGRADE
    elif n == 10:
        if c0 == b'c':
            if _ieq(s, b"connection", 10):
                return H_CONNECTION
        elif c0 == b'k':
            if _ieq(s, b"keep-alive", 10):
                return H_KEEP_ALIVE
    elif n == 14:
        if _ieq(s, b"content-length", 14):
            return H_CONTENT_LENGTH
    elif n == 15:
        if _ieq(s, b"x-forwarded-for", 15):
            return H_X_FORWARDED_FOR
    elif n == 16:
        if c0 == b'p':
            if _ieq(s, b"proxy-connection", 16):
                return H_PROXY_CONNECTION
        elif c0 == b'x':
            if _ieq(s, b"x-forwarded-host", 16):
                return H_X_FORWARDED_HOST
            if _ieq(s, b"x-forwarded-port", 16):
                return H_X_FORWARDED_PORT
    elif n == 17:
        if c0 == b't':
            if _ieq(s, b"transfer-encoding", 17):
                return H_TRANSFER_ENCODING
        elif c0 == b'x':
            if _ieq(s, b"x-forwarded-proto", 17):
                return H_X_FORWARDED_PROTO
    return H_OTHER


# What the header pass learned besides the Head fields.
cdef struct _Sem:
    int64_t cl
    uint8_t has_cl
    uint8_t has_te
    uint8_t te_chunked       # how many times "chunked" was listed
    uint8_t te_last_chunked  # the last coding seen is chunked
    uint8_t te_other         # a coding other than chunked was listed
    uint8_t c_close
    uint8_t c_keepalive
    uint8_t c_upgrade
    uint8_t c_custom         # a Connection option that names a header
    uint8_t expect


cdef inline void _sem_reset(_Sem* s) noexcept nogil:
    s.cl = -1
    s.has_cl = 0
    s.has_te = 0
    s.te_chunked = 0
    s.te_last_chunked = 0
    s.te_other = 0
    s.c_close = 0
    s.c_keepalive = 0
    s.c_upgrade = 0
    s.c_custom = 0
    s.expect = 0


cdef inline void _span(Span* s, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    s.off = <uint32_t>a
    s.len = <uint32_t>(b - a)


cdef inline void _head_reset(Head* h) noexcept nogil:
    h.method.off = 0
    h.method.len = 0
    h.target.off = 0
    h.target.len = 0
    h.path.off = 0
    h.path.len = 0
    h.query.off = 0
    h.query.len = 0
    h.has_query = 0
    h.absolute_form = 0
    h.authority.off = 0
    h.authority.len = 0
    h.method_head = 0
    h.method_connect = 0
    h.status = 0
    h.reason.off = 0
    h.reason.len = 0
    h.version_minor = 1
    h.nheaders = 0
    h.body_kind = BODY_NONE
    h.content_length = -1
    h.keep_alive = 0
    h.upgrade = 0
    h.expect_continue = 0
    h.te_passthrough = 0
    h.host_index = -1
    h.upgrade_index = -1
    h.xff_index = -1
    h.via_index = -1


# ---------------------------------------------------------------------------
# field-value grammars

cdef int _parse_cl(const unsigned char* b, Py_ssize_t i, Py_ssize_t e, int64_t* out) noexcept nogil:
    """1*DIGIT, or a comma list of identical 1*DIGIT values. -1 on error."""
    cdef int64_t value = -1, v
    cdef int d
    while True:
        if i >= e or not (CC[b[i]] & C_DIGIT):
            return -1
        v = 0
        while i < e and (CC[b[i]] & C_DIGIT):
            d = b[i] - 48
            if v > (<int64_t>0x7FFFFFFFFFFFFFFF - d) // 10:
                return -1
            v = v * 10 + d
            i += 1
        if value == -1:
            value = v
        elif value != v:
            return -1
        while i < e and _is_ows(b[i]):
            i += 1
        if i == e:
            break
        if b[i] != _COMMA:
            return -1
        i += 1
        while i < e and _is_ows(b[i]):
            i += 1
    out[0] = value
    return 0


cdef Py_ssize_t _skip_param_value(const unsigned char* b, Py_ssize_t i, Py_ssize_t e) noexcept nogil:
    """token / quoted-string at i; returns the index after it or -1."""
    if i < e and b[i] == _DQUOTE:
        i += 1
        while i < e:
            if b[i] == _DQUOTE:
                return i + 1
            if b[i] == _BSLASH:
                i += 1
                if i >= e or not (CC[b[i]] & C_VALUE):
                    return -1
            elif not (CC[b[i]] & C_QDTEXT):
                return -1
            i += 1
        return -1
    if i >= e or not (CC[b[i]] & C_TCHAR):
        return -1
    while i < e and (CC[b[i]] & C_TCHAR):
        i += 1
    return i


cdef int _parse_te(const unsigned char* b, Py_ssize_t i, Py_ssize_t e, _Sem* sem) noexcept nogil:
    """transfer-coding list: token *( OWS ";" OWS token OWS "=" OWS (token / quoted) ).
    Empty elements are rejected. -1 on error."""
    cdef Py_ssize_t ts, te
    cdef bint chunked, has_params
    sem.has_te = 1
    while True:
        while i < e and _is_ows(b[i]):
            i += 1
        ts = i
        while i < e and (CC[b[i]] & C_TCHAR):
            i += 1
        te = i
        if te == ts:
            return -1
        chunked = (te - ts == 7) and _ieq(b + ts, b"chunked", 7)
        has_params = False
        while True:
            while i < e and _is_ows(b[i]):
                i += 1
            if i < e and b[i] == _SEMI:
                has_params = True
                i += 1
                while i < e and _is_ows(b[i]):
                    i += 1
                if i >= e or not (CC[b[i]] & C_TCHAR):
                    return -1
                while i < e and (CC[b[i]] & C_TCHAR):
                    i += 1
                while i < e and _is_ows(b[i]):
                    i += 1
                if i >= e or b[i] != _EQ:
                    return -1
                i += 1
                while i < e and _is_ows(b[i]):
                    i += 1
                i = _skip_param_value(b, i, e)
                if i < 0:
                    return -1
            else:
                break
        if chunked:
            if has_params:
                return -1          # chunked takes no parameters
            sem.te_chunked += 1
            if sem.te_chunked > 1:
                return -1          # chunked applied twice
            sem.te_last_chunked = 1
        else:
            sem.te_other = 1
            sem.te_last_chunked = 0
        if i == e:
            return 0
        if b[i] != _COMMA:
            return -1
        i += 1


cdef int _parse_connection(const unsigned char* b, Py_ssize_t i, Py_ssize_t e, _Sem* sem) noexcept nogil:
    """#token; empty elements ignored. -1 on error."""
    cdef Py_ssize_t ts, n
    while True:
        while i < e and _is_ows(b[i]):
            i += 1
        ts = i
        while i < e and (CC[b[i]] & C_TCHAR):
            i += 1
        n = i - ts
        if n == 5 and _ieq(b + ts, b"close", 5):
            sem.c_close = 1
        elif n == 10 and _ieq(b + ts, b"keep-alive", 10):
            sem.c_keepalive = 1
        elif n == 7 and _ieq(b + ts, b"upgrade", 7):
            sem.c_upgrade = 1
        elif n > 0:
            sem.c_custom = 1
        while i < e and _is_ows(b[i]):
            i += 1
        if i == e:
            return 0
        if b[i] != _COMMA:
            return -1
        i += 1


cdef bint _valid_host(const unsigned char* b, Py_ssize_t i, Py_ssize_t e) noexcept nogil:
    while i < e:
        if not (CC[b[i]] & C_HOST):
            return False
        i += 1
    return True


cdef void _mark_connection_options(const unsigned char* b, Head* h) noexcept nogil:
    """Second pass: every header named by a Connection option becomes hop-by-hop."""
    cdef int i, j
    cdef Py_ssize_t k, e, ts, n
    cdef Header* hd
    cdef Header* other
    for i in range(h.nheaders):
        hd = &h.headers[i]
        if hd.kind != H_CONNECTION:
            continue
        k = hd.value.off
        e = k + hd.value.len
        while k < e:
            while k < e and (b[k] == _COMMA or _is_ows(b[k])):
                k += 1
            ts = k
            while k < e and b[k] != _COMMA and not _is_ows(b[k]):
                k += 1
            n = k - ts
            if n == 0:
                continue
            if ((n == 5 and _ieq(b + ts, b"close", 5))
                    or (n == 10 and _ieq(b + ts, b"keep-alive", 10))
                    or (n == 7 and _ieq(b + ts, b"upgrade", 7))):
                continue
            for j in range(h.nheaders):
                other = &h.headers[j]
                if (other.hop == 0 and other.kind != H_HOST
                        and <Py_ssize_t>other.name.len == n
                        and _ieq_bytes(b + other.name.off, b + ts, n)):
                    other.hop = 1


cdef inline bint _ieq_bytes(const unsigned char* a, const unsigned char* c, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if LOWER[a[i]] != LOWER[c[i]]:
            return False
    return True


# ---------------------------------------------------------------------------
# header block

cdef int _on_header(const unsigned char* b, Head* h, _Sem* sem, Py_ssize_t ns, Py_ssize_t ne,
                    Py_ssize_t vs, Py_ssize_t ve, bint is_req) noexcept nogil:
    cdef int err = ERR_BAD_REQUEST if is_req else ERR_BAD_RESPONSE
    cdef int idx = h.nheaders
    cdef Header* hd = &h.headers[idx]
    cdef uint8_t kind = _classify(b + ns, ne - ns)
    cdef int64_t v = 0
    _span(&hd.name, ns, ne)
    _span(&hd.value, vs, ve)
    hd.kind = kind
    hd.hop = 0
    if kind != H_OTHER:
        if kind == H_HOST:
            if is_req:
                if h.host_index >= 0:
                    return err
                if not _valid_host(b, vs, ve):
                    return err
                h.host_index = idx
            elif h.host_index < 0:
                h.host_index = idx
        elif kind == H_CONTENT_LENGTH:
            hd.hop = 1
            if _parse_cl(b, vs, ve, &v) < 0:
                return err
            if sem.has_cl and sem.cl != v:
                return err
            sem.has_cl = 1
            sem.cl = v
        elif kind == H_TRANSFER_ENCODING:
            hd.hop = 1
            if _parse_te(b, vs, ve, sem) < 0:
                return err
        elif kind == H_CONNECTION:
            hd.hop = 1
            if _parse_connection(b, vs, ve, sem) < 0:
                return err
        elif kind == H_UPGRADE:
            hd.hop = 1
            if h.upgrade_index < 0 and ve > vs:
                h.upgrade_index = idx
        elif kind == H_EXPECT:
            if ve - vs == 12 and _ieq(b + vs, b"100-continue", 12):
                sem.expect = 1
        elif kind == H_X_FORWARDED_FOR:
            h.xff_index = idx
        elif kind == H_VIA:
            h.via_index = idx
        elif (kind == H_KEEP_ALIVE or kind == H_PROXY_CONNECTION or kind == H_TE
                or kind == H_TRAILER):
            hd.hop = 1
    h.nheaders = <uint16_t>(idx + 1)
    return 0


cdef Py_ssize_t _parse_fields(const unsigned char* b, Py_ssize_t p, Py_ssize_t n, Head* h,
                              const Limits* lim, _Sem* sem, bint is_req) noexcept nogil:
    """Header lines from p through the empty line. Returns the index after the final
    CRLF, 0 when more bytes are needed, or ERR_*."""
    cdef Py_ssize_t err = ERR_BAD_REQUEST if is_req else ERR_BAD_RESPONSE
    cdef Py_ssize_t ns, ne, vs, ve
    cdef unsigned char c
    cdef uint32_t maxh = lim.max_headers
    cdef int r
    if maxh > MAX_HEADERS:
        maxh = MAX_HEADERS
    while True:
        if p >= n:
            return 0
        c = b[p]
        if c == _CR:
            if p + 1 >= n:
                return 0
            if b[p + 1] != _LF:
                return err
            return p + 2
        if not (CC[c] & C_TCHAR):
            return err            # obs-fold (SP/HTAB), bare LF, CTL, separators
        if h.nheaders >= maxh:
            return ERR_HEADERS_TOO_LARGE
        ns = p
        p += 1
        while p < n and (CC[b[p]] & C_TCHAR):
            p += 1
        if p >= n:
            return 0
        if b[p] != _COLON:
            return err            # whitespace before colon, CTL in name, ...
        ne = p
        p += 1
        while p < n and _is_ows(b[p]):
            p += 1
        vs = p
        while p < n and (CC[b[p]] & C_VALUE):
            p += 1
        if p >= n:
            return 0
        if b[p] != _CR:
            return err            # NUL, CTL, bare LF, DEL
        if p + 1 >= n:
            return 0
        if b[p + 1] != _LF:
            return err            # bare CR
        ve = p
        while ve > vs and _is_ows(b[ve - 1]):
            ve -= 1
        p += 2
        r = _on_header(b, h, sem, ns, ne, vs, ve, is_req)
        if r < 0:
            return r


cdef Py_ssize_t _version(const unsigned char* b, Py_ssize_t p, Py_ssize_t n, Head* h,
                         Py_ssize_t err, Py_ssize_t err_major) noexcept nogil:
    """HTTP-version at p. Returns the index after it, 0 if incomplete, or an error."""
    cdef const char* lit = b"HTTP/"
    cdef int k
    for k in range(5):
        if p + k >= n:
            return 0
        if b[p + k] != <unsigned char>lit[k]:
            return err
    p += 5
    if p >= n:
        return 0
    if not (CC[b[p]] & C_DIGIT):
        return err
    if p + 1 >= n:
        return 0
    if b[p + 1] != _DOT:
        return err
    if p + 2 >= n:
        return 0
    if not (CC[b[p + 2]] & C_DIGIT):
        return err
    if b[p] != b'1':
        return err_major
    h.version_minor = 0 if b[p + 2] == b'0' else 1
    return p + 3


# ---------------------------------------------------------------------------
# request

cdef inline Py_ssize_t _req_incomplete(Py_ssize_t n, Py_ssize_t ls, bint over,
                                      const Limits* lim) noexcept nogil:
    if n - ls > <Py_ssize_t>lim.max_line_size:
        return ERR_URI_TOO_LONG
    if over:
        return ERR_HEADERS_TOO_LARGE
    return PARSE_INCOMPLETE


cdef int _request_target(const unsigned char* b, Py_ssize_t ts, Py_ssize_t te, Py_ssize_t qpos,
                         Head* h) noexcept nogil:
    cdef Py_ssize_t pe = te, i, a, colon
    if qpos >= 0:
        h.has_query = 1
        _span(&h.query, qpos + 1, te)
        pe = qpos
    if b[ts] == _SLASH:
        if h.method_connect:
            return -1
        _span(&h.path, ts, pe)
        return 0
    if b[ts] == _STAR:
        if te - ts != 1 or h.method.len != 7 or not _ieq(b + h.method.off, b"options", 7) \
                or b[h.method.off] != b'O':
            return -1
        _span(&h.path, ts, te)
        return 0
    if h.method_connect:
        # authority-form: host ":" port
        if qpos >= 0 or not _valid_host(b, ts, te):
            return -1
        colon = -1
        for i in range(ts, te):
            if b[i] == _COLON:
                colon = i
        if colon <= ts or colon + 1 >= te:
            return -1
        for i in range(colon + 1, te):
            if not (CC[b[i]] & C_DIGIT):
                return -1
        _span(&h.authority, ts, te)
        _span(&h.path, te, te)
        return 0
    # absolute-form: http[s]://authority[path]
    i = ts
    while i < pe and b[i] != _COLON:
        i += 1
    if not ((i - ts == 4 and _ieq(b + ts, b"http", 4)) or (i - ts == 5 and _ieq(b + ts, b"https", 5))):
        return -1
    if i + 3 > pe or b[i + 1] != _SLASH or b[i + 2] != _SLASH:
        return -1
    i += 3
    a = i
    while i < pe and b[i] != _SLASH:
        i += 1
    if i == a or not _valid_host(b, a, i):
        return -1
    h.absolute_form = 1
    _span(&h.authority, a, i)
    _span(&h.path, i, pe)
    return 0


cdef Py_ssize_t parse_request_head(const char* buf, Py_ssize_t n, Head* h, const Limits* lim) noexcept nogil:
    cdef const unsigned char* b = <const unsigned char*>buf
    cdef Py_ssize_t p = 0, ls, ms, ts, te, qpos, r
    cdef int empties = 0
    cdef unsigned char c
    cdef _Sem sem
    # never look past max_head_size bytes: a head that has not ended by then is 431
    cdef bint over = n > <Py_ssize_t>lim.max_head_size
    if over:
        n = lim.max_head_size
    _head_reset(h)
    _sem_reset(&sem)
    # at most a few empty lines before the request line
    while p < n and b[p] == _CR:
        if p + 1 >= n:
            return PARSE_INCOMPLETE
        if b[p + 1] != _LF:
            return ERR_BAD_REQUEST
        empties += 1
        if empties > MAX_LEADING_CRLF:
            return ERR_BAD_REQUEST
        p += 2
    ls = p
    # method
    ms = p
    while p < n and (CC[b[p]] & C_TCHAR):
        p += 1
    if p >= n:
        return _req_incomplete(n, ls, over, lim)
    if p == ms or b[p] != _SP:
        return ERR_BAD_REQUEST
    _span(&h.method, ms, p)
    if p - ms == 4 and b[ms] == b'H' and b[ms + 1] == b'E' and b[ms + 2] == b'A' and b[ms + 3] == b'D':
        h.method_head = 1
    elif p - ms == 7 and b[ms] == b'C' and b[ms + 1] == b'O' and b[ms + 2] == b'N' \
            and b[ms + 3] == b'N' and b[ms + 4] == b'E' and b[ms + 5] == b'C' and b[ms + 6] == b'T':
        h.method_connect = 1
    p += 1
    # request-target
    ts = p
    qpos = -1
    while p < n:
        c = b[p]
        if not (CC[c] & C_TARGET):
            break
        if c == _QMARK and qpos < 0:
            qpos = p
        p += 1
    if p >= n:
        return _req_incomplete(n, ls, over, lim)
    if p == ts or b[p] != _SP:
        return ERR_BAD_REQUEST
    te = p
    p += 1
    # version CRLF
    r = _version(b, p, n, h, ERR_BAD_REQUEST, ERR_VERSION)
    if r == 0:
        return _req_incomplete(n, ls, over, lim)
    if r < 0:
        return r
    p = r
    if p >= n:
        return _req_incomplete(n, ls, over, lim)
    if b[p] != _CR:
        return ERR_BAD_REQUEST
    if p + 1 >= n:
        return _req_incomplete(n, ls, over, lim)
    if b[p + 1] != _LF:
        return ERR_BAD_REQUEST
    if p - ls > <Py_ssize_t>lim.max_line_size:
        return ERR_URI_TOO_LONG
    p += 2
    _span(&h.target, ts, te)
    if _request_target(b, ts, te, qpos, h) < 0:
        return ERR_BAD_REQUEST
    # header fields
    r = _parse_fields(b, p, n, h, lim, &sem, True)
    if r == 0:
        return ERR_HEADERS_TOO_LARGE if over else PARSE_INCOMPLETE
    if r < 0:
        return r
    # semantics
    if h.version_minor == 1 and h.host_index < 0:
        return ERR_BAD_REQUEST
    if sem.has_te:
        if h.version_minor == 0 or sem.has_cl:
            return ERR_BAD_REQUEST
        if sem.te_other:
            return ERR_NOT_IMPLEMENTED
        if not sem.te_last_chunked:
            return ERR_BAD_REQUEST
        h.body_kind = BODY_CHUNKED
    elif sem.has_cl:
        h.content_length = sem.cl
        h.body_kind = BODY_LENGTH if sem.cl > 0 else BODY_NONE
    if h.version_minor == 1:
        h.keep_alive = not sem.c_close
        h.expect_continue = sem.expect
    else:
        h.keep_alive = sem.c_keepalive and not sem.c_close
    # A request with a body is never an upgrade: RFC 9110 7.8 switches only after the whole
    # request, but llhttp (and servers built on it) switch right after the head, so the body
    # would be read as the new protocol by one side and as a body by the other. Upgrade and
    # Connection stay hop-by-hop, so the request is forwarded as a plain one.
    h.upgrade = sem.c_upgrade and h.upgrade_index >= 0 and h.body_kind == BODY_NONE
    if sem.c_custom:
        _mark_connection_options(b, h)
    return r


# ---------------------------------------------------------------------------
# response

cdef inline Py_ssize_t _resp_incomplete(Py_ssize_t n, bint over, const Limits* lim) noexcept nogil:
    if over or n > <Py_ssize_t>lim.max_line_size:
        return ERR_HEADERS_TOO_LARGE
    return PARSE_INCOMPLETE


cdef Py_ssize_t parse_response_head(const char* buf, Py_ssize_t n, Head* h, const Limits* lim,
                                    bint request_was_head) noexcept nogil:
    cdef const unsigned char* b = <const unsigned char*>buf
    cdef Py_ssize_t p, r, rs
    cdef int i, status = 0
    cdef _Sem sem
    cdef Header* hd
    cdef bint over = n > <Py_ssize_t>lim.max_head_size
    if over:
        n = lim.max_head_size
    _head_reset(h)
    _sem_reset(&sem)
    r = _version(b, 0, n, h, ERR_BAD_RESPONSE, ERR_BAD_RESPONSE)
    if r == 0:
        return _resp_incomplete(n, over, lim)
    if r < 0:
        return r
    p = r
    if p >= n:
        return _resp_incomplete(n, over, lim)
    if b[p] != _SP:
        return ERR_BAD_RESPONSE
    p += 1
    for i in range(3):
        if p >= n:
            return _resp_incomplete(n, over, lim)
        if not (CC[b[p]] & C_DIGIT) or (i == 0 and b[p] == b'0'):
            return ERR_BAD_RESPONSE
        status = status * 10 + (b[p] - 48)
        p += 1
    h.status = status
    if p >= n:
        return _resp_incomplete(n, over, lim)
    rs = p
    if b[p] == _SP:
        p += 1
        rs = p
        while p < n and (CC[b[p]] & C_VALUE):
            p += 1
        if p >= n:
            return _resp_incomplete(n, over, lim)
    if b[p] != _CR:
        return ERR_BAD_RESPONSE
    if p + 1 >= n:
        return _resp_incomplete(n, over, lim)
    if b[p + 1] != _LF:
        return ERR_BAD_RESPONSE
    if p > <Py_ssize_t>lim.max_line_size:
        return ERR_HEADERS_TOO_LARGE
    _span(&h.reason, rs, p)
    p += 2
    r = _parse_fields(b, p, n, h, lim, &sem, False)
    if r == 0:
        return ERR_HEADERS_TOO_LARGE if over else PARSE_INCOMPLETE
    if r < 0:
        return r
    # semantics
    if h.version_minor == 1:
        h.keep_alive = not sem.c_close
    else:
        h.keep_alive = sem.c_keepalive and not sem.c_close
    h.upgrade = sem.c_upgrade and h.upgrade_index >= 0
    if sem.has_te:
        if h.version_minor == 0:
            return ERR_BAD_RESPONSE
        if sem.has_cl:
            h.keep_alive = 0          # CL + TE: TE wins, never reuse this connection
        if sem.te_last_chunked:
            h.body_kind = BODY_CHUNKED
            h.te_passthrough = sem.te_other
        else:
            h.body_kind = BODY_UNTIL_CLOSE
            h.te_passthrough = 1
        if h.te_passthrough:
            for i in range(h.nheaders):
                hd = &h.headers[i]
                if hd.kind == H_TRANSFER_ENCODING:
                    hd.hop = 0
    elif sem.has_cl:
        h.content_length = sem.cl
        h.body_kind = BODY_LENGTH if sem.cl > 0 else BODY_NONE
    else:
        h.body_kind = BODY_UNTIL_CLOSE
    if request_was_head or status < 200 or status == 204 or status == 304:
        h.body_kind = BODY_NONE
    elif h.body_kind == BODY_UNTIL_CLOSE:
        h.keep_alive = 0
    if sem.c_custom:
        _mark_connection_options(b, h)
    return r


# ---------------------------------------------------------------------------
# chunked transfer coding

cdef enum:
    CS_SIZE_START = 0
    CS_SIZE
    CS_EXT_PRE_NAME      # chunk-ext without BWS (as llhttp: whitespace there is rejected)
    CS_EXT_NAME
    CS_EXT_PRE_VAL
    CS_EXT_VAL
    CS_EXT_QUOTED
    CS_EXT_QESC
    CS_EXT_POST_VAL
    CS_SIZE_LF
    CS_DATA
    CS_DATA_CR
    CS_DATA_LF
    CS_TRAILER_START
    CS_TRAILER_NAME
    CS_TRAILER_VALUE
    CS_TRAILER_LF
    CS_FINAL_LF
    CS_DONE
    CS_ERROR



cdef enum:
    _CL_NAME_LEN = 14
    _TE_NAME_LEN = 17
    _NO_MATCH = 0xFF


cdef inline int64_t _trailer_name_match(int64_t m, unsigned char ch) noexcept nogil:
    """Incremental, case-insensitive match of a trailer name against Content-Length and
    Transfer-Encoding (a name may arrive split across feeds). While the decoder is in the
    trailer section Chunked.remaining is free: it holds the matched prefix lengths, the
    Content-Length one in bits 0-7 and the Transfer-Encoding one in bits 8-15 (0xFF: no match)."""
    cdef int64_t cl = m & 0xFF
    cdef int64_t te = (m >> 8) & 0xFF
    cdef unsigned char lc = LOWER[ch]
    if cl != _NO_MATCH:
        cl = cl + 1 if cl < _CL_NAME_LEN and lc == <unsigned char>(b"content-length"[cl]) else _NO_MATCH
    if te != _NO_MATCH:
        te = te + 1 if te < _TE_NAME_LEN and lc == <unsigned char>(b"transfer-encoding"[te]) else _NO_MATCH
    return cl | (te << 8)


cdef Py_ssize_t chunked_feed(Chunked* c, const char* buf, Py_ssize_t n,
                             Span* data_out, int max_data, int* ndata) noexcept nogil:
    cdef const unsigned char* b = <const unsigned char*>buf
    cdef Py_ssize_t p = 0, k
    cdef int nd = 0, st = c.state
    cdef unsigned char ch
    cdef uint8_t f
    cdef int64_t d
    cdef int64_t CHUNK_SIZE_MAX = 0x4000000000000000   # 2^62
    if ndata != NULL:
        ndata[0] = 0
    if c.done:
        return 0
    if st == CS_ERROR:
        return ERR_BAD_CHUNK
    if n > 0x7FFFFFFF:
        n = 0x7FFFFFFF       # Span offsets are 32-bit: consume at most 2 GiB per call
    while p < n:
        if st == CS_DATA:
            if data_out != NULL:
                if nd >= max_data:
                    break
            k = n - p
            if k > c.remaining:
                k = <Py_ssize_t>c.remaining
            if data_out != NULL:
                data_out[nd].off = <uint32_t>p
                data_out[nd].len = <uint32_t>k
                nd += 1
            c.remaining -= k
            c.data_total += k
            p += k
            if c.remaining == 0:
                st = CS_DATA_CR
            continue
        ch = b[p]
        f = CC[ch]
        if st < CS_SIZE_LF:
            # chunk-size [ chunk-ext ] up to the CR
            if ch == _CR:
                if not (st == CS_SIZE or st == CS_EXT_NAME or st == CS_EXT_VAL
                        or st == CS_EXT_POST_VAL):
                    st = CS_ERROR
                    break
                st = CS_SIZE_LF
                p += 1
                continue
            c.line_len += 1
            if c.line_len > CHUNK_LINE_MAX:
                st = CS_ERROR
                break
            if st == CS_SIZE_START or st == CS_SIZE:
                d = HEXV[ch]
                if d >= 0:
                    if c.remaining > (CHUNK_SIZE_MAX - d) // 16:
                        st = CS_ERROR
                        break
                    c.remaining = c.remaining * 16 + d
                    st = CS_SIZE
                elif st == CS_SIZE and ch == _SEMI:
                    st = CS_EXT_PRE_NAME
                else:
                    st = CS_ERROR
                    break
            elif st == CS_EXT_PRE_NAME:
                if f & C_TCHAR:
                    st = CS_EXT_NAME
                else:
                    st = CS_ERROR
                    break
            elif st == CS_EXT_NAME:
                if f & C_TCHAR:
                    pass
                elif ch == _EQ:
                    st = CS_EXT_PRE_VAL
                elif ch == _SEMI:
                    st = CS_EXT_PRE_NAME
                else:
                    st = CS_ERROR
                    break
            elif st == CS_EXT_PRE_VAL:
                if ch == _DQUOTE:
                    st = CS_EXT_QUOTED
                elif f & C_TCHAR:
                    st = CS_EXT_VAL
                else:
                    st = CS_ERROR
                    break
            elif st == CS_EXT_VAL:
                if f & C_TCHAR:
                    pass
                elif ch == _SEMI:
                    st = CS_EXT_PRE_NAME
                else:
                    st = CS_ERROR
                    break
            elif st == CS_EXT_QUOTED:
                if ch == _DQUOTE:
                    st = CS_EXT_POST_VAL
                elif ch == _BSLASH:
                    st = CS_EXT_QESC
                elif not (f & C_QDTEXT):
                    st = CS_ERROR
                    break
            elif st == CS_EXT_QESC:
                if f & C_VALUE:
                    st = CS_EXT_QUOTED
                else:
                    st = CS_ERROR
                    break
            elif st == CS_EXT_POST_VAL:
                if ch == _SEMI:
                    st = CS_EXT_PRE_NAME
                else:
                    st = CS_ERROR
                    break
            else:
                st = CS_ERROR
                break
            p += 1
            continue
        if st == CS_SIZE_LF:
            if ch != _LF:
                st = CS_ERROR
                break
            p += 1
            c.line_len = 0
            if c.remaining == 0:
                st = CS_TRAILER_START
                c.trailer_size = 0
            else:
                st = CS_DATA
            continue
        if st == CS_DATA_CR:
            if ch != _CR:
                st = CS_ERROR
                break
            st = CS_DATA_LF
            p += 1
            continue
        if st == CS_DATA_LF:
            if ch != _LF:
                st = CS_ERROR
                break
            st = CS_SIZE_START
            p += 1
            continue
        # trailer section (after the last chunk)
        c.trailer_size += 1
        if c.trailer_size > CHUNK_TRAILER_MAX:
            st = CS_ERROR
            break
        if st == CS_TRAILER_START:
            if ch == _CR:
                st = CS_FINAL_LF
            elif f & C_TCHAR:
                st = CS_TRAILER_NAME
                c.remaining = _trailer_name_match(0, ch)
            else:
                st = CS_ERROR
                break
        elif st == CS_TRAILER_NAME:
            if ch == _COLON:
                if (c.remaining & 0xFF) == _CL_NAME_LEN or ((c.remaining >> 8) & 0xFF) == _TE_NAME_LEN:
                    st = CS_ERROR        # framing fields are never allowed in trailers
                    break
                c.remaining = 0
                st = CS_TRAILER_VALUE
            elif f & C_TCHAR:
                c.remaining = _trailer_name_match(c.remaining, ch)
            else:
                st = CS_ERROR
                break
        elif st == CS_TRAILER_VALUE:
            if ch == _CR:
                st = CS_TRAILER_LF
            elif not (f & C_VALUE):
                st = CS_ERROR
                break
        elif st == CS_TRAILER_LF:
            if ch != _LF:
                st = CS_ERROR
                break
            st = CS_TRAILER_START
        elif st == CS_FINAL_LF:
            if ch != _LF:
                st = CS_ERROR
                break
            p += 1
            st = CS_DONE
            c.done = 1
            break
        p += 1
    c.state = st
    if ndata != NULL:
        ndata[0] = nd
    if st == CS_ERROR:
        return ERR_BAD_CHUNK
    return p


# ---------------------------------------------------------------------------
# Python-visible API (tests, echo server; allocates, not the hot path)

_STATUS = {
    ERR_BAD_REQUEST: 400,
    ERR_URI_TOO_LONG: 414,
    ERR_HEADERS_TOO_LARGE: 431,
    ERR_VERSION: 505,
    ERR_NOT_IMPLEMENTED: 501,
    ERR_BAD_RESPONSE: 502,
    ERR_BAD_CHUNK: 400,
}

_MESSAGES = {
    ERR_BAD_REQUEST: "bad request",
    ERR_URI_TOO_LONG: "request line too long",
    ERR_HEADERS_TOO_LARGE: "header section too large",
    ERR_VERSION: "HTTP version not supported",
    ERR_NOT_IMPLEMENTED: "transfer-coding not implemented",
    ERR_BAD_RESPONSE: "invalid upstream response",
    ERR_BAD_CHUNK: "invalid chunked framing",
}

ERRORS = {
    "ERR_BAD_REQUEST": ERR_BAD_REQUEST,
    "ERR_URI_TOO_LONG": ERR_URI_TOO_LONG,
    "ERR_HEADERS_TOO_LARGE": ERR_HEADERS_TOO_LARGE,
    "ERR_VERSION": ERR_VERSION,
    "ERR_NOT_IMPLEMENTED": ERR_NOT_IMPLEMENTED,
    "ERR_BAD_RESPONSE": ERR_BAD_RESPONSE,
    "ERR_BAD_CHUNK": ERR_BAD_CHUNK,
}
globals().update(ERRORS)


def error_status(int code, bint response=False):
    """HTTP status the gateway answers for an ERR_* code (502 for anything the upstream got wrong)."""
    if response:
        return 502
    return _STATUS.get(code, 400)


class HTTPParseError(Exception):
    def __init__(self, int code, bint response=False, message=None):
        self.code = code
        self.status = error_status(code, response)
        self.message = message or _MESSAGES.get(code, "parse error")
        super().__init__(f"{self.status} {self.message} ({code})")


_BODY_KINDS = ("none", "length", "chunked", "until_close")


class ParsedRequest:
    __slots__ = ("consumed", "method", "target", "path", "query", "version", "headers",
                 "absolute_form", "authority", "body_kind", "content_length", "keep_alive",
                 "upgrade", "expect_continue", "hop_headers", "header_kinds", "host_index",
                 "xff_index", "via_index", "upgrade_index")

    def __repr__(self):
        return "ParsedRequest(%s)" % ", ".join(
            "%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


class ParsedResponse:
    __slots__ = ("consumed", "status", "reason", "version", "headers", "body_kind",
                 "content_length", "keep_alive", "upgrade", "te_passthrough", "hop_headers",
                 "header_kinds")

    def __repr__(self):
        return "ParsedResponse(%s)" % ", ".join(
            "%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


cdef inline bytes _sb(bytes data, Span s):
    return data[s.off:s.off + s.len]


cdef inline str _ss(bytes data, Span s):
    return data[s.off:s.off + s.len].decode("latin-1")


cdef void _limits(Limits* lim, max_head_size, max_line_size, max_headers):
    lim.max_head_size = max_head_size
    lim.max_line_size = max_line_size
    lim.max_headers = max_headers


cdef _headers(bytes data, Head* h, list headers, list hop, list kinds):
    cdef int i
    cdef Header* hd
    for i in range(h.nheaders):
        hd = &h.headers[i]
        name = _sb(data, hd.name)
        headers.append((name, _sb(data, hd.value)))
        kinds.append(hd.kind)
        if hd.hop:
            hop.append(name.lower())


def parse_request(data, *, max_head_size=32768, max_line_size=8192, max_headers=100):
    """Parse a request head at the start of data. None if incomplete; raises HTTPParseError."""
    cdef bytes bdata = bytes(data)
    cdef Head h
    cdef Limits lim
    cdef Py_ssize_t r
    _limits(&lim, max_head_size, max_line_size, max_headers)
    r = parse_request_head(PyBytes_AS_STRING(bdata), PyBytes_GET_SIZE(bdata), &h, &lim)
    if r == 0:
        return None
    if r < 0:
        raise HTTPParseError(r)
    req = ParsedRequest()
    req.consumed = r
    req.method = _ss(bdata, h.method)
    req.target = _ss(bdata, h.target)
    if h.absolute_form and h.path.len == 0:
        req.path = "/"
    else:
        req.path = _ss(bdata, h.path)
    req.query = _ss(bdata, h.query) if h.has_query else None
    req.version = "1.1" if h.version_minor else "1.0"
    headers = []
    hop = []
    kinds = []
    _headers(bdata, &h, headers, hop, kinds)
    req.headers = headers
    req.hop_headers = hop
    req.header_kinds = kinds
    req.absolute_form = bool(h.absolute_form)
    req.authority = _ss(bdata, h.authority) if h.authority.len else None
    req.body_kind = _BODY_KINDS[h.body_kind]
    req.content_length = h.content_length if h.content_length >= 0 else None
    req.keep_alive = bool(h.keep_alive)
    req.upgrade = bool(h.upgrade)
    req.expect_continue = bool(h.expect_continue)
    req.host_index = h.host_index
    req.xff_index = h.xff_index
    req.via_index = h.via_index
    req.upgrade_index = h.upgrade_index
    return req


def parse_response(data, *, request_was_head=False, max_head_size=32768, max_line_size=8192,
                   max_headers=100):
    """Parse a response head at the start of data. None if incomplete; raises HTTPParseError."""
    cdef bytes bdata = bytes(data)
    cdef Head h
    cdef Limits lim
    cdef Py_ssize_t r
    _limits(&lim, max_head_size, max_line_size, max_headers)
    r = parse_response_head(PyBytes_AS_STRING(bdata), PyBytes_GET_SIZE(bdata), &h, &lim,
                            bool(request_was_head))
    if r == 0:
        return None
    if r < 0:
        raise HTTPParseError(r, True)
    resp = ParsedResponse()
    resp.consumed = r
    resp.status = h.status
    resp.reason = _ss(bdata, h.reason)
    resp.version = "1.1" if h.version_minor else "1.0"
    headers = []
    hop = []
    kinds = []
    _headers(bdata, &h, headers, hop, kinds)
    resp.headers = headers
    resp.hop_headers = hop
    resp.header_kinds = kinds
    resp.body_kind = _BODY_KINDS[h.body_kind]
    resp.content_length = h.content_length if h.content_length >= 0 else None
    resp.keep_alive = bool(h.keep_alive)
    resp.upgrade = bool(h.upgrade)
    resp.te_passthrough = bool(h.te_passthrough)
    return resp


cdef enum:
    _SPANS = 64


cdef class ChunkedDecoder:
    """Incremental chunked decoder: feed(data) -> (decoded bytes, bytes consumed)."""
    cdef Chunked c
    cdef bint response

    def __cinit__(self, bint response=False):
        self.c.state = 0
        self.c.remaining = 0
        self.c.line_len = 0
        self.c.trailer_size = 0
        self.c.done = 0
        self.response = response

    @property
    def done(self):
        return bool(self.c.done)

    def feed(self, data):
        cdef bytes bdata = bytes(data)
        cdef const char* buf = PyBytes_AS_STRING(bdata)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(bdata), off = 0, r
        cdef Span spans[_SPANS]
        cdef int nd = 0, i
        out = []
        while off < n and not self.c.done:
            r = chunked_feed(&self.c, buf + off, n - off, spans, _SPANS, &nd)
            if r < 0:
                raise HTTPParseError(r, self.response)
            for i in range(nd):
                out.append(bdata[off + spans[i].off:off + spans[i].off + spans[i].len])
            off += r
            if r == 0 and nd == 0:
                break
        return b"".join(out), off


def _bench_request_head(data, int iterations=100000):
    """Nanoseconds per parse_request_head call on data (the cdef path, no Python objects)."""
    cdef bytes bdata = bytes(data)
    cdef const char* buf = PyBytes_AS_STRING(bdata)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(bdata), r = 0
    cdef Head h
    cdef Limits lim
    cdef int i
    cdef int64_t t0, t1
    limits_default(&lim)
    with nogil:
        t0 = now_ns()
        for i in range(iterations):
            r = parse_request_head(buf, n, &h, &lim)
        t1 = now_ns()
    if r <= 0:
        raise HTTPParseError(r if r < 0 else ERR_BAD_REQUEST)
    return (t1 - t0) / iterations


def _bench_chunked(data, int iterations=1000):
    """Nanoseconds per full chunked_feed over data (no spans)."""
    cdef bytes bdata = bytes(data)
    cdef const char* buf = PyBytes_AS_STRING(bdata)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(bdata), r = 0
    cdef Chunked c
    cdef int i
    cdef int64_t t0, t1
    with nogil:
        t0 = now_ns()
        for i in range(iterations):
            c.state = 0
            c.remaining = 0
            c.line_len = 0
            c.trailer_size = 0
            c.done = 0
            r = chunked_feed(&c, buf, n, NULL, 0, NULL)
        t1 = now_ns()
    if r <= 0 or not c.done:
        raise HTTPParseError(ERR_BAD_CHUNK)
    return (t1 - t0) / iterations
