# HTTP/1.1 head parsing and body framing: the contract other _core modules cimport.
#
# One pass over the head bytes fills a Head struct with offsets (Span) into the
# caller's buffer; nothing is allocated. Framing and connection semantics are
# learned in the same pass so the proxy never re-reads a header.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t

cdef enum:
    MAX_HEADERS = 128          # hard capacity of Head.headers

# Return values of parse_request_head / parse_response_head / chunked_feed.
# > 0: bytes consumed (for heads: through the final CRLFCRLF).
cdef enum:
    PARSE_INCOMPLETE = 0
    ERR_BAD_REQUEST = -1       # 400, framing in doubt: close after answering
    ERR_URI_TOO_LONG = -2      # 414
    ERR_HEADERS_TOO_LARGE = -3 # 431 (head bytes or header count over the limit)
    ERR_VERSION = -4           # 505 (HTTP major other than 1)
    ERR_NOT_IMPLEMENTED = -5   # 501 (transfer-coding we do not support in a request)
    ERR_BAD_RESPONSE = -6      # upstream sent an invalid status line/headers/framing: 502
    ERR_BAD_CHUNK = -7         # invalid chunked framing (400 for requests, 502 for responses)

# What the pass recognised about a header (Header.kind).
cdef enum:
    H_OTHER = 0
    H_HOST = 1
    H_CONTENT_LENGTH = 2
    H_TRANSFER_ENCODING = 3
    H_CONNECTION = 4
    H_KEEP_ALIVE = 5
    H_PROXY_CONNECTION = 6
    H_TE = 7
    H_TRAILER = 8
    H_UPGRADE = 9
    H_EXPECT = 10
    H_X_FORWARDED_FOR = 11
    H_X_FORWARDED_PROTO = 12
    H_X_FORWARDED_HOST = 13
    H_X_FORWARDED_PORT = 14
    H_VIA = 15

# Body framing (Head.body_kind).
cdef enum:
    BODY_NONE = 0          # no body bytes follow the head
    BODY_LENGTH = 1        # exactly Head.content_length bytes
    BODY_CHUNKED = 2       # chunked coding (last transfer-coding is chunked)
    BODY_UNTIL_CLOSE = 3   # responses only: read until the upstream closes

cdef struct Span:
    uint32_t off           # offset from the start of the parsed buffer
    uint32_t len

cdef struct Header:
    Span name              # as sent (case preserved)
    Span value             # leading/trailing OWS trimmed
    uint8_t kind           # H_*
    uint8_t hop            # 1: must not be forwarded (hop-by-hop, named in Connection, or framing
                           # that the proxy re-emits itself: Content-Length, Transfer-Encoding)

cdef struct Limits:
    uint32_t max_head_size     # whole head incl. request line (431 past it; default 32768)
    uint32_t max_line_size     # request line / status line (414 for requests; default 8192)
    uint32_t max_headers       # header count (431 past it; default 100, <= MAX_HEADERS)

cdef struct Head:
    # request line (requests)
    Span method
    Span target            # request-target as sent
    Span path              # origin-form: target up to '?'; absolute-form: its path part ('/' if empty -> len 0 means "/")
    Span query             # after '?', '?' excluded
    uint8_t has_query
    uint8_t absolute_form  # target was absolute-form (http://host/...)
    Span authority         # absolute-form authority (host[:port]) else len 0
    uint8_t method_head    # method is HEAD
    uint8_t method_connect # method is CONNECT
    # status line (responses)
    int status
    Span reason
    # both
    uint8_t version_minor  # 0 or 1 (HTTP/1.x)
    uint16_t nheaders
    Header headers[MAX_HEADERS]
    # learned in the same pass
    uint8_t body_kind      # BODY_*
    int64_t content_length # -1 when absent
    uint8_t keep_alive     # final answer: version default adjusted by Connection tokens
    uint8_t upgrade        # Connection has "upgrade" token and an Upgrade header is present
    uint8_t expect_continue  # Expect: 100-continue
    uint8_t te_passthrough # response TE has codings besides chunked: forward the TE header as-is
    int host_index         # index into headers of Host, -1 when absent
    int upgrade_index      # index of the Upgrade header, -1 when absent
    int xff_index          # index of the last X-Forwarded-For, -1 when absent
    int via_index          # index of the last Via, -1 when absent

# Chunked decoder state (zero it to start).
cdef struct Chunked:
    int state
    int64_t remaining      # data bytes left in the current chunk
    int64_t data_total     # data bytes decoded so far (framing excluded): body size limits
    uint32_t line_len      # bytes seen in the current size/extension/trailer line
    uint32_t trailer_size  # total trailer bytes seen
    uint8_t done           # 1 once the last chunk, trailers and final CRLF were consumed

cdef void limits_default(Limits* lim) noexcept nogil

# Parse a request head at buf[0:n]. Returns bytes consumed (> 0), PARSE_INCOMPLETE, or ERR_*.
cdef Py_ssize_t parse_request_head(const char* buf, Py_ssize_t n, Head* h, const Limits* lim) noexcept nogil

# Parse a response head. request_was_head / request_was_connect decide body framing
# (HEAD, 1xx, 204, 304 -> BODY_NONE).
cdef Py_ssize_t parse_response_head(const char* buf, Py_ssize_t n, Head* h, const Limits* lim,
                                    bint request_was_head) noexcept nogil

# Feed chunked-coded bytes. Consumes up to n bytes and returns how many (>= 0), or ERR_BAD_CHUNK.
# Stops right after the final CRLF (c.done = 1): bytes after that belong to the next message.
# If data_out is not NULL, up to max_data spans of decoded chunk data (offsets into buf) are
# written there and *ndata set to their count (decoding stops early when the array is full).
cdef Py_ssize_t chunked_feed(Chunked* c, const char* buf, Py_ssize_t n,
                             Span* data_out, int max_data, int* ndata) noexcept nogil

# Case-insensitive compare of buf[span] against a lower-case ASCII literal.
cdef bint span_ieq(const char* buf, Span s, const char* lower, Py_ssize_t lower_len) noexcept nogil
