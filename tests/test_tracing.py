"""W3C trace context: traceparent continued with the gateway's span, started when absent."""
from __future__ import annotations

import re

import pytest

from conftest import config, get, service
from fastmesh.config import ConfigError, load_config_data

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


def upstream_values(resp, name: str) -> list[str]:
    assert resp.status == 200, resp.body
    return [v for k, v in resp.json()["headers"] if k.lower() == name]


def traced_gateway(echo, gateway, tracing):
    return gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}]), tracing=tracing))


def test_without_tracing_the_header_passes_untouched(echo, gateway):
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}])))
    sent = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    assert upstream_values(get(gw.port, "/", headers={"traceparent": sent}), "traceparent") == [sent]
    assert upstream_values(get(gw.port, "/"), "traceparent") == []


def test_a_trace_starts_when_absent_with_unique_ids(echo, gateway):
    gw = traced_gateway(echo, gateway, True)
    seen = set()
    for _ in range(20):
        [value] = upstream_values(get(gw.port, "/"), "traceparent")
        trace, parent, flags = TRACEPARENT.match(value).groups()
        assert flags == "01" and trace != "0" * 32 and parent != "0" * 16
        seen.add(trace)
    assert len(seen) == 20


def test_sample_rate_zero_starts_unsampled_traces(echo, gateway):
    gw = traced_gateway(echo, gateway, {"sample_rate": 0})
    for _ in range(5):
        [value] = upstream_values(get(gw.port, "/"), "traceparent")
        assert TRACEPARENT.match(value).group(3) == "00"


def test_a_valid_traceparent_is_continued_with_the_gateway_span(echo, gateway):
    gw = traced_gateway(echo, gateway, {"enabled": True, "sample_rate": 0})
    for flags in ("01", "00"):
        resp = get(gw.port, "/", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-{flags}",
                                          "tracestate": "vendor=abc"})
        [value] = upstream_values(resp, "traceparent")
        trace, parent, got_flags = TRACEPARENT.match(value).groups()
        assert trace == CLIENT_TRACE and parent != CLIENT_PARENT and got_flags == flags
        assert upstream_values(resp, "tracestate") == ["vendor=abc"]


@pytest.mark.parametrize("bad", [
    f"00-{CLIENT_TRACE.upper()}-{CLIENT_PARENT}-01",       # upper-case hex
    f"00-{'0' * 32}-{CLIENT_PARENT}-01",                    # all-zero trace id
    f"00-{CLIENT_TRACE}-{'0' * 16}-01",                     # all-zero parent id
    f"ff-{CLIENT_TRACE}-{CLIENT_PARENT}-01",                # forbidden version
    f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01-extra",          # version 00 has no more fields
    f"00-{CLIENT_TRACE[:-1]}-{CLIENT_PARENT}-01",           # short trace id
    "garbage",
])
def test_an_invalid_traceparent_restarts_the_trace_and_drops_tracestate(echo, gateway, bad):
    gw = traced_gateway(echo, gateway, True)
    resp = get(gw.port, "/", headers={"traceparent": bad, "tracestate": "vendor=abc"})
    [value] = upstream_values(resp, "traceparent")
    assert TRACEPARENT.match(value).group(1) != CLIENT_TRACE
    assert upstream_values(resp, "tracestate") == []


def test_a_future_version_with_more_fields_is_continued(echo, gateway):
    gw = traced_gateway(echo, gateway, True)
    resp = get(gw.port, "/", headers={"traceparent": f"01-{CLIENT_TRACE}-{CLIENT_PARENT}-01-what-ever"})
    [value] = upstream_values(resp, "traceparent")
    assert TRACEPARENT.match(value).group(1) == CLIENT_TRACE


def test_tracing_config_errors_have_paths():
    with pytest.raises(ConfigError) as info:
        load_config_data({"gateway": {"tracing": {"sample_rate": 2, "enable": True}}, "services": []})
    found = {i.path: i.message for i in info.value.issues}
    assert "from 0 to 1" in found["gateway.tracing.sample_rate"]
    assert "unknown field" in found["gateway.tracing.enable"]
