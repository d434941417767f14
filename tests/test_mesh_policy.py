"""The sidecar's policy file, outbound part: per-destination settings and plugins from the
gateway's own schema (`services:`, `plugins:`, `consumers:`), applied to the app's calls, re-read
on change, refused with the file and the path when wrong. Real sidecars over loopback, a file
registry (no Redis), the apps of tests/test_mesh_sidecar.py.
"""
from __future__ import annotations

import os
import subprocess

import yaml

from conftest import fastmesh_cmd, free_port, get, wait_until
from test_mesh_sidecar import admin_get, file_mesh  # noqa: F401  (fixture)


def write(path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    os.replace(tmp, path)


def register(mesh, *sidecars) -> None:
    write(mesh.path, {"services": {s.service: [{"id": s.app.instance,
                                                "address": f"127.0.0.1:{s.inbound}"}]
                                   for s in sidecars}})


def test_destination_plugins_and_settings_apply_to_the_apps_calls(file_mesh, tmp_path):
    policy = tmp_path / "policy.yaml"
    write(policy, {"services": [{"name": "b", "retries": 0, "plugins": [
        {"name": "request-termination",
         "config": {"status_code": 418, "message": "b is closed for lunch"}}]}]})
    b = file_mesh.pod("b", "b1")
    c = file_mesh.pod("c", "c1")
    a = file_mesh.pod("a", "a1", "--policy", str(policy))
    register(file_mesh, b, c)
    wait_until(lambda: get(a.outbound, "/", host="c").status == 200, 5, "c never routable",
               interval=0.05)
    # Only the destination named in the policy gets its plugin.
    resp = get(a.outbound, "/", host="b")
    assert resp.status == 418 and resp.json()["message"] == "b is closed for lunch"
    assert get(a.outbound, "/", host="c").status == 200

    # A global plugin (every destination) and the change of b's entry, applied live.
    write(policy, {"plugins": [{"name": "response-transformer",
                                "config": {"add": {"headers": ["x-mesh-policy:v2"]}}}],
                   "services": [{"name": "b", "read_timeout": "2s"}]})
    wait_until(lambda: get(a.outbound, "/", host="b").status == 200, 10,
               "the new policy was never applied", interval=0.1)
    for host in ("b", "c"):
        resp = get(a.outbound, "/", host=host)
        assert resp.status == 200 and resp.header("x-mesh-policy") == "v2", host


def test_a_split_by_version_gives_each_version_its_share_of_the_calls(file_mesh, tmp_path):
    # b1, b2 are v1, b3 is v2 (registered versions). versions {v1: 75, v2: 25}: of every four
    # calls, three go to v1 (between b1 and b2) and one to b3, exactly (smooth weighted round
    # robin). Changed live: the canary takes everything; an unlisted version takes nothing.
    policy = tmp_path / "policy.yaml"
    write(policy, {"services": [{"name": "b", "versions": {"v1": 75, "v2": 25}}]})
    bs = [file_mesh.pod("b", name) for name in ("b1", "b2", "b3", "b4")]
    a = file_mesh.pod("a", "a1", "--policy", str(policy))
    versions = {"b1": "v1", "b2": "v1", "b3": "v2", "b4": "v3"}
    write(file_mesh.path, {"services": {"b": [
        {"id": s.app.instance, "address": f"127.0.0.1:{s.inbound}",
         "version": versions[s.app.instance]} for s in bs]}})
    wait_until(lambda: get(a.outbound, "/", host="b").status == 200, 5, "b never routable",
               interval=0.05)

    def counts(calls: int) -> dict[str, int]:
        seen: dict[str, int] = {}
        for _ in range(calls):
            resp = get(a.outbound, "/", host="b")
            assert resp.status == 200, resp.body
            seen[resp.json()["instance"]] = seen.get(resp.json()["instance"], 0) + 1
        return seen

    assert counts(40) == {"b1": 15, "b2": 15, "b3": 10}
    write(policy, {"services": [{"name": "b", "versions": {"v1": 0, "v2": 100}}]})
    wait_until(lambda: counts(4) == {"b3": 4}, 10, "the new split was never applied",
               interval=0.1)
    # A split none of whose versions is registered (a canary listed before it starts) is not
    # applied: every instance takes calls, b4 included, rather than none.
    write(policy, {"services": [{"name": "b", "versions": {"v9": 100}}]})
    wait_until(lambda: "b4" in counts(20), 10, "the unmatched split was applied", interval=0.1)


def test_a_broken_policy_change_keeps_the_old_settings(file_mesh, tmp_path):
    policy = tmp_path / "policy.yaml"
    write(policy, {"services": [{"name": "b", "plugins": [
        {"name": "request-termination", "config": {"status_code": 429}}]}]})
    b = file_mesh.pod("b", "b1")
    a = file_mesh.pod("a", "a1", "--policy", str(policy))
    register(file_mesh, b)
    wait_until(lambda: get(a.outbound, "/", host="b").status == 429, 5, "policy not applied",
               interval=0.05)
    write(policy, {"services": [{"name": "b", "retries": "many"}]})
    wait_until(lambda: a.status()["authorization"]["error"], 10, "the broken file was not seen")
    assert "services[0].retries" in a.status()["authorization"]["error"]
    assert get(a.outbound, "/", host="b").status == 429      # the old policy still applies


def test_an_invalid_policy_file_names_the_file_and_every_path(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "services:\n"
        "  - name: b\n    url: http://10.0.0.1:80\n    retries: -1\n"
        "  - name: b\n"
        "  - name: c\n    plugins: [{name: no-such-plugin}]\n"
        "plugins: {name: cors}\n"
        "destinations: []\n")
    registry = tmp_path / "mesh.yaml"
    registry.write_text("services: {}\n")
    result = subprocess.run(fastmesh_cmd(
        "sidecar", "--service", "a", "--app-port", "9", "--registry", f"file:{registry}",
        "--inbound", f"127.0.0.1:{free_port()}", "--outbound", f"127.0.0.1:{free_port()}",
        "--admin", "off", "--policy", str(policy)), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    err = result.stderr
    assert f"{policy}: destinations: unknown field 'destinations'" in err
    assert f"{policy}: services[0].url: a destination's address comes from the registry" in err
    assert f"{policy}: services[1].name: destination 'b' is listed twice" in err
    assert f"{policy}: plugins: expected a list" in err


def test_the_gateway_schema_checks_destination_settings(tmp_path):
    from fastmesh.mesh.policy import parse_policy_file
    source = str(tmp_path / "p.yaml")
    try:
        parse_policy_file({"services": [{"name": "b", "retries": -1},
                                        {"name": "c", "plugins": [{"name": "no-such-plugin"}]}]},
                          source)
    except ValueError as exc:
        text = str(exc)
    else:
        raise AssertionError("an invalid policy was accepted")
    assert f"{source}: services[0].retries" in text
    assert f"{source}: services[1].plugins[0]" in text and "no-such-plugin" in text
    for versions, says in (({"v1": -1}, "share of version 'v1': expected an integer 0..10000"),
                           ({"v1": 0}, "every share is 0"), ([90, 10], "expected a mapping")):
        try:
            parse_policy_file({"services": [{"name": "b", "versions": versions}]}, source)
        except ValueError as exc:
            assert f"{source}: services[0].versions: {says}" in str(exc), str(exc)
        else:
            raise AssertionError(f"versions {versions} were accepted")


def test_opaque_tcp_is_allowed_only_by_rules_without_methods_or_paths():
    from fastmesh.plugins.mesh_authorization import allows_tcp
    a, b = "spiffe://example.org/svc/a", "spiffe://example.org/svc/b"
    assert allows_tcp([], None) and allows_tcp([], a)           # no rules: open
    http_only = [{"from": [a], "methods": ["GET"], "paths": None},
                 {"from": [a], "methods": None, "paths": ["/x"]}]
    assert not allows_tcp(http_only, a)
    assert allows_tcp(http_only + [{"from": [b], "methods": None, "paths": None}], b)
    domain = [{"from": ["spiffe://example.org/*"], "methods": None, "paths": None}]
    assert allows_tcp(domain, a) and not allows_tcp(domain, "spiffe://other.org/svc/a")
    assert not allows_tcp(domain, None)                         # plaintext: no identity
    authenticated = [{"from": None, "methods": None, "paths": None}]
    assert allows_tcp(authenticated, a) and not allows_tcp(authenticated, None)
    assert allows_tcp([{"from": ["*"], "methods": None, "paths": None}], None)
