"""`fastmesh ca serve`: the signing service sidecars get their workload certificates from.

A sidecar makes its key itself and sends only a CSR, with the bootstrap token of its service
(`fastmesh ca token`); the answer is a certificate for that service's SPIFFE id, whatever the CSR
asked for. One request per connection, JSON in and out:

| method | path | body | answer |
| --- | --- | --- | --- |
| POST | /v1/sign | {"service", "csr", "token"[, "ttl"]} | 200 {"certificate", "ca", "not_after", "identity"} |
| GET | /v1/ca | | 200 {"trust_domain", "ca"} |

A bad or foreign token answers 403, a bad body or CSR 400; a request must arrive whole within
REQUEST_TIMEOUT and within MAX_BODY bytes. Plain HTTP on loopback by default (the token is a
bearer secret: beyond loopback the service refuses to start without --tls). With --tls it
serves a certificate from the CA itself (SAN spiffe://<td>/ca plus the listen address and
--name values), renewed in the background; clients verify it with the CA's ca.pem.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import ssl
import tempfile
import time

from fastmesh import jsonbytes
from fastmesh._core.http1 import HTTPParseError, parse_request
from fastmesh.config.schema import Invalid
from fastmesh.mesh.ca import CA, CAError, LEAF_TTL, cert_expiry, spiffe_id
from fastmesh.server import bound_socket, format_url, parse_listen
from fastmesh.tls import ALPN_HTTP1, harden

log = logging.getLogger("fastmesh.ca")

MAX_HEAD = 8192
MAX_BODY = 64 * 1024                 # a CSR is ~0.5 KiB; the token 64 hex digits
REQUEST_TIMEOUT = 10.0               # the whole request (TLS handshake included) must arrive
MAX_CONNECTIONS = 256
SERVER_CERT_TTL = LEAF_TTL           # the service's own TLS certificate, renewed at half-life
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


class SigningService:
    """The request handling: (method, path, body, peer) -> (status, JSON-able answer)."""

    def __init__(self, ca: CA, ttl: float = LEAF_TTL):
        self.ca = ca
        self.ttl = ttl
        self.signed = 0
        self.refused = 0

    def handle(self, method: str, path: str, body: bytes, peer: str) -> tuple[int, dict]:
        path = path.split("?", 1)[0]
        if path == "/v1/sign":
            if method != "POST":
                return 405, {"message": "/v1/sign takes POST"}
            return self.sign(body, peer)
        if path == "/v1/ca":
            if method not in ("GET", "HEAD"):
                return 405, {"message": "/v1/ca takes GET"}
            return 200, {"trust_domain": self.ca.trust_domain, "ca": self.ca.cert_pem.decode()}
        return 404, {"message": f"no such endpoint: {path} (POST /v1/sign, GET /v1/ca)"}

    def sign(self, body: bytes, peer: str) -> tuple[int, dict]:
        try:
            request = jsonbytes.loads(body)
        except ValueError:
            return self._refuse(400, "body must be a JSON object {service, csr, token}", peer)
        if not isinstance(request, dict):
            return self._refuse(400, "body must be a JSON object {service, csr, token}", peer)
        service, csr, token = request.get("service"), request.get("csr"), request.get("token")
        for field, value in (("service", service), ("csr", csr), ("token", token)):
            if not isinstance(value, str) or not value:
                return self._refuse(400, f"'{field}' must be a non-empty string", peer)
        try:
            identity = spiffe_id(self.ca.trust_domain, service)
        except Invalid as exc:
            return self._refuse(400, f"service: {exc.message}", peer)
        if not self.ca.check_token(token, service):
            return self._refuse(403, f"the token does not grant '{service}'", peer)
        ttl = request.get("ttl", self.ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl:
            return self._refuse(400, "'ttl' must be a number of seconds >= 1", peer)
        try:
            cert = self.ca.sign_csr(csr, service, min(float(ttl), self.ttl))
        except CAError as exc:
            return self._refuse(400, f"csr: {exc}", peer)
        not_after = cert_expiry(cert)
        self.signed += 1
        log.info("signed %s for %s, valid until %s", identity, peer,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after)))
        return 200, {"certificate": cert.decode(), "ca": self.ca.cert_pem.decode(),
                     "not_after": not_after, "identity": identity}

    def _refuse(self, status: int, message: str, peer: str) -> tuple[int, dict]:
        self.refused += 1
        log.warning("refused a request from %s: %d %s", peer, status, message)
        return status, {"message": message}


class SignProtocol(asyncio.Protocol):
    """One client connection: one bounded request, one answer, then close."""

    def __init__(self, server: "SigningServer"):
        self.server = server
        self.transport = None
        self.buf = b""
        self.timer = None
        self.peer = "?"

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server.connections.add(self)
        if len(self.server.connections) > MAX_CONNECTIONS:
            self._answer(503, {"message": "too many connections"})
            return
        self.timer = asyncio.get_running_loop().call_later(
            REQUEST_TIMEOUT, self._answer, 408,
            {"message": f"the request did not arrive within {REQUEST_TIMEOUT:g}s"})

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data):
        if self.transport is None or self.transport.is_closing():
            return
        self.buf += data
        try:
            req = parse_request(self.buf, max_head_size=MAX_HEAD)
        except HTTPParseError as exc:
            self._answer(exc.status if exc.status in REASONS else 400, {"message": exc.message})
            return
        if req is None:
            if len(self.buf) > MAX_HEAD:
                self._answer(431, {"message": f"request head over {MAX_HEAD} bytes"})
            return
        if req.body_kind == "chunked":
            self._answer(411, {"message": "send the body with Content-Length"})
            return
        length = req.content_length if req.body_kind == "length" else 0
        if length > MAX_BODY:
            self._answer(413, {"message": f"body over {MAX_BODY} bytes"})
            return
        if len(self.buf) - req.consumed < length:
            return
        body = self.buf[req.consumed:req.consumed + length]
        self.buf = b""
        try:
            status, answer = self.server.service.handle(req.method, req.path, body, self.peer)
        except Exception as exc:       # never take the service down with one request
            log.exception("request from %s failed", self.peer)
            status, answer = 500, {"message": f"{type(exc).__name__}"}
        self._answer(status, answer, head_only=req.method == "HEAD")

    def _answer(self, status: int, answer: dict, head_only: bool = False):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is None or self.transport.is_closing():
            return
        payload = jsonbytes.dumps(answer) + b"\n"
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode("latin-1")
        self.transport.write(head if head_only else head + payload)
        self.transport.close()


class SigningServer:
    """The listener, its TLS context (with --tls) and the renewal of its own certificate."""

    def __init__(self, ca: CA, ttl: float, listen: str, tls: bool = False,
                 names: tuple[str, ...] = ()):
        self.ca = ca
        self.service = SigningService(ca, ttl)
        self.host, self.port = parse_listen(listen)
        self.names = self._names(names) if tls else ()
        self.ssl = self._context() if tls else None
        self.connections: set[SignProtocol] = set()
        self.server = None
        self.renewer = None

    def _names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """What the service's certificate names: the listen address (loopback for 'all
        interfaces') and the --name values."""
        found = list(names)
        try:
            address = ipaddress.ip_address(self.host)
            found.append("127.0.0.1" if address.is_unspecified and address.version == 4 else
                         "::1" if address.is_unspecified else address.compressed)
        except ValueError:
            found.append(self.host)
        return tuple(dict.fromkeys(found))

    def _context(self) -> ssl.SSLContext:
        ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.set_alpn_protocols(ALPN_HTTP1)
        self._load_server_cert(ctx)
        return ctx

    def _load_server_cert(self, ctx: ssl.SSLContext) -> float:
        """Issue the service's own certificate and load it (new handshakes use it); the key is
        on disk only for load_cert_chain, in a private temporary directory."""
        cert, key = self.ca.server_cert(list(self.names), SERVER_CERT_TTL)
        with tempfile.TemporaryDirectory(prefix="fastmesh-ca-") as tmp:
            cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            with open(cert_path, "wb") as f:
                f.write(cert)
            ctx.load_cert_chain(cert_path, key_path)
        return cert_expiry(cert)

    async def _renew(self, not_after: float):
        while True:
            await asyncio.sleep(max(1.0, (not_after - time.time()) / 2))
            try:
                not_after = self._load_server_cert(self.ssl)
                log.info("renewed the service's TLS certificate")
            except (CAError, ssl.SSLError, OSError) as exc:
                log.error("cannot renew the service's TLS certificate: %s", exc)
                not_after = time.time() + 60

    async def start(self):
        loop = asyncio.get_running_loop()
        options = {"ssl": self.ssl, "ssl_handshake_timeout": REQUEST_TIMEOUT} if self.ssl else {}
        sock = bound_socket(self.host, self.port)
        if sock is None:
            self.server = await loop.create_server(lambda: SignProtocol(self), self.host,
                                                   self.port, reuse_address=True, **options)
        else:
            try:
                self.server = await loop.create_server(lambda: SignProtocol(self), sock=sock,
                                                       **options)
            except BaseException:
                sock.close()
                raise
        if self.ssl is not None:
            self.renewer = asyncio.ensure_future(self._renew(time.time() + SERVER_CERT_TTL))

    @property
    def address(self) -> tuple[str, int]:
        return self.server.sockets[0].getsockname()[:2]

    async def stop(self):
        if self.renewer is not None:
            self.renewer.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(directory: str, listen: str, ttl: float, tls: bool, names: tuple[str, ...],
                allow_plaintext: bool) -> int:
    def say(message: str) -> None:
        print(f"fastmesh ca serve: {message}", flush=True)

    try:
        ca = CA.load(directory)
        host, _ = parse_listen(listen)
    except (CAError, ValueError) as exc:
        say(str(exc))
        return 1
    if not tls and not is_loopback(host) and not allow_plaintext:
        say(f"refusing plain HTTP on {listen}: bootstrap tokens would cross the network in "
            "clear; use --tls (or --allow-plaintext on a network you trust)")
        return 2
    server = SigningServer(ca, ttl, listen, tls, names)
    try:
        await server.start()
    except OSError as exc:
        say(f"cannot listen: {exc}")
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = format_url(*server.address)
    if tls:
        url = url.replace("http://", "https://", 1) + f" (TLS, names {', '.join(server.names)})"
    say(f"signing for spiffe://{ca.trust_domain}/svc/* on {url}, certificates valid "
        f"{ttl:g}s; pid {os.getpid()}")
    await stop.wait()
    await server.stop()
    say(f"stopped ({server.service.signed} signed, {server.service.refused} refused)")
    return 0


def run(directory: str, listen: str, ttl: float, tls: bool = False, names: tuple[str, ...] = (),
        allow_plaintext: bool = False) -> int:
    import uvloop
    logging.basicConfig(level=logging.INFO, format="fastmesh ca serve: %(message)s")
    return uvloop.run(serve(directory, listen, ttl, tls, names, allow_plaintext))
