"""The `fastmesh` command: run, echo, check."""
from __future__ import annotations

import argparse
import os
import sys

from fastmesh import __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmesh",
        description="API gateway and service-mesh sidecar with a Cython data path on uvloop.")
    parser.add_argument("--version", action="version", version=f"fastmesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the gateway",
        description="Run the gateway. Without --config it serves the embedded default: "
                    "every path is routed to a built-in echo upstream.")
    run.add_argument("--config", "-c", metavar="FILE", help="declarative config (YAML or JSON)")
    run.add_argument("--listen", "-l", metavar="HOST:PORT",
                     help="listen address (default: the config's gateway.listen, else 127.0.0.1:8000)")
    run.add_argument("--workers", "-w", type=int, default=1, metavar="N",
                     help="worker processes; only 1 is supported until the supervisor lands (issue 5)")

    echo = sub.add_parser("echo", help="run the echo upstream (answers with a JSON description of each request)")
    echo.add_argument("--listen", "-l", metavar="HOST:PORT", default="127.0.0.1:9000")

    check = sub.add_parser("check", help="validate a config file without serving it")
    check.add_argument("--config", "-c", metavar="FILE", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "run":
        if args.workers != 1:
            print("fastmesh: --workers: only 1 worker is supported until the supervisor lands",
                  file=sys.stderr)
            return 2
        from fastmesh.server import run_gateway
        return run_gateway(args.config, args.listen)
    if args.command == "echo":
        from fastmesh.server import run_echo
        return run_echo(args.listen)
    if args.command == "check":
        return _check(args.config)
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
