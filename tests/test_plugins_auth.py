"""Consumers, basic-auth, jwt, acl, the identity sent upstream, and consumer-scoped plugins.

Real gateway processes and the real echo upstream (it answers with the headers it received), JWTs
made with PyJWT and keys generated with cryptography in the test.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import RawClient, config, get, service
from conftest import config_issues as issues_of, upstream_headers as up_headers
from fastmesh.config import load_config_data

HS_SECRET = "alice-hmac-secret-that-is-long-enough-0123456789"
BOB_SECRET = "bob-hmac-secret-that-is-also-long-enough-98765"
B64_SECRET_RAW = b"\x00\x01binary-secret-bytes-for-base64-check-0123456789"
ALICE_PASSWORD = "wonder land: 7 rabbits"


# --- helpers ----------------------------------------------------------------------------------


def refused(resp, status: int = 401) -> str:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("Content-Type") == "application/json"
    return resp.json()["message"]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def pem(public_key) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(iss: str, **extra) -> dict:
    body = {"iss": iss, "exp": int(time.time()) + 600}
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa_other": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ec384": ec.generate_private_key(ec.SECP384R1()),
    }


def consumers(keys) -> list[dict]:
    return [
        {"username": "alice", "custom_id": "c-alice",
         "keyauth_credentials": [{"key": "alice-key", "id": "alice-k1"}],
         "basicauth_credentials": [{"username": "alice", "password": ALICE_PASSWORD}],
         "jwt_secrets": [
             {"key": "alice-hs", "algorithm": "HS256", "secret": HS_SECRET},
             {"key": "alice-rs", "algorithm": "RS256", "rsa_public_key": pem(keys["rsa"].public_key())},
             {"key": "alice-es", "algorithm": "ES256", "public_key": pem(keys["ec"].public_key())},
         ],
         "acls": [{"group": "admins"}], "groups": ["staff"]},
        {"username": "bob", "keyauth_credentials": [{"key": "bob-key"}],
         "basicauth_credentials": [{"username": "bob", "password": "builder"}],
         "jwt_secrets": [{"key": "bob-hs", "secret": BOB_SECRET}],
         "groups": ["guests"]},
        {"username": "carol", "jwt_secrets": [
            {"key": "carol-b64", "algorithm": "HS256", "secret": base64.b64encode(B64_SECRET_RAW).decode()}]},
        {"username": "anon", "custom_id": "nobody"},
    ]


def route(name: str, path: str, *plugins: dict) -> dict:
    return {"name": name, "paths": [path], "plugins": list(plugins)}


SPOOF = {"X-Consumer-Username": "admin", "X-Consumer-Custom-ID": "spoofed",
         "X-Credential-Identifier": "spoofed", "X-Anonymous-Consumer": "spoofed",
         "X-Consumer-Groups": "admins"}


@pytest.fixture
def auth_gateway(echo, gateway, keys):
    return gateway({**config(service("s", echo.url, [
        route("basic", "/basic", {"name": "basic-auth",
                                  "config": {"hide_credentials": True, "realm": "fastmesh-test"}}),
        route("basic-keep", "/basic-keep", {"name": "basic-auth"}),
        route("basic-anon", "/basic-anon", {"name": "basic-auth", "config": {"anonymous": "anon"}}),
        route("jwt", "/jwt", {"name": "jwt"}),
        route("jwt-strict", "/jwt-strict", {"name": "jwt", "config": {
            "audiences": ["orders-api"], "claims_to_verify": ["exp", "nbf"], "maximum_expiration": 3600,
            "uri_param_names": ["token"], "cookie_names": ["session"], "run_on_preflight": False}}),
        route("jwt-b64", "/jwt-b64", {"name": "jwt", "config": {"secret_is_base64": True}}),
        route("acl-allow", "/acl-allow", {"name": "key-auth"},
              {"name": "acl", "config": {"allow": ["admins"]}}),
        route("acl-deny", "/acl-deny", {"name": "basic-auth"},
              {"name": "acl", "config": {"deny": ["guests"]}}),
        route("acl-alone", "/acl-alone", {"name": "acl", "config": {"allow": ["admins"]}}),
        route("acl-hide", "/acl-hide", {"name": "key-auth"},
              {"name": "acl", "config": {"allow": ["staff"], "hide_groups_header": True}}),
        route("either", "/either", {"name": "key-auth", "config": {"anonymous": "anon"}},
              {"name": "basic-auth", "config": {"anonymous": "anon"}},
              {"name": "acl", "config": {"allow": ["admins", "guests"]}}),
    ])), "consumers": consumers(keys)})


# --- config -----------------------------------------------------------------------------------

def test_consumer_credentials_are_checked_with_paths(keys):
    found = issues_of({"services": [], "consumers": [
        {"username": "a", "basicauth_credentials": [{"username": "u", "password": "p"}],
         "jwt_secrets": [{"key": "k1", "secret": "s"}]},
        {"username": "b",
         "basicauth_credentials": [{"username": "u", "password": "q"}, {"username": "v"},
                                   {"username": "x:y", "password": "p"}],
         "jwt_secrets": [
             {"key": "k1", "secret": "s2"},
             {"key": "k2", "algorithm": "PS256", "secret": "s"},
             {"key": "k3", "algorithm": "RS256", "rsa_public_key": "-----BEGIN PUBLIC KEY-----\nnope\n"},
             {"key": "k4", "algorithm": "RS256", "rsa_public_key": pem(keys["ec"].public_key())},
             {"key": "k5", "algorithm": "ES256", "public_key": pem(keys["ec384"].public_key())},
             {"key": "k6", "algorithm": "HS256"},
             {"key": "k7", "algorithm": "RS256"},
             {"key": "k8", "algorithm": "RS256", "secret": "s",
              "rsa_public_key": pem(keys["rsa"].public_key())},
         ],
         "acls": [{"grop": "x"}, {"group": ""}], "groups": "admins"},
    ]})
    assert "duplicate basic-auth username" in found["consumers[1].basicauth_credentials[0].username"][0]
    assert found["consumers[1].basicauth_credentials[1]"] == ["missing required field 'password'"]
    assert "':'" in found["consumers[1].basicauth_credentials[2].username"][0]
    assert "duplicate jwt key" in found["consumers[1].jwt_secrets[0].key"][0]
    assert "HS256, RS256, ES256" in found["consumers[1].jwt_secrets[1].algorithm"][0]
    assert "not a PEM public key" in found["consumers[1].jwt_secrets[2].rsa_public_key"][0]
    assert "RS256 needs an RSA public key" in found["consumers[1].jwt_secrets[3].rsa_public_key"][0]
    assert "P-256" in found["consumers[1].jwt_secrets[4].public_key"][0]
    assert found["consumers[1].jwt_secrets[5]"] == ["algorithm HS256 needs 'secret'"]
    assert "needs 'rsa_public_key'" in found["consumers[1].jwt_secrets[6]"][0]
    assert "only used with HS256" in found["consumers[1].jwt_secrets[7].secret"][0]
    assert found["consumers[1].acls[0].grop"] == ["unknown field 'grop' (did you mean 'group'?)"]
    assert "non-empty" in found["consumers[1].acls[1].group"][0]
    assert "expected a list" in found["consumers[1].groups"][0]


def test_plugin_scope_and_reference_errors_have_paths():
    found = issues_of({
        "services": [{"name": "s", "url": "http://a", "routes": [{"name": "r", "paths": ["/"]}]}],
        "consumers": [{"username": "alice", "plugins": [
            {"name": "key-auth"},
            {"name": "request-termination", "config": {"status_code": 418}},
            {"name": "request-termination"},
            {"name": "cors", "consumer": "alice"},
        ]}],
        "plugins": [
            {"name": "request-termination", "consumer": "nobody"},
            {"name": "basic-auth", "consumer": "alice"},
            {"name": "basic-auth", "config": {"anonymous": "ghost"}},
            {"name": "acl", "config": {"allow": ["a"], "deny": ["b"]}},
            {"name": "acl"},
            {"name": "jwt", "config": {"maximum_expiration": 60, "claims_to_verify": []}},
            {"name": "jwt", "route": "r", "config": {"claims_to_verify": ["iat"]}},
        ]})
    assert found["consumers[0].plugins[0]"] == ["plugin 'key-auth' cannot be scoped to a consumer"]
    assert "configured twice" in found["consumers[0].plugins[2].name"][0]
    assert found["consumers[0].plugins[3].consumer"] == ["unknown field 'consumer'"]
    assert found["plugins[0].consumer"] == ["unknown consumer 'nobody'"]
    assert found["plugins[1].consumer"] == ["plugin 'basic-auth' cannot be scoped to a consumer"]
    assert found["plugins[2].config.anonymous"] == ["unknown consumer 'ghost'"]
    assert found["plugins[3].config"] == ["set exactly one of 'allow' and 'deny'"]
    assert found["plugins[4].config"] == ["set exactly one of 'allow' and 'deny'"]
    assert found["plugins[5].config.maximum_expiration"] == ["needs 'exp' in claims_to_verify"]
    assert "exp and nbf" in found["plugins[6].config.claims_to_verify"][0]


def test_passwords_and_keys_are_not_kept_in_plain_text(keys):
    from fastmesh.config.consumers import password_matches
    from fastmesh.ipc import encode_config
    cfg = load_config_data({"services": [], "consumers": consumers(keys)})
    alice = cfg.consumers[0]
    blob = encode_config(cfg) + repr(cfg).encode()
    assert ALICE_PASSWORD.encode() not in blob and b"alice-key" not in blob
    assert password_matches(alice.basicauth[0], ALICE_PASSWORD.encode())
    assert not password_matches(alice.basicauth[0], b"wonder land: 8 rabbits")
    # the same file read twice in one process keeps its version (reload sees "unchanged")
    assert load_config_data({"services": [], "consumers": consumers(keys)}).version == cfg.version


def test_basic_auth_cache_spares_scrypt_on_repeat(keys):
    """A keep-alive client pays scrypt once: the second check is a digest lookup."""
    from fastmesh._core.plugin import Request
    from fastmesh.plan import plugin_chains
    cfg = load_config_data({
        "services": [{"name": "s", "url": "http://a", "routes": [
            {"name": "r", "paths": ["/"], "plugins": [{"name": "basic-auth"}]}]}],
        "consumers": consumers(keys)})
    plugin = plugin_chains(cfg)["r"][0]
    header = [(b"Authorization", basic("alice", ALICE_PASSWORD).encode())]

    def timed() -> float:
        request = Request.for_test(b"GET", b"/", b"", list(header))
        start = time.perf_counter()
        assert plugin.access(request) is None
        assert request.consumer == "alice"
        return time.perf_counter() - start
    first = timed()
    again = min(timed() for _ in range(5))
    assert again < first / 5, (first, again)


def test_jwt_accepted_token_cache_still_expires(keys):
    """A token verified once is remembered, but its exp is checked against the clock every time."""
    from fastmesh._core.plugin import Request
    from fastmesh.plan import plugin_chains
    cfg = load_config_data({
        "services": [{"name": "s", "url": "http://a", "routes": [
            {"name": "r", "paths": ["/"], "plugins": [{"name": "jwt"}]}]}],
        "consumers": consumers(keys)})
    plugin = plugin_chains(cfg)["r"][0]
    exp = int(time.time()) + 2
    token = jwt.encode(claims("alice-es", exp=exp), keys["ec"], algorithm="ES256")

    def access():
        request = Request.for_test(b"GET", b"/", b"", [(b"Authorization", f"Bearer {token}".encode())])
        return request, plugin.access(request)
    for _ in range(2):
        request, answer = access()
        assert answer is None and request.consumer == "alice"
    deadline = time.monotonic() + 5
    while time.time() < exp + 0.05 and time.monotonic() < deadline:
        time.sleep(0.1)
    request, answer = access()
    assert answer is not None and answer.status == 401 and request.consumer is None
    assert answer.body == {"message": "Token expired"}


# --- basic-auth -------------------------------------------------------------------------------

def test_basic_auth_refuses_and_accepts(auth_gateway):
    port = auth_gateway.port
    missing = get(port, "/basic")
    assert refused(missing) == "Unauthorized"
    assert missing.header("WWW-Authenticate") == 'Basic realm="fastmesh-test"'
    assert get(port, "/basic-keep").header("WWW-Authenticate") == 'Basic realm="service"'
    assert refused(get(port, "/basic", headers={"Authorization": basic("alice", "wrong")})) \
        == "Invalid authentication credentials"
    assert refused(get(port, "/basic", headers={"Authorization": basic("mallory", "x")})) \
        == "Invalid authentication credentials"
    assert refused(get(port, "/basic", headers={"Authorization": "Basic !!notbase64"})) \
        == "Invalid authentication credentials"
    assert refused(get(port, "/basic", headers={"Authorization": "Bearer abc"})) \
        == "Invalid authentication credentials"
    headers = up_headers(get(port, "/basic", headers={
        "Authorization": basic("alice", ALICE_PASSWORD), **SPOOF}))
    assert headers["x-consumer-username"] == ["alice"]
    assert headers["x-consumer-custom-id"] == ["c-alice"]
    assert headers["x-credential-identifier"] == ["alice"]
    assert "x-anonymous-consumer" not in headers
    assert "authorization" not in headers                       # hide_credentials
    headers = up_headers(get(port, "/basic-keep", headers={
        "Authorization": basic("bob", "builder"), **SPOOF}))
    assert headers["x-consumer-username"] == ["bob"]
    assert "x-consumer-custom-id" not in headers                # bob has none: spoofed copy removed
    assert headers["authorization"] == [basic("bob", "builder")]
    headers = up_headers(get(port, "/basic-keep", headers={
        "Proxy-Authorization": basic("bob", "builder")}))
    assert headers["x-consumer-username"] == ["bob"]


def test_basic_auth_keep_alive_and_anonymous(auth_gateway):
    port = auth_gateway.port
    with RawClient(port) as c:
        for _ in range(3):
            c.send(f"GET /basic-keep HTTP/1.1\r\nHost: x\r\nAuthorization: "
                   f"{basic('alice', ALICE_PASSWORD)}\r\n\r\n".encode())
            assert up_headers(c.read_response())["x-consumer-username"] == ["alice"]
        c.send(f"GET /basic-keep HTTP/1.1\r\nHost: x\r\nAuthorization: "
               f"{basic('alice', 'nope')}\r\n\r\n".encode())
        assert c.read_response().status == 401
    headers = up_headers(get(port, "/basic-anon", headers=SPOOF))
    assert headers["x-consumer-username"] == ["anon"]
    assert headers["x-consumer-custom-id"] == ["nobody"]
    assert headers["x-anonymous-consumer"] == ["true"]
    assert "x-credential-identifier" not in headers
    headers = up_headers(get(port, "/basic-anon", headers={"Authorization": basic("bob", "builder")}))
    assert headers["x-consumer-username"] == ["bob"] and "x-anonymous-consumer" not in headers


# --- jwt --------------------------------------------------------------------------------------

def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_jwt_each_algorithm_authenticates(auth_gateway, keys):
    port = auth_gateway.port
    tokens = {
        "alice-hs": jwt.encode(claims("alice-hs"), HS_SECRET, algorithm="HS256"),
        "alice-rs": jwt.encode(claims("alice-rs"), keys["rsa"], algorithm="RS256"),
        "alice-es": jwt.encode(claims("alice-es"), keys["ec"], algorithm="ES256"),
    }
    for key, token in tokens.items():
        headers = up_headers(get(port, "/jwt", headers={**bearer(token), **SPOOF}))
        assert headers["x-consumer-username"] == ["alice"], key
        assert headers["x-credential-identifier"] == [key]
        assert headers["x-consumer-custom-id"] == ["c-alice"]
        assert "x-anonymous-consumer" not in headers
    headers = up_headers(get(port, "/jwt?jwt=" + jwt.encode(claims("bob-hs"), BOB_SECRET)))
    assert headers["x-consumer-username"] == ["bob"]
    token = jwt.encode(claims("carol-b64"), B64_SECRET_RAW, algorithm="HS256")
    assert up_headers(get(port, "/jwt-b64", headers=bearer(token)))["x-consumer-username"] == ["carol"]
    # on a route without secret_is_base64 the same token does not verify
    assert refused(get(port, "/jwt", headers=bearer(token))) == "Invalid signature"


def test_jwt_refusals_have_clear_messages(auth_gateway, keys):
    port = auth_gateway.port
    now = int(time.time())

    def message(token, path="/jwt"):
        return refused(get(port, path, headers=bearer(token)))
    assert refused(get(port, "/jwt")) == "No token found in request"
    assert "Bearer" in refused(get(port, "/jwt", headers={"Authorization": "Token abc"}))
    assert message("not.a.token").startswith("Bad token")
    assert message(jwt.encode(claims("alice-hs", exp=now - 10), HS_SECRET)) == "Token expired"
    assert message(jwt.encode(claims("alice-hs", nbf=now + 300), HS_SECRET)) == "Token not valid yet"
    assert message(jwt.encode(claims("alice-hs", exp=None), HS_SECRET)) \
        == "Token is missing the 'exp' claim"
    assert message(jwt.encode(claims("alice-hs"), "some-other-secret-of-enough-length-000")) \
        == "Invalid signature"
    assert message(jwt.encode(claims("alice-rs"), keys["rsa_other"], algorithm="RS256")) \
        == "Invalid signature"
    assert message(jwt.encode(claims("mallory"), HS_SECRET)) == "No credentials found for given 'iss'"
    assert message(jwt.encode({"exp": now + 60}, HS_SECRET)) == "No mandatory 'iss' in claims"
    # expired AND badly signed: the signature is judged first
    assert message(jwt.encode(claims("alice-hs", exp=now - 10), "x" * 40)) == "Invalid signature"


def test_jwt_refuses_alg_none_and_alg_confusion(auth_gateway, keys):
    port = auth_gateway.port
    payload = b64url(json.dumps(claims("alice-hs")).encode())
    for alg in ("none", "None", "NONE"):
        token = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "." + payload + "."
        assert refused(get(port, "/jwt", headers=bearer(token))).startswith("Invalid algorithm")
    # HS256 signed with the RSA *public* key of an RS256 credential (the classic confusion attack)
    public_pem = pem(keys["rsa"].public_key()).encode()
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims("alice-rs")).encode())
    signature = b64url(hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
    token = f"{header}.{body}.{signature}"
    assert refused(get(port, "/jwt", headers=bearer(token))) \
        == "Invalid algorithm (this credential accepts RS256 only)"
    # an RS256 credential's key named in an ES256 token, and vice versa
    assert refused(get(port, "/jwt", headers=bearer(
        jwt.encode(claims("alice-rs"), keys["ec"], algorithm="ES256")))).startswith("Invalid algorithm")
    assert refused(get(port, "/jwt", headers=bearer(
        jwt.encode(claims("alice-hs"), keys["rsa"], algorithm="RS256")))).startswith("Invalid algorithm")


def test_jwt_audience_nbf_max_expiration_and_token_places(auth_gateway, keys):
    port = auth_gateway.port
    now = int(time.time())
    good = jwt.encode(claims("alice-hs", aud=["other", "orders-api"], nbf=now - 5), HS_SECRET)
    assert up_headers(get(port, "/jwt-strict?token=" + good))["x-consumer-username"] == ["alice"]
    assert up_headers(get(port, "/jwt-strict", headers={"Cookie": f"a=b; session={good}"})
                      )["x-consumer-username"] == ["alice"]
    # header_names keeps its default: Authorization works too
    assert up_headers(get(port, "/jwt-strict", headers=bearer(good)))["x-consumer-username"] == ["alice"]
    other = jwt.encode(claims("bob-hs", aud="orders-api", nbf=now - 5), BOB_SECRET)
    assert refused(get(port, "/jwt-strict?token=" + good, headers=bearer(other))) \
        == "Multiple tokens provided"
    assert refused(get(port, "/jwt-strict?token=" + jwt.encode(
        claims("alice-hs", aud="billing", nbf=now - 5), HS_SECRET))) == "Invalid audience"
    assert refused(get(port, "/jwt-strict?token=" + jwt.encode(
        claims("alice-hs", nbf=now - 5), HS_SECRET))) == "Invalid audience"
    assert refused(get(port, "/jwt-strict?token=" + jwt.encode(
        claims("alice-hs", aud="orders-api"), HS_SECRET))) == "Token is missing the 'nbf' claim"
    assert refused(get(port, "/jwt-strict?token=" + jwt.encode(
        claims("alice-hs", aud="orders-api", nbf=now - 5, exp=now + 7200), HS_SECRET))) \
        == "The maximum allowed expiration is exceeded"
    # run_on_preflight: false lets an OPTIONS request through without a token
    assert get(port, "/jwt-strict", method="OPTIONS").status == 200
    assert refused(get(port, "/jwt", method="OPTIONS")) == "No token found in request"


# --- acl --------------------------------------------------------------------------------------

def test_acl_allow_deny_and_no_consumer(auth_gateway):
    port = auth_gateway.port
    headers = up_headers(get(port, "/acl-allow", headers={"apikey": "alice-key", **SPOOF}))
    assert headers["x-consumer-groups"] == ["admins, staff"]
    assert headers["x-credential-identifier"] == ["alice-k1"]
    denied = get(port, "/acl-allow", headers={"apikey": "bob-key"})
    assert refused(denied, 403) == "You cannot consume this service"
    assert refused(get(port, "/acl-allow")) == "No API key found in request"
    assert refused(get(port, "/acl-deny", headers={"Authorization": basic("bob", "builder")}), 403) \
        == "You cannot consume this service"
    headers = up_headers(get(port, "/acl-deny", headers={"Authorization": basic("alice", ALICE_PASSWORD)}))
    assert headers["x-consumer-groups"] == ["admins, staff"]
    assert refused(get(port, "/acl-alone", headers=SPOOF)) == "Unauthorized"
    headers = up_headers(get(port, "/acl-hide", headers={"apikey": "alice-key", **SPOOF}))
    assert "x-consumer-groups" not in headers                 # hidden, and the spoofed copy removed
    assert refused(get(port, "/acl-hide", headers={"apikey": "bob-key"}), 403)


def test_several_auth_plugins_with_anonymous_act_as_or(auth_gateway):
    """key-auth OR basic-auth, each falling back to `anon`; acl then refuses the anonymous one."""
    port = auth_gateway.port
    headers = up_headers(get(port, "/either", headers={"apikey": "bob-key"}))
    assert headers["x-consumer-username"] == ["bob"] and headers["x-consumer-groups"] == ["guests"]
    # bob's key has no id: a fingerprint of its digest names it, never the key itself
    assert headers["x-credential-identifier"] == ["sha256:" + hashlib.sha256(b"bob-key").hexdigest()[:16]]
    headers = up_headers(get(port, "/either", headers={"Authorization": basic("alice", ALICE_PASSWORD)}))
    assert headers["x-consumer-username"] == ["alice"] and "x-anonymous-consumer" not in headers
    assert refused(get(port, "/either"), 403) == "You cannot consume this service"
    assert refused(get(port, "/either", headers={"apikey": "wrong"}), 403) \
        == "You cannot consume this service"


# --- consumer scope ---------------------------------------------------------------------------

def scope_config(echo_url: str) -> dict:
    def stamp(value, **scope):
        return {"name": "request-transformer", "config": {"add": {"headers": [f"X-Scope:{value}"]}},
                **scope}
    return {**config(
        service("s", echo_url, [
            {"name": "r1", "paths": ["/r1"], "plugins": [{"name": "key-auth"}]},
            {"name": "r2", "paths": ["/r2"], "plugins": [{"name": "key-auth"}]},
            {"name": "r3", "paths": ["/r3"], "plugins": [{"name": "key-auth"}]},
        ]),
        service("t", echo_url, [
            {"name": "t1", "paths": ["/t1"], "plugins": [{"name": "key-auth"}]},
        ])),
        "consumers": [
            {"username": "alice", "keyauth_credentials": [{"key": "alice-key"}],
             "plugins": [{"name": "response-transformer",
                          "config": {"add": {"headers": ["X-Alice:yes"]}}}]},
            {"username": "bob", "keyauth_credentials": [{"key": "bob-key"}],
             "plugins": [{"name": "request-termination",
                          "config": {"status_code": 418, "message": "bob is blocked"}}]},
            {"username": "carol", "keyauth_credentials": [{"key": "carol-key"}]},
        ],
        "plugins": [
            stamp("global"),
            stamp("service", service="s"),
            stamp("consumer", consumer="alice"),
            stamp("consumer-route", consumer="alice", route="r2"),
            stamp("route-service", route="r3", service="s"),
            stamp("consumer-service", consumer="alice", service="t"),
            stamp("consumer-route-service", consumer="alice", route="t1", service="t"),
            {"name": "request-termination", "consumer": "bob", "route": "r2", "enabled": False},
        ]}


def test_consumer_scope_precedence_compiles_as_kong_documents(echo):
    from fastmesh.plan import consumer_chains, plugin_chains, plugin_instances
    cfg = load_config_data(scope_config(echo.url))
    instances = plugin_instances(cfg)
    routes, by_consumer = plugin_chains(cfg, instances), consumer_chains(cfg, instances)

    def scope(chain):
        return [(p.name, p.config["add"]["headers"][0][1] if p.name == "request-transformer" else None)
                for p in chain]
    assert scope(routes["r1"]) == [("key-auth", None), ("request-transformer", "service")]
    assert scope(routes["r3"])[1] == ("request-transformer", "route-service")
    assert scope(by_consumer["r1"]["alice"]) == [
        ("key-auth", None), ("request-transformer", "consumer"), ("response-transformer", None)]
    assert scope(by_consumer["r2"]["alice"])[1] == ("request-transformer", "consumer-route")
    # Kong's documented order puts route+service above consumer
    assert scope(by_consumer["r3"]["alice"])[1] == ("request-transformer", "route-service")
    assert scope(by_consumer["t1"]["alice"])[1] == ("request-transformer", "consumer-route-service")
    assert scope(by_consumer["r1"]["bob"])[-1] == ("request-termination", None)
    assert scope(by_consumer["r2"]["bob"]) == [("key-auth", None), ("request-transformer", "service")]
    assert "carol" not in by_consumer["r1"]
    # the same entry is one instance wherever it appears (compile_plan shares `instances`)
    assert by_consumer["r1"]["alice"][0] is routes["r1"][0]


def test_consumer_scope_leaves_routes_without_plugins_alone(echo, gateway):
    from fastmesh.plan import PoolRegistry, compile_plan, consumer_chains
    cfg_data = {**config(service("s", echo.url, [{"name": "plain", "paths": ["/"]}])),
                "consumers": [{"username": "alice", "keyauth_credentials": [{"key": "alice-key"}],
                               "plugins": [{"name": "request-termination"}]}]}
    cfg = load_config_data(cfg_data)
    assert consumer_chains(cfg) == {}
    assert compile_plan(cfg, PoolRegistry()).targets[0].plugins is None
    gw = gateway(cfg_data)
    assert get(gw.port, "/x", headers={"apikey": "alice-key"}).json()["path"] == "/x"


def test_consumer_scoped_plugins_run_for_that_consumer(echo, gateway):
    gw = gateway(scope_config(echo.url))
    port = gw.port
    assert refused(get(port, "/r1")) == "No API key found in request"
    carol = get(port, "/r1", headers={"apikey": "carol-key"})
    assert up_headers(carol)["x-scope"] == ["service"] and carol.header("X-Alice") is None
    alice = get(port, "/r1", headers={"apikey": "alice-key"})
    assert up_headers(alice)["x-scope"] == ["consumer"]
    assert alice.header("X-Alice") == "yes"                     # response phase from alice's chain
    assert up_headers(get(port, "/r2", headers={"apikey": "alice-key"}))["x-scope"] == ["consumer-route"]
    assert up_headers(get(port, "/r3", headers={"apikey": "alice-key"}))["x-scope"] == ["route-service"]
    assert up_headers(get(port, "/t1", headers={"apikey": "alice-key"}))["x-scope"] \
        == ["consumer-route-service"]
    assert up_headers(get(port, "/t1", headers={"apikey": "carol-key"}))["x-scope"] == ["global"]
    assert refused(get(port, "/r1", headers={"apikey": "bob-key"}), 418) == "bob is blocked"
    assert up_headers(get(port, "/r2", headers={"apikey": "bob-key"}))["x-consumer-username"] == ["bob"]
    # the switch is per request: on one keep-alive connection, alice then carol
    with RawClient(port) as c:
        c.send(b"GET /r1 HTTP/1.1\r\nHost: x\r\napikey: alice-key\r\n\r\n"
               b"GET /r1 HTTP/1.1\r\nHost: x\r\napikey: carol-key\r\n\r\n")
        first, second = c.read_response(), c.read_response()
        assert up_headers(first)["x-scope"] == ["consumer"] and first.header("X-Alice") == "yes"
        assert up_headers(second)["x-scope"] == ["service"] and second.header("X-Alice") is None
