"""jwt: a signed JSON Web Token (HS256, RS256, ES256) identifies the consumer, verified with PyJWT.

The token comes from a query argument (`uri_param_names`), a cookie (`cookie_names`) or a header
(`header_names`, `Bearer <token>`). Its `key_claim_name` claim (default `iss`; the token header is
tried too, e.g. `kid`) names one of the consumers' `jwt_secrets` by `key`; that credential fixes the
only algorithm accepted, so a token cannot pick its own (`none`, or HS256 signed with an RSA public
key, is refused before any signature check). Public keys are parsed once, at setup.

Then, in this order: signature; `exp` and `nbf` whenever present (and required when listed in
`claims_to_verify`); `maximum_expiration`; `audiences`. Each failure answers 401 with its own
message.

Signature checks cost 0.1-1 ms (RS256/ES256), and a client sends the same token on every request
until it expires, so each instance keeps up to 4096 accepted tokens, keyed by a BLAKE2b digest under
a per-process random key, with their `exp`: a hit only re-checks `exp` against the clock (every other
check gives the same answer as long as the config, hence this instance, is the same).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import time

import jwt

from fastmesh.config.consumers import load_public_key
from fastmesh.config.schema import Invalid, boolean, integer, string, token
from fastmesh.plugins import Field, Plugin, Response
from fastmesh.plugins import identity

log = logging.getLogger("fastmesh.plugins.jwt")
CLAIMS = ("exp", "nbf")
CACHE_KEY = os.urandom(32)
CACHE_MAX = 4096


def names(what: str):
    def parse(value) -> tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise Invalid(f"expected a list of {what}s")
        return tuple(token(v, what) for v in value)
    return parse


def claims(value) -> tuple:
    if not isinstance(value, list):
        raise Invalid("expected a list of claims (exp, nbf)")
    for v in value:
        if v not in CLAIMS:
            raise Invalid(f"claims_to_verify accepts exp and nbf, found {v!r}")
    return tuple(dict.fromkeys(value))


def audiences(value) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("expected a non-empty list of audiences")
    return tuple(string(v) for v in value)


class _Refused(Exception):
    pass


class JwtAuth(Plugin):
    name = "jwt"
    priority = 1450
    no_consumer = True
    consumer_fields = ("anonymous",)
    schema = {
        "uri_param_names": Field(names("query argument name"), ("jwt",)),
        "cookie_names": Field(names("cookie name"), ()),
        "header_names": Field(names("header name"), ("authorization",)),
        "claims_to_verify": Field(claims, ("exp",)),
        "key_claim_name": Field(string, "iss"),
        "secret_is_base64": Field(boolean, False),
        "maximum_expiration": Field(integer(0, 31536000, "maximum_expiration"), 0),
        "audiences": Field(audiences, None),
        "anonymous": Field(string, None),
        "run_on_preflight": Field(boolean, True),
    }

    @classmethod
    def check(cls, config):
        if config["maximum_expiration"] and "exp" not in config["claims_to_verify"]:
            return [("maximum_expiration", "needs 'exp' in claims_to_verify")]
        if not (config["uri_param_names"] or config["cookie_names"] or config["header_names"]):
            return [("", "no place to look for the token: set uri_param_names, cookie_names or "
                         "header_names")]
        return []

    def setup(self, gateway_config) -> None:
        consumers = identity.directory(gateway_config)
        self.anonymous = consumers.get(self.config["anonymous"]) if self.config["anonymous"] else None
        self.secrets = {}               # key -> (algorithm, verification key, Consumer)
        for consumer in consumers.values():
            for cred in consumer.jwt_secrets:
                if cred.algorithm == "HS256":
                    key = self._hmac_key(cred)
                    if key is None:
                        continue
                else:
                    key = load_public_key(cred.public_key, cred.algorithm)
                self.secrets[cred.key] = (cred.algorithm, key, consumer)
        self.headers = [n.lower().encode() for n in self.config["header_names"]]
        self.cookies = [n.encode() for n in self.config["cookie_names"]]
        self.options = {"verify_signature": True, "verify_exp": True, "verify_nbf": True,
                        "verify_iat": False, "verify_aud": False, "verify_iss": False,
                        "require": list(self.config["claims_to_verify"])}
        self.verified: dict[bytes, tuple] = {}  # token digest -> (Consumer, key, exp or None)

    def _hmac_key(self, cred) -> bytes | None:
        if not self.config["secret_is_base64"]:
            return cred.secret.encode()
        try:
            return base64.b64decode(cred.secret, validate=True)
        except (binascii.Error, ValueError):
            log.error("jwt: secret of key '%s' is not base64 (secret_is_base64 is set); "
                      "its tokens are refused", cred.key)
            return None

    def access(self, request):
        conf = self.config
        if not conf["run_on_preflight"] and request.method == b"OPTIONS":
            return None
        if identity.already_done(request, conf["anonymous"]):
            return None
        try:
            consumer, key = self._verify(request)
        except _Refused as refused:
            return identity.fail_or_anonymous(request, self.anonymous,
                                              Response(401, {"message": str(refused)}))
        identity.authenticate(request, consumer, key)
        return None

    def _verify(self, request):
        raw = self._token(request)
        digest = hashlib.blake2b(raw, key=CACHE_KEY, digest_size=16).digest()
        hit = self.verified.get(digest)
        if hit is not None and (hit[2] is None or time.time() < hit[2]):
            return hit[0], hit[1]
        consumer, key, exp = self._check(raw)
        if len(self.verified) >= CACHE_MAX:
            self.verified.clear()
        self.verified[digest] = (consumer, key, exp)
        return consumer, key

    def _tokens(self, request) -> set:
        found = set()
        if request.query:
            for name in self.config["uri_param_names"]:
                value = request.query_arg(name)
                if value:
                    found.add(value.encode())
        if self.cookies:
            cookie = request.get_header(b"cookie")
            if cookie:
                for part in cookie.split(b";"):
                    name, eq, value = part.strip().partition(b"=")
                    if eq and name in self.cookies and value:
                        found.add(value.strip(b'"'))
        for name in self.headers:
            value = request.get_header(name)
            if value is None:
                continue
            scheme, _, rest = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and rest.strip():
                found.add(rest.strip())
            else:
                raise _Refused(f"Unrecognizable token in {name.decode()} (expected 'Bearer <token>')")
        return found

    def _token(self, request) -> bytes:
        tokens = self._tokens(request)
        if not tokens:
            raise _Refused("No token found in request")
        if len(tokens) > 1:
            raise _Refused("Multiple tokens provided")
        return tokens.pop()

    def _check(self, raw: bytes):
        """(Consumer, key, exp or None) for a token that passes every check; else _Refused."""
        try:
            header = jwt.get_unverified_header(raw)
            claims_ = jwt.decode(raw, options={"verify_signature": False})
        except jwt.PyJWTError as err:
            raise _Refused(f"Bad token: {err}")
        name = self.config["key_claim_name"]
        key_id = claims_.get(name, header.get(name))
        if not isinstance(key_id, str) or not key_id:
            raise _Refused(f"No mandatory '{name}' in claims")
        found = self.secrets.get(key_id)
        if found is None:
            raise _Refused(f"No credentials found for given '{name}'")
        algorithm, key, consumer = found
        if header.get("alg") != algorithm:
            raise _Refused(f"Invalid algorithm (this credential accepts {algorithm} only)")
        try:
            claims_ = jwt.decode(raw, key, algorithms=[algorithm], options=self.options)
        except jwt.InvalidSignatureError:
            raise _Refused("Invalid signature")
        except jwt.ExpiredSignatureError:
            raise _Refused("Token expired")
        except jwt.ImmatureSignatureError:
            raise _Refused("Token not valid yet")
        except jwt.MissingRequiredClaimError as err:
            raise _Refused(f"Token is missing the '{err.claim}' claim")
        except jwt.PyJWTError as err:
            raise _Refused(f"Bad token: {err}")
        limit = self.config["maximum_expiration"]
        if limit and claims_["exp"] - time.time() > limit:
            raise _Refused("The maximum allowed expiration is exceeded")
        wanted = self.config["audiences"]
        if wanted:
            aud = claims_.get("aud")
            given = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(a in wanted for a in given if isinstance(a, str)):
                raise _Refused("Invalid audience")
        exp = claims_.get("exp")
        return consumer, key_id, exp if isinstance(exp, (int, float)) else None
