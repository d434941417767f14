"""key-auth: an API key in a header (or query arg) maps to a consumer; keys are kept hashed."""
from __future__ import annotations

import hashlib

from fastmesh.config.schema import Invalid, boolean, string, token
from fastmesh.plugins import Field, Plugin, Response


def key_names(value) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("expected a non-empty list of header/query names")
    return tuple(token(v, "key name") for v in value)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyAuth(Plugin):
    name = "key-auth"
    priority = 1250
    schema = {
        "key_names": Field(key_names, ("apikey",)),
        "key_in_header": Field(boolean, True),
        "key_in_query": Field(boolean, True),
        "hide_credentials": Field(boolean, False),
        "anonymous": Field(string, None),
    }

    def setup(self, gateway_config) -> None:
        self.keys = {}
        for consumer in getattr(gateway_config, "consumers", ()):
            for key in consumer.keyauth_keys:
                self.keys[_digest(key.encode())] = consumer.username.encode()
        self.header_names = [n.lower().encode() for n in self.config["key_names"]]

    def access(self, request):
        conf = self.config
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
            if conf["anonymous"]:
                request.consumer = conf["anonymous"]
                request.set_header("X-Anonymous-Consumer", "true")
                request.set_header("X-Consumer-Username", conf["anonymous"])
                return None
            return Response(401, {"message": "No API key found in request"},
                            [(b"WWW-Authenticate", b'Key realm="fastmesh"')])
        username = self.keys.get(_digest(key.strip()))
        if username is None:
            return Response(401, {"message": "Invalid authentication credentials"},
                            [(b"WWW-Authenticate", b'Key realm="fastmesh"')])
        request.consumer = username.decode()
        request.set_header(b"X-Consumer-Username", username)
        request.remove_header(b"X-Anonymous-Consumer")
        return None
