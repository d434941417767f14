"""`fastmesh health`: is the gateway (or, with --sidecar, the sidecar) on this host serving?

One GET on the admin API: /status for a gateway, /ready for a sidecar.

Made for container health checks (Docker's HEALTHCHECK, Kubernetes exec probes), which run inside
the gateway's own network namespace, so the admin listener can stay on loopback. Exit 0 when the
admin API answers and every worker is alive and runs the current config; 1 otherwise, with one
short line saying why (health checkers keep the output, so it should read well in a log).
"""
from __future__ import annotations

import http.client
import json
import sys

from fastmesh.config.schema import Invalid, port_number, split_host_port

DEFAULT_ADMIN = "127.0.0.1:8001"
DEFAULT_SIDECAR_ADMIN = "127.0.0.1:15000"
DEFAULT_TIMEOUT = 2.0


def admin_address(admin: str) -> tuple[str, int]:
    """'host:port' -> where to connect; a wildcard bind address means this host's loopback.

    Parsed with the config schema's helpers, not fastmesh.server: importing the data path costs
    a third of a second, paid on every probe.
    """
    host, port = split_host_port(admin)
    if port is None:
        raise Invalid(f"expected HOST:PORT, found {admin!r}")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "::1" if host == "::" else "127.0.0.1"
    return host, port_number(port)


def probe(admin: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
          sidecar: bool = False) -> tuple[bool, str]:
    """(healthy, one line for a log)."""
    try:
        host, port = admin_address(admin)
    except Invalid as exc:
        return False, f"--admin: {exc.message}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/ready" if sidecar else "/status", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"admin API on {admin} did not answer: {exc}"
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if sidecar:
        if resp.status == 200:
            return True, f"healthy: sidecar on {admin} is ready"
        why = status.get("message") if isinstance(status, dict) else None
        return False, f"unhealthy: sidecar on {admin} is not ready" + (f": {why}" if why else "")
    if resp.status != 200 or not isinstance(status, dict):
        message = status.get("message") if isinstance(status, dict) else None
        return False, f"admin API on {admin} answered {resp.status}" + (f": {message}" if message else "")
    return verdict(status)


def verdict(status: dict) -> tuple[bool, str]:
    """Judge a GET /status answer: every worker alive and on the current config."""
    workers = status.get("workers") or []
    alive = sum(1 for w in workers if w.get("alive"))
    config = status.get("config") or {}
    summary = (f"fastmesh {status.get('version')}, {alive}/{len(workers)} worker(s) alive, "
               f"config {config.get('version')}, up {status.get('uptime_seconds')}s")
    if not workers or alive < len(workers):
        return False, f"unhealthy: {summary}"
    if not config.get("applied", False):
        return False, f"unhealthy: {summary}, config not applied on every worker"
    return True, f"healthy: {summary}"


def main(admin: str | None, token: str | None, timeout: float, sidecar: bool = False) -> int:
    admin = admin or (DEFAULT_SIDECAR_ADMIN if sidecar else DEFAULT_ADMIN)
    healthy, line = probe(admin, token, timeout, sidecar)
    print(line, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1
