"""The edge chain's fast paths: per-connection reuse of the request/response views, the key-auth
cache of presented keys, native header blocks and the cors memo, over real keep-alive connections."""
from __future__ import annotations

import os
import signal
import time

import yaml

from conftest import RawClient, config, echoed, service, wait_until

KEYS = [{"username": "alice", "keyauth_credentials": [{"key": "alice-key"}]},
        {"username": "bob", "custom_id": "b-7", "keyauth_credentials": [{"key": "bob-key"}]}]
APP = "https://app.example"


def edge(echo, extra_plugins=(), **route):
    return {**config(service("s", echo.url, [{"name": "r", "paths": ["/"], "plugins": [
        {"name": "key-auth"},
        {"name": "rate-limiting", "config": {"minute": 1000, "limit_by": "consumer"}},
        {"name": "cors", "config": {"origins": [APP]}},
        *extra_plugins], **route}])), "consumers": KEYS}


def ask(client: RawClient, headers: dict, path: str = "/"):
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    return client.read_response()


def seen(resp) -> dict:
    out: dict[str, list[str]] = {}
    for name, value in echoed(resp)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_one_connection_carries_nothing_from_one_request_to_the_next(echo, gateway):
    gw = gateway(edge(echo))
    with RawClient(gw.port) as c:
        first = ask(c, {"apikey": "alice-key", "Origin": APP, "X-Consumer-Username": "admin"})
        up = seen(first)
        assert up["x-consumer-username"] == ["alice"] and "x-consumer-custom-id" not in up
        assert first.header("Access-Control-Allow-Origin") == APP
        assert first.header("Vary") == "Origin"
        left = int(first.header("RateLimit-Remaining"))
        assert first.header("X-RateLimit-Remaining-Minute") == str(left)
        assert first.header("RateLimit-Limit") == "1000"
        # no key now: the previous consumer must not stick to the reused request
        missing = ask(c, {"Origin": APP, "X-Consumer-Username": "admin"})
        assert missing.status == 401 and missing.json() == {"message": "No API key found in request"}
        assert missing.header("RateLimit-Remaining") is None
        # another consumer, no Origin: no CORS headers left over from the first request
        bob = ask(c, {"apikey": "bob-key"})
        up = seen(bob)
        assert up["x-consumer-username"] == ["bob"] and up["x-consumer-custom-id"] == ["b-7"]
        assert bob.header("Access-Control-Allow-Origin") is None and bob.header("Vary") is None
        assert bob.header("RateLimit-Remaining") == "999"       # bob's own count
        # a disallowed origin: none either
        other = ask(c, {"apikey": "alice-key", "Origin": "https://evil.example"})
        assert other.header("Access-Control-Allow-Origin") is None
        again = ask(c, {"apikey": "alice-key", "Origin": APP})
        assert seen(again)["x-consumer-username"] == ["alice"]
        assert int(again.header("RateLimit-Remaining")) == left - 2
        assert again.header("Access-Control-Allow-Origin") == APP
        # the same key with surrounding blanks is the same credential
        padded = ask(c, {"apikey": " alice-key "})
        assert seen(padded)["x-consumer-username"] == ["alice"]
        assert ask(c, {"apikey": "alice-keyX"}).status == 401
        assert ask(c, {"apikey": "alice-ke"}).status == 401


def test_the_anonymous_fallback_never_inherits_the_previous_consumer(echo, gateway):
    """With `anonymous`, key-auth skips a request an earlier plugin authenticated: a reused
    request view must not look authenticated because the previous request on it was."""
    cfg = edge(echo)
    cfg["consumers"] = KEYS + [{"username": "guest"}]
    cfg["services"][0]["routes"][0]["plugins"][0]["config"] = {"anonymous": "guest"}
    gw = gateway(cfg)
    with RawClient(gw.port) as c:
        for _ in range(3):
            up = seen(ask(c, {"apikey": "alice-key"}))
            assert up["x-consumer-username"] == ["alice"] and "x-anonymous-consumer" not in up
            up = seen(ask(c, {}))
            assert up["x-consumer-username"] == ["guest"] and up["x-anonymous-consumer"] == ["true"]
            up = seen(ask(c, {"apikey": "wrong"}))
            assert up["x-consumer-username"] == ["guest"]


def test_a_reload_forgets_keys_that_were_removed(echo, gateway):
    cfg = edge(echo)
    gw = gateway(cfg)
    with RawClient(gw.port) as c:
        assert ask(c, {"apikey": "bob-key"}).status == 200        # now in the key cache
    cfg["consumers"] = KEYS[:1]
    gw.config_path.write_text(yaml.safe_dump(cfg))
    os.kill(gw.pid, signal.SIGHUP)

    def bob_refused():
        with RawClient(gw.port) as c:
            return ask(c, {"apikey": "bob-key"}).status == 401
    wait_until(bob_refused, 15, "the reload did not drop bob's key")
    with RawClient(gw.port) as c:
        assert ask(c, {"apikey": "alice-key"}).status == 200


def test_later_python_phases_can_remove_what_native_blocks_added(echo, gateway):
    gw = gateway(edge(echo, [
        {"name": "request-transformer", "config": {"remove": {"headers": ["X-Consumer-Username"]}}},
        {"name": "response-transformer", "config": {"remove": {"headers": ["RateLimit-Limit", "Vary"]},
                                                     "add": {"headers": ["X-After:1"]}}}]))
    with RawClient(gw.port) as c:
        for _ in range(3):          # these chains have Python phases: fresh views every time
            resp = ask(c, {"apikey": "bob-key", "Origin": APP})
            up = seen(resp)
            assert "x-consumer-username" not in up and up["x-consumer-custom-id"] == ["b-7"]
            assert resp.header("RateLimit-Limit") is None and resp.header("Vary") is None
            assert resp.header("RateLimit-Remaining") is not None
            assert resp.header("X-RateLimit-Limit-Minute") == "1000"
            assert resp.header("Access-Control-Allow-Origin") == APP
            assert resp.header("X-After") == "1"


def test_a_consumer_scoped_cors_after_the_switch_still_sees_the_origin(echo, gateway):
    """alice's chain has its own cors, which sorts before key-auth: after key-auth identifies
    alice, only the plugins after it run their access phase, so alice's cors left no memo and
    its response phase reads Origin from the request."""
    cfg = edge(echo)
    cfg["plugins"] = [{"name": "cors", "consumer": "alice",
                       "config": {"origins": ["https://alice.example"]}}]
    gw = gateway(cfg)
    with RawClient(gw.port) as c:
        mine = ask(c, {"apikey": "alice-key", "Origin": "https://alice.example"})
        assert mine.status == 200
        assert mine.header("Access-Control-Allow-Origin") == "https://alice.example"
        route_origin = ask(c, {"apikey": "alice-key", "Origin": APP})
        assert route_origin.status == 200 and route_origin.header("Access-Control-Allow-Origin") is None
        bob = ask(c, {"apikey": "bob-key", "Origin": APP})
        assert bob.header("Access-Control-Allow-Origin") == APP
        bob_other = ask(c, {"apikey": "bob-key", "Origin": "https://alice.example"})
        assert bob_other.header("Access-Control-Allow-Origin") is None


def test_many_requests_on_one_connection_stay_correct(echo, gateway):
    """Reused views over many keep-alive requests, alternating consumers and outcomes."""
    gw = gateway(edge(echo))
    deadline = time.monotonic() + 30
    with RawClient(gw.port) as c:
        for i in range(60):
            assert time.monotonic() < deadline
            if i % 3 == 2:
                assert ask(c, {"apikey": "nope", "Origin": APP}).status == 401
                continue
            who, key = ("alice", "alice-key") if i % 3 == 0 else ("bob", "bob-key")
            resp = ask(c, {"apikey": key, "Origin": APP} if i % 2 else {"apikey": key})
            assert seen(resp)["x-consumer-username"] == [who]
            assert (resp.header("Access-Control-Allow-Origin") == APP) == bool(i % 2)
