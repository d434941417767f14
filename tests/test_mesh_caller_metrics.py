"""Inbound east-west metrics per caller service: the callee's sidecar names who called it.

Real sidecar processes over loopback ports and a real redis-server (the pods of
test_mesh_sidecar), certificates from the built-in CA (test_mesh_mtls), raw TLS and plaintext
clients for the callers outside the mesh and the forged headers. Every process is stopped at
teardown; every loop is bounded.
"""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import RawClient, get, wait_until
from fastmesh.mesh.routes import SOURCE_HEADER, caller_of, inbound_config
from fastmesh.plan import PoolRegistry, compile_plan
from test_mesh_mtls import (  # noqa: F401  (ca: the fixture)
    ca, client_context, plain_request, spiffe, tls_request,
)
from test_mesh_sidecar import ThreadedApp, answer_json, mesh  # noqa: F401  (mesh: fixture)
from test_mesh_status import admin_text, metric

UNKNOWN = "(unknown)"


class SourceApp(ThreadedApp):
    """Answers {"service", "source", "peer"}: the source and identity headers that reached it."""

    def __init__(self, service: str):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                answer_json(self, 200, {"service": service,
                                        "source": self.headers.get(SOURCE_HEADER),
                                        "peer": self.headers.get("X-Fastmesh-Peer")})

            def log_message(self, *args):
                pass

        self.serve(Handler)


def source_pod(mesh_, service: str, *extra: str):
    app = SourceApp(service)
    mesh_.apps.append(app)
    return mesh_.sidecar(service, app, "--instance-id", f"{service}1", *extra)


def inbound_requests(sidecar, source: str) -> int:
    """2xx requests the sidecar's inbound side counted from `source` (0 when none)."""
    _, _, text = admin_text(sidecar.admin, "/metrics")
    return int(metric(text, "fastmesh_mesh_requests_total", direction="inbound", source=source,
                      destination=sidecar.service, status_class="2xx") or 0)


def sees(sidecar, *services: str) -> bool:
    return set(services) <= set(sidecar.status()["destinations"])


def call(port: int, service: str, headers: dict | None = None) -> dict:
    resp = get(port, "/x", host=service, headers=headers)
    assert resp.status == 200, resp.body
    return resp.json()


def test_inbound_config_has_a_route_per_caller_and_one_for_the_rest():
    config = inbound_config("c", "127.0.0.1", 8080, authorization=[],
                            callers={"b": (), "a": (), "c": ()})
    names = [r.name for r in config.routes]
    assert names == ["c-inbound", "c~from~a", "c~from~b", "c~from~c"]
    assert {caller_of("c", n) for n in names} == {"", "a", "b", "c"}
    assert caller_of("c", "b~from~a") is None
    assert [tuple(r.hosts) for r in config.routes] == [(), ("a",), ("b",), ("c",)]
    assert all(r.preserve_host for r in config.routes)
    assert sorted(p.route for p in config.plugins if p.name == "mesh-authorization") == names
    plan = compile_plan(config, PoolRegistry())
    # The inbound Gateway hands the router the source where a Host would be.
    assert plan.router.match("b", "/x", "GET")[0].name == "c~from~b"
    assert plan.router.match("B:80", "/x", "GET")[0].name == "c~from~b"
    for outside in ("", "nosuch", "spiffe://example.org/svc/a"):
        assert plan.router.match(outside, "/x", "GET")[0].name == "c-inbound"


def test_inbound_counts_each_caller_service_and_callers_outside_the_mesh(mesh):
    c = source_pod(mesh, "c")
    a = mesh.pod("a", "a1")
    b = mesh.pod("b", "b1")
    wait_until(lambda: sees(c, "a", "b") and sees(a, "c") and sees(b, "c"), 5,
               "the sidecars never saw each other")
    for _ in range(3):
        assert call(a.outbound, "c") == {"service": "c", "source": None, "peer": None}
    call(b.outbound, "c")
    # An app cannot speak for another service through its own sidecar: its copy is replaced.
    assert call(b.outbound, "c", {SOURCE_HEADER: "a"})["source"] is None
    # Outside the mesh: no header, or a service the registry does not know.
    call(c.inbound, "c")
    call(c.inbound, "c", {SOURCE_HEADER: "nosuch"})

    assert inbound_requests(c, "a") == 3
    assert inbound_requests(c, "b") == 2
    assert inbound_requests(c, UNKNOWN) == 2
    _, _, text = admin_text(c.admin, "/metrics")
    assert metric(text, "fastmesh_mesh_request_duration_seconds_count", direction="inbound",
                  source="a", destination="c", status_class="2xx") == 3
    assert metric(text, "fastmesh_mesh_requests_total", direction="inbound", source="",
                  destination="c", status_class="2xx") is None
    # The caller's sidecar counted the same pair outbound.
    _, _, a_text = admin_text(a.admin, "/metrics")
    assert metric(a_text, "fastmesh_mesh_requests_total", direction="outbound", source="a",
                  destination="c", status_class="2xx") == 3

    _, _, stats = admin_text(c.admin, "/stats")
    pairs = {(p["direction"], p["source"], p["destination"]): p
             for p in json.loads(stats)["pairs"]}
    assert pairs[("inbound", "a", "c")]["requests"] == 3
    assert pairs[("inbound", "a", "c")]["latency"]["count"] == 3
    assert pairs[("inbound", "b", "c")]["status"] == {"2xx": 2}
    assert pairs[("inbound", UNKNOWN, "c")]["requests"] == 2


def test_a_new_caller_gets_its_own_row_and_open_connections_stay(mesh):
    c = source_pod(mesh, "c")
    version = c.status()["inbound"]["config_version"]
    with RawClient(c.inbound) as client:                # keep-alive, open across the changes
        client.send(b"GET /1 HTTP/1.1\r\nHost: c\r\n\r\n")
        assert client.read_response().status == 200
        d = mesh.pod("d", "d1")
        wait_until(lambda: c.status()["inbound"]["config_version"] != version, 5,
                   "c's inbound routes never changed for the new service")
        wait_until(lambda: sees(d, "c"), 5, "d never saw c")
        call(d.outbound, "c")
        call(d.outbound, "c")
        assert inbound_requests(c, "d") == 2
        client.send(b"GET /2 HTTP/1.1\r\nHost: c\r\n\r\n")
        assert client.read_response().status == 200
        # d goes away: its routes too, not what it was counted.
        version = c.status()["inbound"]["config_version"]
        d.stop()
        wait_until(lambda: c.status()["inbound"]["config_version"] != version, 5,
                   "c's inbound routes never dropped d")
        assert inbound_requests(c, "d") == 2
        client.send(b"GET /3 HTTP/1.1\r\nHost: c\r\n\r\n")
        assert client.read_response().status == 200
    assert inbound_requests(c, UNKNOWN) == 3


def test_with_mtls_the_verified_identity_decides_the_caller(mesh, ca, tmp_path):
    c = source_pod(mesh, "c", "--mtls", "permissive", "--tls-dir",
                   str(ca.issue("c", tmp_path / "c")))
    a_dir = ca.issue("a", tmp_path / "a")
    a = mesh.pod("a", "a1", "--mtls", "strict", "--tls-dir", str(a_dir))
    mesh.pod("b", "b1")
    wait_until(lambda: sees(c, "a", "b") and sees(a, "c"), 5, "the sidecars never saw each other")
    # Through the mesh, over mTLS: the app of c sees who called, never the source header.
    assert call(a.outbound, "c") == {"service": "c", "source": None, "peer": spiffe("a")}
    call(a.outbound, "c", {SOURCE_HEADER: "b"})
    # A TLS client with a's certificate claiming to be b: the certificate wins.
    status, answer, _ = tls_request(c.inbound, client_context(ca.root, a_dir), path="/x",
                                    headers={SOURCE_HEADER: "b"})
    assert status == 200 and answer["peer"] == spiffe("a") and answer["source"] is None
    # A verified identity that is no service of the mesh is unknown, whatever it claims.
    status, _, _ = tls_request(c.inbound, client_context(ca.root, ca.issue("zz", tmp_path / "z")),
                               path="/x", headers={SOURCE_HEADER: "b"})
    assert status == 200
    # Plaintext (permissive): the header is all there is.
    assert plain_request(c.inbound, "/x", {SOURCE_HEADER: "b"}).startswith(b"HTTP/1.1 200")

    assert inbound_requests(c, "a") == 3
    assert inbound_requests(c, "b") == 1
    assert inbound_requests(c, UNKNOWN) == 1
