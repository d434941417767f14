"""Plugins: contract, scopes and precedence, built-ins, Python plugins from modules, errors."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from conftest import ROOT, RawClient, config, get, service
from conftest import config_issues as issues_of, echoed, upstream_headers as up_headers
from fastmesh.config import ConfigError, load_config_data


def svc(url, routes, **extra):
    return service("s", url, routes, **extra)


# --- config -----------------------------------------------------------------------------------

def test_plugin_config_errors_have_paths():
    found = issues_of({"services": [{"name": "s", "url": "http://a", "routes": [
        {"name": "r", "paths": ["/"], "plugins": [{"name": "key-auth", "config": {"key_names": 1}}]}]}],
        "plugins": [
            {"name": "cors"},
            {"name": "request-termination", "config": {"status_code": 99}},
            {"name": "nope"},
            {"name": "cors", "route": "zz", "config": {"credentials": True}},
            {"name": "stamp", "module": "no_such_module_here"},
            {"name": "request-transformer", "config": {"add": {"headers": ["NoColon"]}, "bogus": 1}},
            {"name": "cors", "config": {}},
        ]})
    assert list(found["services[0].routes[0].plugins[0].config.key_names"])
    assert found["plugins[1].config.status_code"] == ["status_code must be between 100 and 599, found 99"] \
        or "status_code" in found["plugins[1].config.status_code"][0]
    assert "unknown plugin 'nope'" in found["plugins[2].name"][0]
    assert found["plugins[3].route"] == ["unknown route 'zz'"]
    assert "credentials" in found["plugins[3].config.credentials"][0]
    assert "cannot import module 'no_such_module_here'" in found["plugins[4].module"][0]
    assert "expected 'Name:value'" in found["plugins[5].config.add"][0]
    assert found["plugins[5].config.bogus"] == ["unknown field 'bogus'"]
    assert "configured twice" in found["plugins[6].name"][0]


def test_consumer_errors_have_paths():
    found = issues_of({"services": [], "consumers": [
        {"username": "a", "keyauth_credentials": [{"key": "k"}]},
        {"username": "a", "keyauth_credentials": [{"key": "k"}, {"key": ""}, {"kee": "x"}]},
    ]})
    assert "duplicate consumer" in found["consumers[1].username"][0]
    assert "duplicate key" in found["consumers[1].keyauth_credentials[0].key"][0]
    assert "non-empty" in found["consumers[1].keyauth_credentials[1].key"][0]
    assert "unknown field 'kee'" in found["consumers[1].keyauth_credentials[2].kee"][0]


def test_plugins_change_the_config_version():
    base = {"services": [{"name": "s", "url": "http://a", "routes": [{"name": "r", "paths": ["/"]}]}]}
    with_plugin = {**base, "plugins": [{"name": "cors"}]}
    assert load_config_data(base).version != load_config_data(with_plugin).version


def test_chains_follow_precedence_and_priority():
    from fastmesh.plan import plugin_chains
    cfg = load_config_data({
        "services": [
            {"name": "a", "url": "http://a", "plugins": [
                {"name": "request-termination", "config": {"status_code": 418}}],
             "routes": [
                {"name": "a1", "paths": ["/a1"]},
                {"name": "a2", "paths": ["/a2"], "plugins": [
                    {"name": "request-termination", "config": {"status_code": 410}},
                    {"name": "cors", "enabled": False}]},
             ]},
            {"name": "b", "url": "http://b", "routes": [{"name": "b1", "paths": ["/b1"]}]},
            {"name": "c", "url": "http://c", "routes": [{"name": "c1", "paths": ["/c1"]}],
             "plugins": [{"name": "request-termination", "enabled": False}]},
        ],
        "plugins": [{"name": "cors"}, {"name": "request-termination", "config": {"status_code": 503}}],
    })
    chains = plugin_chains(cfg)
    def shape(route):
        return [(p.name, p.config.get("status_code")) for p in chains.get(route, ())]
    assert shape("a1") == [("cors", None), ("request-termination", 418)]     # cors priority 2000 first
    assert shape("a2") == [("request-termination", 410)]                     # cors off for this route
    assert shape("b1") == [("cors", None), ("request-termination", 503)]
    assert shape("c1") == [("cors", None)]


# --- data path --------------------------------------------------------------------------------

def test_route_without_plugins_is_unaffected(echo, gateway):
    gw = gateway(config(svc(echo.url, [
        {"name": "plain", "paths": ["/plain"]},
        {"name": "closed", "paths": ["/closed"],
         "plugins": [{"name": "request-termination", "config": {"status_code": 403, "message": "no"}}]},
    ])))
    resp = get(gw.port, "/plain/x")
    assert echoed(resp)["path"] == "/x"
    resp = get(gw.port, "/closed")
    assert resp.status == 403 and resp.json() == {"message": "no"}
    assert resp.header("Content-Type") == "application/json"


def test_request_termination_keeps_the_connection_and_pipelines(echo, gateway):
    gw = gateway(config(svc(echo.url, [
        {"name": "ok", "paths": ["/ok"]},
        {"name": "t", "paths": ["/t"], "plugins": [{"name": "request-termination"}]},
    ])))
    with RawClient(gw.port) as c:
        c.send(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        first = c.read_response()
        assert first.status == 503 and first.json() == {"message": "Service unavailable"}
        assert echoed(c.read_response())["path"] == "/"
        # a body the plugin did not read: the connection closes after the answer
        c.send(b"POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert c.read_response().status == 503
        assert c.is_closed()


def test_key_auth_header_and_query_and_consumer_identity(echo, gateway):
    gw = gateway({**config(svc(echo.url, [
        {"name": "r", "paths": ["/"], "plugins": [
            {"name": "key-auth", "config": {"key_names": ["X-Api-Key"], "hide_credentials": True}}]}])),
        "consumers": [{"username": "alice", "keyauth_credentials": [{"key": "alice-key"}]},
                      {"username": "bob", "keyauth_credentials": [{"key": "bob-key"}]}]})
    missing = get(gw.port, "/")
    assert missing.status == 401 and missing.json() == {"message": "No API key found in request"}
    assert missing.header("WWW-Authenticate")
    wrong = get(gw.port, "/", headers={"X-Api-Key": "nope"})
    assert wrong.status == 401 and wrong.json() == {"message": "Invalid authentication credentials"}
    spoof = get(gw.port, "/", headers={"X-Consumer-Username": "admin"})
    assert spoof.status == 401
    headers = up_headers(get(gw.port, "/", headers={"X-Api-Key": "alice-key",
                                                    "X-Consumer-Username": "admin"}))
    assert headers["x-consumer-username"] == ["alice"]
    assert "x-api-key" not in headers                      # hide_credentials
    headers = up_headers(get(gw.port, "/?X-Api-Key=bob-key"))
    assert headers["x-consumer-username"] == ["bob"]


def test_cors_preflight_and_response_headers(echo, gateway):
    gw = gateway(config(svc(echo.url, [{"name": "r", "paths": ["/"], "plugins": [
        {"name": "cors", "config": {"origins": ["https://app.example"], "credentials": True,
                                    "max_age": 600, "exposed_headers": ["X-Total"]}}]}])))
    pre = get(gw.port, "/items", method="OPTIONS", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "X-Thing"})
    assert pre.status == 200
    assert pre.header("Access-Control-Allow-Origin") == "https://app.example"
    assert "PUT" in pre.header("Access-Control-Allow-Methods")
    assert pre.header("Access-Control-Allow-Headers") == "X-Thing"
    assert pre.header("Access-Control-Max-Age") == "600"
    assert pre.header("Access-Control-Allow-Credentials") == "true"
    normal = get(gw.port, "/items", headers={"Origin": "https://app.example"})
    assert normal.status == 200
    assert normal.header("Access-Control-Allow-Origin") == "https://app.example"
    assert normal.header("Access-Control-Expose-Headers") == "X-Total"
    other = get(gw.port, "/items", headers={"Origin": "https://evil.example"})
    assert other.status == 200 and other.header("Access-Control-Allow-Origin") is None
    bad_pre = get(gw.port, "/", method="OPTIONS", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"})
    assert bad_pre.header("Access-Control-Allow-Origin") is None


def test_request_and_response_transformers(echo, gateway):
    gw = gateway(config(svc(echo.url, [{"name": "r", "paths": ["/"], "plugins": [
        {"name": "request-transformer", "config": {
            "remove": {"headers": ["X-Drop"]}, "rename": {"headers": ["X-Old:X-New"]},
            "replace": {"headers": ["X-Rep:replaced"]}, "add": {"headers": ["X-Add:added", "X-Keep:no"]}}},
        {"name": "response-transformer", "config": {
            "remove": {"headers": ["Content-Type"]}, "add": {"headers": ["X-Resp:yes"]}}},
    ]}])))
    resp = get(gw.port, "/", headers={"X-Drop": "1", "X-Old": "v", "X-Rep": "orig", "X-Keep": "mine"})
    headers = up_headers(resp)
    assert "x-drop" not in headers and "x-old" not in headers
    assert headers["x-new"] == ["v"] and headers["x-rep"] == ["replaced"]
    assert headers["x-add"] == ["added"] and headers["x-keep"] == ["mine"]
    assert resp.header("X-Resp") == "yes" and resp.header("Content-Type") is None


def test_python_plugin_from_module_all_phases(echo, gateway, tmp_path):
    log_file = tmp_path / "stamp.log"
    gw = gateway(config(svc(echo.url, [
        {"name": "r", "paths": ["/"]},
        {"name": "plain", "paths": ["/plain"], "plugins": [
            {"name": "stamp", "module": "tests.plugins_example", "enabled": False}]},
    ], plugins=[{"name": "stamp", "module": "tests.plugins_example",
                 "config": {"value": "v1", "log_file": str(log_file)}}])))
    resp = get(gw.port, "/x")
    assert up_headers(resp)["x-stamp"] == ["v1"]
    assert resp.header("X-Stamped") == "v1"
    denied = get(gw.port, "/x", headers={"X-Deny": "1"})
    assert denied.status == 403 and denied.json() == {"message": "denied by stamp"}
    plain = get(gw.port, "/plain")
    assert "x-stamp" not in up_headers(plain) and plain.header("X-Stamped") is None
    deadline = time.time() + 5
    while time.time() < deadline and len(log_file.read_text().splitlines() if log_file.exists() else []) < 2:
        time.sleep(0.05)
    lines = [line.split()[1:] for line in log_file.read_text().splitlines()]
    assert lines == [["r", "200", "None"], ["r", "403", "None"]]


def test_raising_plugin_answers_500_and_the_worker_keeps_serving(echo, gateway):
    gw = gateway(config(svc(echo.url, [{"name": "r", "paths": ["/"], "plugins": [
        {"name": "boom", "module": "tests.plugins_example"}]}])))
    for _ in range(3):
        resp = get(gw.port, "/", headers={"X-Boom": "1"})
        assert resp.status == 500
        assert resp.json() == {"message": "An unexpected error occurred", "plugin": "boom"}
        assert echoed(get(gw.port, "/"))["path"] == "/"
    out = gw.stop()
    assert "plugin 'boom' failed in its access phase" in out


def test_docs_example_plugin_works(echo, gateway, tmp_path, monkeypatch):
    text = (Path(ROOT) / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "hello_plugin.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    gw = gateway(config(svc(echo.url, [{"name": "r", "paths": ["/"]}]),
                        ) | {"plugins": [{"name": "hello", "module": "hello_plugin",
                                          "config": {"header_name": "X-Hi", "deny_agent": "badbot"}}]})
    resp = get(gw.port, "/")
    assert up_headers(resp)["x-hi"] == ["hello"]
    assert resp.header("X-Hello-Plugin") == "1"
    blocked = get(gw.port, "/", headers={"User-Agent": "badbot/1.0"})
    assert blocked.status == 403 and blocked.json() == {"message": "agent not allowed"}
    with pytest.raises(ConfigError) as info:
        load_config_data({"services": [], "plugins": [{"name": "hello", "module": "hello_plugin",
                                                       "config": {"header_name": "bad name"}}]})
    assert info.value.issues[0].path == "plugins[0].config.header_name"
