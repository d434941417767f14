"""JSON as bytes with the standard library's C encoder, for the answers that are not per request:
error bodies (4xx/5xx of the data path and of plugins), the admin APIs, the CA's messages, the
built-in echo upstream.

orjson is faster, but a process that imports it also loads datetime, uuid and platform: ~0.3 MiB
of RSS in every sidecar, for bodies that a healthy mesh never sends. It stays where its speed is
paid back, the access log (one record per request, and only when it is on). The output is the same
shape as orjson's (compact, no spaces); non-ASCII is written as \\u escapes, so encoding never
fails, whatever a message holds.
"""
from __future__ import annotations

import json

_strict = json.JSONEncoder(separators=(",", ":")).encode
_lenient = json.JSONEncoder(separators=(",", ":"), default=str).encode


def dumps(value: object) -> bytes:
    """`value` (dicts, lists, str, numbers, bool, None) as JSON; TypeError for anything else."""
    return _strict(value).encode()


def dumps_lenient(value: object) -> bytes:
    """The same, with str() of anything that JSON has no type for (admin answers)."""
    return _lenient(value).encode()


def loads(body: bytes) -> object:
    """Parse a JSON body; ValueError (json.JSONDecodeError, or UnicodeDecodeError for bytes
    that are not UTF-8) when it is not JSON."""
    return json.loads(body)
