"""The sidecar's two configs, as ordinary fastmesh configs (validated by the same loader).

- inbound: every request to the local app (`127.0.0.1:<app-port>`), Host kept, through one
  route per service of the registry (the caller) and one for callers it cannot name: the
  inbound Gateway matches routes' hosts against the request's source service (see "Caller
  services" below), so each route's counters are one caller's;
- outbound: per service known to the registry, an upstream over its instances (p2c-ewma,
  passive health: 5xx, failures and timeouts eject an instance for a while; with a zone,
  instances of the caller's zone first: `zone_priorities`) and a route by host
  name: the service's, and its instances' hosts (a call to `http://10.0.0.5:8080/`, redirected
  by interception, is balanced over that instance's service); plus a catch-all route whose
  plugin answers 503 naming the unknown service. With mTLS on (fastmesh.mesh.mtls), services
  whose instances all take mTLS are `protocol: https` with this workload's certificate, the mesh
  root as trust, and the destination's SPIFFE id as the identity its certificate must carry.

Generating configs, rather than a separate data path, means the mesh gets the gateway's router,
balancers, retries, pools and outlier ejection unchanged; a registry change is applied like a
reload, compiled against the active Plan so unchanged instances keep their health and EWMA state
and their pooled connections.

Caller services (`Gateway.set_source`, native): the outbound Gateway writes
`X-Fastmesh-Source: <this service>` on every request it forwards (an app's own copy is dropped,
so an app cannot speak for another service through its sidecar). The inbound Gateway routes by
the source instead of Host: a caller's verified mTLS identity (`spiffe://<domain>/svc/<name>`)
decides whatever the header says; without one, the header's value; without either, the routes
without hosts (`<service>-inbound`: a client outside the mesh). The header is dropped before
the app: unauthenticated in plaintext, it must not look like an identity (X-Fastmesh-Peer is the
verified one). Per request this costs a header scan and the router's exact-host probe, no Python.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fastmesh._core.proxy import Gateway
from fastmesh.config import Config, load_config_data
from fastmesh.mesh.registry import View

UNKNOWN = "~unknown-service"        # '~' cannot be in a service name: no clash with the registry
SOURCE_HEADER = "X-Fastmesh-Source"
CALLER = "~from~"                   # inbound route names: <service>~from~<caller>


@dataclass(frozen=True)
class MeshPolicy:
    """What every outbound destination gets (one policy for all, for now)."""

    algorithm: str = "p2c-ewma"
    connect_timeout: float = 2.0
    read_timeout: float = 60.0
    retries: int = 3
    retry_on: tuple[str, ...] = ("connect-failure", "timeout", "reset", "5xx")
    eject_failures: int = 3             # passive: consecutive failures to eject an instance
    eject_timeouts: int = 3
    ejection_time: float = 10.0
    eject_statuses: tuple[int, ...] = (502, 503, 504)
    local_zone: str = ""                # zone-aware: this zone's instances first ("" = none)


def _gateway(limits: dict | None = None) -> dict:
    return {"admin": {"listen": "off"}, **({"limits": limits} if limits else {})}


def inbound_config(service: str, app_host: str, app_port: int,
                   connect_timeout: float = 2.0, read_timeout: float = 60.0,
                   authorization: list | None = None, callers=()) -> Config:
    """Everything arriving at the inbound listener goes to the local app, Host unchanged.

    One route per service of `callers` (the registry's services: any may call) matched by
    source (the module docstring), plus `<service>-inbound` for a caller without a known one.
    With `authorization` (this service's rules of the mesh policy, maybe none), every route
    runs the mesh-authorization plugin: it drops a client-sent X-Forwarded-Client-Cert and,
    when there are rules, answers 403 to what they do not allow."""
    app = f"[{app_host}]" if ":" in app_host else app_host
    plugins = [] if authorization is None else [{
        "name": "mesh-authorization", "config": {"service": service, "rules": authorization}}]
    route = {"paths": ["/"], "strip_path": False, "preserve_host": True,
             **({"plugins": plugins} if plugins else {})}
    routes = [{"name": f"{service}-inbound", **route}]
    routes += [{"name": caller_route(service, caller), "hosts": [caller], **route}
               for caller in sorted(callers)]
    return load_config_data({
        "_format_version": "1",
        "gateway": _gateway(),
        "services": [{
            "name": service, "url": f"http://{app}:{app_port}",
            "connect_timeout": f"{int(connect_timeout * 1000)}ms",
            "read_timeout": f"{int(read_timeout * 1000)}ms",
            # The app is one process behind one address: a retry would hit it again.
            "retries": 0,
            "routes": routes,
        }],
    }, source="<sidecar inbound>")


def caller_route(service: str, caller: str) -> str:
    return f"{service}{CALLER}{caller}"


def caller_of(service: str, route: str) -> str | None:
    """The caller service an inbound route counts, "" for `<service>-inbound` (no known
    caller), None for a route of another config."""
    if route == f"{service}-inbound":
        return ""
    prefix = f"{service}{CALLER}"
    return route[len(prefix):] if route.startswith(prefix) else None


def use_sources(inbound: Gateway | None, outbound: Gateway | None, service: str,
                identity: str | None) -> None:
    """Turn on caller services on the sidecar's Gateways (the module docstring): the outbound
    one stamps `service`, the inbound one routes by source, trusting a TLS peer whose identity
    is in `identity`'s trust domain (this workload's SPIFFE id; None without mTLS)."""
    if inbound is not None:
        prefix = f"{identity.rsplit('/', 1)[0]}/" if identity else None
        inbound.set_source(SOURCE_HEADER, route=True, peer_prefix=prefix)
    if outbound is not None:
        outbound.set_source(SOURCE_HEADER, stamp=service)


def routable_host(host: str) -> str | None:
    """An instance host as a route host: loopback and unspecified addresses name no instance
    (every sidecar of a host has them), IPv6 literals are bracketed as the loader keeps them."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None if host == "localhost" else host.lower().rstrip(".")
    if address.is_loopback or address.is_unspecified:
        return None
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def host_owners(view: View) -> dict[str, tuple[frozenset[str], bool]]:
    """Routable host -> (the services it names, registered: whether some instance's address is
    at it). Those are the services of the instances registered at the host, else, when none
    is, of those that claim it as another address (`Instance.hosts`): an instance cannot take a
    host away from the instance registered there."""
    registered: dict[str, set[str]] = {}
    claimed: dict[str, set[str]] = {}
    for name, instances in view.items():
        for instance in instances:
            for i, host in enumerate(map(routable_host, instance.hosts)):
                if host is not None:
                    (claimed if i else registered).setdefault(host, set()).add(name)
    owners = {host: (frozenset(names), False) for host, names in claimed.items()}
    owners.update((host, (frozenset(names), True)) for host, names in registered.items())
    return owners


def instance_hosts(view: View) -> dict[str, tuple[str, ...]]:
    """service -> the hosts of its instances that a call may be addressed to (`Host: 10.0.0.5`
    or `10.0.0.5:8080`: the port is not matched; `Instance.hosts`, as host_owners says). A host
    that names two services, or equal to a service name, is left out: it could not tell them
    apart."""
    found: dict[str, list[str]] = {}
    for host, (names, _) in host_owners(view).items():
        if len(names) == 1 and host not in view:
            found.setdefault(next(iter(names)), []).append(host)
    return {name: tuple(sorted(hosts)) for name, hosts in found.items()}


def mesh_hosts(view: View) -> frozenset[str]:
    """Every host the outbound routes match: service names and instance hosts."""
    return frozenset(view).union(*instance_hosts(view).values())


@dataclass(frozen=True)
class MeshTLSFiles:
    """What the outbound side presents and trusts when this sidecar has mTLS on."""

    trust_domain: str
    ca: str                         # the mesh root (trust bundle)
    cert: str                       # this workload's certificate and key
    key: str


MTLS_KEY = "fastmesh.mtls"          # instance metadata: its inbound mTLS mode (absent: disabled)
MTLS_MODES = ("strict", "permissive")


def use_mtls(instances) -> tuple[bool, tuple]:
    """(mTLS?, the instances to balance over) for one destination, when this sidecar has mTLS:
    mTLS when every instance takes it; else plaintext over those that accept plaintext (not
    strict), or, if none does, mTLS over all of them."""
    modes = [dict(i.metadata).get(MTLS_KEY) for i in instances]
    if all(mode in MTLS_MODES for mode in modes):
        return True, tuple(instances)
    plain = tuple(i for i, mode in zip(instances, modes) if mode != "strict")
    return (False, plain) if plain else (True, tuple(instances))


def zone_priorities(instances, zone: str) -> list[int]:
    """Each instance's balancing tier for a caller in `zone`: 0 for that zone's instances, 1 for
    the others, which then take traffic only while none of the zone's is healthy (the
    balancer's priority tiers: ejection, active health and weight 0 all count). All 0 when
    `zone` is "" or no instance is in it."""
    if not zone or not any(i.zone == zone for i in instances):
        return [0] * len(instances)
    return [0 if i.zone == zone else 1 for i in instances]


SPLIT_SCALE = 10000      # a split's weights: a version's share of this, among its instances


def version_weights(instances, shares: dict[str, int]) -> list[int]:
    """Each instance's balancing weight for a destination split by version (the policy file's
    `versions`): a listed version's share of SPLIT_SCALE (at least 1) divided among its
    instances by their own weights, whole numbers by largest remainder (so a small share over
    many instances stays small: some of them get 0); instances of other versions 0
    (registered, never picked). Balanced round robin, whose smooth weighted cycle gives each
    version its share; a version without a healthy instance leaves it to the others."""
    total = sum(shares.values())
    members: dict[str, list[int]] = {}
    for k, instance in enumerate(instances):
        if shares.get(instance.version) and instance.weight:
            members.setdefault(instance.version, []).append(k)
    weights = [0] * len(instances)
    for version, ks in members.items():
        budget = max(1, round(SPLIT_SCALE * shares[version] / total))
        own = sum(instances[k].weight for k in ks)
        exact = [budget * instances[k].weight / own for k in ks]
        whole = [int(x) for x in exact]
        by_remainder = sorted(range(len(ks)), key=lambda j: whole[j] - exact[j])
        for j in by_remainder[:budget - sum(whole)]:
            whole[j] += 1
        for j, k in enumerate(ks):
            weights[k] = whole[j]
    return weights


def outbound_document(view: View, policy: MeshPolicy = MeshPolicy(),
                      tls: MeshTLSFiles | None = None, outbound=None,
                      only: frozenset[str] | None = None) -> dict:
    """`outbound` (fastmesh.mesh.policy.Outbound, the policy file's part) overlays each named
    destination's settings and adds global plugins and consumers; `only`: compile just these
    services of the view (fastmesh.mesh.destinations; None: all)."""
    services = []
    overlays = outbound.services if outbound is not None else {}
    upstreams = []
    by_instance = instance_hosts(view)
    for name, instances in view.items():
        if only is not None and name not in only:
            continue
        secure = False
        if tls is not None and instances:
            secure, instances = use_mtls(instances)
        # Two registrations of one address (a restarted instance under a new id, before the
        # old key expires) are one target: the first by id keeps it.
        unique, seen = [], set()
        for instance in instances:
            if instance.address not in seen:
                seen.add(instance.address)
                unique.append(instance)
        overlay = dict(overlays.get(name, {}))
        shares = overlay.pop("versions", None)
        split = version_weights(unique, shares) if shares else None
        algorithm = policy.algorithm
        if split and any(split):    # by version: round robin, one tier (it overrides zones)
            algorithm = "round-robin"
            tiers = zip(split, [0] * len(unique))
        else:       # no split, or none of its versions has an instance yet: all, as usual
            tiers = zip([i.weight for i in unique], zone_priorities(unique, policy.local_zone))
        targets = {i.address: tier for i, tier in zip(unique, tiers)}
        if not targets:
            continue
        upstreams.append({
            "name": name, "algorithm": algorithm,
            "targets": [{"target": address, "weight": weight, "priority": priority}
                        for address, (weight, priority) in targets.items()],
            "healthchecks": {"passive": {
                "unhealthy": {"http_statuses": list(policy.eject_statuses),
                              "failures": policy.eject_failures,
                              "timeouts": policy.eject_timeouts},
                "ejection_time": f"{int(policy.ejection_time * 1000)}ms"}},
        })
        transport = {"protocol": "http"}
        if secure:
            # The peer must be the service meant: its certificate's SPIFFE id is checked (a
            # URI SAN; the certificates carry no DNS name), the name sent as SNI is the service.
            transport = {"protocol": "https", "tls_ca": tls.ca, "tls_client_cert": tls.cert,
                         "tls_client_key": tls.key, "tls_server_name": name,
                         "tls_peer_identity": f"spiffe://{tls.trust_domain}/svc/{name}"}
        services.append({
            "name": name, "host": name, **transport,
            "connect_timeout": f"{int(policy.connect_timeout * 1000)}ms",
            "read_timeout": f"{int(policy.read_timeout * 1000)}ms",
            "retries": policy.retries, "retry_on": list(policy.retry_on),
            "routes": [{"name": name, "hosts": [name, *by_instance.get(name, ())],
                        "strip_path": False,
                        "preserve_host": False}],
            **overlay,
        })
    services.append({
        "name": UNKNOWN, "url": "http://127.0.0.1:9",     # never contacted: the plugin answers
        # "/" for ordinary requests; the regex (it matches at the start of any path) also
        # catches the empty path of `GET http://name HTTP/1.1` and `OPTIONS *`.
        "routes": [{"name": UNKNOWN, "paths": ["/", "~/?"], "strip_path": False,
                    "plugins": [{"name": "mesh-unknown-service",
                                 "module": "fastmesh.mesh.unknown_service"}]}],
    })
    return {"_format_version": "1", "gateway": _gateway(), "upstreams": upstreams,
            "services": services, **(outbound.document_parts() if outbound is not None else {})}


def outbound_config(view: View, policy: MeshPolicy = MeshPolicy(),
                    tls: MeshTLSFiles | None = None, outbound=None,
                    only: frozenset[str] | None = None) -> Config:
    """The outbound listener's config for the registry view `view`."""
    return load_config_data(outbound_document(view, policy, tls, outbound, only),
                            source="<sidecar outbound>")


def destination_of(view: View, host: str | None) -> str | None:
    """The service a call addressed to `host` is for: a service name, or an instance host that
    names one service only (as the outbound routes match them); None when none."""
    if not host:
        return None
    if host in view:
        return host
    for name, hosts in instance_hosts(view).items():
        if host in hosts:
            return name
    return None
