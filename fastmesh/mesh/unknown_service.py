"""mesh-unknown-service: the outbound catch-all. A service the registry knows but the Plan does
not hold yet (fastmesh.mesh.destinations) is compiled in and the request routed again; any
other is answered 503 naming the service that was asked for.

Only the sidecar's generated outbound config uses it (fastmesh.mesh.routes), and the sidecar
binds itself with `serve` at start. A request for a service that the registry does not know
(or that has no instance left) is answered at once, never held waiting for one to appear.
"""
from __future__ import annotations

from fastmesh._core.plugin import REROUTE
from fastmesh.plugins import Plugin, Response

_sidecar = None         # the process's fastmesh.mesh.sidecar.Sidecar (one per process)


def serve(sidecar) -> None:
    """Let the catch-all ask `sidecar` for destinations it does not hold yet."""
    global _sidecar
    _sidecar = sidecar


def requested_service(host: bytes | None) -> str | None:
    """The service part of a Host value: lower-cased, without the port and trailing dots."""
    if not host:
        return None
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        text = text[:text.find("]") + 1] if "]" in text else text
    else:
        text = text.partition(":")[0]
    return text.rstrip(".") or None


class UnknownService(Plugin):
    name = "mesh-unknown-service"
    priority = 1
    schema = {}

    def access(self, request):
        service = requested_service(request.get_header("host") or request.default_host)
        if service is None:
            return Response(503, {"message": "no service named: send 'Host: <service>' or an "
                                             "absolute-form request 'GET http://<service>/...'"})
        sidecar = _sidecar
        if sidecar is not None:
            destination = sidecar.destination_for(service)
            if destination is not None and sidecar.activate(destination):
                return REROUTE          # the new Plan routes it: the data path routes it again
        return Response(503, {"message": f"unknown service '{service}': no instance of it in "
                                         f"the registry", "service": service})
