"""The server name (SNI) a TLS client asks for, read from its ClientHello without terminating TLS.

A TLS passthrough stream (fastmesh.streams) routes a connection by this name and then relays the
bytes untouched, so the backend terminates TLS itself. The parser sees bytes from the network
before anything about the client is known, so it is bounded and defensive: it never raises,
never reads past what it was given, and gives up on anything that is not a well-formed
ClientHello at the start of the stream.

`read_hello(data)` -> (status, name):
- (MORE, None): a ClientHello may be starting but is not complete yet: wait for more bytes (the
  caller bounds the wait by time and by MAX_HELLO);
- (HELLO, name): a complete ClientHello; `name` is its host_name server name, lower-cased and
  without a trailing dot, or None when it sends none (or one that is not a valid host name);
- (NOT_TLS, None): not a TLS handshake, a malformed one, or one larger than MAX_HELLO.

The handshake message may be split over several TLS records and over several TCP segments; the
records' payloads are joined before the ClientHello is parsed (RFC 8446 5.1, RFC 6066 3).
"""
from __future__ import annotations

import re

MORE, HELLO, NOT_TLS = 0, 1, 2

MAX_HELLO = 65536                   # bytes of records buffered at most before giving up
RECORD_HEADER = 5                   # content type, legacy version (2), length (2)
MAX_RECORD = 16384 + 256            # a plaintext record's payload (RFC 8446 5.1), some slack
HANDSHAKE = 22                      # record content type
CLIENT_HELLO = 1                    # handshake message type
EXT_SERVER_NAME = 0
NAME_TYPE_HOST = 0

_LABEL = rb"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = re.compile(_LABEL + rb"(\." + _LABEL + rb")*")          # as config.schema.hostname


def read_hello(data: bytes) -> tuple[int, str | None]:
    """(MORE | HELLO | NOT_TLS, server name or None) for the first bytes of a connection."""
    payload = bytearray()
    pos = 0
    size = len(data)
    if size > MAX_HELLO:
        data = data[:MAX_HELLO]
        size = MAX_HELLO
    while True:
        if size - pos < RECORD_HEADER:
            if pos < size and data[pos] != HANDSHAKE:
                return NOT_TLS, None
            if size - pos >= 2 and data[pos + 1] != 3:
                return NOT_TLS, None
            return _more_or_give_up(size)
        kind, major, length = data[pos], data[pos + 1], (data[pos + 3] << 8) | data[pos + 4]
        if kind != HANDSHAKE or major != 3 or length == 0 or length > MAX_RECORD:
            return NOT_TLS, None
        end = pos + RECORD_HEADER + length
        payload += data[pos + RECORD_HEADER:min(end, size)]
        if len(payload) >= 4:
            if payload[0] != CLIENT_HELLO:
                return NOT_TLS, None
            needed = 4 + ((payload[1] << 16) | (payload[2] << 8) | payload[3])
            if needed > MAX_HELLO:
                return NOT_TLS, None
            if len(payload) >= needed:
                return HELLO, _server_name(bytes(payload[4:needed]))
        if end >= size:
            return _more_or_give_up(size)
        pos = end


def server_name(data: bytes) -> str | None:
    """The SNI host name of the ClientHello that `data` starts with; None for anything else
    (no SNI, incomplete, not TLS, malformed)."""
    status, name = read_hello(data)
    return name if status == HELLO else None


def _more_or_give_up(size: int) -> tuple[int, None]:
    return (NOT_TLS, None) if size >= MAX_HELLO else (MORE, None)


def _server_name(hello: bytes) -> str | None:
    """The host_name in a ClientHello body (after the 4-byte handshake header), or None."""
    end = len(hello)
    pos = 2 + 32                                           # legacy_version, random
    if pos + 1 > end:
        return None
    pos += 1 + hello[pos]                                  # legacy_session_id
    if pos + 2 > end:
        return None
    pos += 2 + ((hello[pos] << 8) | hello[pos + 1])        # cipher_suites
    if pos + 1 > end:
        return None
    pos += 1 + hello[pos]                                  # legacy_compression_methods
    if pos + 2 > end:
        return None                                        # no extensions at all (or truncated)
    ext_end = pos + 2 + ((hello[pos] << 8) | hello[pos + 1])
    if ext_end > end:
        return None
    pos += 2
    while pos + 4 <= ext_end:
        kind = (hello[pos] << 8) | hello[pos + 1]
        length = (hello[pos + 2] << 8) | hello[pos + 3]
        pos += 4
        if pos + length > ext_end:
            return None
        if kind == EXT_SERVER_NAME:
            return _host_name(hello[pos:pos + length])
        pos += length
    return None


def _host_name(ext: bytes) -> str | None:
    """The first host_name entry of a server_name extension body, validated, or None."""
    if len(ext) < 2:
        return None
    end = min(len(ext), 2 + ((ext[0] << 8) | ext[1]))
    pos = 2
    while pos + 3 <= end:
        kind, length = ext[pos], (ext[pos + 1] << 8) | ext[pos + 2]
        pos += 3
        if pos + length > end:
            return None
        if kind == NAME_TYPE_HOST:
            name = ext[pos:pos + length].lower()
            if name.endswith(b"."):
                name = name[:-1]
            if 0 < len(name) <= 253 and _HOST.fullmatch(name):
                return name.decode("ascii")
            return None
        pos += length
    return None
