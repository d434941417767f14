"""The `fastmesh` command: run, reload, echo, check, health; sidecar, mesh and mesh-init come
from fastmesh.mesh (PLUGGED_COMMANDS)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from fastmesh import __version__

SYSTEM_CONFIG = "/etc/fastmesh/fastmesh.yaml"   # served when present (e.g. mounted in a container)


def _workers(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers, found {value!r}") from None
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"workers must be 1..1024, found {n}")
    return n


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, found {value!r}") from None
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0..3600 seconds, found {value}")
    return seconds


def _terminal_columns() -> int:
    """The terminal width as shutil.get_terminal_size() reads it ($COLUMNS, else stdout's)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=_terminal_columns() - 2)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (subcommand parsers included) whose help formatter gets the width.

    Left to itself, the formatter, which add_argument builds every time, imports shutil to ask
    for it, and with shutil bz2, lzma and zlib: ~0.4 MB that `fastmesh run` would keep for good.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _help_formatter)
        super().__init__(*args, **kwargs)


# Subcommands that other modules define with their own add_parser(sub), and the commands each
# adds. A module is imported only to parse one of its commands, or to list them all (--help, no
# command, an unknown one): `fastmesh run` does not load the mesh's command line, nor what it
# imports, into the gateway.
OWN_COMMANDS = ("run", "reload", "echo", "check", "health")
PLUGGED_COMMANDS = (
    ("fastmesh.mesh.cli", ("sidecar",)),
    ("fastmesh.mesh.status", ("mesh",)),
    ("fastmesh.mesh.interception", ("mesh-init",)),
    ("fastmesh.mesh.ca_cli", ("ca",)),
)


def _command(argv: list[str]) -> str | None:
    """The subcommand when `argv` starts with one; None (build them all) for anything else."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def _plugged_modules(command: str | None) -> list[str]:
    for module, commands in PLUGGED_COMMANDS:
        if command in commands:
            return [module]
    return [] if command in OWN_COMMANDS else [module for module, _ in PLUGGED_COMMANDS]


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, given `command`, of that one (and the top level)."""
    parser = _Parser(
        prog="fastmesh",
        description="API gateway and service-mesh sidecar with a Cython data path on uvloop.")
    parser.add_argument("--version", action="version", version=f"fastmesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the gateway",
        description="Run the gateway. Without --config it serves the embedded default: "
                    "every path is routed to a built-in echo upstream. Signals: SIGHUP reloads "
                    "the config file, SIGTERM/SIGINT drain in-flight requests and exit.")
    run.add_argument("--config", "-c", metavar="FILE",
                     help="declarative config (YAML or JSON; default: $FASTMESH_CONFIG, else "
                          f"{SYSTEM_CONFIG} when it exists, else the embedded default)")
    run.add_argument("--listen", "-l", metavar="HOST:PORT",
                     help="listen address (default: the config's gateway.listen, else 127.0.0.1:8000)")
    run.add_argument("--workers", "-w", type=_workers, default=None, metavar="N",
                     help="worker processes, each with its own event loop and SO_REUSEPORT "
                          "listener (default: $FASTMESH_WORKERS, else the number of CPUs, here "
                          f"{os.cpu_count() or 1}); 1 runs everything in one process")
    run.add_argument("--admin", metavar="HOST:PORT|off",
                     help="admin API listener (default: the config's gateway.admin.listen, else "
                          "127.0.0.1:8001); 'off' disables it")
    run.add_argument("--drain-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, how long in-flight requests may take to finish "
                          "(default: 10)")

    reload = sub.add_parser(
        "reload", help="make a running gateway re-read its config file",
        description="Ask a running gateway to re-read and apply its config file, through its "
                    "admin API (or send SIGHUP with --pid). Prints the new config version, or "
                    "every problem when the file is refused (the old config keeps serving).")
    reload.add_argument("--admin", metavar="HOST:PORT", default="127.0.0.1:8001",
                        help="the gateway's admin API (default: 127.0.0.1:8001)")
    reload.add_argument("--token", metavar="TOKEN", default=os.environ.get("FASTMESH_ADMIN_TOKEN"),
                        help="admin token (default: $FASTMESH_ADMIN_TOKEN)")
    reload.add_argument("--pid", type=int, metavar="PID",
                        help="send SIGHUP to this gateway process instead (no result is reported)")

    echo = sub.add_parser("echo", help="run the echo upstream (answers with a JSON description of each request)")
    echo.add_argument("--listen", "-l", metavar="HOST:PORT", default="127.0.0.1:9000")

    for module in _plugged_modules(command):
        importlib.import_module(module).add_parser(sub)

    check = sub.add_parser("check", help="validate a config file without serving it")
    check.add_argument("--config", "-c", metavar="FILE", required=True)

    health = sub.add_parser(
        "health", help="exit 0 when the gateway here is serving, else 1 (for container health checks)",
        description="Ask a running gateway's admin API (GET /status) whether it serves: exit 0 "
                    "when every worker is alive on the current config, 1 otherwise, with one "
                    "short line saying why.")
    health.add_argument("--admin", metavar="HOST:PORT", default=None,
                        help="the admin API (default: 127.0.0.1:8001, with --sidecar 127.0.0.1:15000)")
    health.add_argument("--sidecar", action="store_true",
                        help="ask a sidecar's admin API (GET /ready) instead of a gateway's")
    health.add_argument("--token", metavar="TOKEN", default=os.environ.get("FASTMESH_ADMIN_TOKEN"),
                        help="admin token (default: $FASTMESH_ADMIN_TOKEN)")
    health.add_argument("--timeout", type=_seconds, default=2.0, metavar="SECONDS",
                        help="how long to wait for the answer (default: 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _build_parser(_command(argv)).parse_args(argv)
    if args.command == "run":
        from fastmesh.server import run_gateway
        workers = args.workers
        if workers is None:
            try:
                workers = _workers(os.environ.get("FASTMESH_WORKERS") or str(os.cpu_count() or 1))
            except argparse.ArgumentTypeError as exc:
                print(f"fastmesh: FASTMESH_WORKERS: {exc}", file=sys.stderr)
                return 2
        config = args.config or os.environ.get("FASTMESH_CONFIG") or (
            SYSTEM_CONFIG if os.path.isfile(SYSTEM_CONFIG) else None)
        listen = args.listen or os.environ.get("FASTMESH_LISTEN") or None
        return run_gateway(config, listen, workers, args.admin, args.drain_timeout)
    if args.command == "reload":
        return _reload(args)
    if args.command == "echo":
        from fastmesh.server import run_echo
        return run_echo(args.listen)
    if args.command == "sidecar":
        from fastmesh.mesh.cli import main as sidecar_main
        return sidecar_main(args)
    if args.command == "mesh-init":
        from fastmesh.mesh.interception import main as mesh_init_main
        return mesh_init_main(args)
    if args.command == "check":
        return _check(args.config)
    if args.command == "health":
        from fastmesh import healthcheck
        return healthcheck.main(args.admin, args.token, args.timeout, args.sidecar)
    _build_parser().print_help()
    return 2


def _check(path: str) -> int:
    from fastmesh.config import ConfigError, load_config
    try:
        config = load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{len(exc.issues)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{os.path.basename(path)}: OK ({len(config.services)} service(s), "
          f"{len(config.routes)} route(s), version {config.version})")
    return 0


def _reload(args) -> int:
    if args.pid is not None:
        import signal
        try:
            os.kill(args.pid, signal.SIGHUP)
        except OSError as exc:
            print(f"fastmesh reload: cannot signal pid {args.pid}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"sent SIGHUP to {args.pid}")
        return 0
    import http.client
    import json
    from fastmesh.server import parse_listen
    try:
        host, port = parse_listen(args.admin)
    except ValueError as exc:
        print(f"fastmesh reload: {exc}", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("POST", "/reload", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        print(f"fastmesh reload: cannot reach the admin API on {args.admin}: {exc}",
              file=sys.stderr)
        return 1
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {"message": body.decode("utf-8", "replace")}
    if resp.status == 200:
        print(f"reloaded: config version {answer.get('config_version')} "
              f"on {answer.get('workers')} worker(s)")
        return 0
    for problem in answer.get("errors") or ():
        print(problem.get("text", problem), file=sys.stderr)
    print(f"fastmesh reload: {answer.get('message', resp.status)}", file=sys.stderr)
    return 1
