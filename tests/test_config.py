"""Declarative config: loading, validation messages (with paths) and normalization."""
from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from fastmesh.config import Config, ConfigError, load_config, load_config_data


def write(tmp_path, text: str, name: str = "fastmesh.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load(tmp_path, text: str, name: str = "fastmesh.yaml") -> Config:
    return load_config(write(tmp_path, text, name))


def issues(tmp_path, text: str, name: str = "fastmesh.yaml") -> dict[str, list[str]]:
    """{path: [messages]} of the ConfigError raised for `text`."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, name)
    found: dict[str, list[str]] = {}
    for issue in caught.value.issues:
        assert issue.source.endswith(name)
        found.setdefault(issue.path, []).append(issue.message)
    return found


def data_issues(data: object) -> dict[str, list[str]]:
    with pytest.raises(ConfigError) as caught:
        load_config_data(data)
    found: dict[str, list[str]] = {}
    for issue in caught.value.issues:
        found.setdefault(issue.path, []).append(issue.message)
    return found


def one_route(**route) -> dict:
    return {"services": [{"name": "s", "url": "http://127.0.0.1:9001", "routes": [route]}]}


def one_service(**service) -> dict:
    return {"services": [{"name": "s", **service}]}


FULL = """\
    _format_version: "1"
    gateway:
      listen: "[::1]:8000"
      server_timing: true
      limits: {max_head_size: 64k, max_body_size: 1m, header_timeout: 5s}
      upstream_keepalive: {max_idle: 8, idle_timeout: 1m30s}
    services:
      - name: orders
        url: http://127.0.0.1:9001/api/
        connect_timeout: 5s
        retries: 2
        server_timing: false
        routes:
          - name: o1
            hosts: [API.Example.com, "*.orders.internal", "::1"]
            paths: [/orders, "=/exact", "~/items/\\\\d+$"]
            methods: [get, POST, GET]
            headers: {X-Version: ["1", "2"], accept: text/html}
            strip_path: false
            priority: 3
      - name: users
        host: Users.Internal
        port: 8080
        path: /
    routes:
      - name: u1
        service: users
        paths: [/users]
        preserve_host: true
"""


# --- happy path and normalization -------------------------------------------------------------

def test_full_config_is_normalized(tmp_path):
    config = load(tmp_path, FULL)
    orders, users = config.services
    assert (orders.name, orders.protocol, orders.host, orders.port, orders.path) == \
        ("orders", "http", "127.0.0.1", 9001, "/api")
    assert (orders.connect_timeout, orders.read_timeout, orders.retries, orders.server_timing) == \
        (5.0, 60.0, 2, False)
    assert (users.host, users.port, users.path, users.server_timing) == ("users.internal", 8080, "", None)

    o1, u1 = config.routes
    assert (o1.name, o1.service, o1.index) == ("o1", "orders", 0)
    assert o1.hosts == ("api.example.com", "*.orders.internal", "[::1]")
    assert o1.paths == ("/orders", "=/exact", "~/items/\\d+$")
    assert o1.methods == ("GET", "POST")
    assert o1.headers == (("accept", ("text/html",)), ("x-version", ("1", "2")))
    assert (o1.strip_path, o1.preserve_host, o1.priority) == (False, False, 3)
    assert (u1.service, u1.index, u1.strip_path, u1.preserve_host) == ("users", 1, True, True)

    gateway = config.gateway
    assert (gateway.listen, gateway.server_timing) == ("[::1]:8000", True)
    assert (gateway.limits.max_head_size, gateway.limits.max_body_size) == (65536, 1048576)
    assert (gateway.limits.header_timeout, gateway.limits.max_headers) == (5.0, 100)
    assert (gateway.upstream_keepalive.max_idle, gateway.upstream_keepalive.idle_timeout) == (8, 90.0)
    assert config.source.endswith("fastmesh.yaml")


def test_config_without_services_or_routes_is_valid(tmp_path):
    config = load(tmp_path, "gateway: {listen: '0.0.0.0:8080'}\n")
    assert (config.services, config.routes) == ((), ())
    assert config.gateway.listen == "0.0.0.0:8080"
    assert config.gateway.limits.max_head_size == 32768


def test_json_config_is_accepted(tmp_path):
    data = {"services": [{"name": "api", "url": "http://localhost:81",
                          "routes": [{"name": "r", "paths": ["/"]}]}]}
    config = load(tmp_path, json.dumps(data, indent="\t"), name="fastmesh.json")
    assert config.services[0].host == "localhost" and config.services[0].port == 81
    assert config.routes[0].paths == ("/",)


def test_route_index_is_declaration_order_nested_first(tmp_path):
    config = load(tmp_path, """\
        routes:
          - {name: top, service: b, paths: [/t]}
        services:
          - name: a
            host: a.local
            routes: [{name: a1, paths: [/a1]}, {name: a2, paths: [/a2]}]
          - name: b
            host: b.local
            routes: [{name: b1, paths: [/b1]}]
    """)
    assert [(r.name, r.index, r.service) for r in config.routes] == \
        [("a1", 0, "a"), ("a2", 1, "a"), ("b1", 2, "b"), ("top", 3, "b")]


def test_nested_route_may_repeat_its_own_service():
    config = load_config_data(one_route(name="r", service="s", paths=["/"]))
    assert config.routes[0].service == "s"


# --- durations and sizes ----------------------------------------------------------------------

def test_integer_timeout_is_milliseconds():
    config = load_config_data(one_service(host="h", connect_timeout=250, read_timeout=60000))
    assert config.services[0].connect_timeout == 0.25
    assert config.services[0].read_timeout == 60.0


@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("5s", 5.0), ("1.5s", 1.5), ("1m", 60.0), ("1h", 3600.0), ("1m30s", 90.0),
])
def test_duration_strings(text, seconds):
    assert load_config_data(one_service(host="h", write_timeout=text)).services[0].write_timeout == seconds


@pytest.mark.parametrize("value, phrase", [
    ("5 parsecs", "expected a duration like '250ms'"),
    ("500", "found str '500'"),
    (True, "found bool true"),
    (0, "duration must be greater than 0"),
    ("0s", "duration must be greater than 0"),
])
def test_bad_durations_are_refused(value, phrase):
    found = data_issues(one_service(host="h", connect_timeout=value))
    assert list(found) == ["services[0].connect_timeout"]
    assert phrase in found["services[0].connect_timeout"][0]


def test_sizes_accept_ints_and_suffixes():
    limits = load_config_data({"gateway": {"limits": {
        "max_head_size": "1m", "max_line_size": "4k", "max_body_size": "1g"}}}).gateway.limits
    assert (limits.max_head_size, limits.max_line_size, limits.max_body_size) == \
        (1 << 20, 4096, 1 << 30)


def test_bad_limits_name_their_paths():
    found = data_issues({"gateway": {"limits": {
        "max_head_size": "lots", "max_headers": True, "max_body_size": -1}}})
    assert "expected a size like 32768, '32k'" in found["gateway.limits.max_head_size"][0]
    assert found["gateway.limits.max_headers"] == ["expected an integer, found bool true"]
    assert found["gateway.limits.max_body_size"] == ["max_body_size must be >= 0, found -1"]


def test_line_size_may_not_exceed_head_size():
    found = data_issues({"gateway": {"limits": {"max_head_size": "1k", "max_line_size": "2k"}}})
    assert "must not exceed max_head_size (1024)" in found["gateway.limits.max_line_size"][0]


# --- services ---------------------------------------------------------------------------------

def test_url_and_host_fields_conflict():
    found = data_issues(one_service(url="http://a:1", host="b", port=2))
    assert list(found) == ["services[0]"]
    assert "set either 'url' or 'host', 'port', not both" in found["services[0]"][0]


def test_service_needs_url_or_host():
    assert data_issues(one_service()) == {"services[0]": ["missing required field 'url' (or 'host')"]}


@pytest.mark.parametrize("url, message", [
    ("htp:/x", "invalid URL 'htp:/x': scheme must be http"),
    ("http://", "invalid URL 'http://': missing host"),
    ("http://a:70000", "invalid URL 'http://a:70000': port must be 1..65535, found 70000"),
    ("http://a:x", "invalid URL 'http://a:x': port must be a number, found 'x'"),
    ("http://u@a", "invalid URL 'http://u@a': user info is not allowed"),
    ("http://a/p?q=1", "invalid URL 'http://a/p?q=1': a query string or fragment is not allowed"),
    ("http://::1/", "invalid URL 'http://::1/': IPv6 addresses must be written in brackets"),
    ("ftp://a", "invalid URL 'ftp://a': scheme must be http or https"),
])
def test_bad_urls_are_explained(url, message):
    found = data_issues(one_service(url=url))
    assert list(found) == ["services[0].url"]
    assert found["services[0].url"][0].startswith(message)


@pytest.mark.parametrize("url, parts", [
    ("http://Example.COM", ("example.com", 80, "")),
    ("http://10.0.0.1:8080/", ("10.0.0.1", 8080, "")),
    ("http://[::1]:9000/a/b/", ("::1", 9000, "/a/b")),
    ("HTTP://h/base", ("h", 80, "/base")),
])
def test_urls_are_split(url, parts):
    service = load_config_data(one_service(url=url)).services[0]
    assert (service.host, service.port, service.path) == parts


def test_protocol_field_is_http_or_https():
    found = data_issues(one_service(host="h", protocol="ftp"))
    assert found == {"services[0].protocol": ["protocol must be http or https, found 'ftp'"]}


@pytest.mark.parametrize("field, value, message", [
    ("port", 70000, "port must be 1..65535, found 70000"),
    ("port", "80", "expected an integer, found str '80'"),
    ("path", "api", "path must start with '/', found 'api'"),
    ("retries", 33, "retries must be 0..32, found 33"),
    ("server_timing", "yes", "expected true or false, found str 'yes'"),
    ("host", "bad host", "invalid host name 'bad host'"),
    ("host", "10.0.0.256", "invalid IPv4 address '10.0.0.256'"),
    ("name", "has space", "name may contain only letters, digits and . _ ~ -"),
])
def test_bad_service_fields_name_their_paths(field, value, message):
    service = {"name": "s", "host": "h", field: value}
    found = data_issues({"services": [service]})
    assert list(found) == [f"services[0].{field}"]
    assert found[f"services[0].{field}"][0].startswith(message)


def test_ipv6_service_host_is_stored_without_brackets():
    assert load_config_data(one_service(host="[::1]")).services[0].host == "::1"
    assert load_config_data(one_service(host="0:0::1")).services[0].host == "::1"


def test_duplicate_service_name():
    found = data_issues({"services": [{"name": "a", "host": "h"}, {"name": "a", "host": "h"}]})
    assert found == {"services[1].name": ["duplicate service name 'a' (first defined at services[0])"]}


def test_missing_service_name():
    assert data_issues({"services": [{"host": "h"}]}) == \
        {"services[0]": ["missing required field 'name'"]}


# --- routes -----------------------------------------------------------------------------------

def test_bad_regex_names_path(tmp_path):
    found = issues(tmp_path, """\
        services:
          - name: s
            host: h
            routes:
              - name: r
                paths: [/ok, "~/a[b"]
    """)
    assert list(found) == ["services[0].routes[0].paths[1]"]
    assert found["services[0].routes[0].paths[1]"][0].startswith(
        "invalid regex: unterminated character set at position 2")


def test_regex_is_validated_as_bytes():
    found = data_issues(one_route(name="r", paths=["~/(?u)x"]))
    message = found["services[0].routes[0].paths[0]"][0]
    assert message.startswith("invalid regex: ") and "bytes pattern" in message


@pytest.mark.parametrize("path, message", [
    ("orders", "path must start with '/' (prefix), '=/' (exact) or '~' (regex), found 'orders'"),
    ("=exact", "an exact path after '=' must start with '/', found 'exact'"),
    ("/a b", "path must not contain whitespace"),
    ("~", "regex path '~' has an empty pattern"),
    (5, "expected a string, found int 5"),
])
def test_bad_route_paths(path, message):
    found = data_issues(one_route(name="r", paths=[path]))
    assert found["services[0].routes[0].paths[0]"][0].startswith(message)


def test_paths_must_be_a_list():
    found = data_issues(one_route(name="r", paths=5))
    assert found == {"services[0].routes[0].paths": ["expected a list of strings, found int 5"]}


def test_duplicate_route_name(tmp_path):
    found = issues(tmp_path, """\
        services:
          - name: s
            host: h
            routes: [{name: a, paths: [/x]}]
        routes:
          - {name: a, service: s, paths: [/y]}
    """)
    assert found == {"routes[0].name": ["duplicate route name 'a' (first defined at services[0].routes[0])"]}


def test_route_without_criteria():
    found = data_issues(one_route(name="r", paths=[], strip_path=False))
    assert found == {"services[0].routes[0]": [
        "route has no match criteria: set at least one of hosts, paths, methods, headers"]}


def test_top_level_route_unknown_service():
    data = {"services": [{"name": "orders", "host": "h"}, {"name": "users", "host": "h"}],
            "routes": [{"name": "r", "service": "nope", "paths": ["/"]}]}
    assert data_issues(data) == {"routes[0].service": ["unknown service 'nope' (known: orders, users)"]}


def test_top_level_route_requires_service():
    found = data_issues({"routes": [{"name": "r", "paths": ["/"]}]})
    assert found == {"routes[0]": ["missing required field 'service'"]}


def test_nested_route_naming_another_service():
    found = data_issues(one_route(name="r", service="other", paths=["/"]))
    assert found["services[0].routes[0].service"][0].startswith(
        "route is nested under service 's' but names service 'other'")


@pytest.mark.parametrize("host, message", [
    ("a.com:8080", "port not allowed in route hosts, found 'a.com:8080'"),
    ("[::1]:80", "port not allowed in route hosts"),
    ("x.*.com", "a wildcard is allowed only as the leading label"),
    ("*", "a wildcard is allowed only as the leading label"),
    ("-a.com", "invalid host name '-a.com'"),
])
def test_bad_route_hosts(host, message):
    found = data_issues(one_route(name="r", hosts=["ok.com", host]))
    assert found["services[0].routes[0].hosts[1]"][0].startswith(message)


def test_route_headers_are_validated():
    found = data_issues(one_route(name="r", headers={
        "Host": "a", "x-v": 1, "bad name": "a", "x-e": [], "x-l": ["ok", 2]}))
    base = "services[0].routes[0].headers"
    assert found[f"{base}.Host"] == ["match the Host header with the route's 'hosts', not 'headers'"]
    assert found[f"{base}.x-v"] == ['expected a string or list of strings, found int 1 (quote it: "1")']
    assert found[f"{base}.bad name"][0].startswith("invalid header name 'bad name'")
    assert found[f"{base}.x-e"] == ["expected at least one header value, found an empty list"]
    assert found[f"{base}.x-l[1]"][0].startswith("expected a string or list of strings, found int 2")


def test_route_fields_reject_wrong_types():
    found = data_issues(one_route(name="r", paths=["/"], strip_path="no", priority=1.5,
                                  methods=["GE T"]))
    base = "services[0].routes[0]"
    assert found[f"{base}.strip_path"] == ["expected true or false, found str 'no'"]
    assert found[f"{base}.priority"] == ["expected an integer, found float 1.5"]
    assert found[f"{base}.methods[0]"][0].startswith("invalid method 'GE T'")


# --- structure and reporting ------------------------------------------------------------------

def test_unknown_field_names_path_and_suggestion(tmp_path):
    found = issues(tmp_path, """\
        services:
          - name: s
            host: h
            routes:
              - name: r
                pathz: [/x]
                paths: [/x]
    """)
    assert found == {"services[0].routes[0].pathz": ["unknown field 'pathz' (did you mean 'paths'?)"]}


def test_unknown_field_without_close_match_has_no_suggestion():
    assert data_issues({"gateway": {"zzz": 1}}) == {"gateway.zzz": ["unknown field 'zzz'"]}


def test_plugins_and_consumers_are_accepted_as_entities():
    config = load_config_data({"plugins": [], "consumers": []})
    assert config.plugins == () and config.consumers == ()


def test_all_errors_reported_at_once(tmp_path):
    found = issues(tmp_path, """\
        gateway:
          limits: {max_headers: 0}
        services:
          - name: a
            url: htp:/x
            retries: 99
            routes:
              - {name: r1, paths: ["~("]}
              - {name: r1}
        routes:
          - {name: r3, service: nope, paths: [/]}
    """)
    assert set(found) == {
        "gateway.limits.max_headers", "services[0].url", "services[0].retries",
        "services[0].routes[0].paths[0]", "services[0].routes[1]", "services[0].routes[1].name",
        "routes[0].service",
    }


def test_every_issue_names_the_file(tmp_path):
    path = write(tmp_path, "services: [{name: a}]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: services[0]: missing required field 'url' (or 'host')"


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "services:\n  - name: a\n    host: [h\n  - name: b\n")
    [issue] = caught.value.issues
    assert issue.source.endswith("fastmesh.yaml") and issue.path == ""
    assert issue.message.startswith("YAML syntax error at line 4, column 9: ")
    assert "flow sequence at line 3, column 11" in issue.message


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "# only a comment\n")
    assert [i.message for i in caught.value.issues] == ["config file is empty"]


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "absent.yaml"))
    [issue] = caught.value.issues
    assert issue.source.endswith("absent.yaml")
    assert issue.message == "cannot read config file: No such file or directory"


@pytest.mark.parametrize("data, found", [([1, 2], "found a list"), ("text", "found str 'text'")])
def test_top_level_must_be_a_mapping(data, found):
    [message] = data_issues(data)[""]
    assert message.startswith("expected a mapping at the top level") and message.endswith(found)


@pytest.mark.parametrize("value, ok", [("1", True), (1, True), ("2", False), ("3.0", False)])
def test_format_version(value, ok):
    data = {"_format_version": value}
    if ok:
        load_config_data(data)
    else:
        assert list(data_issues(data)) == ["_format_version"]


@pytest.mark.parametrize("listen, ok", [
    ("127.0.0.1:8000", True), ("[::]:80", True), ("localhost:0", True),
    ("localhost", False), (":80", False), ("::1:80", False), ("h:65536", False),
])
def test_listen_address(listen, ok):
    data = {"gateway": {"listen": listen}}
    if ok:
        assert load_config_data(data).gateway.listen == listen
    else:
        assert list(data_issues(data)) == ["gateway.listen"]


# --- version ----------------------------------------------------------------------------------

def test_version_hash_stable_and_changes(tmp_path):
    first = load(tmp_path, FULL)
    assert len(first.version) == 12 and int(first.version, 16) >= 0
    assert load(tmp_path, FULL, name="copy.yaml").version == first.version

    reformatted = FULL.replace("connect_timeout: 5s", "connect_timeout: 5000  # ms")
    assert load(tmp_path, reformatted, name="other.yaml").version == first.version

    changed = FULL.replace("connect_timeout: 5s", "connect_timeout: 6s")
    assert load(tmp_path, changed, name="changed.yaml").version != first.version


def test_config_is_frozen():
    config = load_config_data(one_route(name="r", paths=["/"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].priority = 1  # type: ignore[misc]
