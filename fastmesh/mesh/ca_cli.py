"""The `fastmesh ca` command: init, issue, token, show, serve (see docs/ca.md)."""
from __future__ import annotations

import argparse
import os
import sys

ENV_CA_DIR = "FASTMESH_CA_DIR"
DEFAULT_LISTEN = "127.0.0.1:15010"


def _duration(value: str) -> float:
    """'24h', '30m', '6s', '1h30m' or a bare number of seconds."""
    from fastmesh.config.durations import duration_seconds
    try:
        seconds = float(value)
    except ValueError:
        seconds = duration_seconds(value)
        if seconds is None:
            raise argparse.ArgumentTypeError(
                f"expected a duration like 24h, 30m or 6s (or seconds), found {value!r}") from None
    if not seconds >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, found {value!r}")
    return seconds


def _service(value: str) -> str:
    from fastmesh.config.schema import Invalid
    from fastmesh.mesh.registry import service_name
    try:
        return service_name(value)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _listen(value: str) -> str:
    from fastmesh.config.schema import Invalid, listen_address
    try:
        return listen_address(value)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_parser(sub) -> None:
    ca = sub.add_parser(
        "ca", help="the mesh's certificate authority: init, issue, token, show, serve",
        description="A small CA for mesh mTLS: a root per trust domain, short-lived workload "
                    "certificates named spiffe://<trust-domain>/svc/<service>, bootstrap tokens "
                    "bound to one service, and a signing service for sidecars. See docs/ca.md.")
    # `fastmesh` hands "sidecar" to fastmesh.mesh.cli.main, which runs `mesh_main`.
    ca.set_defaults(command="sidecar", mesh_main=None)
    commands = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)

    def with_dir(p):
        p.add_argument("--dir", required=ENV_CA_DIR not in os.environ,
                       default=os.environ.get(ENV_CA_DIR), metavar="DIR",
                       help=f"the CA directory (default: ${ENV_CA_DIR})")
        return p

    p = with_dir(commands.add_parser(
        "init", help="create the mesh's root (ECDSA P-256) in a new directory",
        description="Create DIR (0700) with ca.pem (the root), ca-key.pem (0600), ca.json and "
                    "token-secret (0600). Refuses when DIR already holds a CA, unless --force."))
    p.add_argument("--trust-domain", required=True, metavar="NAME",
                   help="the SPIFFE trust domain, e.g. example.org")
    p.add_argument("--validity", type=_duration, default=None, metavar="DURATION",
                   help="the root's lifetime (default: 10 years)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing CA (what it issued is no longer trusted)")
    p.set_defaults(mesh_main=_init)

    p = with_dir(commands.add_parser(
        "issue", help="write a workload certificate and its key for one service",
        description="Write OUT/key.pem (0600, made here), OUT/ca.pem and OUT/cert.pem (SAN "
                    "spiffe://<trust-domain>/svc/SERVICE), atomically, key first. A sidecar "
                    "watching OUT picks up a re-issued pair."))
    p.add_argument("--service", required=True, type=_service, metavar="NAME")
    p.add_argument("--out", required=True, metavar="OUT", help="the workload directory")
    p.add_argument("--ttl", type=_duration, default=86400.0, metavar="DURATION",
                   help="lifetime (default: 24h)")
    p.set_defaults(mesh_main=_issue)

    p = with_dir(commands.add_parser(
        "token", help="print the bootstrap token of one service (for `fastmesh ca serve`)",
        description="Print the token a sidecar of SERVICE sends to the signing service. It "
                    "grants that service only; keep it as secret as a key."))
    p.add_argument("--service", required=True, type=_service, metavar="NAME")
    p.set_defaults(mesh_main=_token)

    p = with_dir(commands.add_parser(
        "show", help="print the trust domain, the root's fingerprint and expiry"))
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(mesh_main=_show)

    p = with_dir(commands.add_parser(
        "serve", help="run the signing service sidecars get certificates from",
        description="POST /v1/sign {service, csr, token} -> {certificate, ca, not_after}. Plain "
                    "HTTP, for loopback; --tls serves it with a certificate from this CA "
                    "(clients verify it with ca.pem). SIGTERM/SIGINT stop it."))
    p.add_argument("--listen", type=_listen, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"default: {DEFAULT_LISTEN}")
    p.add_argument("--ttl", type=_duration, default=86400.0, metavar="DURATION",
                   help="lifetime of the certificates it signs (default: 24h; a request may "
                        "ask for less)")
    p.add_argument("--tls", action="store_true", help="serve over TLS (certificate from this CA)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="with --tls: another DNS name or IP for the service's certificate "
                        "(repeatable; the listen address is always included)")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="allow plain HTTP on an address beyond loopback (tokens in clear)")
    p.set_defaults(mesh_main=_serve)


def _fail(command: str, message: str) -> int:
    print(f"fastmesh ca {command}: {message}", file=sys.stderr, flush=True)
    return 1


def _init(args) -> int:
    from fastmesh.mesh.ca import CA, CAError, ROOT_VALIDITY
    try:
        ca = CA.init(args.dir, args.trust_domain, force=args.force,
                     validity=args.validity or ROOT_VALIDITY)
    except (CAError, OSError) as exc:
        return _fail("init", str(exc))
    print(f"created the root of trust domain '{ca.trust_domain}' in {ca.directory} "
          f"(SHA-256 {ca.fingerprint}); keep ca-key.pem and token-secret private")
    return 0


def _load(command: str, directory: str):
    from fastmesh.mesh.ca import CA, CAError
    try:
        return CA.load(directory)
    except CAError as exc:
        _fail(command, str(exc))
        return None


def _issue(args) -> int:
    from fastmesh.mesh.ca import CAError, cert_expiry, spiffe_id, write_workload
    ca = _load("issue", args.dir)
    if ca is None:
        return 1
    try:
        cert, key = ca.issue(args.service, ttl=args.ttl)
        write_workload(args.out, cert, key, ca.cert_pem)
    except (CAError, OSError) as exc:
        return _fail("issue", str(exc))
    print(f"issued {spiffe_id(ca.trust_domain, args.service)} valid until "
          f"{_when(cert_expiry(cert))} into {args.out} (cert.pem, key.pem, ca.pem)")
    return 0


def _token(args) -> int:
    ca = _load("token", args.dir)
    if ca is None:
        return 1
    print(ca.make_token(args.service))
    return 0


def _show(args) -> int:
    ca = _load("show", args.dir)
    if ca is None:
        return 1
    info = {"trust_domain": ca.trust_domain, "fingerprint_sha256": ca.fingerprint,
            "not_after": _when(ca.not_after), "created": ca.created, "directory": ca.directory}
    if args.json:
        import json
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key + ':':20} {value}")
    return 0


def _serve(args) -> int:
    from fastmesh.mesh.ca_server import run
    return run(args.dir, args.listen, args.ttl, tls=args.tls, names=tuple(args.name),
               allow_plaintext=args.allow_plaintext)


def _when(epoch: float) -> str:
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
