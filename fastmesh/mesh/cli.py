"""The `fastmesh sidecar` subcommand: its flags, checked up front, and its entry point (also
`fastmesh mesh ...`'s, whose parser fastmesh.mesh.status adds: a sidecar does not load it)."""
from __future__ import annotations

import argparse
import os

from fastmesh.config.schema import Invalid, integer, listen_address

ENV_REGISTRY = "FASTMESH_REGISTRY"
ENV_SERVICE = "FASTMESH_SERVICE"         # the container image passes settings this way
ENV_APP_PORT = "FASTMESH_APP_PORT"
ENV_MTLS = "FASTMESH_MTLS"
ENV_TLS_DIR = "FASTMESH_TLS_DIR"
ENV_CA_URL = "FASTMESH_CA_URL"
ENV_CA_TOKEN = "FASTMESH_CA_TOKEN"       # env rather than the flag: not in `ps` output
ENV_POLICY = "FASTMESH_POLICY"
ENV_OPAQUE_PORTS = "FASTMESH_OPAQUE_PORTS"


def _checked(parse, what: str):
    def check(value: str):
        try:
            return parse(value)
        except Invalid as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid {what}: {exc}") from None
    return check


def _service(value: str) -> str:
    from fastmesh.mesh.registry import service_name
    return service_name(value)


def _address(value: str) -> tuple[str, int]:
    from fastmesh.mesh.registry import instance_address
    return instance_address(value)


def _extra_address(value: str) -> str:
    from fastmesh.mesh.registry import addresses_value
    try:
        found = addresses_value(value)
    except Invalid:
        found = ""
    if not found or "," in found:
        raise Invalid(f"expected one IP address (IPv6 without a zone), found {value!r}")
    return found


def _listen(value: str) -> str:
    return listen_address(value)


def _port(value: str) -> int:
    if not value.isdigit():
        raise Invalid(f"expected a port number, found {value!r}")
    return integer(1, 65535, "port")(int(value))


def _ports(value: str) -> frozenset[int]:
    """`3306,5432,9000-9010` as a set of ports."""
    ports: set[int] = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        low, dash, high = item.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise Invalid(f"expected PORT or LOW-HIGH, found {item!r}")
        first, last = int(low), int(high) if dash else int(low)
        if not 1 <= first <= last <= 65535:
            raise Invalid(f"ports are 1..65535, low to high, found {item!r}")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def _weight(value: str) -> int:
    if not value.isdigit():
        raise Invalid(f"expected a weight 0..65535, found {value!r}")
    return integer(0, 65535, "weight")(int(value))


def _seconds(low: float, high: float):
    """A parser of a number of seconds from `low` to `high`."""
    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise Invalid(f"expected seconds, found {value!r}") from None
        if not low <= seconds <= high:
            raise Invalid(f"must be {low:g}..{high:g} seconds, found {value}")
        return seconds
    return parse


_positive_seconds = _seconds(0.3, 3600)
_drain = _seconds(0, 3600)
_detect_timeout = _seconds(0.05, 60)


def _meta(value: str) -> tuple[str, str]:
    key, sep, text = value.partition("=")
    if not sep or not key:
        raise Invalid(f"expected KEY=VALUE, found {value!r}")
    return key, text


def _admin(value: str) -> str:
    return "off" if value.lower() == "off" else listen_address(value)


def _mtls(value: str) -> str:
    from fastmesh.mesh.mtls import MODES
    if value not in MODES:
        raise Invalid(f"expected one of {', '.join(MODES)}, found {value!r}")
    return value


def _ca_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise Invalid(f"expected http://HOST:PORT or https://HOST:PORT, found {value!r}")
    return value.rstrip("/")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sidecar", help="run a service-mesh sidecar beside one service instance",
        description="Run a sidecar: an inbound listener in front of the local app, and an "
                    "outbound listener that routes the app's calls to other services by name "
                    "(Host: NAME, or absolute-form requests when used as an HTTP proxy) over "
                    "the instances in the registry. Registers this instance with a TTL "
                    "heartbeat; SIGTERM deregisters, drains and exits 0. One process, one "
                    "worker. See docs/mesh.md.")
    p.add_argument("--service", required=ENV_SERVICE not in os.environ,
                   default=os.environ.get(ENV_SERVICE), type=_checked(_service, "service name"),
                   metavar="NAME", help="this instance's service (a host name: callers send "
                                        f"'Host: NAME'; default: ${ENV_SERVICE})")
    p.add_argument("--app-port", required=ENV_APP_PORT not in os.environ,
                   default=os.environ.get(ENV_APP_PORT), type=_checked(_port, "port"),
                   metavar="PORT", help=f"the local app's port on 127.0.0.1 (default: ${ENV_APP_PORT})")
    p.add_argument("--registry", default=os.environ.get(ENV_REGISTRY, "redis://127.0.0.1:6379/0"),
                   metavar="URL", help="redis://HOST:PORT/DB[?prefix=NAME] or file:PATH "
                                       f"(default: ${ENV_REGISTRY}, else redis://127.0.0.1:6379/0)")
    p.add_argument("--inbound", default="0.0.0.0:15006", type=_checked(_listen, "address"),
                   metavar="HOST:PORT", help="inbound listener (default: 0.0.0.0:15006)")
    p.add_argument("--outbound", default="127.0.0.1:15001", type=_checked(_listen, "address"),
                   metavar="HOST:PORT", help="outbound listener (default: 127.0.0.1:15001)")
    p.add_argument("--advertise", type=_checked(_address, "address"), metavar="HOST:PORT",
                   help="address registered for this instance (default: the inbound listener's; "
                        "when it listens on all interfaces, this host's primary address)")
    p.add_argument("--advertise-also", action="append", default=[],
                   type=_checked(_extra_address, "address"), metavar="IP",
                   help="another address of this instance (repeatable): its service's virtual "
                   "address, or one of its pod's; calls and TCP sent to it are for this service "
                   "(with --intercept on all interfaces, this pod's IPv6 addresses are added)")
    p.add_argument("--zone", default="", metavar="ZONE",
                   help="registered with the instance; the app's calls go to instances of this "
                        "zone first (see --locality)")
    p.add_argument("--locality", choices=("zone", "off"), default="zone",
                   help="zone (default, with --zone): a destination's instances in this zone "
                        "take its calls, the others only while none of those is healthy; "
                        "off: all instances alike")
    p.add_argument("--version", dest="instance_version", default="", metavar="VERSION",
                   help="the app's version, registered with the instance")
    p.add_argument("--weight", type=_checked(_weight, "weight"), default=100, metavar="N",
                   help="balancing weight 0..65535 (default: 100; 0: registered, never picked)")
    p.add_argument("--meta", action="append", default=[], type=_checked(_meta, "metadata"),
                   metavar="KEY=VALUE", help="instance metadata (repeatable)")
    p.add_argument("--instance-id", metavar="ID",
                   help="instance id (default: HOSTNAME-PID-RANDOM)")
    p.add_argument("--ttl", type=_checked(_positive_seconds, "ttl"), default=10.0,
                   metavar="SECONDS", help="registration TTL; the heartbeat runs every TTL/3 "
                                           "(default: 10)")
    p.add_argument("--admin", type=_checked(_admin, "address"), metavar="HOST:PORT|off",
                   help="read-only admin API: /ready, /status, /registry (default: "
                        "127.0.0.1:15000, skipped with a warning when busy)")
    p.add_argument("--drain-timeout", type=_checked(_drain, "drain timeout"), default=10.0,
                   metavar="SECONDS", help="on SIGTERM, how long in-flight requests may take "
                                           "(default: 10)")
    p.add_argument("--destinations", choices=("called", "all"), default="called",
                   help="compile only the destinations the app calls (on first call, dropped "
                        "when idle) or every service of the registry (default: called)")
    p.add_argument("--destinations-idle", type=_checked(_positive_seconds, "idle time"),
                   default=300.0, metavar="SECONDS",
                   help="with --destinations called: drop a destination unused this long "
                        "(default: 300)")
    p.add_argument("--intercept", action="store_true",
                   help="accept connections redirected by 'fastmesh mesh-init': HTTP for the "
                        "mesh is routed, other TCP relayed to its original destination "
                        "(SO_ORIGINAL_DST); run the sidecar under the excluded uid/gid")
    p.add_argument("--opaque-ports", default=os.environ.get(ENV_OPAQUE_PORTS, ""),
                   type=_checked(_ports, "ports"), metavar="PORT,LOW-HIGH,...",
                   help="with --intercept: connections to these ports (as dialled, both "
                        "directions) are opaque TCP, relayed at once without protocol "
                        "detection; for protocols where the server speaks first (MySQL, SMTP), "
                        "which would otherwise wait --detect-timeout "
                        f"(default: ${ENV_OPAQUE_PORTS}, else none)")
    p.add_argument("--detect-timeout", type=_checked(_detect_timeout, "detect timeout"),
                   default=0.5, metavar="SECONDS",
                   help="with --intercept: a new connection that sends nothing this long is "
                        "opaque TCP (a server-first protocol) (default: 0.5)")
    p.add_argument("--mtls", default=os.environ.get(ENV_MTLS), type=_checked(_mtls, "mode"),
                   metavar="strict|permissive|disabled",
                   help="sidecar-to-sidecar mutual TLS on the inbound listener (strict: mTLS "
                        "only; permissive: mTLS or plaintext) and to destinations that take it "
                        f"(default: ${ENV_MTLS}, else permissive with a certificate source, "
                        "disabled without)")
    p.add_argument("--tls-dir", default=os.environ.get(ENV_TLS_DIR), metavar="DIR",
                   help="this workload's certificate: DIR/cert.pem, key.pem, ca.pem from "
                        "'fastmesh ca issue' (watched, reloaded when replaced); with --ca-url, "
                        f"where the issued files are written (default: ${ENV_TLS_DIR})")
    p.add_argument("--ca-url", default=os.environ.get(ENV_CA_URL), type=_checked(_ca_url, "url"),
                   metavar="URL", help="get the certificate from 'fastmesh ca serve' (a CSR; the "
                                       f"key never leaves this process) (default: ${ENV_CA_URL})")
    p.add_argument("--ca-token", default=os.environ.get(ENV_CA_TOKEN), metavar="TOKEN",
                   help="bootstrap token for --ca-url ('fastmesh ca token --service NAME'; "
                        f"default: ${ENV_CA_TOKEN}, which keeps it out of the process list)")
    p.add_argument("--policy", default=os.environ.get(ENV_POLICY), metavar="FILE",
                   help="the mesh policy (YAML/JSON): authorization rules (authorization: "
                        "[{to, from, methods, paths}]) and per-destination settings and plugins "
                        "(services: [{name, timeouts, retries, plugins}], plugins, consumers); "
                        "re-read when it changes; see docs/mesh.md "
                        f"(default: ${ENV_POLICY})")


def main(args) -> int:
    import sys
    if getattr(args, "mesh_main", None) is not None:      # `fastmesh mesh ...` (see status.py)
        return args.mesh_main(args)
    from fastmesh.mesh.registry import ADDRESSES_KEY, addresses_value, instance_id
    from fastmesh.mesh.routes import MeshPolicy
    from fastmesh.mesh.sidecar import SidecarOptions, run_sidecar
    if args.instance_id is not None:
        try:
            instance_id(args.instance_id)
        except Invalid as exc:
            print(f"fastmesh sidecar: --instance-id: {exc.message}", file=sys.stderr)
            return 2
    admin = "127.0.0.1:15000" if args.admin is None else args.admin
    metadata = dict(args.meta)
    also = args.advertise_also
    if ADDRESSES_KEY in metadata:           # --meta fastmesh.addresses=...: --advertise-also
        try:
            written = addresses_value(metadata.pop(ADDRESSES_KEY))
        except Invalid as exc:
            print(f"fastmesh sidecar: --meta: {exc.message}", file=sys.stderr)
            return 2
        also = [*(written.split(",") if written else ()), *also]
    if admin != "off" and not admin.endswith(":0"):
        # Registered so that `fastmesh mesh status` finds this sidecar's admin API.
        from fastmesh.mesh.registry import ADMIN_KEY
        metadata.setdefault(ADMIN_KEY, admin)
    options = SidecarOptions(
        service=args.service, app_port=args.app_port, registry=args.registry,
        inbound=args.inbound, outbound=args.outbound, advertise=args.advertise,
        advertise_also=tuple(dict.fromkeys(also)),
        zone=args.zone, version=args.instance_version, weight=args.weight,
        metadata=tuple(sorted(metadata.items())), instance_id=args.instance_id,
        admin=None if admin == "off" else admin, admin_explicit=args.admin is not None,
        ttl=args.ttl, drain_timeout=args.drain_timeout, intercept=args.intercept,
        opaque_ports=args.opaque_ports, detect_timeout=args.detect_timeout,
        destinations=args.destinations, destinations_idle=args.destinations_idle,
        mtls=args.mtls or ("permissive" if args.tls_dir or args.ca_url else "disabled"),
        tls_dir=args.tls_dir, ca_url=args.ca_url, ca_token=args.ca_token,
        authz_file=args.policy,
        policy=MeshPolicy(local_zone=args.zone if args.locality == "zone" else ""))
    return run_sidecar(options)
