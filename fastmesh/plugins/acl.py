"""acl: allow or deny the authenticated consumer by its groups (`consumers[].acls` / `groups`).

Runs after the authentication plugins (priority 950) and reads only `request.consumer`, so it works
with any of them, including their anonymous fallback (the anonymous consumer's groups count). The
groups go upstream in `X-Consumer-Groups` (", "-joined; a client-sent copy is always removed).
"""
from __future__ import annotations

from fastmesh.config.schema import Invalid, boolean, string
from fastmesh.plugins import Field, Plugin, Response
from fastmesh.plugins import identity

GROUPS = b"X-Consumer-Groups"


def groups(value) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("expected a non-empty list of group names")
    out = []
    for v in value:
        text = string(v)
        if not text or any(c in text for c in "\r\n\x00"):
            raise Invalid(f"group names must be non-empty, without CR, LF or NUL, found {text!r}")
        out.append(text)
    return tuple(dict.fromkeys(out))


class Acl(Plugin):
    name = "acl"
    priority = 950
    no_consumer = True
    schema = {
        "allow": Field(groups, None),
        "deny": Field(groups, None),
        "hide_groups_header": Field(boolean, False),
    }

    @classmethod
    def check(cls, config):
        if (config["allow"] is None) == (config["deny"] is None):
            return [("", "set exactly one of 'allow' and 'deny'")]
        return []

    def setup(self, gateway_config) -> None:
        self.allow = frozenset(self.config["allow"] or ())
        self.deny = frozenset(self.config["deny"] or ())
        self.groups = {}                # username -> (frozenset of groups, header value or None)
        for username, consumer in identity.directory(gateway_config).items():
            header = ", ".join(consumer.groups).encode() if consumer.groups else None
            self.groups[username] = (frozenset(consumer.groups), header)

    def access(self, request):
        request.remove_header(GROUPS)
        username = request.consumer
        if username is None:
            return Response(401, {"message": "Unauthorized"})
        member, header = self.groups.get(username, (frozenset(), None))
        if self.allow:
            allowed = not member.isdisjoint(self.allow)
        else:
            allowed = member.isdisjoint(self.deny)
        if not allowed:
            return Response(403, {"message": "You cannot consume this service"})
        if header is not None and not self.config["hide_groups_header"]:
            request.set_header(GROUPS, header)
        return None
