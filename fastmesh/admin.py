"""The admin API: a small JSON-over-HTTP/1.1 server on its own listener.

Parsing uses fastmesh's own HTTP/1.1 parser (`fastmesh._core.http1`) in a plain asyncio protocol;
no web framework. Bodies and answers are JSON (fastmesh.jsonbytes), except `GET /metrics`
(Prometheus text).
Requests on one connection are answered in order (keep-alive and pipelining work).

| method | path | what |
| --- | --- | --- |
| GET | /status | version, uptime, workers, config version, connections, requests |
| GET | /config | the active declarative config |
| POST, PUT | /config | replace the whole config (validated, applied atomically) |
| POST | /reload | re-read the config file (as SIGHUP and `fastmesh reload`) |
| GET | /services, /routes, /upstreams | list |
| GET, PUT, PATCH, DELETE | /services/{name}, /routes/{name}, /upstreams/{name} | one entity |
| GET | /upstreams/{name}/health | targets' health and balancer state, merged over workers |
| GET | /metrics | Prometheus text format |
"""
from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote

from fastmesh._core.http1 import ChunkedDecoder, HTTPParseError, parse_request
from fastmesh.config import ConfigIssue
from fastmesh.entities import (
    EntityError, delete_entity, get_entity, list_entities, patch_entity, put_entity,
)
from fastmesh.jsonbytes import dumps_lenient, loads
from fastmesh.metrics import merge_upstream_health, upstream_summaries
from fastmesh.osutil import compare_digest
from fastmesh.server import parse_listen, start_server

MAX_BODY = 16 * 1024 * 1024
REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Payload Too Large", 415: "Unsupported Media Type",
           500: "Internal Server Error", 503: "Service Unavailable"}
ENTITY_PATH = re.compile(r"^/(services|routes|upstreams)(?:/([^/]+))?/?$")
HEALTH_PATH = re.compile(r"^/upstreams/([^/]+)/health/?$")
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class Answer:
    def __init__(self, status: int, body: object = None, content_type: str = JSON,
                 headers: tuple = ()):
        self.status = status
        self.content_type = content_type
        self.headers = headers
        if isinstance(body, (bytes, str)):
            self.payload = body.encode() if isinstance(body, str) else body
        elif body is None and status == 204:
            self.payload = b""
        else:
            self.payload = dumps_lenient(body) + b"\n"


def error(status: int, message: str, **extra) -> Answer:
    headers = (("Allow", extra.pop("allow")),) if "allow" in extra else ()
    return Answer(status, {"message": message, **extra}, headers=headers)


def issues_answer(issues: list, what: str = "invalid config") -> Answer:
    """400 with every problem, as `fastmesh check` prints them (plus path and message apart)."""
    errors = []
    for issue in issues:
        if isinstance(issue, ConfigIssue):
            errors.append({"path": issue.path, "message": issue.message, "text": str(issue)})
        else:
            errors.append({"path": "", "message": str(issue), "text": str(issue)})
    return error(400, f"{what}: {len(errors)} problem(s) found", errors=errors)


class AdminAPI:
    """Request handling, given a Supervisor (fastmesh.supervisor)."""

    def __init__(self, supervisor):
        self.sup = supervisor

    def authorized(self, headers: list) -> bool:
        token = self.sup.config.gateway.admin.token
        if not token:
            return True
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, given = value.decode("latin-1").strip().partition(" ")
                if scheme.lower() == "bearer" and compare_digest(
                        given.strip().encode(), token.encode()):
                    return True
        return False

    async def handle(self, method: str, path: str, headers: list, body: bytes) -> Answer:
        if not self.authorized(headers):
            return Answer(401, {"message": "missing or wrong admin token: send "
                                           "'Authorization: Bearer <token>'"},
                          headers=(("WWW-Authenticate", 'Bearer realm="fastmesh admin"'),))
        try:
            return await self.dispatch(method, path, body)
        except EntityError as exc:
            return error(exc.status, exc.message)

    async def dispatch(self, method: str, path: str, body: bytes) -> Answer:
        if path == "/status":
            return self.only(method, "GET") or Answer(200, await self.sup.status())
        if path == "/metrics":
            return self.only(method, "GET") or Answer(
                200, await self.sup.metrics_text(), content_type=PROMETHEUS)
        if path == "/config":
            if method in ("GET", "HEAD"):
                return Answer(200, self.sup.current_document())
            if method in ("POST", "PUT"):
                document = self.json_body(body)
                if isinstance(document, Answer):
                    return document
                return await self.apply(document, created=False)
            return error(405, f"{method} is not allowed on /config", allow="GET, POST, PUT")
        if path == "/reload":
            if method != "POST":
                return error(405, "use POST /reload", allow="POST")
            problems = await self.sup.reload_from_file()
            if problems:
                return issues_answer(problems, "reload refused")
            return Answer(200, self.applied())
        match = HEALTH_PATH.match(path)
        if match:
            return self.only(method, "GET") or await self.upstream_health(unquote(match.group(1)))
        match = ENTITY_PATH.match(path)
        if match:
            return await self.entity(method, match.group(1),
                                     unquote(match.group(2)) if match.group(2) else None, body)
        return error(404, f"no such admin endpoint: {path}")

    @staticmethod
    def only(method: str, allowed: str) -> Answer | None:
        if method == allowed or (allowed == "GET" and method == "HEAD"):
            return None
        return error(405, f"{method} is not allowed here", allow=allowed)

    @staticmethod
    def json_body(body: bytes) -> object:
        if not body.strip():
            return error(400, "expected a JSON body")
        try:
            return loads(body)
        except ValueError as exc:
            return error(400, f"invalid JSON: {exc}")

    def applied(self) -> dict:
        return {"config_version": self.sup.config.version,
                "workers": sum(1 for h in self.sup.handles if h.alive)}

    async def apply(self, document: object, created: bool, entity: object = None) -> Answer:
        problems = await self.sup.apply_document(document)
        if problems:
            return issues_answer(problems)
        answer = self.applied()
        if entity is not None:
            answer["entity"] = entity
        return Answer(201 if created else 200, answer)

    async def upstream_health(self, name: str) -> Answer:
        """Health and balancer state of one upstream of the active config (see metrics.py)."""
        upstream = next((u for u in self.sup.config.upstreams if u.name == name), None)
        if upstream is None:
            return error(404, f"no upstream named '{name}'")
        return Answer(200, merge_upstream_health(await self.sup.snapshots(full=True), upstream))

    async def entity(self, method: str, kind: str, name: str | None, body: bytes) -> Answer:
        document = self.sup.current_document()
        if name is None:
            if method in ("GET", "HEAD"):
                answer = {"data": list_entities(document, kind)}
                if kind == "upstreams":
                    # `data` stays the declared entities (what PUT takes back); `health` is the
                    # running view: effective algorithm and target counts per upstream.
                    answer["health"] = upstream_summaries(await self.sup.snapshots(full=True),
                                                          self.sup.config.upstreams)
                return Answer(200, answer)
            return error(405, f"use /{kind}/{{name}} to change one entity", allow="GET")
        if method in ("GET", "HEAD"):
            return Answer(200, get_entity(document, kind, name))
        if method == "DELETE":
            return await self.apply(delete_entity(document, kind, name), created=False)
        if method in ("PUT", "PATCH"):
            parsed = self.json_body(body)
            if isinstance(parsed, Answer):
                return parsed
            if method == "PUT":
                new, created = put_entity(document, kind, name, parsed)
            else:
                new, created = patch_entity(document, kind, name, parsed), False
            return await self.apply(new, created, get_entity(new, kind, name))
        return error(405, f"{method} is not allowed on /{kind}/{{name}}",
                     allow="GET, PUT, PATCH, DELETE")


class AdminProtocol(asyncio.Protocol):
    """One admin client connection."""

    def __init__(self, api: AdminAPI):
        self.api = api
        self.transport = None
        self.buf = b""
        self.busy = False
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        self.transport = None

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self):
        if self.closed or not self.buf:
            return
        try:
            req = parse_request(self.buf)
        except HTTPParseError as exc:
            self._write(error(exc.status, exc.message), close=True)
            return
        if req is None:
            if len(self.buf) > 65536:
                self._write(error(431, "request head too large"), close=True)
            return
        body = b""
        rest = self.buf[req.consumed:]
        if req.body_kind == "length":
            if req.content_length > MAX_BODY:
                self._write(error(413, f"body over {MAX_BODY} bytes"), close=True)
                return
            if len(rest) < req.content_length:
                if req.expect_continue and not getattr(self, "continued", False):
                    self.continued = True
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            body, rest = rest[:req.content_length], rest[req.content_length:]
        elif req.body_kind == "chunked":
            decoder = ChunkedDecoder()
            parts = []
            used_total = 0
            while not decoder.done:
                payload, used = decoder.feed(rest[used_total:])
                if payload:
                    parts.append(payload)
                used_total += used
                if used == 0:
                    break
            if sum(map(len, parts)) > MAX_BODY:
                self._write(error(413, f"body over {MAX_BODY} bytes"), close=True)
                return
            if not decoder.done:
                return          # wait for more: the body is decoded again when it is whole
            body, rest = b"".join(parts), rest[used_total:]
        self.buf = rest
        self.continued = False
        self.busy = True
        asyncio.ensure_future(self._answer(req, body))

    async def _answer(self, req, body: bytes):
        try:
            answer = await self.api.handle(req.method, req.path, req.headers, body)
        except Exception as exc:       # never take the admin listener down with one request
            answer = error(500, f"{type(exc).__name__}: {exc}")
        self.busy = False
        self._write(answer, close=not req.keep_alive, head_only=req.method == "HEAD")
        if not self.closed:
            self._next()

    def _write(self, answer: Answer, close: bool, head_only: bool = False):
        if self.transport is None:
            return
        reason = REASONS.get(answer.status, "Unknown")
        lines = [f"HTTP/1.1 {answer.status} {reason}"]
        if answer.status != 204:
            lines.append(f"Content-Type: {answer.content_type}")
            lines.append(f"Content-Length: {len(answer.payload)}")
        lines.extend(f"{k}: {v}" for k, v in answer.headers)
        lines.append("Cache-Control: no-store")
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.transport.write(head if head_only else head + answer.payload)
        if close:
            self.closed = True
            self.transport.close()


async def start_admin(supervisor, listen: str) -> asyncio.AbstractServer:
    host, port = parse_listen(listen)
    api = AdminAPI(supervisor)
    return await start_server(asyncio.get_running_loop(), lambda: AdminProtocol(api), host, port)
