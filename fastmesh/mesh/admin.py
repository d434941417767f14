"""The sidecar's admin API (read-only, loopback): readiness, status, the registry view.

Served by fastmesh.admin's connection handling (`AdminProtocol`) with this request handler.

| method | path | what |
| --- | --- | --- |
| GET | /ready | 200 when both listeners are up and the registry view was loaded, else 503 |
| GET | /status | the instance, both listeners (requests, statuses, upstream health), registry |
| GET | /registry | the registry view: every service and its instances |
"""
from __future__ import annotations

from fastmesh.admin import Answer, error


class SidecarAdmin:
    def __init__(self, sidecar):
        self.sidecar = sidecar

    async def handle(self, method: str, path: str, headers: list, body: bytes) -> Answer:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        routes = {"/ready": self.ready, "/status": self.status, "/registry": self.registry}
        handler = routes.get(path)
        if handler is None:
            return error(404, f"no such endpoint: {path} (try {', '.join(routes)})")
        if method not in ("GET", "HEAD"):
            return error(405, f"{path} supports GET only", allow="GET, HEAD")
        return handler()

    def ready(self) -> Answer:
        sidecar = self.sidecar
        if sidecar.ready:
            return Answer(200, {"ready": True})
        if sidecar.stopping:
            why = "stopping"
        elif sidecar.registry is None or not sidecar.registry.ready:
            why = "registry view not loaded yet"
        else:
            why = "starting"
        return Answer(503, {"ready": False, "message": why})

    def status(self) -> Answer:
        return Answer(200, self.sidecar.status())

    def registry(self) -> Answer:
        registry = self.sidecar.registry
        return Answer(200, registry.state() if registry is not None else {})
