"""basic-auth: `Authorization: Basic base64(username:password)` checked against consumers' credentials.

Passwords are held only as scrypt digests (fastmesh.config.consumers). scrypt is deliberately slow
(~10 ms), and the access phase runs on the worker's event loop, so each plugin instance remembers
the header values it has already judged, keyed by a BLAKE2b digest under a per-process random key
(the cache never holds a password, and its keys are useless outside this process):

- accepted: up to 4096 entries, so a keep-alive client pays scrypt once, not per request;
- refused (known username, wrong password): up to 1024 entries, so a client retrying the same
  wrong password does not cost a scrypt each time either.

Unknown usernames are refused without running scrypt. A reload builds new instances, so a changed
password takes effect with the new config.
"""
from __future__ import annotations

import binascii
import hashlib
import os

from fastmesh.config.consumers import password_matches
from fastmesh.config.schema import Invalid, boolean, string
from fastmesh.plugins import Field, Plugin, Response
from fastmesh.plugins import identity

CACHE_KEY = os.urandom(32)
ACCEPTED_MAX = 4096
REFUSED_MAX = 1024
HEADERS = (b"authorization", b"proxy-authorization")


def realm(value) -> str:
    text = string(value)
    if not text or any(c in text for c in '"\\\r\n\x00'):
        raise Invalid(f"realm must be non-empty, without quotes, backslashes, CR, LF or NUL, "
                      f"found {text!r}")
    return text


class BasicAuth(Plugin):
    name = "basic-auth"
    priority = 1100
    no_consumer = True
    consumer_fields = ("anonymous",)
    schema = {
        "hide_credentials": Field(boolean, False),
        "anonymous": Field(string, None),
        "realm": Field(realm, "service"),
    }

    def setup(self, gateway_config) -> None:
        consumers = identity.directory(gateway_config)
        self.users = {}                 # basic-auth username -> (BasicCredential, Consumer)
        for consumer in consumers.values():
            for cred in consumer.basicauth:
                self.users[cred.username.encode()] = (cred, consumer)
        self.anonymous = consumers.get(self.config["anonymous"]) if self.config["anonymous"] else None
        self.challenge = [(b"WWW-Authenticate", f'Basic realm="{self.config["realm"]}"'.encode())]
        self.accepted: dict[bytes, tuple] = {}
        self.refused: dict[bytes, bool] = {}

    def _refuse(self, request, message: str):
        return identity.fail_or_anonymous(request, self.anonymous,
                                          Response(401, {"message": message}, self.challenge))

    def access(self, request):
        if identity.already_done(request, self.config["anonymous"]):
            return None
        value = None
        for name in HEADERS:
            value = request.get_header(name)
            if value is not None:
                break
        if self.config["hide_credentials"]:
            for name in HEADERS:
                request.remove_header(name)
        if value is None:
            return self._refuse(request, "Unauthorized")
        scheme, _, encoded = value.strip().partition(b" ")
        if scheme.lower() != b"basic" or not encoded.strip():
            return self._refuse(request, "Invalid authentication credentials")
        encoded = encoded.strip()
        digest = hashlib.blake2b(encoded, key=CACHE_KEY, digest_size=16).digest()
        hit = self.accepted.get(digest)
        if hit is not None:
            identity.authenticate(request, hit[1], hit[0].username)
            return None
        if digest in self.refused:
            return self._refuse(request, "Invalid authentication credentials")
        found = self._verify(encoded)
        if found is None:
            if len(self.refused) >= REFUSED_MAX:
                self.refused.clear()
            self.refused[digest] = True
            return self._refuse(request, "Invalid authentication credentials")
        if len(self.accepted) >= ACCEPTED_MAX:
            self.accepted.clear()
        self.accepted[digest] = found
        identity.authenticate(request, found[1], found[0].username)
        return None

    def _verify(self, encoded: bytes):
        """(BasicCredential, Consumer) when the credentials are right, else None."""
        try:
            decoded = binascii.a2b_base64(encoded, strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        username, sep, password = decoded.partition(b":")
        if not sep:
            return None
        found = self.users.get(username)
        if found is None or not password_matches(found[0], password):
            return None
        return found
