"""request-size-limiting: refuse request bodies over a size (Kong's shape and answers).

A body announced by Content-Length is judged from the header alone: 413 before a byte of it is
read or sent upstream. A chunked body has no size up front, so the plugin hands the limit to the
data path (`request.set_body_limit`), which counts the body as it streams and answers 413 when it
passes the limit (before anything is sent upstream when the excess arrives with the head;
otherwise the upstream exchange is abandoned). `require_content_length: true` answers 411 to any
request without Content-Length, bodiless ones included, as Kong does.
"""
from __future__ import annotations

from fastmesh.config.schema import Invalid, boolean, describe, integer
from fastmesh.plugins import Field, Plugin, Response

UNITS = {"megabytes": 1 << 20, "kilobytes": 1 << 10, "bytes": 1}


def unit(value) -> str:
    if value not in UNITS:
        raise Invalid(f"expected one of {', '.join(UNITS)}, found {describe(value)}")
    return value


TOO_LARGE = {"message": "Request size limit exceeded"}
LENGTH_REQUIRED = {"message": "A valid Content-Length header is required"}


class RequestSizeLimiting(Plugin):
    name = "request-size-limiting"
    priority = 951
    schema = {
        "allowed_payload_size": Field(integer(0, None, "allowed_payload_size"), 128),
        "size_unit": Field(unit, "megabytes"),
        "require_content_length": Field(boolean, False),
    }

    def __init__(self, config):
        super().__init__(config)
        self.limit = config["allowed_payload_size"] * UNITS[config["size_unit"]]

    def access(self, request):
        length = request.get_header(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:      # the data path refuses malformed framing before plugins run
                size = None
            if size is not None and size > self.limit:
                return Response(413, TOO_LARGE)
            return None
        if self.config["require_content_length"]:
            return Response(411, LENGTH_REQUIRED)
        if request.get_header(b"transfer-encoding") is not None:
            request.set_body_limit(self.limit)
        return None
