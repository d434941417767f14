"""A sidecar compiles only the destinations its app calls (fastmesh.mesh.destinations): the first
call to a known service compiles it in and is routed again, transparently; an idle destination is
dropped and comes back on the next call; `--destinations all` compiles the whole view. Real
sidecars over loopback with a file registry.
"""
from __future__ import annotations

from conftest import RawClient, wait_until
from test_mesh_sidecar import call, file_mesh  # noqa: F401  (fixture)
from test_mesh_policy import register


def held(sidecar) -> list[str]:
    return sidecar.status()["held_destinations"]["held"]


def test_first_call_compiles_the_destination_and_is_answered(file_mesh):
    b = file_mesh.pod("b", "b1")
    c = file_mesh.pod("c", "c1")
    a = file_mesh.pod("a", "a1", "--destinations-idle", "2")
    register(file_mesh, b, c)
    wait_until(lambda: set(a.status()["destinations"]) == {"b", "c"}, 5, "view never loaded",
               interval=0.05)
    assert held(a) == []
    # The very first call is answered by b, not by the catch-all; a POST body survives it too.
    assert call(a.outbound, "b")[1]["service"] == "b"
    assert held(a) == ["b"]
    # A first call with a body: it reaches c's app (which serves GET only: its own 501), and the
    # connection stays usable.
    with RawClient(a.outbound) as client:
        client.send(b"POST /x HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n\r\nhello")
        assert client.read_response().status == 501
        client.send(b"GET / HTTP/1.1\r\nHost: c\r\n\r\n")
        assert client.read_response().json()["service"] == "c"
    assert held(a) == ["b", "c"]
    # Unknown services are still 503 naming them, and are not held.
    status, body = call(a.outbound, "nosuch")
    assert status == 503 and body["service"] == "nosuch"
    assert "nosuch" not in held(a)

    # b keeps being called, c does not: c is dropped after ~2 s, then comes back on demand.
    def only_b_left() -> bool:
        call(a.outbound, "b")
        return held(a) == ["b"]
    wait_until(only_b_left, 10, "the idle destination was never dropped", interval=0.2)
    assert a.status()["held_destinations"]["drops"] >= 1
    assert call(a.outbound, "c")[1]["service"] == "c"
    assert "c" in held(a)


def test_all_compiles_every_service_of_the_view(file_mesh):
    b = file_mesh.pod("b", "b1")
    c = file_mesh.pod("c", "c1")
    a = file_mesh.pod("a", "a1", "--destinations", "all")
    register(file_mesh, b, c)
    wait_until(lambda: {r[0] for r in routes(a)} >= {"b", "c"}, 5, "view never compiled",
               interval=0.05)
    assert held(a) == []            # nothing is held on demand: everything is compiled
    assert call(a.outbound, "c")[1]["service"] == "c"


def routes(sidecar) -> list:
    upstreams = sidecar.status()["outbound"]["upstreams"] or {}
    return [(name,) for name in upstreams]
