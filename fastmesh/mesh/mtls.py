"""Sidecar-to-sidecar mutual TLS: the inbound listener's own accept path, the server context,
the caller's verified identity, and what the outbound side needs to present and check.

Inbound (modes `strict`, `permissive`, `disabled`): the listening socket is non-blocking and
watched with `loop.add_reader`; each accepted connection is looked at before any protocol sees
it. Its first byte is peeked (`MSG_PEEK`, nothing consumed) once readable, at most
DETECT_TIMEOUT (permissive with interception: the sidecar's --detect-timeout): 0x16 (a TLS
handshake record, the ClientHello) means TLS; anything else is plaintext, refused in strict
mode and served as before in permissive mode (one that stays silent through the peek goes
to the silent factory: with interception, a Detector that decides at once instead of waiting
the detect timeout a second time). In permissive mode, a connection dialled to one of the
sidecar's --opaque-ports is plaintext without a peek (callers relay it as it is: a server-first
protocol never waits); in strict mode callers wrap it in mTLS (fastmesh.mesh.opaque_mtls),
and the TLS factory of an intercepting sidecar tells it from HTTP by ALPN. TLS connections are
handed to the Gateway through fastmesh._core.tls_transport (`accept`), which returns once the
handshake is done, so a failed one is seen here: the connection is closed and counted under
one reason of a fixed set (REASONS). The server context requires a client certificate that
chains to the mesh root; the verified SPIFFE id of the caller goes to the app in
X-Fastmesh-Peer (the Gateway drops any copy a client sends, TLS or not).

Rotation: when the CertificateSource has a new certificate, `load_cert_chain` is called on the
SAME server context (new handshakes present the new certificate, open connections keep theirs),
and fastmesh.upstream_tls.refresh() does the same for the outbound client contexts.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from typing import Callable

from fastmesh.tls import ALPN_HTTP1, HANDSHAKE_FAILURES, classify, harden

log = logging.getLogger("fastmesh")

MODES = ("strict", "permissive", "disabled")
PEER_HEADER = "X-Fastmesh-Peer"
DETECT_TIMEOUT = 2.0                # first byte of a new inbound connection, at most this long
HANDSHAKE_TIMEOUT = 5.0
ACCEPT_BATCH = 64                   # connections accepted per readiness event, at most
TLS_HANDSHAKE = 0x16                # first byte of a TLS record carrying a handshake (ClientHello)
REASONS = HANDSHAKE_FAILURES


def server_context(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    """The inbound side: TLS 1.2+ (fastmesh.tls), a client certificate from the mesh root."""
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    # http/1.1 for the mesh's HTTP; the relays of opaque TCP offer theirs (fastmesh.mesh.opaque_mtls)
    from fastmesh.mesh.opaque_mtls import OPAQUE_ALPN
    ctx.set_alpn_protocols(ALPN_HTTP1 + [OPAQUE_ALPN])
    return ctx


def peer_id(peercert: dict | None) -> str | None:
    """The first spiffe:// URI SAN of a verified peer certificate (ssl's getpeercert() dict)."""
    from fastmesh.mesh.registry import peer_identity     # not .ca: no `cryptography` here
    return peer_identity(peercert) if peercert else None


def identify(transport) -> bytes | None:
    """The Gateway's identity hook: the caller's SPIFFE id (once per TLS connection)."""
    found = peer_id(transport.get_extra_info("peercert"))
    return found.encode() if found else None


class Handshakes:
    """Inbound connection outcomes: TLS accepted, plaintext accepted, refused by reason."""

    def __init__(self):
        self.tls = 0
        self.plaintext = 0
        self.refused = dict.fromkeys(REASONS, 0)

    def as_dict(self) -> dict:
        return {"tls": self.tls, "plaintext": self.plaintext, "refused": dict(self.refused)}


class MtlsListener:
    """Accepts on `sock` and hands each connection to the Gateway over TLS (or plaintext in
    permissive mode). Looks like an asyncio Server where the Worker needs one (`close`,
    `sockets`)."""

    def __init__(self, loop, sock: socket.socket, mode: str, ctx: ssl.SSLContext,
                 tls_factory: Callable, plain_factory: Callable, counts: Handshakes,
                 opaque: Callable | None = None, detect_timeout: float = DETECT_TIMEOUT,
                 silent_factory: Callable | None = None):
        self.loop = loop
        self.sock = sock
        self.sockets = [sock]
        self.mode = mode
        self.ctx = ctx
        self.tls_factory = tls_factory
        self.plain_factory = plain_factory
        self.counts = counts
        self.opaque = opaque
        self.detect_timeout = detect_timeout
        # A permissive connection that stayed silent through the peek: plaintext already known
        # to be server-first, so whatever follows must not wait the detect timeout again.
        self.silent_factory = silent_factory or plain_factory
        self.tasks: set = set()
        self.closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # EMFILE and friends: try again on the next event
                log.warning("mesh inbound: accept failed: %s", exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._serve(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _first_byte(self, conn: socket.socket) -> bytes:
        """The first byte the client sent, not consumed; b"" at EOF; TimeoutError if none."""
        ready = self.loop.create_future()
        fd = conn.fileno()
        self.loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            # Strict: how long a TLS client may stay silent; permissive: also how long a
            # plaintext one may (a server-first protocol) before it is served as plaintext.
            await asyncio.wait_for(ready, self.detect_timeout if self.mode == "permissive"
                                   else DETECT_TIMEOUT)
        finally:
            self.loop.remove_reader(fd)
        return conn.recv(1, socket.MSG_PEEK)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            if self.mode == "permissive" and self.opaque is not None and self.opaque(conn):
                # Declared opaque TCP (--opaque-ports): callers relay it in plaintext to a
                # permissive sidecar, so no peek (strict: they use mTLS, peeked as any other).
                await self._plaintext(conn, self.plain_factory)
                return
            try:
                first = await self._first_byte(conn)
            except (asyncio.TimeoutError, TimeoutError):
                # Silent: a server-first protocol, or a client that waits (the Gateway's
                # timeouts apply); refused in strict mode.
                await self._plaintext(conn, self.silent_factory, "timeout")
                return
            except OSError:
                conn.close()
                return
            if first == b"":
                conn.close()
                return
            if first[0] != TLS_HANDSHAKE:
                await self._plaintext(conn, self.plain_factory)
                return
            from fastmesh._core.tls_transport import accept as tls_accept
            try:
                await tls_accept(self.loop, self.tls_factory(), conn, self.ctx,
                                 HANDSHAKE_TIMEOUT)
            except (ssl.SSLError, OSError, asyncio.TimeoutError, TimeoutError) as exc:
                self._refuse(conn, classify(exc), exc)
                return
            self.counts.tls += 1
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError:
            conn.close()

    async def _plaintext(self, conn: socket.socket, factory: Callable,
                         strict_reason: str = "plaintext") -> None:
        """Serve `conn` without TLS (permissive), or refuse it under `strict_reason` (strict)."""
        if self.mode == "strict":
            self._refuse(conn, strict_reason)
            return
        await self.loop.connect_accepted_socket(factory, conn)
        self.counts.plaintext += 1

    def _refuse(self, conn: socket.socket, reason: str, exc: BaseException | None = None) -> None:
        """Count and close. After a failed handshake the loop owns the socket (it holds an I/O
        reference, so this close only marks it) and closes it itself."""
        self.counts.refused[reason] += 1
        log.debug("mesh inbound: refused a connection (%s): %s", reason, exc)
        try:
            conn.close()
        except OSError:
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in list(self.tasks):
            task.cancel()


class MeshTLS:
    """A sidecar's mTLS: its mode, its certificate (a fastmesh.mesh.workload_cert
    CertificateSource), the inbound server context and counters, the outbound TLS settings."""

    def __init__(self, mode: str, source, private_dir: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mtls mode must be one of {', '.join(MODES)}, found {mode!r}")
        self.mode = mode
        self.source = source
        self.private_dir = private_dir      # made for the CSR mode's files: removed at stop
        self.ctx: ssl.SSLContext | None = None
        self.counts = Handshakes()
        self.rotations = 0
        self.last_error: str | None = None

    @classmethod
    def from_options(cls, mode: str, service: str, tls_dir: str | None, ca_url: str | None,
                     ca_token: str | None) -> "MeshTLS | None":
        """None when mTLS is off; ValueError when the flags do not make sense together."""
        if mode == "disabled":
            return None
        from fastmesh.mesh.workload_cert import CertificateSource
        if ca_url:
            if not ca_token:
                raise ValueError("--ca-url needs --ca-token (the bootstrap token of this service: "
                                 "fastmesh ca token --service NAME)")
            private = None
            if tls_dir is None:
                import tempfile      # (shutil, lzma, bz2: not in an idle sidecar without it)
                private = tls_dir = tempfile.mkdtemp(prefix="fastmesh-mtls-")
            os.makedirs(tls_dir, mode=0o700, exist_ok=True)
            return cls(mode, CertificateSource.from_ca_server(ca_url, ca_token, service, tls_dir),
                       private)
        if tls_dir:
            return cls(mode, CertificateSource.from_dir(tls_dir, service))
        raise ValueError(f"--mtls {mode} needs a certificate: --tls-dir DIR (files of "
                         "'fastmesh ca issue') or --ca-url URL --ca-token TOKEN")

    @property
    def identity(self) -> str | None:
        return self.source.identity

    async def start(self) -> None:
        await self.source.start(self._changed)
        self.ctx = server_context(self.source.cert_file, self.source.key_file,
                                  self.source.ca_file)

    def _changed(self) -> None:
        """A new certificate on disk: new handshakes use it on both sides."""
        if self.ctx is None:
            return                          # the first one: start() builds the context
        try:
            self.ctx.load_verify_locations(cafile=self.source.ca_file)
            self.ctx.load_cert_chain(self.source.cert_file, self.source.key_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.last_error = f"cannot load the new certificate: {exc}"
            log.error("mesh mTLS: %s (the previous one stays in use)", self.last_error)
            return
        try:
            from fastmesh import upstream_tls
            upstream_tls.refresh()
        except Exception as exc:            # the inbound side rotated; say what did not
            self.last_error = f"outbound contexts not refreshed: {type(exc).__name__}: {exc}"
            log.error("mesh mTLS: %s", self.last_error)
        else:
            self.last_error = None
        self.rotations += 1
        log.warning("mesh mTLS: certificate rotated (%s, not after %s)", self.identity,
                    self.source.status().get("not_after"))

    def listen(self, loop, server, tls_factory: Callable, plain_factory: Callable,
               opaque: Callable | None = None, detect_timeout: float = DETECT_TIMEOUT,
               silent_factory: Callable | None = None) -> MtlsListener:
        """Take over the listening socket of `server` (an asyncio Server from start_server):
        its socket is duplicated before the server is closed, so the port is never released.
        `opaque(sock)`: whether a connection is declared opaque TCP (no first-byte peek);
        `silent_factory`: the protocol for a permissive connection that sent nothing within
        the detect timeout (default `plain_factory`)."""
        listening = server.sockets[0]
        sock = socket.socket(listening.family, socket.SOCK_STREAM, fileno=os.dup(listening.fileno()))
        server.close()
        return MtlsListener(loop, sock, self.mode, self.ctx, tls_factory, plain_factory,
                            self.counts, opaque, detect_timeout, silent_factory)

    def outbound(self) -> dict:
        """What the outbound config's TLS services present and trust (file paths)."""
        src = self.source
        return {"tls_ca": src.ca_file, "tls_client_cert": src.cert_file,
                "tls_client_key": src.key_file}

    def status(self) -> dict:
        cert = dict(self.source.status())
        return {"mode": self.mode, "identity": self.identity, "certificate": cert,
                "rotations": self.rotations, "last_error": self.last_error,
                "handshakes": self.counts.as_dict()}

    async def stop(self) -> None:
        try:
            await self.source.stop()
        finally:
            if self.private_dir is not None:
                import shutil
                shutil.rmtree(self.private_dir, ignore_errors=True)
