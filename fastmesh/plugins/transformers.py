"""request-transformer / response-transformer: remove, rename, replace, add headers (in that order)."""
from __future__ import annotations

from fastmesh.config.schema import Invalid, string, token
from fastmesh.plugins import Field, Plugin


def names(value) -> tuple:
    if not isinstance(value, list):
        raise Invalid("expected a list of header names")
    return tuple(token(v, "header name") for v in value)


def pairs(value) -> tuple:
    """["Name:value", ...] (Kong's shape) -> ((name, value), ...)."""
    if not isinstance(value, list):
        raise Invalid("expected a list of 'Name:value' strings")
    out = []
    for entry in value:
        text = string(entry)
        name, sep, val = text.partition(":")
        if not sep:
            raise Invalid(f"expected 'Name:value', found {text!r}")
        if any(c in val for c in "\r\n\x00"):
            raise Invalid(f"header value must not contain CR, LF or NUL, found {val!r}")
        out.append((token(name.strip(), "header name"), val.strip()))
    return tuple(out)


SECTION = {"remove": Field(names, ()), "rename": Field(pairs, ()), "replace": Field(pairs, ()),
           "add": Field(pairs, ()), "append": Field(pairs, ())}


def section(value) -> dict:
    if not isinstance(value, dict):
        raise Invalid("expected a mapping with headers: [...]")
    unknown = [k for k in value if k != "headers"]
    if unknown:
        raise Invalid(f"unknown field {unknown[0]!r} (only 'headers' is supported yet)")
    return {"headers": value.get("headers") or []}


def _apply(conf: dict, target) -> None:
    for name in conf["remove"]:
        target.remove_header(name)
    for old, new in conf["rename"]:
        value = target.get_header(old)
        if value is not None:
            target.remove_header(old)
            target.set_header(new, value)
    for name, value in conf["replace"]:
        if target.get_header(name) is not None:
            target.set_header(name, value)
    for name, value in conf["add"]:
        if target.get_header(name) is None:
            target.add_header(name, value)
    for name, value in conf["append"]:
        target.add_header(name, value)


class _Transformer(Plugin):
    schema = {key: Field(lambda v, f=f: {"headers": f.parse(section(v)["headers"])},
                         {"headers": ()})
              for key, f in SECTION.items()}

    def setup(self, gateway_config) -> None:
        self.ops = {key: self.config[key]["headers"] for key in SECTION}


class RequestTransformer(_Transformer):
    name = "request-transformer"
    priority = 801

    def access(self, request):
        _apply(self.ops, request)


class ResponseTransformer(_Transformer):
    name = "response-transformer"
    priority = 800

    def response(self, request, response):
        _apply(self.ops, response)
