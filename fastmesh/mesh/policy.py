"""The sidecar's policy file (`fastmesh sidecar --policy FILE`, YAML or JSON): who may call this
service, and what the app's calls to each destination get.

    authorization:                  # fastmesh.plugins.mesh_authorization (the inbound side)
      - {to: orders, from: [spiffe://example.org/svc/frontend], methods: [GET], paths: [/orders]}
    services:                       # per destination: the gateway's service fields that apply
      - name: payments              #   to a mesh destination (the registry gives the address)
        connect_timeout: 500ms
        read_timeout: 5s
        retries: 1
        retry_on: [connect-failure]
        versions: {v1: 90, v2: 10}  #   a canary: shares of the calls by registered version
        plugins:
          - {name: rate-limiting, config: {second: 50, policy: local}}
    plugins: [...]                  # on every outbound call (global scope)
    consumers: [...]                # for the auth plugins of the entries above

The outbound part uses the gateway's own schema and validator (it is overlaid on the generated
outbound config, fastmesh.mesh.routes), so the same plugins and settings serve north-south and
east-west traffic, and a mistake is reported as `FILE: services[0].retries: ...`. A destination
the registry does not know (yet) keeps its entry until it appears.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastmesh.config.schema import Fields, Issues

TOP_FIELDS = ("_format_version", "authorization", "services", "plugins", "consumers")
DESTINATION_FIELDS = ("name", "connect_timeout", "read_timeout", "write_timeout", "retries",
                      "retry_on", "per_try_timeout", "plugins", "versions")
MESH_FIELDS = ("versions",)             # read here, not by the gateway schema (routes.py)
SHARE_MAX = 10000
REGISTRY_FIELDS = ("url", "protocol", "host", "port", "path")   # what the registry decides
UNUSED_ADDRESS = "http://127.0.0.1:9"   # validation only: the destinations' real address is theirs


@dataclass(frozen=True)
class Outbound:
    """The outbound part of a policy file, validated, as written (plain data)."""

    services: dict = field(default_factory=dict)    # destination name -> its fields (no name)
    plugins: tuple = ()
    consumers: tuple = ()

    def document_parts(self) -> dict:
        """Top-level entries to add to the outbound config document."""
        parts = {}
        if self.plugins:
            parts["plugins"] = list(self.plugins)
        if self.consumers:
            parts["consumers"] = list(self.consumers)
        return parts


@dataclass(frozen=True)
class PolicyFile:
    authorization: dict                 # service -> its rules (mesh_authorization.parse_policy)
    outbound: Outbound


def read_policy_file(path: str) -> PolicyFile:
    """The policy file at `path`; ValueError listing every problem with its place in the file."""
    from fastmesh.config.datafile import read_data_file
    return parse_policy_file(read_data_file(path), path)


def parse_policy_file(data: object, source: str) -> PolicyFile:
    from fastmesh.plugins.mesh_authorization import parse_policy
    issues = Issues(source)
    if data is None:
        data = {}
    top = Fields.of(issues, "", data, TOP_FIELDS)
    if top is None:
        raise ValueError("\n".join(str(i) for i in issues.items))
    problems: list[str] = []
    try:
        authorization = parse_policy({"authorization": data["authorization"]}
                                     if "authorization" in data else {}, source)
    except ValueError as exc:
        authorization = {}
        problems.append(str(exc))
    outbound = _read_outbound(top, data, issues)
    if outbound is not None:
        problems.extend(_check_with_gateway_schema(outbound, source))
    problems[:0] = [str(i) for i in issues.items]
    if problems:
        raise ValueError("\n".join(problems))
    return PolicyFile(authorization, outbound)


def _read_outbound(top: Fields, data: dict, issues: Issues) -> Outbound | None:
    """The destinations' entries, shape-checked here (what the gateway schema cannot know)."""
    from fastmesh.mesh.registry import service_name
    before = len(issues.items)
    services: dict[str, dict] = {}
    for path, element in top.items("services"):
        if isinstance(element, dict):
            for key in REGISTRY_FIELDS:
                if key in element:
                    issues.add(f"{path}.{key}", "a destination's address comes from the "
                                                "registry; only its settings go here")
            if "routes" in element:
                issues.add(f"{path}.routes", "a destination's routes are made by the sidecar "
                                             "(by its name); put plugins on the service")
        fields = Fields.of(issues, path, element,
                           DESTINATION_FIELDS + REGISTRY_FIELDS + ("routes",))
        if fields is None:
            continue
        name = fields.value("name", service_name, required=True)
        versions = fields.value("versions", version_shares)
        if name is None:
            continue
        if name in services:
            issues.add(fields.at("name"), f"destination {name!r} is listed twice")
            continue
        services[name] = {k: v for k, v in element.items() if k != "name"}
        if versions is not None:
            services[name]["versions"] = versions
    plugins = tuple(element for _, element in top.items("plugins"))
    consumers = tuple(element for _, element in top.items("consumers"))
    if len(issues.items) != before:
        return None
    return Outbound(services, plugins, consumers)


def version_shares(value: object) -> dict[str, int]:
    """`versions`: registered version -> its share of the calls (0..SHARE_MAX, some above 0)."""
    from fastmesh.config.schema import Invalid
    from fastmesh.mesh.registry import _label
    if not isinstance(value, dict) or not value:
        raise Invalid("expected a mapping of registered versions to shares, e.g. "
                      "{v1: 90, v2: 10}")
    shares = {}
    for version, share in value.items():
        if not isinstance(version, str) or not version:
            raise Invalid(f"expected version names, found {version!r}")
        _label(version)
        if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share <= SHARE_MAX:
            raise Invalid(f"share of version {version!r}: expected an integer 0..{SHARE_MAX}, "
                          f"found {share!r}")
        shares[version] = share
    if not any(shares.values()):
        raise Invalid("every share is 0: at least one version must take calls")
    return shares


def _check_with_gateway_schema(outbound: Outbound, source: str) -> list[str]:
    """Validate the outbound part with the gateway's loader, on a document of the same shape
    (entry i of `services` stays entry i, so the paths in the messages are the file's)."""
    from fastmesh.config import ConfigError, load_config_data
    document = {
        "_format_version": "1", "gateway": {"admin": {"listen": "off"}},
        "services": [{"name": name, "url": UNUSED_ADDRESS,
                      **{k: v for k, v in fields.items() if k not in MESH_FIELDS}}
                     for name, fields in outbound.services.items()],
        **outbound.document_parts(),
    }
    try:
        load_config_data(document, source=source)
    except ConfigError as exc:
        return [str(issue) for issue in exc.issues]
    return []
