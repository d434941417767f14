"""The service registry: which instances each service has, as the sidecars see it.

A registry keeps a local *view* (service name -> instances) that the sidecar compiles into its
outbound routes; a request never waits on the registry. Two implementations:

- `redis://host:port/db` (fastmesh.mesh.redis_registry): sidecars register themselves with a TTL
  heartbeat and watch for changes (pub/sub, keyspace notifications, periodic full resync);
- `file:mesh.yaml` (fastmesh.mesh.file_registry): a static file, re-read when it changes.

Whatever goes wrong on the registry's side (Redis unreachable, a bad file), the last good view
stays: routing goes on with what was known.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastmesh.config.schema import (
    Fields, Invalid, Issues, hostname, integer, ip_literal, string,
)
from fastmesh.config.streams import connect_address

INSTANCE_FIELDS = ("service", "id", "address", "zone", "version", "weight", "metadata")
DEFAULT_WEIGHT = 100
# The sidecar's admin API address (`fastmesh mesh status` reads it), registered as a metadata
# entry rather than a new field: entries without it still parse, and sidecars that predate it
# (which refuse unknown fields) still accept entries that carry it.
ADMIN_KEY = "fastmesh.admin"
# More addresses of the instance (a dual-stack pod's IPv6 ones, its service's virtual address),
# comma-separated IP addresses: TCP or a Host header sent to one of them is for this instance's
# service, as to `address`'s host, unless another instance is registered at it (see
# fastmesh.mesh.routes.host_owners). The mesh dials `address` only. A metadata entry for the
# same reason as ADMIN_KEY.
ADDRESSES_KEY = "fastmesh.addresses"

View = dict  # service name -> tuple[Instance, ...] (sorted by id)


@dataclass(frozen=True)
class Instance:
    """One running copy of a service: where its sidecar's inbound listener is, and what it is."""

    service: str                        # a host name: callers address it as `Host: <service>`
    id: str                             # unique within the service
    host: str                           # IPv4, IPv6 (no brackets) or host name
    port: int
    zone: str = ""
    version: str = ""
    weight: int = DEFAULT_WEIGHT        # 0..65535, as upstream targets (0: never picked)
    metadata: tuple[tuple[str, str], ...] = ()   # sorted (key, value) pairs

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host this instance is reached at: its address's, then ADDRESSES_KEY's."""
        more = dict(self.metadata).get(ADDRESSES_KEY)
        return (self.host, *more.split(",")) if more else (self.host,)

    @property
    def admin(self) -> str | None:
        """The sidecar's admin API as 'host:port' (metadata `fastmesh.admin`), if registered."""
        return dict(self.metadata).get(ADMIN_KEY) or None

    def to_dict(self) -> dict:
        return {"service": self.service, "id": self.id, "address": self.address,
                "zone": self.zone, "version": self.version, "weight": self.weight,
                "metadata": dict(self.metadata)}


# --- parsing (the Redis values and the registry file share it) ---------------------------------

def service_name(value: object) -> str:
    """A service name is a host name (lower-cased): it is matched against Host headers."""
    text = string(value)
    if not text:
        raise Invalid("service name must not be empty")
    return hostname(text)


def instance_id(value: object) -> str:
    text = string(value)
    if not text or len(text) > 200 or any(c in text for c in ": \t\r\n\x00"):
        raise Invalid(f"instance id must be 1-200 characters without ':', blanks or control "
                      f"characters, found {text!r}")
    return text


# An instance's address ('10.0.0.5:15006', '[fd00::5]:15006', 'pod-b.local:15006') is read as a
# stream's: instance_address(value) -> (host, port).
instance_address = connect_address


def _label(value: object) -> str:
    text = string(value)
    if len(text) > 200 or any(c in text for c in "\r\n\x00"):
        raise Invalid(f"expected at most 200 characters without CR, LF or NUL, found {text!r}")
    return text


def _metadata(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping of strings, found {type(value).__name__}")
    pairs = []
    for key, item_value in value.items():
        if not isinstance(key, str) or not isinstance(item_value, (str, int, float, bool)):
            raise Invalid(f"expected string keys and scalar values, found {key!r}: {item_value!r}")
        if key == ADDRESSES_KEY:            # its own limit: up to ADDRESSES_MAX addresses
            pairs.append((key, addresses_value(str(item_value))))
        else:
            pairs.append((_label(key), _label(str(item_value))))
    return tuple(sorted(pairs))


ADDRESSES_MAX = 16


def addresses_value(text: str) -> str:
    """ADDRESSES_KEY's value: at most ADDRESSES_MAX IP addresses (IPv6 with or without
    brackets, no zone index), written as `Instance.host` is (compressed, without brackets),
    each once; Invalid names the bad one. Addresses only: a host name there would let an
    instance take HTTP for that name from the mesh's callers."""
    found = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        bare = part[1:-1] if part.startswith("[") and part.endswith("]") else part
        address = ip_literal(bare) if "%" not in bare else None
        if address is None or (bare is not part and address.version != 6):
            raise Invalid(f"{ADDRESSES_KEY}: expected IP addresses, found {part[:60]!r}")
        found.append(address.compressed)
    found = list(dict.fromkeys(found))
    if len(found) > ADDRESSES_MAX:
        raise Invalid(f"{ADDRESSES_KEY}: at most {ADDRESSES_MAX} addresses, found {len(found)}")
    return ",".join(found)


def read_instance(fields: Fields, service: str | None = None) -> Instance | None:
    """An Instance from a mapping; problems go to fields.issues with their paths. With `service`
    (the file registry nests instances under their service), the field may be left out."""
    before = len(fields.issues.items)
    name = fields.value("service", service_name, required=service is None)
    if name is not None and service is not None and name != service:
        fields.issues.add(fields.at("service"), f"instance listed under '{service}' says "
                                                f"service '{name}'")
    name = service if service is not None else name
    ident = fields.value("id", instance_id)
    address = fields.value("address", instance_address, required=True)
    zone = fields.value("zone", _label, "")
    version = fields.value("version", _label, "")
    weight = fields.value("weight", integer(0, 65535, "weight"), DEFAULT_WEIGHT)
    metadata = fields.value("metadata", _metadata, ())
    if len(fields.issues.items) != before or name is None or address is None:
        return None
    host, port = address
    return Instance(name, ident if ident is not None else f"{host}:{port}", host, port,
                    zone, version, weight, metadata)


def parse_instance(data: object, source: str = "<registry>") -> Instance:
    """An Instance from its JSON/YAML form; ValueError with every problem."""
    issues = Issues(source)
    fields = Fields.of(issues, "", data, INSTANCE_FIELDS)
    found = read_instance(fields) if fields is not None else None
    if issues or found is None:
        raise ValueError("; ".join(str(i) for i in issues.items) or f"{source}: invalid instance")
    return found


def make_view(instances) -> View:
    """service -> instances sorted by id; for a repeated (service, id) the last one wins."""
    by_key = {(i.service, i.id): i for i in instances}
    view: dict[str, list[Instance]] = {}
    for inst in by_key.values():
        view.setdefault(inst.service, []).append(inst)
    return {svc: tuple(sorted(found, key=lambda i: i.id)) for svc, found in sorted(view.items())}


# --- workload identities: a service's SPIFFE id and the files of its certificate ----------------
# fastmesh.mesh.ca makes them (with `cryptography`); sidecars only read them, with these and the
# ssl module: a sidecar in mTLS never loads `cryptography` (~12 MiB of RSS) unless it asks
# `fastmesh ca serve` for its certificate.

SPIFFE_SCHEME = "spiffe://"
CERT_FILE, KEY_FILE, BUNDLE_FILE = "cert.pem", "key.pem", "ca.pem"     # a workload directory
CLOCK_SKEW = 60.0                       # the CA backdates notBefore this far


def peer_identity(peercert: dict | None) -> str | None:
    """The first spiffe:// URI SAN in ssl's getpeercert() dict (a verified peer), else None."""
    if not peercert:
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith(SPIFFE_SCHEME):
            return value
    return None


def trust_domain_of(identity: str) -> str:
    """'spiffe://td/svc/orders' -> 'td'."""
    return identity[len(SPIFFE_SCHEME):].partition("/")[0]


def service_of(identity: str | None, trust_domain_name: str | None = None) -> str | None:
    """'spiffe://td/svc/orders' -> 'orders' (None when it is not a service id of `td`)."""
    if not identity or not identity.startswith(SPIFFE_SCHEME):
        return None
    domain, _, path = identity[len(SPIFFE_SCHEME):].partition("/")
    if trust_domain_name is not None and domain != trust_domain_name:
        return None
    kind, _, name = path.partition("/")
    if kind != "svc" or not name:
        return None
    try:
        return name if service_name(name) == name else None
    except Invalid:
        return None


def lifetime_of(not_before: float, not_after: float) -> tuple[float, float]:
    """(issued, not_after) in epoch seconds; `issued` undoes the CA's clock-skew backdating."""
    if not_after - not_before > CLOCK_SKEW:
        not_before += CLOCK_SKEW
    return not_before, not_after


# --- the interface -----------------------------------------------------------------------------

class Registry:
    """Base class: the local view, change notification, and the registration calls.

    `on_change()` is called on the sidecar's loop whenever the view changed; the sidecar then
    reads `view()`. `ready` is true once a view was loaded (or the source answered) at least once.
    """

    kind = "?"
    writable = True             # register/deregister change the registry (not so for a file)

    def __init__(self, on_change: Callable[[], None]):
        self.on_change = on_change
        self._view: View = {}
        self.ready = False
        self.error: str | None = None           # the last problem with the source, if any

    def view(self) -> View:
        return self._view

    def _set_view(self, view: View) -> None:
        self.ready = True
        if view != self._view:
            self._view = view
            self.on_change()

    async def start(self, wait: float) -> None:
        """Begin watching; wait (at most `wait` seconds) for the first view."""
        raise NotImplementedError

    async def register(self, instance: Instance) -> None:
        """Announce `instance` and keep it announced (heartbeat) until deregistered."""
        raise NotImplementedError

    async def deregister(self, instance: Instance) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        """What the registry knows now (admin /status and /registry)."""
        return {"kind": self.kind, "ready": self.ready, "error": self.error,
                "services": {svc: [i.to_dict() for i in found]
                             for svc, found in self._view.items()}}


def open_registry(url: str, on_change: Callable[[], None], ttl: float) -> Registry:
    """A Registry for `redis://...`/`rediss://...` or `file:PATH`; ValueError when unsupported."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from fastmesh.mesh.redis_registry import RedisRegistry
        return RedisRegistry(url, on_change, ttl)
    if url.startswith("file:"):
        from fastmesh.mesh.file_registry import FileRegistry
        path = url[len("file:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("file registry: expected file:PATH, e.g. file:mesh.yaml")
        return FileRegistry(path, on_change)
    raise ValueError(f"unsupported registry {url!r}: expected redis://HOST:PORT/DB or file:PATH")


__all__ = ["ADMIN_KEY", "Instance", "Registry", "View", "make_view", "open_registry",
           "parse_instance", "read_instance", "service_name"]
