"""key-auth: an API key in a header (or query arg) maps to a consumer; keys are kept hashed.

The config and the tables are built here; the per-request lookup is native
(fastmesh/_core/key_auth.pyx) and forwards the same identity headers as fastmesh.plugins.identity.
"""
from __future__ import annotations

from fastmesh._core.key_auth import KeyAuthFilter
from fastmesh.config.schema import Invalid, boolean, string, token
from fastmesh.plugins import Field, Response
from fastmesh.plugins import identity


def key_names(value) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("expected a non-empty list of header/query names")
    return tuple(token(v, "key name") for v in value)


class KeyAuth(KeyAuthFilter):
    name = "key-auth"
    priority = 1250
    no_consumer = True                  # finds the consumer: cannot be scoped to one
    consumer_fields = ("anonymous",)    # checked against `consumers` at load
    schema = {
        "key_names": Field(key_names, ("apikey",)),
        "key_in_header": Field(boolean, True),
        "key_in_query": Field(boolean, True),
        "hide_credentials": Field(boolean, False),
        "anonymous": Field(string, None),
    }

    def setup(self, gateway_config) -> None:
        consumers = identity.directory(gateway_config)
        keys = {}                       # SHA-256(key) -> (username, credential id, header lines)
        for consumer in consumers.values():
            for cred in consumer.keyauth:
                keys[cred.digest] = (consumer.username, cred.id,
                                     tuple(identity.headers_for(consumer, cred.id)))
        conf = self.config
        anonymous = consumers.get(conf["anonymous"]) if conf["anonymous"] else None
        challenge = [(b"WWW-Authenticate", b'Key realm="fastmesh"')]
        self.compile(keys, tuple(n.lower().encode() for n in conf["key_names"]),
                     tuple(conf["key_names"]), conf["key_in_header"], conf["key_in_query"],
                     conf["hide_credentials"], anonymous, identity.anonymous, identity.NAMES,
                     Response(401, {"message": "No API key found in request"}, challenge),
                     Response(401, {"message": "Invalid authentication credentials"}, challenge))
