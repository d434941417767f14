"""The `streams` entity: L4 (TCP) proxying, plain or TLS passthrough routed by SNI.

```yaml
streams:
  - name: pg
    listen: "127.0.0.1:15432"
    upstream: pg-pool            # an upstream of the config: its algorithm, health checks, breaker
    # or  address: "10.0.0.5:5432"
    connect_timeout: 2s          # per attempt (default 5s)
    idle_timeout: 1h             # no byte either way for this long: both sides closed (default 1h)
  - name: tls-by-sni
    listen: "0.0.0.0:9443"
    tls_passthrough:             # route by the ClientHello's SNI; TLS is not terminated here
      - {snis: [api.example.com, "*.example.com"], upstream: api-backends}
      - {snis: [db.example.com], address: "127.0.0.1:5443"}
    default: {upstream: other}   # optional: no SNI or an unknown one; without it: closed
    hello_timeout: 5s            # the whole ClientHello must arrive within this (default 5s)
```

Semantics the rest of the code relies on (fastmesh.streams):
- a stream has exactly one of `upstream`, `address` or `tls_passthrough`; every passthrough entry
  and `default` has exactly one of `upstream` or `address`; `default` needs `tls_passthrough`;
- `upstream` names an upstream of the config (checked here); `address` is "host:port";
- `snis` are lower-case names or `*.name` wildcards; a wildcard stands for exactly one label (as
  in a certificate: `*.example.com` matches `a.example.com`, not `a.b.example.com` nor
  `example.com`); an exact name wins over a wildcard; an SNI may be named by one entry only;
- `listen` must not clash with another stream's, `gateway.listen`, a `listeners` entry or an
  explicit admin listen (same port on the same or a wildcard address); port 0 never clashes.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastmesh.config.schema import (
    Fields, Invalid, address_host, duration, entities_version, listen_address, name, port_number,
    split_host_port, string,
)
from fastmesh.config.tls import bind_address, overlaps, sni_name

STREAM_FIELDS = ("name", "listen", "upstream", "address", "connect_timeout", "idle_timeout",
                 "tls_passthrough", "default", "hello_timeout")
PASSTHROUGH_FIELDS = ("snis", "upstream", "address")
DESTINATION_FIELDS = ("upstream", "address")


@dataclass(frozen=True)
class Destination:
    """Where a connection goes: an upstream of the config (balanced) or one fixed address."""

    upstream: str | None = None
    host: str | None = None             # IPv6 without brackets
    port: int = 0


@dataclass(frozen=True)
class SniRoute:
    snis: tuple[str, ...]               # lower-case names and "*.name" wildcards
    destination: Destination


@dataclass(frozen=True)
class Stream:
    name: str
    listen: str                         # "host:port" as written (validated)
    destination: Destination | None = None   # plain TCP; None with tls_passthrough
    tls_passthrough: tuple[SniRoute, ...] = ()
    default: Destination | None = None  # passthrough: no SNI / an unknown one
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    hello_timeout: float = 5.0

    def destinations(self) -> tuple[Destination, ...]:
        found = [self.destination] + [r.destination for r in self.tls_passthrough] + [self.default]
        return tuple(d for d in found if d is not None)


# --- entry point ------------------------------------------------------------------------------

def read_streams(top: Fields, upstreams: list, gateway) -> tuple[Stream, ...]:
    """The top-level `streams`; `upstreams` are the config's (names checked), `gateway` its
    GatewaySettings (listen clashes). Issues go to top.issues with their paths."""
    known = [u.name for u in upstreams if u.name]
    taken = _taken_addresses(top, gateway)
    streams: list[Stream] = []
    names: dict[str, str] = {}
    for path, raw in top.items("streams", "list of streams"):
        fields = Fields.of(top.issues, path, raw, STREAM_FIELDS)
        if fields is None:
            continue
        stream = read_stream(fields, known)
        if stream.name is not None:
            if stream.name in names:
                fields.issues.add(fields.at("name"), f"duplicate stream name '{stream.name}' "
                                                     f"(first defined at {names[stream.name]})")
            else:
                names[stream.name] = path
        if stream.listen is not None:
            address = bind_address(stream.listen)
            clash = next((where for bound, where in taken if overlaps(bound, address)), None)
            if clash is not None:
                fields.issues.add(fields.at("listen"),
                                  f"address {stream.listen} is already used by {clash}")
            else:
                taken.append((address, fields.at("listen")))
        if stream.name is not None and stream.listen is not None:
            streams.append(stream)
    return tuple(streams)


def streams_version(base: str, streams: tuple[Stream, ...]) -> str:
    """The config version including streams; unchanged when there are none."""
    return entities_version(base, streams=streams)


def _taken_addresses(top: Fields, gateway) -> list[tuple[tuple[str, int], str]]:
    """Addresses other listeners bind: gateway.listen, `listeners` entries (read leniently:
    their own reader reports their problems), an explicit admin listen."""
    taken = [(bind_address(gateway.listen), "gateway.listen")]
    raw = top.raw("listeners")
    for index, entry in enumerate(raw if isinstance(raw, list) else ()):
        listen = entry.get("listen") if isinstance(entry, dict) else None
        try:
            taken.append((bind_address(listen_address(listen)), f"listeners[{index}].listen"))
        except Invalid:
            continue
    admin = gateway.admin.listen
    if admin and admin != "off":
        try:
            taken.append((bind_address(listen_address(admin)), "gateway.admin.listen"))
        except Invalid:
            pass
    return taken


# --- one stream -------------------------------------------------------------------------------

def read_stream(fields: Fields, known: list[str]) -> Stream:
    defaults = Stream(name="", listen="")
    passthrough = fields.has("tls_passthrough")
    given = [key for key in ("upstream", "address", "tls_passthrough") if fields.has(key)]
    if len(given) != 1:
        fields.issues.add(fields.path, "set exactly one of 'upstream', 'address' or "
                                       "'tls_passthrough'" + (f", found {_quoted(given)}"
                                                              if given else ""))
    destination = None if passthrough else read_destination(fields, known)
    routes = read_passthrough(fields, known) if passthrough else ()
    default = None
    if fields.has("default"):
        if not passthrough:
            fields.issues.add(fields.at("default"), "'default' applies to 'tls_passthrough' "
                                                    "only: a plain stream has one destination")
        section = Fields.of(fields.issues, fields.at("default"), fields.raw("default"),
                            DESTINATION_FIELDS)
        if section is not None:
            default = read_destination(section, known, required=True)
    return Stream(
        name=fields.value("name", name, required=True),
        listen=fields.value("listen", listen_address, required=True),
        destination=destination,
        tls_passthrough=routes,
        default=default,
        connect_timeout=fields.value("connect_timeout", duration, defaults.connect_timeout),
        idle_timeout=fields.value("idle_timeout", duration, defaults.idle_timeout),
        hello_timeout=fields.value("hello_timeout", duration, defaults.hello_timeout),
    )


def read_passthrough(fields: Fields, known: list[str]) -> tuple[SniRoute, ...]:
    routes: list[SniRoute] = []
    claimed: dict[str, str] = {}
    listed = False
    for path, raw in fields.items("tls_passthrough", "list of {snis, upstream | address}"):
        listed = True
        entry = Fields.of(fields.issues, path, raw, PASSTHROUGH_FIELDS)
        if entry is None:
            continue
        snis: list[str] = []
        for sni_path, element in entry.items("snis", "list of host names"):
            sni = entry.parse_at(sni_path, element, sni_name)
            if sni is None or sni in snis:
                continue
            if sni in claimed:
                entry.issues.add(sni_path, f"SNI '{sni}' is already routed by {claimed[sni]}")
                continue
            claimed[sni] = sni_path
            snis.append(sni)
        if not entry.has("snis"):
            entry.issues.add(path, "missing required field 'snis' (unmatched names go to "
                                   "the stream's 'default')")
        destination = read_destination(entry, known, required=True)
        if snis and destination is not None:
            routes.append(SniRoute(tuple(snis), destination))
    if not listed and fields.has("tls_passthrough"):
        fields.issues.add(fields.at("tls_passthrough"), "expected at least one entry")
    return tuple(routes)


def read_destination(fields: Fields, known: list[str],
                     required: bool = False) -> Destination | None:
    """`upstream: NAME` or `address: HOST:PORT` (exactly one when `required`)."""
    if required and fields.has("upstream") == fields.has("address"):
        fields.issues.add(fields.path, "set exactly one of 'upstream' or 'address'")
    if fields.has("upstream"):
        upstream = fields.value("upstream", name)
        if upstream is not None and upstream not in known:
            shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
            fields.issues.add(fields.at("upstream"), f"unknown upstream '{upstream}' "
                              + (f"(known: {shown})" if known else "(no upstreams are defined)"))
            return None
        return Destination(upstream=upstream) if upstream is not None else None
    if fields.has("address"):
        parsed = fields.value("address", connect_address)
        return Destination(host=parsed[0], port=parsed[1]) if parsed is not None else None
    return None


def connect_address(value: object) -> tuple[str, int]:
    """'host:port' or '[v6]:port' to connect to -> (host without brackets, port); also a
    registry instance's address (fastmesh.mesh.registry.instance_address)."""
    text = string(value)
    host_part, port_part = split_host_port(text)
    if not host_part or port_part is None:
        raise Invalid(f"expected 'host:port' or '[ipv6]:port', found {text!r}")
    return address_host(host_part), port_number(port_part)


def _quoted(keys: list[str]) -> str:
    return ", ".join(f"'{key}'" for key in keys)
