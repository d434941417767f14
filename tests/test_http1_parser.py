"""Behaviour of the strict HTTP/1.1 head parser and chunked decoder (fastmesh._core.http1)."""
import pytest

from fastmesh._core import http1
from fastmesh._core.http1 import (
    ChunkedDecoder,
    HTTPParseError,
    error_status,
    parse_request,
    parse_response,
)

ERR_BAD_REQUEST = http1.ERR_BAD_REQUEST
ERR_URI_TOO_LONG = http1.ERR_URI_TOO_LONG
ERR_HEADERS_TOO_LARGE = http1.ERR_HEADERS_TOO_LARGE
ERR_VERSION = http1.ERR_VERSION
ERR_NOT_IMPLEMENTED = http1.ERR_NOT_IMPLEMENTED
ERR_BAD_RESPONSE = http1.ERR_BAD_RESPONSE
ERR_BAD_CHUNK = http1.ERR_BAD_CHUNK

# header kinds (H_* in http1.pxd)
H_OTHER, H_HOST, H_CL, H_TE, H_CONNECTION, H_KEEP_ALIVE = 0, 1, 2, 3, 4, 5
H_UPGRADE, H_EXPECT, H_XFF, H_XFP, H_XFH, H_XFPORT, H_VIA = 9, 10, 11, 12, 13, 14, 15

TYPICAL = (
    b"GET /api/v1/users/12345/orders?limit=50&offset=100 HTTP/1.1\r\n"
    b"Host: api.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) curl/8.4.0\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc\r\n"
    b"X-Request-Id: 7f9c2a1e-4b3d-4f8a-9c1d-2e3f4a5b6c7d\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)


def req(head: bytes, **kw):
    r = parse_request(head, **kw)
    assert r is not None, "head unexpectedly incomplete"
    return r


def req_err(data: bytes, **kw) -> int:
    with pytest.raises(HTTPParseError) as ei:
        parse_request(data, **kw)
    return ei.value.code


def resp(data: bytes, **kw):
    r = parse_response(data, **kw)
    assert r is not None, "head unexpectedly incomplete"
    return r


def resp_err(data: bytes, **kw) -> int:
    with pytest.raises(HTTPParseError) as ei:
        parse_response(data, **kw)
    return ei.value.code


def h11(*lines: bytes, method=b"GET", target=b"/", host=True) -> bytes:
    head = method + b" " + target + b" HTTP/1.1\r\n"
    if host:
        head += b"Host: example.com\r\n"
    for ln in lines:
        head += ln + b"\r\n"
    return head + b"\r\n"


# ---------------------------------------------------------------------------
# request line and basic structure


def test_typical_request_fields_and_spans():
    r = req(TYPICAL)
    assert r.consumed == len(TYPICAL)
    assert r.method == "GET"
    assert r.target == "/api/v1/users/12345/orders?limit=50&offset=100"
    assert r.path == "/api/v1/users/12345/orders"
    assert r.query == "limit=50&offset=100"
    assert r.version == "1.1"
    assert r.headers[0] == (b"Host", b"api.example.com")
    assert r.headers[3] == (b"Accept-Encoding", b"gzip, deflate, br")
    assert len(r.headers) == 7
    assert r.body_kind == "none" and r.content_length is None
    assert r.keep_alive is True
    assert r.absolute_form is False and r.authority is None
    assert r.host_index == 0


def test_query_absent_vs_empty():
    assert req(h11(target=b"/a")).query is None
    r = req(h11(target=b"/a?"))
    assert r.query == "" and r.path == "/a"
    r = req(h11(target=b"/a?b?c"))
    assert r.path == "/a" and r.query == "b?c"


def test_pipelined_requests_are_parsed_one_at_a_time():
    first = h11(b"Content-Length: 5", method=b"POST") + b"hello"
    second = h11(target=b"/second")
    third = b"DELETE /third HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    data = first + second + third
    r1 = req(data)
    assert r1.method == "POST" and r1.body_kind == "length" and r1.content_length == 5
    rest = data[r1.consumed:]
    assert rest[:5] == b"hello"
    rest = rest[5:]
    r2 = req(rest)
    assert r2.path == "/second" and r2.consumed == len(second)
    rest = rest[r2.consumed:]
    r3 = req(rest)
    assert r3.method == "DELETE" and r3.keep_alive is False and r3.consumed == len(rest)


def test_head_split_at_every_byte_gives_same_result():
    full = req(TYPICAL)
    for i in range(len(TYPICAL)):
        assert parse_request(TYPICAL[:i]) is None, i
    again = req(TYPICAL + b"GET / HTTP/1.1\r\n")
    assert again.consumed == full.consumed
    assert again.headers == full.headers


def test_response_split_at_every_byte_is_incomplete_until_the_end():
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: x\r\n\r\n"
    for i in range(len(data)):
        assert parse_response(data[:i]) is None, i
    assert resp(data).consumed == len(data)


def test_leading_empty_lines_are_skipped_and_counted():
    data = b"\r\n\r\n" + h11()
    r = req(data)
    assert r.consumed == len(data)
    assert r.method == "GET"
    # spans are relative to the buffer start, so names still slice correctly
    assert r.headers[0] == (b"Host", b"example.com")


def test_too_many_leading_empty_lines_are_rejected():
    assert req_err(b"\r\n" * 5 + h11()) == ERR_BAD_REQUEST


def test_leading_bare_lf_is_rejected():
    assert req_err(b"\n" + h11()) == ERR_BAD_REQUEST


@pytest.mark.parametrize("line", [
    b"GET  / HTTP/1.1",       # double SP
    b"GET /  HTTP/1.1",
    b"GET / HTTP/1.1 ",       # trailing SP
    b" GET / HTTP/1.1",
    b"GET\t/ HTTP/1.1",       # HTAB separator
    b"GET /",                 # HTTP/0.9
    b"GET / HTTP/1.1 extra",
    b"GE(T / HTTP/1.1",       # method not a token
    b"G\x00ET / HTTP/1.1",
])
def test_request_line_separators_are_exactly_one_space(line):
    assert req_err(line + b"\r\nHost: h\r\n\r\n") == ERR_BAD_REQUEST


@pytest.mark.parametrize("target", [
    b"/a\x00b", b"/a\x7fb", b"/a\x01", b"/\xff", b"/a#frag", b"/\xc3\xa9",
])
def test_ctl_nonascii_and_fragment_in_target_are_rejected(target):
    assert req_err(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n") == ERR_BAD_REQUEST


def test_bare_lf_ending_request_line_is_rejected():
    assert req_err(b"GET / HTTP/1.1\nHost: h\r\n\r\n") == ERR_BAD_REQUEST


def test_bare_cr_in_request_line_is_rejected():
    assert req_err(b"GET / HTTP/1.1\rHost: h\r\n\r\n") == ERR_BAD_REQUEST
    assert req_err(b"GET /a\rb HTTP/1.1\r\nHost: h\r\n\r\n") == ERR_BAD_REQUEST


def test_invalid_bytes_are_rejected_before_the_head_is_complete():
    assert req_err(b"GET /a b") == ERR_BAD_REQUEST
    assert req_err(b"GET / HTTP/1.1\r\nHost: h\r\nBad Name") == ERR_BAD_REQUEST
    assert req_err(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00") == ERR_BAD_REQUEST
    assert req_err(b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n") == ERR_BAD_REQUEST
    assert req_err(b"GET / HTTX") == ERR_BAD_REQUEST


@pytest.mark.parametrize("version,minor", [
    (b"HTTP/1.0", "1.0"), (b"HTTP/1.1", "1.1"), (b"HTTP/1.2", "1.1"), (b"HTTP/1.9", "1.1"),
])
def test_http1_minor_versions(version, minor):
    r = req(b"GET / " + version + b"\r\nHost: h\r\n\r\n")
    assert r.version == minor


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.1"])
def test_other_major_versions_are_505(version):
    code = req_err(b"GET / " + version + b"\r\nHost: h\r\n\r\n")
    assert code == ERR_VERSION
    assert error_status(code) == 505


@pytest.mark.parametrize("version", [b"http/1.1", b"HTTP/1.", b"HTTP/11", b"HTTP/1.1.1", b"HTTP/a.1",
                                     b"HTTP/1.x", b"HTTPS/1.1"])
def test_garbage_versions_are_400(version):
    assert req_err(b"GET / " + version + b"\r\nHost: h\r\n\r\n") == ERR_BAD_REQUEST


def test_method_flags():
    assert req(h11(method=b"HEAD")).method == "HEAD"
    # methods are case-sensitive tokens: any token is accepted
    assert req(h11(method=b"PURGE")).method == "PURGE"
    assert req(h11(method=b"get")).method == "get"


# ---------------------------------------------------------------------------
# request-target forms


def test_absolute_form_gives_authority_and_path():
    r = req(b"GET http://Example.com:8080/p/q?x=1 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n")
    assert r.absolute_form is True
    assert r.authority == "Example.com:8080"
    assert r.path == "/p/q"
    assert r.query == "x=1"
    assert r.target == "http://Example.com:8080/p/q?x=1"


def test_absolute_form_with_empty_path_means_slash():
    r = req(b"GET https://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert r.absolute_form and r.path == "/" and r.query is None
    r = req(b"GET http://example.com?q HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert r.path == "/" and r.query == "q" and r.authority == "example.com"


def test_absolute_form_still_needs_host_in_http11():
    assert req_err(b"GET http://example.com/ HTTP/1.1\r\n\r\n") == ERR_BAD_REQUEST


@pytest.mark.parametrize("target", [
    b"http://user@example.com/", b"http:///path", b"ftp://example.com/", b"http:/example.com/",
    b"example.com/", b"http//example.com",
])
def test_bad_absolute_forms_are_rejected(target):
    assert req_err(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n") == ERR_BAD_REQUEST


def test_asterisk_form_only_for_options():
    r = req(h11(method=b"OPTIONS", target=b"*"))
    assert r.target == "*" and r.path == "*"
    assert req_err(h11(method=b"GET", target=b"*")) == ERR_BAD_REQUEST
    assert req_err(h11(method=b"OPTIONS", target=b"*x")) == ERR_BAD_REQUEST


def test_authority_form_only_for_connect():
    r = req(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert r.authority == "example.com:443"
    assert r.absolute_form is False
    assert req_err(b"CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n") == ERR_BAD_REQUEST
    assert req_err(b"CONNECT example.com HTTP/1.1\r\nHost: h\r\n\r\n") == ERR_BAD_REQUEST
    assert req_err(h11(target=b"example.com:443")) == ERR_BAD_REQUEST


# ---------------------------------------------------------------------------
# header fields


def test_whitespace_before_colon_is_rejected():
    assert req_err(h11(b"Foo : bar")) == ERR_BAD_REQUEST
    assert req_err(h11(b"Foo\t: bar")) == ERR_BAD_REQUEST


def test_obs_fold_is_rejected():
    assert req_err(h11(b"Foo: bar", b" continued")) == ERR_BAD_REQUEST
    assert req_err(h11(b"Foo: bar", b"\tcontinued")) == ERR_BAD_REQUEST


def test_whitespace_line_after_request_line_is_rejected():
    assert req_err(b"GET / HTTP/1.1\r\n Host: h\r\n\r\n") == ERR_BAD_REQUEST


@pytest.mark.parametrize("name", [b"", b"Fo o", b"Fo\x00o", b"Fo(o", b"Fo\"o", b"F\xe9o"])
def test_field_name_must_be_a_token(name):
    assert req_err(h11(name + b": x")) == ERR_BAD_REQUEST


@pytest.mark.parametrize("ctl", [b"\x00", b"\x01", b"\x0b", b"\x1f", b"\x7f", b"\n", b"\r"])
def test_ctl_in_value_is_rejected(ctl):
    assert req_err(h11(b"X: a" + ctl + b"b")) == ERR_BAD_REQUEST


def test_htab_and_obs_text_are_allowed_in_values():
    r = req(h11(b"X: a\tb \xe9\xff c"))
    assert r.headers[1] == (b"X", b"a\tb \xe9\xff c")


def test_value_ows_is_trimmed_and_inner_whitespace_kept():
    r = req(h11(b"X: \t  a  b \t ", b"Empty:", b"Blank:   \t"))
    assert r.headers[1:] == [(b"X", b"a  b"), (b"Empty", b""), (b"Blank", b"")]


def test_bare_lf_ending_a_header_is_rejected():
    assert req_err(b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n") == ERR_BAD_REQUEST
    assert req_err(b"GET / HTTP/1.1\r\nHost: h\r\n\n") == ERR_BAD_REQUEST


def test_bare_cr_in_header_block_is_rejected():
    assert req_err(b"GET / HTTP/1.1\r\nHost: h\r\r\n\r\n") == ERR_BAD_REQUEST
    assert req_err(b"GET / HTTP/1.1\r\nHost: h\r\n\rX") == ERR_BAD_REQUEST


def test_header_names_keep_their_case():
    r = req(h11(b"x-CuStOm: 1"))
    assert r.headers[1][0] == b"x-CuStOm"


# Host


def test_http11_without_host_is_rejected():
    assert req_err(h11(host=False)) == ERR_BAD_REQUEST


def test_http10_without_host_is_accepted():
    r = req(b"GET / HTTP/1.0\r\n\r\n")
    assert r.version == "1.0" and r.host_index == -1


def test_two_host_headers_are_rejected():
    assert req_err(h11(b"host: other.com")) == ERR_BAD_REQUEST


@pytest.mark.parametrize("host", [b"a b", b"a/b", b"user@host", b"h?x", b"h#"])
def test_invalid_host_values_are_rejected(host):
    assert req_err(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n") == ERR_BAD_REQUEST


def test_host_case_insensitive_and_indexed():
    r = req(b"GET / HTTP/1.1\r\nA: 1\r\nhOsT: [::1]:8080\r\n\r\n")
    assert r.host_index == 1
    assert r.header_kinds[1] == H_HOST
    assert b"host" not in r.hop_headers


# Content-Length


def test_content_length_gives_length_body():
    r = req(h11(b"Content-Length: 42", method=b"POST"))
    assert r.body_kind == "length" and r.content_length == 42
    assert b"content-length" in r.hop_headers


def test_content_length_zero_means_no_body():
    r = req(h11(b"Content-Length: 0", method=b"POST"))
    assert r.body_kind == "none" and r.content_length == 0


def test_identical_content_lengths_are_merged():
    r = req(h11(b"Content-Length: 7", b"content-length: 7", method=b"POST"))
    assert r.content_length == 7
    r = req(h11(b"Content-Length: 7 , 7,7", method=b"POST"))
    assert r.content_length == 7


def test_differing_content_lengths_are_rejected():
    assert req_err(h11(b"Content-Length: 7", b"Content-Length: 8")) == ERR_BAD_REQUEST
    assert req_err(h11(b"Content-Length: 7, 8")) == ERR_BAD_REQUEST


@pytest.mark.parametrize("value", [
    b"+5", b"-5", b"5 5", b"0x5", b"5a", b"a", b"", b"1,", b",1", b"1,,1", b"5.0",
    b"9223372036854775808", b"99999999999999999999999",
])
def test_malformed_content_length_is_rejected(value):
    assert req_err(h11(b"Content-Length: " + value, method=b"POST")) == ERR_BAD_REQUEST


def test_largest_int63_content_length_is_accepted():
    r = req(h11(b"Content-Length: 9223372036854775807", method=b"POST"))
    assert r.content_length == 2**63 - 1


# Transfer-Encoding


def test_chunked_request():
    r = req(h11(b"Transfer-Encoding: chunked", method=b"POST"))
    assert r.body_kind == "chunked" and r.content_length is None
    assert b"transfer-encoding" in r.hop_headers
    r = req(h11(b"Transfer-Encoding: CHUNKED", method=b"POST"))
    assert r.body_kind == "chunked"


@pytest.mark.parametrize("te", [b"gzip", b"gzip, chunked", b"deflate,chunked", b"identity",
                                b"chunked, gzip"])
def test_unsupported_request_codings_are_501(te):
    code = req_err(h11(b"Transfer-Encoding: " + te, method=b"POST"))
    assert code == ERR_NOT_IMPLEMENTED
    assert error_status(code) == 501


def test_codings_split_over_two_te_headers_count_as_one_list():
    assert req_err(h11(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked")) == ERR_NOT_IMPLEMENTED
    assert req_err(h11(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")) == ERR_BAD_REQUEST


@pytest.mark.parametrize("te", [b"chunked, chunked", b"", b"chunked,", b", chunked", b"chunked;x=1",
                                b"chun ked", b"\"chunked\""])
def test_malformed_or_repeated_chunked_is_400(te):
    assert req_err(h11(b"Transfer-Encoding: " + te, method=b"POST")) == ERR_BAD_REQUEST


def test_content_length_with_transfer_encoding_is_rejected():
    data = h11(b"Content-Length: 5", b"Transfer-Encoding: chunked", method=b"POST")
    assert req_err(data) == ERR_BAD_REQUEST


def test_transfer_encoding_in_http10_request_is_rejected():
    data = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert req_err(data) == ERR_BAD_REQUEST


# Connection / keep-alive / upgrade / expect


@pytest.mark.parametrize("version,conn,expected", [
    (b"1.1", None, True),
    (b"1.1", b"close", False),
    (b"1.1", b"Keep-Alive", True),
    (b"1.1", b"foo, CLOSE", False),
    (b"1.0", None, False),
    (b"1.0", b"keep-alive", True),
    (b"1.0", b" Keep-Alive ,x", True),
    (b"1.0", b"keep-alive, close", False),
])
def test_keep_alive_defaults_and_connection_tokens(version, conn, expected):
    data = b"GET / HTTP/" + version + b"\r\nHost: h\r\n"
    if conn is not None:
        data += b"Connection: " + conn + b"\r\n"
    assert req(data + b"\r\n").keep_alive is expected


def test_connection_tokens_across_several_headers():
    r = req(h11(b"Connection: keep-alive", b"Connection: close"))
    assert r.keep_alive is False


def test_malformed_connection_value_is_rejected():
    assert req_err(h11(b"Connection: a b")) == ERR_BAD_REQUEST
    assert req_err(h11(b"Connection: \"close\"")) == ERR_BAD_REQUEST


def test_upgrade_needs_token_and_header():
    r = req(h11(b"Connection: Upgrade", b"Upgrade: websocket"))
    assert r.upgrade is True and r.upgrade_index == 2
    assert req(h11(b"Upgrade: websocket")).upgrade is False
    assert req(h11(b"Connection: upgrade")).upgrade is False
    assert set(r.hop_headers) == {b"connection", b"upgrade"}


def test_expect_100_continue():
    assert req(h11(b"Expect: 100-Continue", b"Content-Length: 3", method=b"PUT")).expect_continue
    assert not req(h11(b"Expect: 200-ok")).expect_continue
    assert not req(h11()).expect_continue
    # RFC 9110 10.1.1: ignored in HTTP/1.0
    assert not req(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue


# hop-by-hop and kinds


def test_hop_by_hop_headers_are_flagged():
    r = req(h11(
        b"Connection: keep-alive, X-Secret , x-other",
        b"Keep-Alive: timeout=5",
        b"Proxy-Connection: keep-alive",
        b"TE: trailers",
        b"Trailer: Expires",
        b"X-Secret: 1",
        b"X-OTHER: 2",
        b"X-Kept: 3",
        b"Content-Length: 1",
        method=b"POST",
    ))
    assert r.hop_headers == [b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                             b"x-secret", b"x-other", b"content-length"]


def test_connection_option_does_not_strip_host():
    r = req(h11(b"Connection: host"))
    assert b"host" not in r.hop_headers and r.host_index == 0


def test_forwarding_headers_get_kinds_but_are_not_hop():
    r = req(h11(
        b"X-Forwarded-For: 1.1.1.1",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Host: a",
        b"X-Forwarded-Port: 443",
        b"Via: 1.1 a",
        b"x-forwarded-for: 2.2.2.2",
        b"VIA: 1.1 b",
        b"Expect: 100-continue",
    ))
    assert r.header_kinds == [H_HOST, H_XFF, H_XFP, H_XFH, H_XFPORT, H_VIA, H_XFF, H_VIA, H_EXPECT]
    assert r.hop_headers == []
    assert r.xff_index == 6 and r.via_index == 7


def test_lookalike_names_are_other():
    r = req(h11(b"Hosts: x", b"Content-Lengths: 5", b"X-Forwarded-Fo: 1", b"Connectionx: close"))
    assert r.header_kinds == [H_HOST, H_OTHER, H_OTHER, H_OTHER, H_OTHER]
    assert r.keep_alive is True and r.body_kind == "none"


# ---------------------------------------------------------------------------
# limits


def test_long_request_line_is_414_before_the_line_ends():
    partial = b"GET /" + b"a" * 9000
    code = req_err(partial)
    assert code == ERR_URI_TOO_LONG and error_status(code) == 414
    assert req_err(b"GET /" + b"a" * 100, max_line_size=64) == ERR_URI_TOO_LONG


def test_request_line_at_the_limit_is_accepted():
    line = b"GET /" + b"a" * (64 - len(b"GET / HTTP/1.1") ) + b" HTTP/1.1"
    assert len(line) == 64
    assert req(line + b"\r\nHost: h\r\n\r\n", max_line_size=64).method == "GET"
    line2 = b"GET /a" + b"a" * (64 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert req_err(line2 + b"\r\nHost: h\r\n\r\n", max_line_size=64) == ERR_URI_TOO_LONG


def test_big_head_is_431_before_it_ends():
    partial = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"v" * 40000
    code = req_err(partial)
    assert code == ERR_HEADERS_TOO_LARGE and error_status(code) == 431
    full = h11(b"X: " + b"v" * 200)
    assert req_err(full, max_head_size=128) == ERR_HEADERS_TOO_LARGE
    assert req(full, max_head_size=len(full)).consumed == len(full)


def test_too_many_headers_is_431_before_the_head_ends():
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(100))
    partial = b"GET / HTTP/1.1\r\nHost: h\r\n" + lines
    assert req_err(partial) == ERR_HEADERS_TOO_LARGE
    ok = b"GET / HTTP/1.1\r\nHost: h\r\n" + lines[:-len(b"X-99: v\r\n")] + b"\r\n"
    assert len(req(ok).headers) == 100
    assert req_err(h11(b"A: 1", b"B: 2"), max_headers=2) == ERR_HEADERS_TOO_LARGE


def test_max_headers_is_capped_at_struct_capacity():
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(130))
    assert req_err(b"GET / HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n", max_headers=1000) \
        == ERR_HEADERS_TOO_LARGE


# ---------------------------------------------------------------------------
# responses


def test_status_line_forms():
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert (r.status, r.reason, r.version) == (200, "OK", "1.1")
    r = resp(b"HTTP/1.1 404 Not  Found \xe9\r\nContent-Length: 0\r\n\r\n")
    assert r.reason == "Not  Found \xe9"
    assert resp(b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n").reason == ""
    assert resp(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n").reason == ""
    assert resp(b"HTTP/1.0 999 X\r\n\r\n").status == 999


@pytest.mark.parametrize("line", [
    b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 099 X", b"HTTP/1.1  200 OK", b"HTTP/1.1 abc OK",
    b"HTTP/2.0 200 OK", b"HTTP/1.1 200 O\x00K", b"HTTP/1.1 200 OK\n", b"HTTP/1.1", b"ICY 200 OK",
    b"http/1.1 200 OK", b"HTTP/1.1 200\tOK",
])
def test_bad_status_lines_are_bad_response(line):
    code = resp_err(line + b"\r\nContent-Length: 0\r\n\r\n")
    assert code == ERR_BAD_RESPONSE and error_status(code, True) == 502


def test_response_header_errors_are_bad_response():
    assert resp_err(b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n") == ERR_BAD_RESPONSE
    assert resp_err(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n") == ERR_BAD_RESPONSE
    assert resp_err(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n") == ERR_BAD_RESPONSE
    assert resp_err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n") == ERR_BAD_RESPONSE
    assert resp_err(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") == ERR_BAD_RESPONSE


def test_response_limits_are_431_code_and_502_status():
    with pytest.raises(HTTPParseError) as ei:
        parse_response(b"HTTP/1.1 200 OK\r\nX: " + b"v" * 40000)
    assert ei.value.code == ERR_HEADERS_TOO_LARGE and ei.value.status == 502
    assert resp_err(b"HTTP/1.1 200 " + b"x" * 9000) == ERR_HEADERS_TOO_LARGE


def test_response_framing_by_content_length():
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
    assert r.body_kind == "length" and r.content_length == 12 and r.keep_alive
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert r.body_kind == "none" and r.content_length == 0 and r.keep_alive


def test_response_without_framing_reads_until_close():
    r = resp(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n")
    assert r.body_kind == "until_close" and r.keep_alive is False


@pytest.mark.parametrize("status", [204, 304, 100, 101, 103])
def test_bodyless_statuses(status):
    r = resp(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    assert r.body_kind == "none" and r.keep_alive is True
    r = resp(b"HTTP/1.1 %d X\r\n\r\n" % status)
    assert r.body_kind == "none" and r.keep_alive is True


def test_response_to_head_has_no_body():
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    r = resp(data, request_was_head=True)
    assert r.body_kind == "none" and r.content_length == 1234 and r.keep_alive
    r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", request_was_head=True)
    assert r.body_kind == "none"
    r = resp(b"HTTP/1.1 200 OK\r\n\r\n", request_was_head=True)
    assert r.body_kind == "none" and r.keep_alive


def test_1xx_head_is_complete_and_next_head_follows():
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    statuses = []
    while True:
        r = resp(data)
        statuses.append(r.status)
        data = data[r.consumed:]
        if r.status >= 200:
            break
    assert statuses == [100, 103, 200] and data == b"ok"


def test_response_chunked_and_te_passthrough():
    r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert r.body_kind == "chunked" and not r.te_passthrough
    assert b"transfer-encoding" in r.hop_headers
    r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert r.body_kind == "chunked" and r.te_passthrough
    assert b"transfer-encoding" not in r.hop_headers


def test_response_te_not_ending_in_chunked_reads_until_close():
    r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\n")
    assert r.body_kind == "until_close" and r.keep_alive is False
    assert r.te_passthrough and b"transfer-encoding" not in r.hop_headers


def test_response_cl_and_te_te_wins_and_cl_is_removed():
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert r.body_kind == "chunked" and r.content_length is None
    assert b"content-length" in r.hop_headers
    assert r.keep_alive is False  # smuggling signal: do not reuse the upstream connection


def test_response_keep_alive():
    assert resp(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive is False
    assert resp(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").keep_alive
    assert not resp(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive


def test_response_upgrade():
    r = resp(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert r.upgrade and r.body_kind == "none"


def test_response_does_not_require_host_and_allows_several():
    r = resp(b"HTTP/1.1 200 OK\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n")
    assert r.status == 200


# ---------------------------------------------------------------------------
# chunked decoding

CHUNKED = (b"5\r\nhello\r\n"
           b"6;name=value;flag\r\n world\r\n"
           b"1A;q=\"quo\\\"ted;x\"\r\n" + b"z" * 26 + b"\r\n"
           b"0\r\n"
           b"Expires: never\r\n"
           b"X-Checksum: abc\r\n"
           b"\r\n")
DECODED = b"hello world" + b"z" * 26


def decode_all(data: bytes):
    d = ChunkedDecoder()
    out, used = d.feed(data)
    return out, used, d.done


def chunk_err(data: bytes) -> int:
    d = ChunkedDecoder()
    with pytest.raises(HTTPParseError) as ei:
        d.feed(data)
    return ei.value


def test_chunked_with_extensions_and_trailers():
    out, used, done = decode_all(CHUNKED)
    assert out == DECODED and used == len(CHUNKED) and done


def test_chunked_stops_exactly_after_final_crlf():
    out, used, done = decode_all(CHUNKED + b"GET / HTTP/1.1\r\n")
    assert out == DECODED and used == len(CHUNKED) and done
    d = ChunkedDecoder()
    d.feed(CHUNKED)
    assert d.feed(b"more") == (b"", 0)


def test_chunked_split_at_every_byte_boundary():
    for i in range(len(CHUNKED) + 1):
        d = ChunkedDecoder()
        a, ua = d.feed(CHUNKED[:i])
        assert ua == i and (d.done is (i == len(CHUNKED)))
        b, ub = d.feed(CHUNKED[i:])
        assert a + b == DECODED and d.done and ua + ub == len(CHUNKED)


def test_chunked_fed_one_byte_at_a_time():
    d = ChunkedDecoder()
    out = b""
    for i in range(len(CHUNKED)):
        assert not d.done
        piece, used = d.feed(CHUNKED[i:i + 1])
        assert used == 1
        out += piece
    assert d.done and out == DECODED


def test_chunked_large_chunk_and_many_spans():
    data = b"".join(b"1\r\n%c\r\n" % (65 + i % 26) for i in range(300)) + b"10000\r\n" + b"q" * 65536 + b"\r\n0\r\n\r\n"
    out, used, done = decode_all(data)
    assert done and used == len(data)
    assert out[:300] == bytes(65 + i % 26 for i in range(300)) and out[300:] == b"q" * 65536


def test_chunk_size_leading_zeros_and_uppercase_hex():
    out, _, done = decode_all(b"000A\r\n0123456789\r\n000\r\n\r\n")
    assert out == b"0123456789" and done


@pytest.mark.parametrize("data", [
    b"0x10\r\n",                                # hex prefix
    b"-5\r\nhello\r\n",                         # negative
    b"+5\r\nhello\r\n",
    b"\r\nhello\r\n",                           # empty size
    b"g\r\n",
    b"5 5\r\n",
    b"5 \r\nhello\r\n",                         # trailing BWS without extension
    b"10000000000000000\r\n",                   # 17 digits
    b"4000000000000001\r\n",                    # > 2^62
    b"ffffffffffffffff\r\n",
    b"5\nhello\r\n",                            # bare LF after size
    b"5\rhello\r\n",                            # bare CR
    b"5\r\nhelloX\r\n",                         # missing CRLF after data
    b"5\r\nhello\n0\r\n\r\n",                   # bare LF after data
    b"5\r\nhello\r\r\n",
    b"5;\r\nhello\r\n",                         # empty extension name
    b"5;a=\r\nhello\r\n",                       # empty extension value
    b"5;a=\"x\r\nhello\r\n",                    # unterminated quoted value
    b"5;a b\r\n",
    b"5 ;a\r\n",                               # BWS in chunk-ext: rejected like llhttp
    b"5; a\r\n",
    b"5;a =b\r\n",
    b"5;a= b\r\n",
    b"5;a=b \r\n",
    b"5;a=\"b\" \r\n",
    b"5;a=\"b\"c\r\n",
    b"5;a=b c\r\n",
    b"5;\x00\r\n",
    b"0\r\nBad Trailer: x\r\n\r\n",             # trailer name not a token
    b"0\r\nX: a\x00b\r\n\r\n",                  # NUL in trailer value
    b"0\r\n folded\r\n\r\n",
    b"0\r\nX: y\n\r\n",                         # bare LF in trailers
    b"0\r\n\n",                                 # bare LF as final line
    b"0\r\nX\r\n\r\n",                          # trailer without colon
])
def test_bad_chunked_framing_is_rejected(data):
    e = chunk_err(data)
    assert e.code == ERR_BAD_CHUNK and e.status == 400


def test_largest_allowed_chunk_size_is_accepted():
    d = ChunkedDecoder()
    out, used = d.feed(b"4000000000000000\r\nabc")
    assert out == b"abc" and used == 21 and not d.done


def test_chunk_size_line_is_bounded():
    ok = b"1;" + b"a" * (4096 - 2) + b"\r\nx\r\n0\r\n\r\n"
    assert decode_all(ok)[0] == b"x"
    e = chunk_err(b"1;" + b"a" * 4095)  # rejected before the line ends
    assert e.code == ERR_BAD_CHUNK
    e = chunk_err(b"0" * 5000)
    assert e.code == ERR_BAD_CHUNK


def test_trailer_section_is_bounded():
    big = b"0\r\n" + b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    assert chunk_err(big).code == ERR_BAD_CHUNK


def test_decoder_stays_failed_after_an_error():
    d = ChunkedDecoder()
    with pytest.raises(HTTPParseError):
        d.feed(b"z\r\n")
    with pytest.raises(HTTPParseError):
        d.feed(b"0\r\n\r\n")


def test_response_decoder_errors_map_to_502():
    d = ChunkedDecoder(response=True)
    with pytest.raises(HTTPParseError) as ei:
        d.feed(b"zz\r\n")
    assert ei.value.code == ERR_BAD_CHUNK and ei.value.status == 502


# ---------------------------------------------------------------------------
# error mapping


def test_error_status_mapping():
    assert error_status(ERR_BAD_REQUEST) == 400
    assert error_status(ERR_URI_TOO_LONG) == 414
    assert error_status(ERR_HEADERS_TOO_LARGE) == 431
    assert error_status(ERR_VERSION) == 505
    assert error_status(ERR_NOT_IMPLEMENTED) == 501
    assert error_status(ERR_BAD_RESPONSE) == 502
    assert error_status(ERR_BAD_CHUNK) == 400
    assert error_status(ERR_BAD_CHUNK, True) == 502
    assert error_status(ERR_BAD_RESPONSE, True) == 502


def test_parse_error_carries_code_status_and_message():
    with pytest.raises(HTTPParseError) as ei:
        parse_request(b"GET / HTTP/2.0\r\n\r\n")
    e = ei.value
    assert e.code == ERR_VERSION and e.status == 505 and "version" in e.message.lower()
