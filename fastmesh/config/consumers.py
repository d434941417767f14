"""Read `consumers`: API client identities with their credentials and ACL groups.

```yaml
consumers:
  - username: alice
    custom_id: "42"                                   # optional, forwarded as X-Consumer-Custom-ID
    keyauth_credentials: [{key: alice-secret, id: k1}]  # id: X-Credential-Identifier
    basicauth_credentials: [{username: alice, password: s3cret}]
    jwt_secrets:
      - {key: alice-iss, algorithm: HS256, secret: "..."}
      - {key: alice-rsa, algorithm: RS256, rsa_public_key: "-----BEGIN PUBLIC KEY-----..."}
    acls: [{group: admins}]                            # and/or groups: [admins, ops]
    plugins: [...]                                     # consumer-scoped (read by config.plugins)
```

Secrets are turned into what verification needs while the file is read, so the Config that travels
to the workers never holds a plain key or password:

- key-auth keys: SHA-256 digests (a key is high-entropy; a fast digest is enough).
- basic-auth passwords: scrypt digests with one random salt per gateway process (the supervisor
  reads the file; workers receive the digests and the salt). Passwords are often low-entropy, so a
  slow, memory-hard function is used; the cost (about 10 ms here) is paid once per config load per
  credential and once per new credential per worker: the basic-auth plugin caches successful checks
  keyed by a keyed fast digest of the header. The salt is per process, so a config holding
  basic-auth credentials gets a different `version` after a restart (never across a reload).
- jwt public keys: parsed and checked (type and curve match the algorithm) here, so a bad PEM is a
  config error with its path; the PEM text is kept (it is public). HS256 secrets are kept as given:
  HMAC verification needs them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from fastmesh.config.schema import Fields, Invalid, string
from fastmesh.osutil import compare_digest, sha256

CONSUMER_FIELDS = ("username", "custom_id", "keyauth_credentials", "basicauth_credentials",
                   "jwt_secrets", "acls", "groups", "plugins")
JWT_ALGORITHMS = ("HS256", "RS256", "ES256")

# scrypt cost: n=2**12, r=8 is 4 MiB and ~10 ms per check on a 2-core host (2**14 would be ~45 ms
# of blocked event loop for every cache miss, which a wrong-password flood could exploit).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 12, 8, 1
GATEWAY_SALT = os.urandom(16)


@dataclass(frozen=True)
class KeyCredential:
    digest: bytes = field(repr=False)        # SHA-256 of the key
    id: str | None = None


@dataclass(frozen=True)
class BasicCredential:
    username: str
    digest: bytes = field(repr=False)        # scrypt(password), see password_digest
    salt: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class JwtSecret:
    key: str                                 # matched against the token's key claim (iss)
    algorithm: str                           # HS256 | RS256 | ES256: the only one accepted
    secret: str | None = field(default=None, repr=False)   # HS256
    public_key: str | None = None            # RS256 / ES256, PEM (validated at load)


@dataclass(frozen=True)
class Consumer:
    username: str
    custom_id: str | None = None
    keyauth: tuple = ()                      # KeyCredential
    basicauth: tuple = ()                    # BasicCredential
    jwt_secrets: tuple = ()                  # JwtSecret
    groups: tuple = ()                       # ACL group names


def key_digest(key: bytes) -> bytes:
    return sha256(key).digest()


def password_digest(salt: bytes, username: str, password: bytes) -> bytes:
    """scrypt over the password; the username is mixed into the salt so equal passwords differ."""
    import hashlib                   # here: scrypt is OpenSSL's; only basic-auth needs it
    return hashlib.scrypt(password, salt=salt + username.encode(), n=SCRYPT_N, r=SCRYPT_R,
                          p=SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=32)


def password_matches(cred: BasicCredential, password: bytes) -> bool:
    return compare_digest(password_digest(cred.salt, cred.username, password), cred.digest)


def load_public_key(pem: str, algorithm: str):
    """The cryptography key object for `pem`; Invalid when it is not a key `algorithm` can use."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as err:
        raise Invalid(f"not a PEM public key ({str(err).splitlines()[0] if str(err) else 'unreadable'})")
    if algorithm == "RS256":
        if not isinstance(key, rsa.RSAPublicKey):
            raise Invalid(f"RS256 needs an RSA public key, found {type(key).__name__}")
        if key.key_size < 2048:
            raise Invalid(f"RSA key of {key.key_size} bits is too small (2048 at least)")
    elif algorithm == "ES256":
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            found = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
            raise Invalid(f"ES256 needs a P-256 (secp256r1) public key, found {found}")
    return key


def _text(what: str):
    def parse(value) -> str:
        text = string(value)
        if not text or text != text.strip() or any(c in text for c in "\r\n\x00"):
            raise Invalid(f"{what} must be non-empty, without surrounding spaces, CR, LF or NUL")
        return text
    return parse


_key = _text("key")
_group = _text("group")


def _basic_username(value) -> str:
    text = _text("username")(value)
    if ":" in text:
        raise Invalid("username must not contain ':' (it separates username and password)")
    return text


def _password(value) -> str:
    text = string(value)
    if not text or any(c in text for c in "\r\n\x00"):
        raise Invalid("password must be non-empty, without CR, LF or NUL")
    return text


def _algorithm(value) -> str:
    text = string(value)
    if text not in JWT_ALGORITHMS:
        raise Invalid(f"expected one of {', '.join(JWT_ALGORITHMS)}, found {text!r}")
    return text


class _Unique:
    """Values that must be unique across all consumers (keys, usernames): first path kept."""

    def __init__(self, what: str):
        self.what = what
        self.seen: dict[str, str] = {}

    def claim(self, fields: Fields, name: str, value: str) -> bool:
        if value in self.seen:
            fields.issues.add(fields.at(name), f"duplicate {self.what} (also at {self.seen[value]})")
            return False
        self.seen[value] = fields.at(name)
        return True


def read_consumers(top: Fields) -> tuple[Consumer, ...]:
    consumers: list[Consumer] = []
    users: dict[str, str] = {}
    keys, basic_users, jwt_keys = _Unique("key"), _Unique("basic-auth username"), _Unique("jwt key")
    for path, raw in top.items("consumers", "list of consumers"):
        fields = Fields.of(top.issues, path, raw, CONSUMER_FIELDS)
        if fields is None:
            continue
        username = fields.value("username", _text("username"), required=True)
        custom_id = fields.value("custom_id", _text("custom_id"))
        if username is not None:
            if username in users:
                fields.issues.add(fields.at("username"), f"duplicate consumer '{username}' "
                                                         f"(first at {users[username]})")
            users.setdefault(username, path)
        keyauth = tuple(_keyauth(top, fields, keys))
        basicauth = tuple(_basicauth(top, fields, basic_users))
        secrets = tuple(_jwt(top, fields, jwt_keys))
        groups = _groups(top, fields)
        if username is not None:
            consumers.append(Consumer(username, custom_id, keyauth, basicauth, secrets, groups))
    return tuple(consumers)


def _keyauth(top: Fields, fields: Fields, keys: _Unique):
    for cpath, cred in fields.items("keyauth_credentials", "list of credentials"):
        cfields = Fields.of(top.issues, cpath, cred, ("key", "id"))
        if cfields is None:
            continue
        key = cfields.value("key", _key, required=True)
        ident = cfields.value("id", _text("id"))
        if key is not None and keys.claim(cfields, "key", key):
            digest = key_digest(key.encode())
            # without an id, a short fingerprint names the credential (X-Credential-Identifier,
            # rate limits by credential); 64 bits of SHA-256 say nothing useful about the key
            yield KeyCredential(digest, ident or "sha256:" + digest[:8].hex())


def _basicauth(top: Fields, fields: Fields, users: _Unique):
    for cpath, cred in fields.items("basicauth_credentials", "list of credentials"):
        cfields = Fields.of(top.issues, cpath, cred, ("username", "password"))
        if cfields is None:
            continue
        username = cfields.value("username", _basic_username, required=True)
        password = cfields.value("password", _password, required=True)
        if username is None or password is None or not users.claim(cfields, "username", username):
            continue
        yield BasicCredential(username, password_digest(GATEWAY_SALT, username, password.encode()),
                              GATEWAY_SALT)


def _jwt(top: Fields, fields: Fields, jwt_keys: _Unique):
    for cpath, cred in fields.items("jwt_secrets", "list of jwt secrets"):
        cfields = Fields.of(top.issues, cpath, cred,
                            ("key", "algorithm", "secret", "rsa_public_key", "public_key"))
        if cfields is None:
            continue
        key = cfields.value("key", _key, required=True)
        algorithm = cfields.value("algorithm", _algorithm) if cfields.has("algorithm") else "HS256"
        secret = cfields.value("secret", _text("secret"))
        pem_field = "public_key" if cfields.has("public_key") else "rsa_public_key"
        pem = cfields.value(pem_field, string)
        ok = key is not None
        if cfields.has("public_key") and cfields.has("rsa_public_key"):
            cfields.issues.add(cfields.path, "give either 'rsa_public_key' or 'public_key', not both")
            ok = False
        if algorithm == "HS256":
            if secret is None:
                if not cfields.has("secret"):
                    cfields.issues.add(cfields.path, "algorithm HS256 needs 'secret'")
                ok = False
            if pem is not None:
                cfields.issues.add(cfields.at(pem_field), "a public key is only used with RS256 "
                                                          "and ES256; HS256 uses 'secret'")
                ok = False
        elif algorithm is not None:
            if secret is not None:
                cfields.issues.add(cfields.at("secret"), f"'secret' is only used with HS256; "
                                                         f"{algorithm} verifies with a public key")
                ok = False
            if pem is None:
                if not cfields.has(pem_field):
                    cfields.issues.add(cfields.path, f"algorithm {algorithm} needs 'rsa_public_key' "
                                                     f"(or 'public_key')")
                ok = False
            elif cfields.parse_at(cfields.at(pem_field), pem,
                                  lambda text: load_public_key(text, algorithm)) is None:
                ok = False
        else:
            ok = False
        if ok and jwt_keys.claim(cfields, "key", key):
            yield JwtSecret(key, algorithm, secret, pem)


def _groups(top: Fields, fields: Fields) -> tuple:
    groups: list[str] = []
    for gpath, raw in fields.items("acls", "list of {group: name}"):
        gfields = Fields.of(top.issues, gpath, raw, ("group",))
        if gfields is not None:
            group = gfields.value("group", _group, required=True)
            if group is not None and group not in groups:
                groups.append(group)
    for group in fields.values("groups", _group, "list of group names"):
        if group not in groups:
            groups.append(group)
    return tuple(groups)


def consumer_names(data: dict) -> set:
    """Usernames declared in the raw document (for plugin scope checks before consumers are read)."""
    raw = data.get("consumers")
    if not isinstance(raw, list):
        return set()
    return {c.get("username") for c in raw if isinstance(c, dict) and isinstance(c.get("username"), str)}


__all__ = ["Consumer", "KeyCredential", "BasicCredential", "JwtSecret", "read_consumers",
           "key_digest", "password_digest", "password_matches", "load_public_key", "consumer_names"]
