"""The `fastmesh` command: run, reload, echo, check, sidecar."""
from __future__ import annotations

import argparse
import os
import sys

from fastmesh import __version__


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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmesh",
        description="API gateway and service-mesh sidecar with a Cython data path on uvloop.")
    parser.add_argument("--version", action="version", version=f"fastmesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the gateway",
        description="Run the gateway. Without --config it serves the embedded default: "
                    "every path is routed to a built-in echo upstream. Signals: SIGHUP reloads "
                    "the config file, SIGTERM/SIGINT drain in-flight requests and exit.")
    run.add_argument("--config", "-c", metavar="FILE", help="declarative config (YAML or JSON)")
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

    from fastmesh.mesh.cli import add_parser as add_sidecar_parser
    add_sidecar_parser(sub)

    check = sub.add_parser("check", help="validate a config file without serving it")
    check.add_argument("--config", "-c", metavar="FILE", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "run":
        from fastmesh.server import run_gateway
        workers = args.workers
        if workers is None:
            try:
                workers = _workers(os.environ.get("FASTMESH_WORKERS") or str(os.cpu_count() or 1))
            except argparse.ArgumentTypeError as exc:
                print(f"fastmesh: FASTMESH_WORKERS: {exc}", file=sys.stderr)
                return 2
        return run_gateway(args.config, args.listen, workers, args.admin, args.drain_timeout)
    if args.command == "reload":
        return _reload(args)
    if args.command == "echo":
        from fastmesh.server import run_echo
        return run_echo(args.listen)
    if args.command == "sidecar":
        from fastmesh.mesh.cli import main as sidecar_main
        return sidecar_main(args)
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
