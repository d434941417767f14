"""The admin API: status, config replace, entity CRUD, auth, errors; served by fastmesh's parser."""
from __future__ import annotations

import json
import subprocess

import yaml

from conftest import ROOT, RawClient, fastmesh_cmd, free_port, get
from test_supervisor import echo_cfg, ops  # noqa: F401  (fixture)


def test_status_reports_version_uptime_workers_config_and_traffic(echo, ops):
    gw = ops(echo_cfg(echo), 2)
    for _ in range(5):
        assert get(gw.port, "/x").status == 200
    status = gw.status()
    from fastmesh import __version__
    assert status["version"] == __version__
    assert status["pid"] == gw.pid
    assert status["uptime_seconds"] >= 0
    assert len(status["workers"]) == 2
    assert status["config"]["routes"] == 1 and status["config"]["applied"] is True
    assert status["config"]["version"] == status["workers"][0]["config_version"]
    assert status["requests"] == 5
    assert status["connections"] == 0


def test_get_config_returns_the_active_document(echo, ops):
    cfg = echo_cfg(echo)
    gw = ops(cfg, 1)
    code, body = gw.admin("GET", "/config")
    assert code == 200
    assert body == cfg


def test_post_config_replaces_it_atomically_on_every_worker(echo, ops):
    gw = ops(echo_cfg(echo), 2)
    old = gw.status()["config"]["version"]
    new_cfg = echo_cfg(echo, {"name": "only-new", "paths": ["/new"]})
    code, body = gw.admin("POST", "/config", new_cfg)
    assert code == 200, body
    assert body["config_version"] != old and body["workers"] == 2
    status = gw.status()
    assert all(w["config_version"] == body["config_version"] for w in status["workers"])
    for _ in range(6):
        assert get(gw.port, "/new").status == 200
        assert get(gw.port, "/other").status == 404
    assert gw.admin("GET", "/config")[1] == new_cfg


def test_post_invalid_config_is_400_with_every_error_and_changes_nothing(echo, ops):
    gw = ops(echo_cfg(echo), 2)
    old = gw.status()["config"]["version"]
    bad = {"services": [{"name": "x", "url": "http://127.0.0.1:1",
                         "routes": [{"name": "r", "paths": ["~[unclosed"]},
                                    {"name": "r2", "pathz": ["/a"]}]}]}
    code, body = gw.admin("POST", "/config", bad)
    assert code == 400
    texts = [e["text"] for e in body["errors"]]
    assert any("services[0].routes[0].paths[0]: invalid regex" in t for t in texts), texts
    assert any("unknown field 'pathz' (did you mean 'paths'?)" in t for t in texts), texts
    assert body["errors"][0]["path"].startswith("services[0].routes")
    assert gw.status()["config"]["version"] == old
    assert gw.status()["reloads"]["failure"] == 1
    assert get(gw.port, "/x").status == 200


def test_bad_json_is_400_with_the_parse_error(echo, ops):
    gw = ops(echo_cfg(echo), 1)
    code, body = gw.admin("POST", "/config", raw=b'{"services": [')
    assert code == 400
    assert body["message"].startswith("invalid JSON:")
    code, body = gw.admin("PUT", "/services/x", raw=b"{nope}")
    assert code == 400 and "invalid JSON" in body["message"]


def test_unknown_path_is_404_json_and_wrong_method_405(echo, ops):
    gw = ops(echo_cfg(echo), 1)
    code, body = gw.admin("GET", "/nope")
    assert code == 404 and "no such admin endpoint" in body["message"]
    code, body = gw.admin("DELETE", "/status")
    assert code == 405


def test_service_and_route_crud_each_make_a_new_version(echo, ops):
    gw = ops(echo_cfg(echo), 2)
    versions = [gw.status()["config"]["version"]]

    code, body = gw.admin("PUT", "/services/users", {"url": f"{echo.url}/api"})
    assert code == 201, body
    versions.append(body["config_version"])
    code, body = gw.admin("PUT", "/routes/users", {"service": "users", "paths": ["/users"]})
    assert code == 201, body
    assert body["entity"] == {"name": "users", "service": "users", "paths": ["/users"]}
    versions.append(body["config_version"])
    assert json.loads(get(gw.port, "/users/7").body)["target"] == "/api/7"

    code, body = gw.admin("GET", "/services/users")
    assert code == 200 and body == {"name": "users", "url": f"{echo.url}/api"}
    code, body = gw.admin("GET", "/routes")
    assert sorted(r["name"] for r in body["data"]) == ["all", "users"]
    assert {r["name"]: r["service"] for r in body["data"]} == {"all": "echo", "users": "users"}

    code, body = gw.admin("PATCH", "/routes/users", {"strip_path": False})
    assert code == 200, body
    versions.append(body["config_version"])
    assert json.loads(get(gw.port, "/users/7").body)["target"] == "/api/users/7"

    code, body = gw.admin("PATCH", "/services/users", {"url": echo.url})   # merge patch
    assert code == 200, body
    versions.append(body["config_version"])
    assert json.loads(get(gw.port, "/users/7").body)["target"] == "/users/7"

    # A service that routes still use cannot go: the validator says why, nothing changes.
    code, body = gw.admin("DELETE", "/services/users")
    assert code == 400
    assert any("unknown service 'users'" in e["text"] for e in body["errors"])

    code, body = gw.admin("DELETE", "/routes/users")
    assert code == 200
    versions.append(body["config_version"])
    assert get(gw.port, "/users/7").status == 200          # now caught by the "/" route
    code, body = gw.admin("DELETE", "/services/users")
    assert code == 200
    versions.append(body["config_version"])
    # Each change made a new version; removing both again gives back the first config (the
    # version is a hash of the effective config).
    assert len(set(versions[:-1])) == len(versions) - 1
    assert versions[-1] == versions[0]
    status = gw.status()
    assert status["config"]["version"] == versions[-1]
    assert all(w["config_version"] == versions[-1] for w in status["workers"])

    assert gw.admin("GET", "/services/users")[0] == 404
    assert gw.admin("DELETE", "/routes/users")[0] == 404
    assert gw.admin("PATCH", "/routes/users", {"paths": ["/x"]})[0] == 404


def test_nested_route_edits_stay_nested(echo, ops):
    gw = ops(echo_cfg(echo), 1)
    code, body = gw.admin("PUT", "/routes/all", {"paths": ["/only"]})
    assert code == 200, body
    doc = gw.admin("GET", "/config")[1]
    assert doc["services"][0]["routes"] == [{"name": "all", "paths": ["/only"]}]
    assert "routes" not in doc
    assert get(gw.port, "/x").status == 404 and get(gw.port, "/only").status == 200


def test_entity_body_must_match_the_url(echo, ops):
    gw = ops(echo_cfg(echo), 1)
    code, body = gw.admin("PUT", "/services/a", {"name": "b", "url": echo.url})
    assert code == 400 and "URL names 'a'" in body["message"]
    code, body = gw.admin("PUT", "/services/a", ["not", "an", "object"])
    assert code == 400


def test_token_is_required_when_set(echo, ops):
    token = "s3cret-token"
    cfg = echo_cfg(echo)
    cfg["gateway"] = {"admin": {"token": token}}
    gw = ops(cfg, 1)
    code, body = gw.admin("GET", "/status")
    assert code == 401
    assert gw.admin("GET", "/status", token="wrong-token")[0] == 401
    assert gw.admin("GET", "/status", token=token)[0] == 200
    out = subprocess.run(fastmesh_cmd("reload", "--admin", f"127.0.0.1:{gw.admin_port}",
                                      "--token", token),
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr


def test_non_loopback_admin_without_token_refuses_to_start(echo, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(echo_cfg(echo)))
    out = subprocess.run(fastmesh_cmd("run", "-c", str(path), "--listen", f"127.0.0.1:{free_port()}",
                                      "--workers", "1", "--admin", f"0.0.0.0:{free_port()}"),
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1
    assert "set gateway.admin.token" in out.stderr
    cfg = echo_cfg(echo)
    cfg["gateway"] = {"admin": {"listen": "0.0.0.0:8001"}}
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(fastmesh_cmd("check", "-c", str(path)), capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 1
    assert "gateway.admin.listen: the admin API on 0.0.0.0:8001 is reachable" in out.stderr


def test_admin_off_has_no_listener(echo, ops):
    gw = ops(echo_cfg(echo), 1, admin=False)
    assert "admin API on" not in gw.stop()


def test_admin_keep_alive_pipelining_and_chunked_body(echo, ops):
    gw = ops(echo_cfg(echo), 1)
    body = json.dumps({"url": echo.url}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with RawClient(gw.admin_port) as c:
        c.send(b"GET /status HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
               b"PUT /services/chunky HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunked)
        assert c.read_response().status == 200
        assert c.read_response().status == 404
        resp = c.read_response()
        assert resp.status == 201, resp.body
        assert resp.header("content-type") == "application/json"
    with RawClient(gw.admin_port) as c:
        c.send(b"GET /status HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 400 and c.is_closed()
