"""fastmesh.sni: the SNI of a ClientHello, read from the first bytes of a connection.

ClientHellos here are real ones, made by the ssl module (OpenSSL) through memory BIOs; the fuzz
tests check that nothing at all (random bytes, mutated or cut hellos) makes the parser raise.
"""
from __future__ import annotations

import ssl

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastmesh.sni import HELLO, MAX_HELLO, MORE, NOT_TLS, read_hello, server_name

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def client_hello(server_hostname: str | None, maximum=ssl.TLSVersion.TLSv1_3) -> bytes:
    """The first flight of a TLS client (its ClientHello records), as sent on the wire."""
    context = ssl.create_default_context()
    context.check_hostname = server_hostname is not None
    if server_hostname is None:
        context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, size: int) -> bytes:
    """The same handshake message re-framed in records of at most `size` payload bytes."""
    assert hello[0] == 22
    length = int.from_bytes(hello[3:5], "big")
    payload = hello[5:5 + length]
    out = b""
    for start in range(0, len(payload), size):
        part = payload[start:start + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return out


HELLO_13 = client_hello("a.example.com")
HELLO_12 = client_hello("api.example.com", ssl.TLSVersion.TLSv1_2)


def test_sni_of_a_tls13_and_a_tls12_client_hello():
    assert read_hello(HELLO_13) == (HELLO, "a.example.com")
    assert read_hello(HELLO_12) == (HELLO, "api.example.com")


def test_sni_is_lower_cased_and_loses_a_trailing_dot():
    assert server_name(client_hello("Mixed.Example.COM")) == "mixed.example.com"


def test_hello_without_sni_is_complete_with_no_name():
    assert read_hello(client_hello(None)) == (HELLO, None)


def test_every_prefix_of_a_hello_asks_for_more():
    for cut in range(len(HELLO_13)):
        assert read_hello(HELLO_13[:cut]) == (MORE, None), cut


def test_truncated_hello_gives_no_name():
    assert server_name(HELLO_13[:len(HELLO_13) // 2]) is None


def test_hello_split_over_several_records_is_joined():
    for size in (1, 7, 64, 200):
        framed = split_records(HELLO_13, size)
        assert read_hello(framed) == (HELLO, "a.example.com"), size
        for cut in range(0, len(framed), 37):
            assert read_hello(framed[:cut]) == (MORE, None)


def test_bytes_after_the_hello_are_ignored():
    assert read_hello(HELLO_13 + b"\x17\x03\x03garbage") == (HELLO, "a.example.com")


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.0\r\n",
    b"\x16\x02\x00\x00\x10",                           # SSL 2-ish version byte
    b"\x17\x03\x03\x00\x10" + b"x" * 16,               # application data, not a handshake
    b"\x16\x03\x01\x00\x00",                           # empty record
    b"\x16\x03\x01\x50\x00",                           # record longer than TLS allows
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",           # a ServerHello, not a ClientHello
])
def test_non_tls_or_malformed_starts_are_refused(data):
    assert read_hello(data) == (NOT_TLS, None)


def test_a_hello_larger_than_the_limit_is_refused():
    declared = (MAX_HELLO + 10).to_bytes(3, "big")
    record = b"\x01" + declared + b"\x03\x03" + b"\x00" * 1000
    data = b"\x16\x03\x01" + len(record).to_bytes(2, "big") + record
    assert read_hello(data) == (NOT_TLS, None)


def test_endless_small_records_stop_at_the_limit():
    record = b"\x16\x03\x01\x00\x01\x01"                # a one-byte piece of a huge hello
    data = split_records(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", 1) + record * (MAX_HELLO // 6)
    assert read_hello(data) == (NOT_TLS, None)


def test_invalid_host_names_are_not_returned():
    good = HELLO_13
    name = b"a.example.com"
    at = good.index(name)
    for bad in (b"a\x00example.com", b"a..example.co", b"a example.com", b"\xff.example.com"):
        assert len(bad) == len(name)          # the framing lengths stay right
        assert read_hello(good[:at] + bad + good[at + len(name):]) == (HELLO, None), bad


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    status, name = read_hello(data)
    assert status in (MORE, HELLO, NOT_TLS)
    assert name is None or (status == HELLO and isinstance(name, str))


@FUZZ
@given(st.sampled_from([HELLO_13, HELLO_12]), st.lists(
    st.tuples(st.integers(min_value=0, max_value=600), st.integers(min_value=0, max_value=255)),
    min_size=1, max_size=8))
def test_mutated_hellos_never_raise(hello, edits):
    data = bytearray(hello)
    for position, value in edits:
        data[position % len(data)] = value
    status, name = read_hello(bytes(data))
    assert status in (MORE, HELLO, NOT_TLS)
    if name is not None:
        assert name == name.lower() and name.isascii() and " " not in name


@FUZZ
@given(st.sampled_from([HELLO_13, HELLO_12]), st.integers(min_value=0, max_value=600),
       st.binary(max_size=40))
def test_cut_and_padded_hellos_never_raise(hello, cut, tail):
    status, _ = read_hello(hello[:cut] + tail)
    assert status in (MORE, HELLO, NOT_TLS)
