"""request-transformer / response-transformer: remove, rename, replace, add, append (in that order).

Both change headers; request-transformer also changes query arguments (`querystring`) and can
replace the upstream path (`replace.uri`), as Kong's does. Query edits work on the raw query:
arguments the config does not name are kept byte for byte and in order; names are matched after
percent-decoding ('+' read as a space); new names and values are percent-encoded. `replace.uri` is
the final upstream path, sent verbatim: the route's strip_path and the service's base path are not
applied to it.
"""
from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

from fastmesh.config.schema import Invalid, describe, string, token
from fastmesh.plugins import Field, Plugin


def _list(value, what: str) -> list:
    if not isinstance(value, list):
        raise Invalid(f"expected a list of {what}, found {describe(value)}")
    return value


def header_names(value) -> tuple:
    return tuple(token(v, "header name") for v in _list(value, "header names"))


def header_pairs(value) -> tuple:
    """["Name:value", ...] (Kong's shape) -> ((name, value), ...)."""
    out = []
    for entry in _list(value, "'Name:value' strings"):
        text = string(entry)
        name, sep, val = text.partition(":")
        if not sep:
            raise Invalid(f"expected 'Name:value', found {text!r}")
        if any(c in val for c in "\r\n\x00"):
            raise Invalid(f"header value must not contain CR, LF or NUL, found {val!r}")
        out.append((token(name.strip(), "header name"), val.strip()))
    return tuple(out)


def query_names(value) -> tuple:
    out = []
    for entry in _list(value, "query argument names"):
        text = string(entry)
        if not text:
            raise Invalid("query argument name must not be empty")
        out.append(text)
    return tuple(out)


def query_pairs(value) -> tuple:
    """["name:value", ...] -> ((name, value), ...); the value may itself contain ':'."""
    out = []
    for entry in _list(value, "'name:value' strings"):
        text = string(entry)
        name, sep, val = text.partition(":")
        if not sep or not name:
            raise Invalid(f"expected 'name:value', found {text!r}")
        out.append((name, val))
    return tuple(out)


def query_renames(value) -> tuple:
    """["old:new", ...]: both names non-empty."""
    out = query_pairs(value)
    for old, new in out:
        if not new:
            raise Invalid(f"expected 'old:new' with a new name, found {old + ':'!r}")
    return out


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 path characters stay as written; anything else (space, non-ASCII) is percent-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"


def uri(value) -> str:
    text = string(value)
    if not text.startswith("/"):
        raise Invalid(f"must start with '/', found {text!r}")
    if any(c in text for c in "?#") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise Invalid(f"must be a path without '?', '#' or control characters, found {text!r}")
    if _BAD_ESCAPE.search(text):
        raise Invalid(f"has a '%' that does not start a %XX escape: {text!r}")
    return quote(text, safe=_PATH_SAFE)


REQUEST_SECTIONS = {
    "remove": {"headers": header_names, "querystring": query_names},
    "rename": {"headers": header_pairs, "querystring": query_renames},
    "replace": {"headers": header_pairs, "querystring": query_pairs, "uri": uri},
    "add": {"headers": header_pairs, "querystring": query_pairs},
    "append": {"headers": header_pairs, "querystring": query_pairs},
}
RESPONSE_SECTIONS = {key: {"headers": parts["headers"]} for key, parts in REQUEST_SECTIONS.items()}


def _section(parts: dict, plugin: str):
    """A parser for one section ({headers: [...], querystring: [...], ...}); errors name the part."""
    def parse(value) -> dict:
        if not isinstance(value, dict):
            raise Invalid(f"expected a mapping with {' / '.join(parts)}, found {describe(value)}")
        for key in value:
            if key not in parts:
                raise Invalid(f"unknown field {key!r} ({plugin} supports {', '.join(parts)})")
        out = _empty(parts)
        for key, part in parts.items():
            raw = value.get(key)
            if raw is None:
                continue
            try:
                out[key] = part(raw)
            except Invalid as err:
                raise Invalid(f"{key}: {err.message}") from None
        return out
    return parse


def _empty(parts: dict) -> dict:
    return {key: (None if key == "uri" else ()) for key in parts}


def _schema(sections: dict, plugin: str) -> dict:
    return {key: Field(_section(parts, plugin), _empty(parts)) for key, parts in sections.items()}


def _apply_headers(ops: dict, target) -> None:
    for name in ops["remove"]:
        target.remove_header(name)
    for old, new in ops["rename"]:
        value = target.get_header(old)
        if value is not None:
            target.remove_header(old)
            target.set_header(new, value)
    for name, value in ops["replace"]:
        if target.get_header(name) is not None:
            target.set_header(name, value)
    for name, value in ops["add"]:
        if target.get_header(name) is None:
            target.add_header(name, value)
    for name, value in ops["append"]:
        target.add_header(name, value)


# --- query arguments --------------------------------------------------------------------------

def _enc(text: str) -> bytes:
    return quote(text, safe="").encode("ascii")


def _arg(name: str, value: str) -> bytes:
    return _enc(name) + b"=" + _enc(value)


def arg_name(segment: bytes) -> bytes:
    """The decoded name of one raw `name=value` segment ('+' is a space in query strings)."""
    return unquote_to_bytes(segment.partition(b"=")[0].replace(b"+", b" "))


def transform_query(query: bytes, ops: dict) -> bytes | None:
    """The new raw query after remove/rename/replace/add/append, or None when nothing changed."""
    args = [(arg_name(seg), seg) for seg in query.split(b"&")] if query else []
    before = list(args)
    if ops["remove"]:
        drop = set(ops["remove"])
        args = [a for a in args if a[0] not in drop]
    for old, new in ops["rename"]:
        if old != new and any(n == old for n, _ in args):
            args = [(new, _enc(new.decode()) + seg[len(seg.partition(b"=")[0]):]) if n == old
                    else (n, seg) for n, seg in args if n != new]
    for name, value in ops["replace"]:
        at = next((i for i, (n, _) in enumerate(args) if n == name), None)
        if at is not None:
            args = [(n, seg) for i, (n, seg) in enumerate(args) if n != name or i == at]
            args[at] = (name, _arg(name.decode(), value))
    for name, value in ops["add"]:
        if not any(n == name for n, _ in args):
            args.append((name, _arg(name.decode(), value)))
    for name, value in ops["append"]:
        args.append((name, _arg(name.decode(), value)))
    if args == before:
        return None
    return b"&".join(seg for _, seg in args)


def _query_ops(config: dict) -> dict | None:
    """Names as UTF-8 bytes (compared with decoded names); None when the config has no query op."""
    ops = {}
    for key in REQUEST_SECTIONS:
        entries = config[key]["querystring"]
        if key == "remove":
            ops[key] = tuple(name.encode() for name in entries)
        else:
            ops[key] = tuple((a.encode(), b.encode() if key == "rename" else b)
                             for a, b in entries)
    return ops if any(ops.values()) else None


class RequestTransformer(Plugin):
    name = "request-transformer"
    priority = 801
    schema = _schema(REQUEST_SECTIONS, "request-transformer")

    def __init__(self, config):
        super().__init__(config)
        self.headers = {key: config[key]["headers"] for key in REQUEST_SECTIONS}
        self.query = _query_ops(config)
        uri = config["replace"]["uri"]
        self.path = uri.encode("ascii") if uri is not None else None

    def access(self, request):
        _apply_headers(self.headers, request)
        if self.query is not None:
            current = getattr(request, "new_query", None)     # an earlier plugin's set_query
            query = transform_query(request.query if current is None else current, self.query)
            if query is not None:
                request.set_query(query)
        if self.path is not None:
            request.set_path(self.path)


class ResponseTransformer(Plugin):
    name = "response-transformer"
    priority = 800
    schema = _schema(RESPONSE_SECTIONS, "response-transformer")

    def __init__(self, config):
        super().__init__(config)
        self.headers = {key: config[key]["headers"] for key in RESPONSE_SECTIONS}

    def response(self, request, response):
        _apply_headers(self.headers, response)
