"""mesh-unknown-service: the outbound catch-all's answer, 503 naming the service that was asked for.

Only the sidecar's generated outbound config uses it (fastmesh.mesh.routes): a request for a
service that the registry does not know (or that has no instance left) is answered at once,
never held waiting for one to appear.
"""
from __future__ import annotations

from fastmesh.plugins import Plugin, Response


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
        service = requested_service(request.get_header("host"))
        if service is None:
            return Response(503, {"message": "no service named: send 'Host: <service>' or an "
                                             "absolute-form request 'GET http://<service>/...'"})
        return Response(503, {"message": f"unknown service '{service}': no instance of it in "
                                         f"the registry", "service": service})
