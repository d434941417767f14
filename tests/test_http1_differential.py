"""Differential tests: fastmesh's HTTP/1.1 parser against httptools (llhttp).

On valid input both must agree on what the message means. On invalid input, whenever
httptools rejects, ours must reject too (ours is allowed to be stricter); the only
exceptions are the documented places where ours is deliberately more permissive than
llhttp, which are checked explicitly rather than skipped.
"""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llhttp_reference import LLHTTP_METHODS, OWS, run_llhttp

from fastmesh._core.http1 import ChunkedDecoder, HTTPParseError, parse_request, parse_response

# ---------------------------------------------------------------------------
# the two parsers, run to the end of the buffer


def run_ours(data: bytes):
    """('ok'|'incomplete'|'error', [(ParsedRequest, body)], unparsed rest or the exception)."""
    msgs = []
    while data:
        try:
            r = parse_request(data)
        except HTTPParseError as e:
            return "error", msgs, e
        if r is None:
            return "incomplete", msgs, data
        rest = data[r.consumed:]
        if r.body_kind == "length":
            if len(rest) < r.content_length:
                return "incomplete", msgs, data
            body, rest = rest[:r.content_length], rest[r.content_length:]
        elif r.body_kind == "chunked":
            d = ChunkedDecoder()
            try:
                body, used = d.feed(rest)
            except HTTPParseError as e:
                return "error", msgs, e
            if not d.done:
                return "incomplete", msgs, data
            rest = rest[used:]
        else:
            body = b""
        msgs.append((r, body))
        data = rest
        if r.upgrade or r.method == "CONNECT":
            break
        if not r.keep_alive and data:
            # the connection ends after this message: what follows is never parsed
            return "error", msgs, None
    return "ok", msgs, None


def assert_same_request(ours, theirs):
    r, body = ours
    assert r.method == theirs["method"]
    assert r.target.encode() == theirs["url"]
    # llhttp keeps trailing whitespace in values, we trim it (RFC 9110 5.5)
    assert r.headers == [(n, v.rstrip(OWS)) for n, v in theirs["headers"]]
    assert r.version == theirs["version"]
    assert r.keep_alive == theirs["keep_alive"]
    assert body == theirs["body"]


def check_valid(data: bytes):
    ot, tm = run_llhttp(data)
    oo, om, exc = run_ours(data)
    assert ot == "ok", (data, tm)
    assert oo == "ok", (data, exc)
    assert len(om) == len(tm)
    for ours, theirs in zip(om, tm):
        assert theirs["complete"]
        assert_same_request(ours, theirs)


def check_at_least_as_strict(data: bytes):
    ot, tm = run_llhttp(data)
    oo, om, extra = run_ours(data)
    if ot == "ok" and oo == "ok":
        # both accepted the whole buffer: they must agree on every complete message
        complete = [m for m in tm if m["complete"]]
        for ours, theirs in zip(om, complete):
            if ours[0].method in LLHTTP_METHODS:
                assert_same_request(ours, theirs)
    if ot == "error" and oo != "error":
        explained = _permitted_leniency(om) or (oo == "incomplete" and _unknown_method_prefix(extra))
        assert explained, (data, oo, [m[0] for m in om], tm)


def _permitted_leniency(msgs) -> bool:
    """Documented cases where we accept what llhttp rejects."""
    for r, _ in msgs:
        if r.method not in LLHTTP_METHODS:
            return True     # any token is a method (RFC 9110 9.1)
        for name, value in r.headers:
            if name.lower() == b"content-length" and b"," in value:
                return True  # "5, 5": identical CL list values are merged (RFC 9110 8.6)
    return False


def _unknown_method_prefix(rest: bytes) -> bool:
    """An unfinished message that llhttp already refused for its method: we wait for more bytes
    because any token may be a method."""
    r = parse_request(rest)
    if r is not None:
        return _permitted_leniency([(r, b"")])
    method = rest.lstrip(b"\r\n").split(b" ", 1)[0].decode("latin-1")
    return method not in LLHTTP_METHODS


# ---------------------------------------------------------------------------
# hand-written corpus

VALID_CORPUS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /p?q=1&r=%20x HTTP/1.1\r\nHost: a:8080\r\nAccept: */*\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n0\r\nTrailer-A: x\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://example.com/a?b HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Sp:   v  \r\n\r\n",
    b"DELETE /d HTTP/1.1\r\nHost: a\r\nX: \xe9\xff obs-text\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"PATCH /p HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\nCONTENT-TYPE: text/plain\r\n\r\nok",
]

INVALID_CORPUS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX\x00: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
]


@pytest.mark.parametrize("data", VALID_CORPUS)
def test_valid_corpus_agrees_with_httptools(data):
    check_valid(data)


@pytest.mark.parametrize("data", INVALID_CORPUS)
def test_invalid_corpus_is_rejected_by_both(data):
    assert run_llhttp(data)[0] == "error"
    assert run_ours(data)[0] == "error"


# Things llhttp accepts that we reject on purpose (stricter): we check ours rejects them.
STRICTER_CORPUS = [
    b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",                      # fragment in target
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",                 # duplicate Host
    b"GET / HTTP/1.1\r\n\r\n",                                      # missing Host
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",                          # double SP
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",                           # HTTP/2 over h1 -> 505
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("data", STRICTER_CORPUS)
def test_deliberately_stricter_than_httptools(data):
    assert run_ours(data)[0] == "error"


# ---------------------------------------------------------------------------
# generated valid requests

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PATH_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%"
SPECIAL_NAMES = {"host", "content-length", "transfer-encoding", "connection", "upgrade",
                 "expect", "keep-alive", "proxy-connection", "te", "trailer"}

methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PURGE",
                           "PROPFIND", "M-SEARCH"])
segment = st.text(alphabet=PATH_CHARS, min_size=0, max_size=12)
paths = st.builds(lambda segs, q: "/" + "/".join(segs) + (("?" + q) if q is not None else ""),
                  st.lists(segment, max_size=4),
                  st.none() | st.text(alphabet=PATH_CHARS + "/?", max_size=20))
header_names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20).filter(
    lambda n: n.lower() not in SPECIAL_NAMES)
# field-content: no leading/trailing whitespace inside the generated core
value_core = st.binary(min_size=0, max_size=30).map(
    lambda b: bytes(c for c in b if c == 9 or 0x20 <= c <= 0x7E or c >= 0x80).strip(OWS))
header_values = st.tuples(st.sampled_from([b"", b" ", b"  ", b"\t"]), value_core,
                          st.sampled_from([b"", b" ", b"\t "]))
hosts = st.builds(lambda name, tld, port: name + tld + port,
                  st.sampled_from(["a", "api", "x-1", "svc-7", "10.0.0.1", "[::1]", "localhost"]),
                  st.sampled_from(["", ".example.com", ".io", ".internal"]),
                  st.sampled_from(["", ":80", ":8080", ":65535"]))
chunk_exts = st.sampled_from([b"", b";a", b";a=b", b";name=\"q v\"", b";x=1;y"])


@st.composite
def valid_requests(draw):
    method = draw(methods)
    version = draw(st.sampled_from(["1.0", "1.1"]))
    path = draw(paths)
    headers = [(draw(header_names).encode(), b"".join(draw(header_values)))
               for _ in range(draw(st.integers(0, 8)))]
    if version == "1.1" or draw(st.booleans()):
        host = draw(hosts).encode()
        headers.insert(draw(st.integers(0, len(headers))), (b"Host", host))
    conn = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, X-Foo"]))
    if conn is not None:
        headers.insert(draw(st.integers(0, len(headers))), (b"Connection", conn))
    body_mode = draw(st.sampled_from(["none", "length", "chunked"] if version == "1.1"
                                     else ["none", "length"]))
    body = b""
    tail = b""
    if body_mode == "length":
        body = draw(st.binary(max_size=64))
        headers.insert(draw(st.integers(0, len(headers))),
                       (draw(st.sampled_from([b"Content-Length", b"content-length"])),
                        str(len(body)).encode()))
        tail = body
    elif body_mode == "chunked":
        chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
        headers.insert(draw(st.integers(0, len(headers))), (b"Transfer-Encoding", b"chunked"))
        for c in chunks:
            tail += b"%x%s\r\n%s\r\n" % (len(c), draw(chunk_exts), c)
        tail += b"0\r\n"
        if draw(st.booleans()):
            tail += b"X-Trailer: " + draw(value_core) + b"\r\n"
        tail += b"\r\n"
        body = b"".join(chunks)
    head = b"%s %s HTTP/%s\r\n" % (method.encode(), path.encode(), version.encode())
    head += b"".join(n + b":" + v + b"\r\n" for n, v in headers)
    return head + b"\r\n" + tail


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_requests(), min_size=1, max_size=3))
def test_generated_valid_requests_agree_with_httptools(reqs):
    # pipeline them, up to the first one that ends the connection (llhttp rejects bytes after it)
    pipeline = []
    for one in reqs:
        pipeline.append(one)
        if not parse_request(one).keep_alive:
            break
    check_valid(b"".join(pipeline))
    # and pipelining: each request on its own gives the same result
    for one in reqs:
        check_valid(one)


@settings(max_examples=60, deadline=None)
@given(valid_requests(), st.data())
def test_generated_request_split_anywhere_is_incomplete_then_same(data, d):
    full = parse_request(data)
    cut = d.draw(st.integers(0, full.consumed - 1))
    assert parse_request(data[:cut]) is None
    again = parse_request(data[:full.consumed])
    assert again.headers == full.headers and again.consumed == full.consumed


# ---------------------------------------------------------------------------
# generated invalid requests: mutations of valid ones

NASTY = [b"\x00", b"\x01", b"\x7f", b"\r", b"\n", b" ", b"\t", b":", b",", b"\"", b"#", b"\xff",
         b"\r\n", b"\r\n ", b" :", b"-", b"0x", b"\x0b", b"\x1f", b"(", b"@", b"\\"]


@st.composite
def mutated_requests(draw):
    data = draw(valid_requests())
    kind = draw(st.sampled_from(["insert", "replace", "delete", "cl", "te", "fold"]))
    if kind in ("insert", "replace", "delete"):
        pos = draw(st.integers(0, len(data) - 1))
        junk = draw(st.sampled_from(NASTY))
        if kind == "insert":
            data = data[:pos] + junk + data[pos:]
        elif kind == "replace":
            data = data[:pos] + junk + data[pos + 1:]
        else:
            data = data[:pos] + data[pos + 1:]
    else:
        head, _, rest = data.partition(b"\r\n")
        extra = {
            "cl": draw(st.sampled_from([b"Content-Length: -1", b"Content-Length: 1 2",
                                        b"Content-Length: +3", b"Content-Length: 0x10",
                                        b"Content-Length: 99999999999999999999",
                                        b"Content-Length: 3\r\nContent-Length: 4"])),
            "te": draw(st.sampled_from([b"Transfer-Encoding: chunked\r\nContent-Length: 0",
                                        b"Transfer-Encoding: gzip, chunked",
                                        b"Transfer-Encoding: chunked, gzip"])),
            "fold": b"X-Folded: a\r\n  b",
        }[kind]
        data = head + b"\r\n" + extra + b"\r\n" + rest
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_requests())
def test_whenever_httptools_rejects_we_reject(data):
    check_at_least_as_strict(data)


# ---------------------------------------------------------------------------
# responses (hand-written corpus)

RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"abc"),
    (b"HTTP/1.1 204 No Content\r\nX: y\r\n\r\n", b""),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", b""),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    (b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", b""),
    (b"HTTP/1.1 500 \r\nContent-Length: 1\r\nServer:  s \r\n\r\nx", b"x"),
]


@pytest.mark.parametrize("data,body", RESPONSES)
def test_responses_agree_with_httptools(data, body):
    status, msgs = run_llhttp(data, response=True)
    assert status == "ok" and msgs[0]["complete"]
    theirs = msgs[0]
    r = parse_response(data)
    assert r.status == theirs["status"]
    assert r.version == theirs["version"]
    assert r.keep_alive == theirs["keep_alive"]
    assert r.headers == [(n, v.rstrip(OWS)) for n, v in theirs["headers"]]
    rest = data[r.consumed:]
    if r.body_kind == "chunked":
        d = ChunkedDecoder(response=True)
        ours_body, _ = d.feed(rest)
        assert d.done
    elif r.body_kind == "length":
        ours_body = rest[:r.content_length]
    else:
        ours_body = b""
    assert ours_body == theirs["body"] == body


BAD_RESPONSES = [
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\nX: y\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n",
]


@pytest.mark.parametrize("data", BAD_RESPONSES)
def test_bad_responses_are_rejected_by_both(data):
    assert run_llhttp(data, response=True)[0] == "error"
    with pytest.raises(HTTPParseError) as ei:
        parse_response(data)
    assert ei.value.status == 502
