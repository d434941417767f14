"""The built-in echo upstream: answers every request with a JSON description of it.

Used by the embedded default config and by tests as a real upstream. Bodies
are streamed and counted (size and SHA-256), only the first 64 KiB are kept,
so arbitrarily large uploads use constant memory.
"""
from __future__ import annotations

import asyncio
import hashlib

from fastmesh import jsonbytes
from fastmesh._core.http1 import ChunkedDecoder, HTTPParseError, error_status, parse_request
from fastmesh.server import start_server

BODY_KEEP = 65536


class EchoProtocol(asyncio.Protocol):
    """One client connection of the echo server (keep-alive and pipelining supported)."""

    def __init__(self):
        self.transport = None
        self.buf = b""
        self.req = None
        self.remaining = 0
        self.decoder = None
        self.body_head = bytearray()
        self.body_size = 0
        self.sha = None
        self.peer = None

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else None

    def data_received(self, data):
        self.buf += data
        try:
            self._process()
        except HTTPParseError as exc:
            self._answer_error(error_status(exc.code), str(exc))

    def _process(self):
        while self.buf and self.transport is not None and not self.transport.is_closing():
            if self.req is None:
                req = parse_request(self.buf)
                if req is None:
                    return
                self.buf = self.buf[req.consumed:]
                self._start(req)
                continue
            if self.decoder is not None:
                payload, used = self.decoder.feed(self.buf)
                self.buf = self.buf[used:]
                self._body(payload)
                if self.decoder.done:
                    self._finish()
                elif used == 0:
                    return
            else:
                take = min(self.remaining, len(self.buf))
                self._body(self.buf[:take])
                self.buf = self.buf[take:]
                self.remaining -= take
                if self.remaining == 0:
                    self._finish()

    def _start(self, req):
        self.req = req
        self.body_head = bytearray()
        self.body_size = 0
        self.sha = hashlib.sha256()
        self.decoder = ChunkedDecoder() if req.body_kind == "chunked" else None
        self.remaining = req.content_length if req.body_kind == "length" else 0
        if req.expect_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if req.body_kind == "none":
            self._finish()

    def _body(self, chunk: bytes):
        if not chunk:
            return
        self.body_size += len(chunk)
        self.sha.update(chunk)
        room = BODY_KEEP - len(self.body_head)
        if room > 0:
            self.body_head += chunk[:room]

    def _finish(self):
        req = self.req
        self.req = None
        self.decoder = None
        body = bytes(self.body_head)
        try:
            body_text = body.decode()
        except UnicodeDecodeError:
            body_text = None
        description = {
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "target": req.target,
            "http_version": req.version,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers],
            "body_size": self.body_size,
            "body_sha256": self.sha.hexdigest(),
            "body": body_text,
            "remote": self.peer,
        }
        payload = jsonbytes.dumps(description)
        close = not req.keep_alive
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
        ).encode()
        self.transport.write(head + (b"" if req.method == "HEAD" else payload))
        if close:
            self.transport.close()

    def _answer_error(self, status: int, message: str):
        payload = jsonbytes.dumps({"message": message})
        self.transport.write(
            f"HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        self.transport.close()


async def start_echo(host: str, port: int) -> asyncio.AbstractServer:
    return await start_server(asyncio.get_running_loop(), EchoProtocol, host, port)
