"""HTTPS upstreams: the `tls_*` fields of a service, and the client-side TLS contexts for them.

Three jobs, one subject (how fastmesh talks TLS to what it proxies to):

- at load: `read_service_tls` validates a service's TLS fields (files are read and checked
  then, so a bad CA file or a key that does not match its certificate is a config error with
  its path, not a 502 later); `check_upstream_tls` makes services that share a balanced
  upstream agree on TLS, since each target has one connection pool.
- at plan time: `settings_for(service)` is a small hashable `UpstreamTLS` (the pool registry
  keys pools by it, so a reload with equal settings keeps warm connections) and
  `pool_options(settings)` the Pool arguments: the shared context, the name for SNI and
  verification, and the identity check of the peer's certificate.
- at run time: `refresh()` reloads rotated client certificates into the contexts in place.

Contexts are cached per (verify, CA file, client certificate, key): every pool with those
settings shares one SSLContext, whatever its host. Verification is on unless the config says
`tls_verify: false`; the name checked is `tls_server_name`, else the service host (for a
balanced service, the upstream's name, which is also the Host header sent); an IP literal is
checked against the certificate's IP SANs and sends no SNI (the ssl module's rule).
"""
from __future__ import annotations

import logging
import os
import re
import ssl
from dataclasses import dataclass
from typing import Callable

from fastmesh.osutil import file_stamp
from fastmesh.tls import ALPN_HTTP1, harden

log = logging.getLogger("fastmesh.upstream_tls")

# fastmesh.config.schema is imported inside the load-time functions: the loader imports this
# module, and importing the config package from here at the top would be a cycle.

TLS_FIELDS = ("tls_verify", "tls_ca", "tls_server_name", "tls_client_cert", "tls_client_key",
              "tls_peer_identity")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\x00-\x1f\x7f]+")


# --- load time: the service's fields ----------------------------------------------------------

def read_service_tls(fields, protocol: str) -> dict:
    """The Service keyword arguments for the `tls_*` fields of one service (issues recorded).

    `fields` is the service's fastmesh.config.schema.Fields. Files are made absolute against
    the config file's directory and checked now. Any tls_* field on an http service is an
    error; `tls_verify: false` is logged once here, naming the service.
    """
    present = [key for key in TLS_FIELDS if fields.has(key)]
    if protocol != "https":
        for key in present:
            fields.issues.add(fields.at(key), f"'{key}' applies only to HTTPS upstreams: set "
                                              "protocol https (or an https:// url)")
        return {}
    if not present:
        return {}
    from fastmesh.config.schema import boolean, host
    base = _config_dir(fields.issues.source)
    out = {
        "tls_verify": fields.value("tls_verify", boolean, True),
        "tls_ca": fields.value("tls_ca", _pem_file(base, "CA", _check_ca)),
        "tls_server_name": fields.value("tls_server_name", host),
        "tls_client_cert": fields.value("tls_client_cert", _pem_file(base, "certificate",
                                                                      _check_cert)),
        "tls_client_key": fields.value("tls_client_key", _pem_file(base, "key", _check_key)),
        "tls_peer_identity": fields.value("tls_peer_identity", _uri_san),
    }
    _check_pair(fields, out["tls_client_cert"], out["tls_client_key"])
    if out["tls_verify"] is False:
        for key in ("tls_ca", "tls_peer_identity"):
            if fields.has(key):
                fields.issues.add(fields.at(key), f"'{key}' needs a verified certificate: remove "
                                                  "it or 'tls_verify: false'")
        log.warning("service %s: tls_verify is false: its upstream's certificate is NOT "
                    "checked (any certificate, any name is accepted)", fields.raw("name"))
    return {key: value for key, value in out.items() if value is not None}


def check_upstream_tls(top, services: list) -> None:
    """Services balanced over one upstream must use the same TLS settings (or all plain HTTP):
    each target has one connection pool. Issues go to the later service's path."""
    first: dict[str, tuple[str, UpstreamTLS | None]] = {}
    for service in services:
        if not service.upstream:
            continue
        settings = settings_for(service)
        if service.upstream not in first:
            first[service.upstream] = (service.name, settings)
            continue
        name, other = first[service.upstream]
        if settings != other:
            top.issues.add(_service_path(top, service.name),
                           f"service '{service.name}' and service '{name}' both use upstream "
                           f"'{service.upstream}' with different TLS settings (protocol or "
                           "tls_* fields): make them equal, or give each its own upstream")


def _service_path(top, name: str | None) -> str:
    for index, raw in enumerate(top.raw("services") or ()):
        if isinstance(raw, dict) and raw.get("name") == name:
            return f"services[{index}]"
    return "services"


def _config_dir(source: str) -> str:
    return os.path.dirname(source) if source and not source.startswith("<") else ""


def _pem_file(base: str, what: str, check: Callable[[str], None]):
    """A parser: the path made absolute, the file readable and holding a usable `what`."""
    from fastmesh.config.schema import Invalid, string

    def parse(value: object) -> str:
        text = string(value)
        if not text:
            raise Invalid(f"expected the path of a PEM {what} file, found an empty string")
        path = os.path.abspath(os.path.join(base, text))
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as err:
            raise Invalid(f"cannot read {what} file {path}: {err.strerror or err}") from None
        try:
            check(path)
        except (ssl.SSLError, ValueError, TypeError) as err:
            raise Invalid(f"{what} file {path}: {_reason(err)}") from None
        return path
    return parse


def _reason(err: Exception) -> str:
    if isinstance(err, ssl.SSLError) and err.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
        return "no PEM certificate in it"
    if isinstance(err, ssl.SSLError):
        return err.reason or str(err)
    return str(err)


def _check_ca(path: str) -> None:
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)


def _check_cert(path: str) -> None:
    _check_ca(path)                 # a PEM certificate (chain), whatever else it holds


# An unencrypted PEM private key block (PKCS#8, or OpenSSL's RSA/EC/DSA forms); encrypted ones
# say so in their header.
PEM_KEY = re.compile(rb"-----BEGIN ((?:RSA |EC |DSA )?PRIVATE KEY)-----\r?\n"
                     rb"[A-Za-z0-9+/=\r\n]+-----END \1-----")
PEM_ENCRYPTED = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def _check_key(path: str) -> None:
    """A PEM private key block, unencrypted. Read as text, not loaded with `cryptography` (~12
    MiB of RSS a sidecar in mTLS would keep for this one check): whether the key loads and goes
    with the certificate, _check_pair finds out with ssl."""
    with open(path, "rb") as f:
        data = f.read()
    if any(marker in data for marker in PEM_ENCRYPTED):
        raise ValueError("the key is encrypted: fastmesh needs an unencrypted key file "
                         "(keep it readable by fastmesh only, 0600)")
    if PEM_KEY.search(data) is None:
        raise ValueError("no PEM private key in it")


def _check_pair(fields, cert: str | None, key: str | None) -> None:
    has_cert, has_key = fields.has("tls_client_cert"), fields.has("tls_client_key")
    if has_cert != has_key:
        missing, given = ("tls_client_key", "tls_client_cert") if has_cert else \
            ("tls_client_cert", "tls_client_key")
        fields.issues.add(fields.at(given), f"'{given}' needs '{missing}' too (both or neither)")
        return
    if cert is None or key is None:
        return
    try:
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key)
    except (ssl.SSLError, ValueError) as err:
        reason = "the key does not match the certificate" \
            if getattr(err, "reason", None) == "KEY_VALUES_MISMATCH" else _reason(err)
        fields.issues.add(fields.at("tls_client_key"), f"{key} with {cert}: {reason}")


def _uri_san(value: object) -> str:
    from fastmesh.config.schema import Invalid, string
    text = string(value)
    if not _URI.fullmatch(text):
        raise Invalid("expected a URI such as 'spiffe://example.org/svc/orders' (the URI SAN "
                      f"the upstream's certificate must carry), found {text!r}")
    return text


def _no_password() -> bytes:
    raise ValueError("the key is encrypted: fastmesh needs an unencrypted key file")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    # a password callback that refuses: OpenSSL's default would prompt on the terminal
    ctx.load_cert_chain(cert, key, password=_no_password)


# --- plan time: settings, contexts, pools -----------------------------------------------------

@dataclass(frozen=True)
class UpstreamTLS:
    """What a TLS pool is keyed by: equal settings share pools across reloads."""

    verify: bool
    ca: str | None
    client_cert: str | None
    client_key: str | None
    server_name: str
    peer_identity: str | None
    alpn: tuple[str, ...] = tuple(ALPN_HTTP1)   # offered; the mesh's opaque TCP offers its own


def settings_for(service) -> UpstreamTLS | None:
    """The TLS settings of a config Service, or None for plain HTTP."""
    if service.protocol != "https":
        return None
    return UpstreamTLS(service.tls_verify, service.tls_ca, service.tls_client_cert,
                       service.tls_client_key, service.tls_server_name or service.host,
                       service.tls_peer_identity)


def pool_options(settings: UpstreamTLS | None) -> dict:
    """Keyword arguments for fastmesh._core.pool.Pool: none for plain HTTP."""
    if settings is None:
        return {}
    return {"ssl": context(settings), "server_hostname": settings.server_name,
            "peer_check": peer_checker(settings.peer_identity) if settings.peer_identity else None}


@dataclass
class _Cached:
    ctx: ssl.SSLContext
    ca: str | None
    cert: str | None
    key: str | None
    stamps: tuple                   # file_stamp of ca, cert, key when last loaded (or tried)


_contexts: dict[tuple, _Cached] = {}


def context(settings: UpstreamTLS) -> ssl.SSLContext:
    """The shared client context for `settings` (made on first use, then the same object).

    Certificate files that change on disk reach it through refresh(), which every Plan compile
    (fastmesh.plan.compile_plan: start, reload, registry change) calls first.
    """
    # A peer identity to check replaces the host name check: mesh workload certificates carry
    # a SPIFFE URI SAN and no DNS name (the chain is still verified).
    by_identity = settings.peer_identity is not None
    key = (settings.verify, settings.ca, settings.client_cert, settings.client_key, by_identity,
           settings.alpn)
    cached = _contexts.get(key)
    if cached is not None:
        return cached.ctx
    if settings.verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # CERT_REQUIRED, check_hostname
        ctx.check_hostname = not by_identity
        if settings.ca:
            ctx.load_verify_locations(cafile=settings.ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)   # the system CA bundle
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    harden(ctx)
    ctx.set_alpn_protocols(list(settings.alpn))
    if settings.client_cert:
        _load_chain(ctx, settings.client_cert, settings.client_key)
    _contexts[key] = _Cached(ctx, settings.ca, settings.client_cert, settings.client_key,
                             _stamps(settings.ca, settings.client_cert, settings.client_key))
    return ctx


def peer_checker(identity: str) -> Callable[[object], str | None]:
    """peer_check(transport) for Pool: None when the verified peer certificate carries the URI
    SAN `identity` exactly, else the reason (the data path answers 502 "identity rejected")."""
    def check(transport) -> str | None:
        cert = transport.get_extra_info("peercert") or {}
        uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
        if identity in uris:
            return None
        found = ", ".join(uris[:3]) + (", ..." if len(uris) > 3 else "") if uris else "none"
        return f"expected {identity}, certificate has URI SAN {found}"
    return check


# --- run time: rotation -----------------------------------------------------------------------

def refresh() -> list[str]:
    """Reload changed certificate files into the cached contexts, in place; the paths reloaded.

    Contract (for the mesh's rotation, and anyone holding a context from `context()`):
    - the SSLContext objects stay the same, so every pool keeps its context and pooled
      connections are not dropped; new handshakes use the new files;
    - a client certificate and key are reloaded when either file changed (osutil.file_stamp:
      mtime, size, inode: an atomic rename counts); the pair is checked in a scratch context
      first, and a pair that does not load (half-written, key not matching yet) leaves the old
      one in use and is logged once per change: write the key first, or rename both into place;
    - a changed CA file adds its certificates to the trust store; certificates removed from it
      stay trusted until the process restarts (OpenSSL cannot remove trust from a context);
    - cheap when nothing changed (three stat calls per context); call it from the event loop
      thread that uses the contexts, e.g. every few seconds and before expiry.
    """
    reloaded: list[str] = []
    for cached in list(_contexts.values()):
        reloaded.extend(_refresh_one(cached))
    return reloaded


def _stamps(*paths: str | None) -> tuple:
    return tuple(file_stamp(p) if p else None for p in paths)


def _refresh_one(cached: _Cached) -> list[str]:
    now = _stamps(cached.ca, cached.cert, cached.key)
    if now == cached.stamps:
        return []
    before, cached.stamps = cached.stamps, now      # a failure is logged once per change
    reloaded: list[str] = []
    if cached.ca and now[0] != before[0]:
        try:
            cached.ctx.load_verify_locations(cafile=cached.ca)
            reloaded.append(cached.ca)
        except (OSError, ValueError) as err:
            log.warning("upstream TLS: CA file %s changed but cannot be loaded (%s): the "
                        "certificates already loaded stay in use", cached.ca, _reason(err))
    if cached.cert and now[1:] != before[1:]:
        try:
            _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cached.cert, cached.key)
            _load_chain(cached.ctx, cached.cert, cached.key)
            reloaded += [cached.cert, cached.key]
        except (OSError, ValueError) as err:
            log.warning("upstream TLS: client certificate %s / key %s changed but cannot be "
                        "loaded (%s): the previous pair stays in use", cached.cert, cached.key,
                        _reason(err))
    if reloaded:
        log.info("upstream TLS: reloaded %s", ", ".join(reloaded))
    return reloaded
