"""mesh-authorization: which callers (by verified SPIFFE identity) may make which requests to a
service; and the mesh policy file that holds those rules.

A policy file (`fastmesh sidecar --policy FILE`, YAML or JSON):

    authorization:
      - to: orders                                   # the protected service
        from: [spiffe://example.org/svc/frontend]    # omitted: any authenticated caller;
                                                     # spiffe://example.org/*: that trust domain
        methods: [GET, POST]                         # omitted: any method
        paths: [/orders]                             # omitted: any path; else segment prefixes

When at least one rule names a service, a request to it that no rule allows is answered 403; a
service that no rule names is open. `from: ["*"]` allows anyone, callers without a certificate
(plaintext, permissive mode) included. The sidecar of service `to` puts this plugin on its
inbound route with that service's rules; the per-request check is native (fastmesh/_core/authz.pyx).

Opaque TCP to a protected service (relayed by an intercepting sidecar, over mTLS or plaintext)
has no method or path: a connection is allowed by a rule whose `from` takes its caller and that
names neither `methods` nor `paths` (`allows_tcp`); otherwise it is closed. Both count in the
same decisions.
"""
from __future__ import annotations

import re

from fastmesh._core.authz import AuthzFilter, decisions  # noqa: F401  (decisions: re-export)
from fastmesh.config.schema import Fields, Invalid, Issues, describe, string, token
from fastmesh.plugins import Field, Response

POLICY_FIELDS = ("authorization",)
RULE_FIELDS = ("to", "from", "methods", "paths")
ANYONE = "*"
DENIED = {"message": "Forbidden by the mesh authorization policy"}

# spiffe://<trust domain>/<path>: lower-case trust domain, a non-empty path of plain segments.
_SPIFFE = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()*+=:@-]+)+")
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/%-]*")


def peer_id(value: object) -> str:
    """An exact SPIFFE id, a pattern ending in `/*` (every id under that prefix: a whole trust
    domain `spiffe://example.org/*`, or `spiffe://example.org/svc/*`), or `*` (anyone)."""
    text = string(value)
    if text == ANYONE:
        return text
    if not _SPIFFE.fullmatch(text) or "/./" in text + "/" or "/../" in text + "/":
        raise Invalid(f"expected a SPIFFE id such as 'spiffe://example.org/svc/frontend', a "
                      f"pattern such as 'spiffe://example.org/*', or '*', found {text!r}")
    if "*" in text.removesuffix("/*"):
        raise Invalid(f"'*' stands only as a whole last segment ('spiffe://example.org/*', "
                      f"'spiffe://example.org/svc/*'), found {text!r}")
    return text


def path_prefix(value: object) -> str:
    text = string(value)
    if not _PATH.fullmatch(text):
        raise Invalid(f"expected a path starting with '/' (no query, no blanks), found {text!r}")
    segments = text.split("/")[1:]
    if any(s in (".", "..") for s in segments) or "//" in text or \
            re.search(r"%(2[eEfF]|5[cC])", text):
        raise Invalid(f"path {text!r} has a dot segment, an empty segment or an encoded "
                      f"'.', '/' or '\\': requests never match it")
    return text


def method(value: object) -> str:
    return token(value, "method").upper()


def _non_empty(fields: Fields, name: str, parse, what: str) -> tuple | None:
    """A list field: None when absent (any), else its values; an empty list is refused."""
    if not fields.has(name):
        return None
    raw = fields.raw(name)
    if isinstance(raw, list) and not raw:
        fields.issues.add(fields.at(name), f"must not be empty (leave '{name}' out for any "
                                           f"{what})")
        return None
    return fields.values(name, parse, "list")


def read_rule(fields: Fields, need_to: bool) -> dict | None:
    """One rule in the plugin's form ({"to", "from", "methods", "paths"}; None = any)."""
    from fastmesh.mesh.registry import service_name
    before = len(fields.issues.items)
    to = fields.value("to", service_name, required=need_to)
    peers = _non_empty(fields, "from", peer_id, "authenticated caller")
    if peers is not None and ANYONE in peers and len(peers) > 1:
        fields.issues.add(fields.at("from"), "'*' allows anyone: list it alone")
    methods = _non_empty(fields, "methods", method, "method")
    paths = _non_empty(fields, "paths", path_prefix, "path")
    if len(fields.issues.items) != before:
        return None
    return {"to": to, "from": list(peers) if peers is not None else None,
            "methods": list(methods) if methods is not None else None,
            "paths": list(paths) if paths is not None else None}


def parse_policy(data: object, source: str) -> dict[str, list[dict]]:
    """service -> its rules, from a policy document; ValueError listing every problem
    (`source: authorization[1].methods[0]: ...`)."""
    issues = Issues(source)
    policy: dict[str, list[dict]] = {}
    if data is None:
        data = {}
    fields = Fields.of(issues, "", data, POLICY_FIELDS)
    if fields is not None:
        for path, element in fields.items("authorization"):
            rule_fields = Fields.of(issues, path, element, RULE_FIELDS)
            rule = read_rule(rule_fields, True) if rule_fields is not None else None
            if rule is not None and rule["to"] is not None:
                policy.setdefault(rule.pop("to"), []).append(rule)
    if issues:
        raise ValueError("\n".join(str(i) for i in issues.items))
    return policy


def _rules(value: object) -> tuple:
    """The plugin's `rules` field: a list of rules without `to`."""
    if not isinstance(value, list):
        raise Invalid(f"expected a list of rules, found {describe(value)}")
    issues = Issues("")
    out = []
    for index, element in enumerate(value):
        fields = Fields.of(issues, f"[{index}]", element, RULE_FIELDS[1:])
        rule = read_rule(fields, False) if fields is not None else None
        if rule is not None:
            rule.pop("to")
            out.append(rule)
    if issues:
        raise Invalid("; ".join(f"{i.path}: {i.message}" for i in issues.items))
    return tuple(out)


def compiled(rule: dict) -> tuple:
    """A rule as authz.pyx reads it: (peers, methods, paths) in bytes; None = any, True = anyone;
    peers with patterns: (exact ids, prefixes)."""
    peers = rule.get("from")
    if peers is None:
        who = None
    elif ANYONE in peers:
        who = True
    else:
        exact = frozenset(p.encode() for p in peers if not p.endswith("/*"))
        prefixes = tuple(p[:-1].encode() for p in peers if p.endswith("/*"))   # keeps the '/'
        who = (exact, prefixes) if prefixes else exact
    methods = rule.get("methods")
    paths = rule.get("paths")
    return (who, tuple(m.encode() for m in methods) if methods is not None else None,
            tuple(p.encode() for p in paths) if paths is not None else None)


def allows_tcp(rules: list[dict], peer: str | None) -> bool:
    """Whether opaque TCP from `peer` (a verified SPIFFE id, None for plaintext) may reach a
    service with `rules` (its rules of the policy, without `to`); see the module doc."""
    if not rules:
        return True
    for rule in rules:
        if rule.get("methods") is not None or rule.get("paths") is not None:
            continue                        # narrowed to some HTTP requests: no TCP
        peers = rule.get("from")
        if peers is None:                   # any authenticated caller
            if peer is not None:
                return True
        elif ANYONE in peers:
            return True
        elif peer is not None and any(
                peer == p or (p.endswith("/*") and len(peer) > len(p) - 1
                              and peer.startswith(p[:-1])) for p in peers):
            return True
    return False


class MeshAuthorization(AuthzFilter):
    name = "mesh-authorization"
    priority = 2100                     # before anything that would spend work on the request
    schema = {
        "service": Field(string, None, required=True),
        "rules": Field(_rules, ()),
    }

    def setup(self, gateway_config) -> None:
        self.compile(tuple(compiled(r) for r in self.config["rules"]), self.config["service"],
                     Response(403, DENIED))
