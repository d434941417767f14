"""The TLS policy every fastmesh context shares (edge listeners, HTTPS upstreams, mesh mTLS).

One place decides the protocol floor and the ciphers, so the edge, the upstream side and the
mesh cannot drift apart: TLS 1.2 and 1.3 only, forward-secret AEAD ciphers for TLS 1.2 (TLS
1.3's suites are all AEAD and OpenSSL's defaults are kept), no compression, no renegotiation.
The TLS itself is the standard library's ssl module (OpenSSL); the data path's connections (edge
listeners, HTTPS upstreams, mesh mTLS) run it through fastmesh._core.tls_transport.

Edge termination lives here too: `CertificateStore` (one config's certificates, a server name
picks one) and `EdgeTLS` (a worker's TLS listeners: base contexts whose SNI callback switches to
the chosen certificate, and the store a reload swaps). docs/tls.md is the user's side of it.
"""
from __future__ import annotations

import ssl

# ECDHE only (forward secrecy), AEAD only (GCM, ChaCha20-Poly1305); ECDSA and RSA certificates.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
ALPN_HTTP1 = ["http/1.1"]
RECORD_MAX = 16384                  # the most plaintext one TLS record carries (RFC 8446 5.1)


class SSLObject(ssl.SSLObject):
    """The per-connection TLS object, made cheaper where uvloop's own SSL transport drives it
    (health checks, the CA client; the data path uses fastmesh._core.tls_transport).

    uvloop's SSL transport reads with `read(256 KiB)` for protocols that are not buffered
    (fastmesh's are not): the ssl module allocates a 256 KiB bytes object for every record and
    shrinks it after. While glibc's mmap threshold is below that size (it starts at 128 KiB and
    rises only when such a block is freed whole: it depends on the process's history), each
    read costs an mmap, an mremap and an munmap plus page faults: +57 µs CPU per request on a
    TLS upstream hop (benches/tls_profile.py). A read returns one record's plaintext at most
    (16 KiB) and the transports (uvloop's, asyncio's) read again while bytes are pending, so
    asking for at most RECORD_MAX returns the same bytes, from the heap; a caller's buffer is
    used as given. write and pending are the C object's own methods (no Python frame).
    """

    @classmethod
    def _create(cls, *args, **kwargs):
        self = super()._create(*args, **kwargs)
        self.write = self._sslobj.write
        self.pending = self._sslobj.pending
        return self

    def read(self, len=1024, buffer=None):
        if buffer is not None:
            return self._sslobj.read(len, buffer)
        return self._sslobj.read(len if len < RECORD_MAX else RECORD_MAX)


# Why a handshake failed, in a fixed set (metric labels): edge listeners and the mesh's inbound.
# "plaintext": HTTP sent to a TLS port; "closed": the client went away before finishing (a TCP
# health check, a port scan), kept apart from handshakes that failed.
HANDSHAKE_FAILURES = ("no_client_cert", "unknown_ca", "expired", "bad_protocol_version",
                      "plaintext", "timeout", "closed", "other")
# X509 verify codes (openssl/x509_vfy.h) that mean "not signed by a CA we trust"
_UNKNOWN_CA_CODES = {2, 18, 19, 20, 21, 24, 27, 28, 30, 32}
_EXPIRED_CODES = {9, 10}            # not yet valid, expired


def classify(exc: BaseException) -> str:
    """One of HANDSHAKE_FAILURES for the exception a failed handshake raised."""
    if isinstance(exc, TimeoutError):   # asyncio's too, and tls_transport.HandshakeTimeout
        return "timeout"
    if isinstance(exc, ConnectionError) and not isinstance(exc, ssl.SSLError):
        return "closed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _EXPIRED_CODES:
            return "expired"
        if code in _UNKNOWN_CA_CODES:
            return "unknown_ca"
        return "other"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no_client_cert"
        if ("PROTOCOL" in reason and "VERSION" in reason) or reason in (
                "UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER", "VERSION_TOO_LOW"):
            return "bad_protocol_version"
        if "UNKNOWN_CA" in reason:
            return "unknown_ca"
        if "EXPIRED" in reason:
            return "expired"
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            return "plaintext"
    return "other"


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Apply the shared policy to a new context (server or client side); returns it.
    Its connections get fastmesh's SSLObject (see there)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.sslobject_class = SSLObject
    return ctx


# --- edge termination: certificates chosen by SNI ---------------------------------------------

def server_context() -> ssl.SSLContext:
    """A hardened server context that speaks HTTP/1.1 only (ALPN)."""
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(ALPN_HTTP1)
    return ctx


def no_password() -> bytes:
    """load_cert_chain's password: an encrypted key fails to load instead of OpenSSL asking for
    a passphrase on the terminal."""
    return b""


def load_pair(cert: str, key: str) -> ssl.SSLContext:
    """A server context holding one certificate (chain) and its key; ssl.SSLError if refused."""
    ctx = server_context()
    ctx.load_cert_chain(cert, key, password=no_password)
    return ctx


def _fingerprint(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class CertificateStore:
    """The certificates of one config, ready for handshakes: a server name picks a context.

    Exact names first, then the wildcard for the name without its first label (`*.example.com`
    covers one label only, so there is one candidate), else the default certificate: the first
    one without snis, else the first one. Built when a config is prepared, never changed after.
    """

    def __init__(self, certificates: tuple = ()):
        self.certificates = tuple(certificates)
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}      # "example.com" for "*.example.com"
        self.default: ssl.SSLContext | None = None
        loaded = []
        for entry in self.certificates:
            # The supervisor validated these files; one replaced since then is not what it checked.
            if entry.fingerprint and _fingerprint(entry.cert) != entry.fingerprint:
                raise ValueError(f"certificate file {entry.cert} changed after the config was "
                                 "validated; reload again")
            loaded.append((entry, load_pair(entry.cert, entry.key)))
        for entry, ctx in loaded:
            for sni in entry.snis:
                if sni.startswith("*."):
                    self.wildcard.setdefault(sni[2:], ctx)
                else:
                    self.exact.setdefault(sni, ctx)
        self.default = next((ctx for entry, ctx in loaded if not entry.snis),
                            loaded[0][1] if loaded else None)

    def select(self, server_name: str | None) -> ssl.SSLContext | None:
        if server_name:
            name = server_name.lower()
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            ctx = self.wildcard.get(name.partition(".")[2])
            if ctx is not None:
                return ctx
        return self.default


class EdgeTLS:
    """One worker's TLS listeners: their base contexts and the certificate store they share.

    Each TLS listener has one base context (no certificate of its own) whose SNI callback
    switches the connection to the chosen certificate's context. The session cache and ticket
    keys stay those of the base context, which lives as long as the worker: sessions survive
    reloads. A reload swaps the store (prepare, then commit): handshakes already done keep
    their certificate, new ones get the new store's.
    """

    def __init__(self, certificates: tuple = ()):
        self.store = CertificateStore(certificates)
        self.pending: dict[str, CertificateStore] = {}
        self.handshakes = {"ok": 0, **dict.fromkeys(HANDSHAKE_FAILURES, 0)}

    def listener_context(self) -> ssl.SSLContext:
        ctx = server_context()
        ctx.sni_callback = self._on_sni
        return ctx

    def protocol_factory(self, app_factory, handshake_timeout: float):
        """A listener's protocol factory: TLS (fastmesh._core.tls_transport) around one
        `app_factory()` protocol per connection; every handshake counted by outcome."""
        from fastmesh._core.tls_transport import TLSTransport
        ctx = self.listener_context()
        done = self._handshake_done
        return lambda: TLSTransport(ctx, True, app_factory(), None, handshake_timeout, done)

    def _handshake_done(self, _tls, exc) -> None:
        self.handshakes["ok" if exc is None else classify(exc)] += 1

    def _on_sni(self, ssl_object, server_name, base):
        ctx = self.store.select(server_name)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.context = ctx
        return None

    def prepare(self, version: str, certificates: tuple) -> None:
        """Load the certificates of config `version`; raises (ssl.SSLError, OSError, ...)."""
        if tuple(certificates) == self.store.certificates:
            store = self.store
        else:
            store = CertificateStore(certificates)
        self.pending = {version: store}

    def commit(self, version: str) -> None:
        store = self.pending.pop(version, None)
        self.pending = {}
        if store is not None:
            self.store = store

    def abort(self, version: str) -> None:
        self.pending.pop(version, None)
