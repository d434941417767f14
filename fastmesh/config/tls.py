"""Edge TLS entities: extra `listeners`, `certificates`, and the route fields that require HTTPS.

```yaml
listeners:                         # beside gateway.listen (the plain one; --listen overrides it)
  - {listen: "0.0.0.0:8443", tls: true}
  - {listen: "127.0.0.1:8080"}     # another plain one
certificates:
  - {cert: certs/api.pem, key: certs/api.key, snis: [api.example.com, "*.example.com"]}
  - {cert: certs/default.pem, key: certs/default.key}     # no snis: the default certificate
routes:
  - {name: admin, paths: [/admin], protocols: [https], https_redirect_status_code: 301}
```

Semantics the rest of the code relies on:
- `cert` and `key` are PEM files; relative paths are relative to the config file's directory (the
  working directory for configs sent to the admin API) and are stored absolute;
- every pair is loaded with ssl at validation time, so a missing, unreadable or mismatched pair is
  a config error (file and path) and never reaches a worker; `fingerprint` is the SHA-256 of the
  certificate file, so replacing a file in place is a new config version;
- `snis` are lower-cased host names or `*.name` wildcards (one leading label); an SNI names one
  certificate only;
- a listener with `tls: true` needs at least one certificate; two listeners on the same port of
  the same (or an overlapping wildcard) address are refused;
- route `protocols` is a non-empty subset of http/https (default both);
  `https_redirect_status_code` (426, 301, 302, 307 or 308) is what plain HTTP gets on a route
  without http.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from fastmesh.config.schema import (
    Fields, Invalid, boolean, entities_version, hostname, listen_address, split_host_port, string,
)
from fastmesh.osutil import sha256

LISTENER_FIELDS = ("listen", "tls")
CERTIFICATE_FIELDS = ("cert", "key", "snis")
PROTOCOLS = ("http", "https")
REDIRECT_STATUSES = (426, 301, 302, 307, 308)


# --- model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Listener:
    listen: str                         # "host:port" / "[v6]:port", as written
    tls: bool = False


@dataclass(frozen=True)
class Certificate:
    cert: str                           # absolute path of the PEM certificate (chain)
    key: str                            # absolute path of the PEM private key
    snis: tuple[str, ...] = ()          # lower-case names and "*.name" wildcards
    fingerprint: str = ""               # sha256 hex of the certificate file at validation


def tls_version(base: str, listeners: tuple, certificates: tuple) -> str:
    """The config version including listeners and certificates; unchanged when there are none."""
    return entities_version(base, listeners=listeners, certificates=certificates)


def first_tls_port(listeners: tuple) -> int:
    """Where https-only routes redirect to: the first TLS listener's port, else 443."""
    for listener in listeners:
        if listener.tls:
            port = int(listener.listen.rpartition(":")[2])
            return port or 443
    return 443


# --- listeners --------------------------------------------------------------------------------

def read_tls(top: Fields, plain_listen: str | None) -> tuple[tuple, tuple]:
    """(listeners, certificates) of the top level; problems go to top.issues."""
    certificates = read_certificates(top)
    listeners = read_listeners(top, plain_listen, has_certificates=bool(top.raw("certificates")))
    return listeners, certificates


def read_listeners(top: Fields, plain_listen: str | None, has_certificates: bool) -> tuple:
    listeners: list[Listener] = []
    seen: list[tuple[str, int, str]] = []         # (host, port, where it was declared)
    if plain_listen is not None:
        seen.append((*bind_address(plain_listen), "gateway.listen"))
    for path, raw in top.items("listeners", "list of listeners"):
        fields = Fields.of(top.issues, path, raw, LISTENER_FIELDS)
        if fields is None:
            continue
        listen = fields.value("listen", listen_address, required=True)
        tls = fields.value("tls", boolean, False)
        if tls and not has_certificates:
            fields.issues.add(fields.at("tls"), "a TLS listener needs a certificate: add one "
                                                "under 'certificates' (cert, key, snis)")
        if listen is None:
            continue
        address = bind_address(listen)
        clash = next((where for host_, port, where in seen if overlaps((host_, port), address)),
                     None)
        if clash is not None:
            fields.issues.add(fields.at("listen"), f"address {listen} is already used by {clash}")
        else:
            seen.append((*address, fields.at("listen")))
        listeners.append(Listener(listen=listen, tls=tls))
    return tuple(listeners)


def bind_address(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8443' / '[::1]:8443' / ':8443' -> (host without brackets, port)."""
    host_part, port_part = split_host_port(listen)
    host_part = host_part[1:-1] if host_part.startswith("[") else host_part
    return host_part or "0.0.0.0", int(port_part or 0)


def overlaps(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Two binds that would share a port: same port (not 0) and same or wildcard address."""
    if a[1] != b[1] or a[1] == 0:
        return False
    if a[0] == b[0]:
        return True
    try:
        ip_a, ip_b = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
    except ValueError:                  # a host name: only an identical one is a clash
        return False
    return ip_a.version == ip_b.version and (ip_a.is_unspecified or ip_b.is_unspecified)


# --- certificates -----------------------------------------------------------------------------

def read_certificates(top: Fields) -> tuple:
    certificates: list[Certificate] = []
    claimed: dict[str, str] = {}                  # sni -> path where first named
    base = config_dir(top.issues.source)
    for path, raw in top.items("certificates", "list of certificates"):
        fields = Fields.of(top.issues, path, raw, CERTIFICATE_FIELDS)
        if fields is None:
            continue
        cert = fields.value("cert", pem_path(base), required=True)
        key = fields.value("key", pem_path(base), required=True)
        snis = []
        for sni_path, element in fields.items("snis", "list of host names"):
            sni = fields.parse_at(sni_path, element, sni_name)
            if sni is None or sni in snis:
                continue
            if sni in claimed:
                fields.issues.add(sni_path, f"SNI '{sni}' is already served by the certificate "
                                            f"at {claimed[sni]}")
                continue
            claimed[sni] = sni_path
            snis.append(sni)
        fingerprint = ""
        if cert is not None and key is not None:
            fingerprint = check_pair(fields, cert, key)
        if cert is not None and key is not None and fingerprint:
            certificates.append(Certificate(cert=cert, key=key, snis=tuple(snis),
                                            fingerprint=fingerprint))
    return tuple(certificates)


def config_dir(source: str) -> str:
    return os.path.dirname(os.path.abspath(source)) if source and not source.startswith("<") \
        else os.getcwd()


def pem_path(base: str):
    """A parser for a file path, made absolute against `base`."""
    def parse(value: object) -> str:
        text = string(value)
        if not text:
            raise Invalid("file path must not be empty")
        return os.path.normpath(os.path.join(base, os.path.expanduser(text)))
    return parse


def wildcard_name(text: str) -> str | None:
    """`*.name` checked and lower-cased (a wildcard is the whole leading label, as certificates
    and route hosts both have it); None for a name without one."""
    if text.startswith("*."):
        return "*." + hostname(text[2:])
    if "*" in text:
        raise Invalid("a wildcard is allowed only as the leading label, as in '*.example.com', "
                      f"found {text!r}")
    return None


def sni_name(value: object) -> str:
    """A host name or a `*.name` wildcard (the leading label only), lower-cased."""
    text = string(value)
    wildcard = wildcard_name(text)
    if wildcard is not None:
        return wildcard
    if not text:
        raise Invalid("SNI must not be empty")
    return hostname(text)


def check_pair(fields: Fields, cert: str, key: str) -> str:
    """Load the pair as a worker will; the certificate's fingerprint, or "" (reported)."""
    cert_pem = read_file(fields, "cert", cert, "certificate")
    key_pem = read_file(fields, "key", key, "private key")
    if cert_pem is None or key_pem is None:
        return ""
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        fields.issues.add(fields.at("cert"), f"{cert} is not a PEM certificate "
                                             "(no '-----BEGIN CERTIFICATE-----')")
        return ""
    if b"PRIVATE KEY-----" not in key_pem:
        fields.issues.add(fields.at("key"), f"{key} is not a PEM private key "
                                            "(no '-----BEGIN ... PRIVATE KEY-----')")
        return ""
    if b"ENCRYPTED" in key_pem:
        fields.issues.add(fields.at("key"), f"{key} is an encrypted private key: "
                                            "fastmesh needs it unencrypted (readable only by it)")
        return ""
    from fastmesh.tls import load_pair
    try:
        load_pair(cert, key)
    except Exception as exc:             # ssl.SSLError, or OSError if a file vanished just now
        reason = getattr(exc, "reason", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            fields.issues.add(fields.path, f"the private key {key} does not belong to the "
                                           f"certificate {cert}")
        else:
            fields.issues.add(fields.at("cert"), f"cannot load certificate {cert} with key {key}: "
                                                 f"{reason}")
        return ""
    return sha256(cert_pem).hexdigest()


def read_file(fields: Fields, field: str, path: str, what: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        fields.issues.add(fields.at(field), f"cannot read {what} file {path}: "
                                            f"{err.strerror or err}")
        return None


# --- routes -----------------------------------------------------------------------------------

def read_route_protocols(fields: Fields) -> dict:
    """Route keywords `protocols` and `https_redirect_status_code` (only those written)."""
    out: dict = {}
    if fields.raw("protocols") is not None:
        protocols = fields.values("protocols", protocol, "list of protocols (http, https)")
        if not protocols and isinstance(fields.raw("protocols"), list):
            fields.issues.add(fields.at("protocols"), "expected at least one of http, https, "
                                                      "found an empty list")
        if protocols:
            out["protocols"] = tuple(p for p in PROTOCOLS if p in protocols)
    status = fields.value("https_redirect_status_code", redirect_status)
    if status is not None:
        out["https_redirect_status_code"] = status
    return out


def protocol(value: object) -> str:
    text = string(value).lower()
    if text not in PROTOCOLS:
        raise Invalid(f"expected http or https, found {value!r}")
    return text


def redirect_status(value: object) -> int:
    if isinstance(value, bool) or value not in REDIRECT_STATUSES:
        raise Invalid("expected 426 (refuse) or 301, 302, 307, 308 (redirect), "
                      f"found {value!r}")
    return int(value)


# --- at start-up ------------------------------------------------------------------------------

def listener_addresses(listeners: tuple) -> list[tuple[str, int, bool]]:
    """(host, port, tls) to bind for each listener, in declaration order."""
    return [(*bind_address(x.listen), x.tls) for x in listeners]


def listen_clash(host: str, port: int, listeners: tuple) -> str | None:
    """What the effective plain listener (--listen may override gateway.listen) collides with."""
    for index, listener in enumerate(listeners):
        if overlaps((host, port), bind_address(listener.listen)):
            return f"listeners[{index}].listen ({listener.listen})"
    return None


def listeners_change(old: tuple, new: tuple) -> str | None:
    """Why a reload may not change the listeners (they are bound once, at start), or None."""
    if old == new:
        return None
    shown = lambda xs: ", ".join(f"{x.listen}{' (tls)' if x.tls else ''}" for x in xs) or "none"
    return (f"listeners: changing listeners needs a restart (running: {shown(old)}; "
            f"new config: {shown(new)})")
