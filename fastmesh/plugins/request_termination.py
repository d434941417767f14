"""request-termination: answer every request of its scope at the gateway (Kong's shape)."""
from __future__ import annotations

from fastmesh.config.schema import integer, string
from fastmesh.plugins import Field, Plugin, Response


class RequestTermination(Plugin):
    name = "request-termination"
    priority = 2
    schema = {
        "status_code": Field(integer(100, 599, "status_code"), 503),
        "message": Field(string, None),
    }

    def access(self, request):
        message = self.config["message"]
        return Response(self.config["status_code"],
                        {"message": message if message is not None else "Service unavailable"})
