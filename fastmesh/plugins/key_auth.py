"""key-auth: an API key in a header (or query arg) maps to a consumer; keys are kept hashed."""
from __future__ import annotations

from fastmesh.config.consumers import key_digest
from fastmesh.config.schema import Invalid, boolean, string, token
from fastmesh.plugins import Field, Plugin, Response
from fastmesh.plugins import identity


def key_names(value) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("expected a non-empty list of header/query names")
    return tuple(token(v, "key name") for v in value)


class KeyAuth(Plugin):
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
        self.keys = {}                  # SHA-256(key) -> (Consumer, credential id)
        for consumer in consumers.values():
            for cred in consumer.keyauth:
                self.keys[cred.digest] = (consumer, cred.id)
        self.anonymous = consumers.get(self.config["anonymous"]) if self.config["anonymous"] else None
        self.header_names = [n.lower().encode() for n in self.config["key_names"]]

    def access(self, request):
        conf = self.config
        if identity.already_done(request, conf["anonymous"]):
            return None
        key = None
        if conf["key_in_header"]:
            for name in self.header_names:
                key = request.get_header(name)
                if key is not None:
                    if conf["hide_credentials"]:
                        request.remove_header(name)
                    break
        if key is None and conf["key_in_query"] and request.query:
            for name in conf["key_names"]:
                found = request.query_arg(name)
                if found is not None:
                    key = found.encode()
                    break
        if key is None:
            return identity.fail_or_anonymous(request, self.anonymous, Response(
                401, {"message": "No API key found in request"},
                [(b"WWW-Authenticate", b'Key realm="fastmesh"')]))
        found = self.keys.get(key_digest(key.strip()))
        if found is None:
            return identity.fail_or_anonymous(request, self.anonymous, Response(
                401, {"message": "Invalid authentication credentials"},
                [(b"WWW-Authenticate", b'Key realm="fastmesh"')]))
        identity.authenticate(request, found[0], found[1])
        return None
