"""Python plugins loaded by tests/test_plugins.py with `module: tests.plugins_example`."""
import os

from fastmesh.config.schema import string
from fastmesh.plugins import REROUTE, Field, Plugin, Response


class Stamp(Plugin):
    """Adds a header upstream and one to the response; logs each request to a file."""
    name = "stamp"
    priority = 10
    schema = {"value": Field(string, "stamped"), "log_file": Field(string, None)}

    def access(self, request):
        request.add_header("X-Stamp", self.config["value"])
        if request.get_header("x-deny") is not None:
            return Response(403, {"message": "denied by stamp"})

    def response(self, request, response):
        response.add_header("X-Stamped", self.config["value"])

    def log(self, request, response, timings):
        if self.config["log_file"]:
            with open(self.config["log_file"], "a") as f:
                f.write(f"{os.getpid()} {request.route} {response.status} {request.consumer}\n")


class Boom(Plugin):
    """Raises in access when the request asks for it."""
    name = "boom"
    priority = 5

    def access(self, request):
        if request.get_header("x-boom") is not None:
            raise RuntimeError("boom as asked")


class Later(Plugin):
    """An access phase that waits (as a Redis or auth-server round trip would) before deciding.

    `X-Wait: seconds` sets the wait; `X-Deny` answers 403 after it; `X-Boom` raises after it.
    """
    name = "later"
    priority = 20

    async def _decide(self, request, delay):
        import asyncio
        await asyncio.sleep(delay)
        if request.get_header("x-boom") is not None:
            raise RuntimeError("boom after waiting")
        if request.get_header("x-deny") is not None:
            return Response(403, {"message": "denied later"})
        request.add_header("X-Later", "waited")
        return None

    def access(self, request):
        wait = request.get_header("x-wait")
        if wait is None:
            return None
        return self._decide(request, float(wait))


class Rewriter(Plugin):
    """A rewrite phase: /old/... is routed as /new/...; `X-Teapot` is answered before routing."""
    name = "rewriter"
    priority = 3000

    def rewrite(self, request):
        if request.get_header("x-teapot") is not None:
            return Response(418, {"message": "short and stout"})
        if request.path.startswith(b"/old/"):
            request.set_path(b"/new/" + request.path[5:])
            request.set_header("X-Rewritten", "1")

    def access(self, request):
        request.set_header("X-Seen-Path", request.path)


class BodyCheck(Plugin):
    """Reads request bodies (opt-in): refuses ones that contain b"forbidden"."""
    name = "body-check"
    priority = 30
    read_body = True
    max_body_bytes = 1000

    def access(self, request):
        if request.body is None:
            return None
        if b"forbidden" in request.body:
            return Response(403, {"message": "forbidden body"})
        request.set_header("X-Body-Len", str(len(request.body)))


class Again(Plugin):
    """Asks for the request to be routed again, every time (at once, or after `X-Wait`): under
    an unchanged Plan the request comes back here, and the second ask is refused (508)."""
    name = "again"

    async def _later(self, delay):
        import asyncio
        await asyncio.sleep(delay)
        return REROUTE

    def access(self, request):
        wait = request.get_header("x-wait")
        return REROUTE if wait is None else self._later(float(wait))

