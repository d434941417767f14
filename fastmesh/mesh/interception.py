"""`fastmesh mesh-init`: the iptables rules that send a pod's TCP through its sidecar.

Run once in the pod's network namespace before the app starts (what an init container does).
The same rules go to iptables (IPv4) and ip6tables (IPv6: a dual-stack pod's IPv6 TCP would
otherwise reach the app around the sidecar, its mTLS and its authorization). In each `nat`
table, two chains of our own, each reached by one jump:

- FASTMESH_INBOUND (from PREROUTING): TCP arriving from another host -> the sidecar's inbound
  port (15006), except excluded ports;
- FASTMESH_OUTPUT (from OUTPUT): TCP that processes of this namespace open -> the sidecar's
  outbound port (15001), except the sidecar's own connections (by uid, gid or mark: without
  this, its calls to other pods would loop back into it), loopback, excluded ports and CIDRs.

The chains are flushed and filled again on every run (idempotent), `--remove` deletes them and
their jumps. Only the first packet of a connection meets the nat table, so replies and already
open connections are untouched. The sidecar finds where a redirected connection was going with
SO_ORIGINAL_DST (fastmesh.mesh.transparent).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

INBOUND_CHAIN = "FASTMESH_INBOUND"
OUTPUT_CHAIN = "FASTMESH_OUTPUT"
HOOKS = (("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN))
LOCK_WAIT = "5"                  # seconds to wait for the xtables lock (shared by all namespaces)
IPV6_MODES = ("auto", "on", "off")   # auto: ip6tables rules when ip6tables is installed


@dataclass(frozen=True)
class Interception:
    """What to redirect and what to leave alone."""

    inbound_port: int = 15006
    outbound_port: int = 15001
    proxy_uids: tuple[int, ...] = ()
    proxy_gids: tuple[int, ...] = ()
    proxy_mark: int | None = None
    exclude_ports: tuple[int, ...] = ()          # destination ports, both directions
    exclude_cidrs: tuple[str, ...] = ()          # outbound destinations, IPv4 or IPv6
    inbound: bool = True                         # also redirect inbound TCP

    def problems(self) -> list[str]:
        found = []
        if not (self.proxy_uids or self.proxy_gids or self.proxy_mark is not None):
            found.append("the sidecar's own traffic must be excluded: give --proxy-uid, "
                         "--proxy-gid or --proxy-mark (else its calls loop back into it)")
        if self.inbound_port == self.outbound_port:
            found.append(f"the inbound and outbound ports must differ, both are "
                         f"{self.inbound_port}")
        return found


def _dport(port: int) -> list[str]:
    return ["-p", "tcp", "-m", "tcp", "--dport", str(port)]    # as `iptables -S` prints it


def rules(spec: Interception, version: int = 4) -> list[list[str]]:
    """The iptables (version 4) or ip6tables (6) argument lists, after `-t nat`, that install
    `spec`: the same chains, with the excluded CIDRs of that IP version."""
    out: list[list[str]] = []
    for _, chain in HOOKS:
        out.append(["-N", chain])               # create (an existing chain is then flushed)
        out.append(["-F", chain])
    if spec.inbound:
        out.append(["-A", INBOUND_CHAIN, "-i", "lo", "-j", "RETURN"])
        for port in spec.exclude_ports:
            out.append(["-A", INBOUND_CHAIN, *_dport(port), "-j", "RETURN"])
        out.append(["-A", INBOUND_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports",
                    str(spec.inbound_port)])
    for uid in spec.proxy_uids:
        out.append(["-A", OUTPUT_CHAIN, "-m", "owner", "--uid-owner", str(uid), "-j", "RETURN"])
    for gid in spec.proxy_gids:
        out.append(["-A", OUTPUT_CHAIN, "-m", "owner", "--gid-owner", str(gid), "-j", "RETURN"])
    if spec.proxy_mark is not None:
        out.append(["-A", OUTPUT_CHAIN, "-m", "mark", "--mark", hex(spec.proxy_mark),
                    "-j", "RETURN"])
    out.append(["-A", OUTPUT_CHAIN, "-o", "lo", "-j", "RETURN"])
    for cidr in spec.exclude_cidrs:
        if ipaddress.ip_network(cidr).version != version:
            continue
        out.append(["-A", OUTPUT_CHAIN, "-d", cidr, "-j", "RETURN"])
    for port in spec.exclude_ports:
        out.append(["-A", OUTPUT_CHAIN, *_dport(port), "-j", "RETURN"])
    out.append(["-A", OUTPUT_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports",
                str(spec.outbound_port)])
    for hook, chain in HOOKS:
        out.append(["-I", hook, "1", "-p", "tcp", "-j", chain])
    return out


def shell_lines(arg_lists: list[list[str]], iptables: str = "iptables") -> list[str]:
    return [" ".join([iptables, "-t", "nat", *args]) for args in arg_lists]


class Iptables:
    """Runs `iptables -w -t nat ...` (or ip6tables); RuntimeError with its own message on
    failure."""

    def __init__(self, binary: str = "iptables"):
        path = shutil.which(binary)
        if path is None:
            raise RuntimeError(f"{binary} is not installed (Debian: apt-get install iptables)")
        self.binary = path
        self.name = os.path.basename(binary)

    def run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([self.binary, "-w", LOCK_WAIT, "-t", "nat", *args],
                              capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{self.name} -t nat {' '.join(args)}: "
                               f"{done.stderr.strip() or f'exit {done.returncode}'}")
        return done

    def chain_exists(self, chain: str) -> bool:
        return self.run(["-S", chain], check=False).returncode == 0

    def unhook(self) -> None:
        """Delete every jump to our chains (a rerun or a crash may have left several)."""
        for hook, chain in HOOKS:
            for _ in range(100):                 # bounded: one -D removes one copy
                if self.run(["-D", hook, "-p", "tcp", "-j", chain], check=False).returncode:
                    break


def install(spec: Interception, iptables: Iptables, version: int = 4) -> None:
    iptables.unhook()
    for args in rules(spec, version):
        if args[0] == "-N" and iptables.chain_exists(args[1]):
            continue
        iptables.run(args)


def remove(iptables: Iptables) -> list[str]:
    """Delete our jumps and chains; the names of the chains that were there."""
    iptables.unhook()
    removed = []
    for _, chain in HOOKS:
        if iptables.chain_exists(chain):
            iptables.run(["-F", chain])
            iptables.run(["-X", chain])
            removed.append(chain)
    return removed


# -- the command line ----------------------------------------------------------------------------

def _port_list(value: str) -> tuple[int, ...]:
    ports = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise ValueError(f"expected ports 1..65535 separated by commas, found {part!r}")
        ports.append(int(part))
    return tuple(ports)


def _cidr_list(value: str) -> tuple[str, ...]:
    cidrs = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        try:
            network = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(f"expected CIDRs separated by commas, found {part!r}") from None
        cidrs.append(str(network))
    return tuple(cidrs)


def _id(value: str) -> int:
    if not value.isdigit() or int(value) > 2**32 - 2:
        raise ValueError(f"expected a number, found {value!r}")
    return int(value)


def _mark(value: str) -> int:
    try:
        mark = int(value, 0)
    except ValueError:
        raise ValueError(f"expected a number (e.g. 0x539), found {value!r}") from None
    if not 1 <= mark <= 0xFFFFFFFF:
        raise ValueError(f"must be 1..0xffffffff, found {value}")
    return mark


def _port(value: str) -> int:
    ports = _port_list(value)
    if len(ports) != 1:
        raise ValueError(f"expected one port, found {value!r}")
    return ports[0]


def add_parser(sub) -> None:
    import argparse

    def checked(parse):
        def check(value: str):
            try:
                return parse(value)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return check

    p = sub.add_parser(
        "mesh-init", help="install the iptables rules that send a pod's TCP through its sidecar",
        description="Install (or with --remove delete) iptables nat rules in the current network "
                    "namespace: inbound TCP to the sidecar's inbound port, the app's outbound "
                    "TCP to its outbound port, except the sidecar's own traffic (--proxy-uid, "
                    "--proxy-gid or --proxy-mark), loopback and the excluded ports and CIDRs. "
                    "Idempotent. Needs root (CAP_NET_ADMIN). See docs/mesh.md.")
    p.add_argument("--inbound-port", type=checked(_port), default=15006, metavar="PORT",
                   help="the sidecar's inbound listener (default: 15006)")
    p.add_argument("--outbound-port", type=checked(_port), default=15001, metavar="PORT",
                   help="the sidecar's outbound listener (default: 15001)")
    p.add_argument("--proxy-uid", type=checked(_id), action="append", default=[], metavar="UID",
                   help="connections of processes with this uid are not redirected (repeatable)")
    p.add_argument("--proxy-gid", type=checked(_id), action="append", default=[], metavar="GID",
                   help="connections of processes with this gid are not redirected (repeatable)")
    p.add_argument("--proxy-mark", type=checked(_mark), metavar="MARK",
                   help="packets with this fwmark (SO_MARK) are not redirected")
    p.add_argument("--exclude-ports", type=checked(_port_list), default=(), metavar="P1,P2",
                   help="destination ports never redirected, inbound and outbound")
    p.add_argument("--exclude-cidrs", type=checked(_cidr_list), default=(), metavar="CIDR,...",
                   help="outbound destinations never redirected (e.g. 10.0.0.0/8)")
    p.add_argument("--no-inbound", action="store_true",
                   help="redirect outbound TCP only; inbound reaches the pod unchanged")
    p.add_argument("--iptables", default="iptables", metavar="PATH",
                   help="the iptables binary (default: iptables on PATH)")
    p.add_argument("--ipv6", choices=IPV6_MODES, default="auto",
                   help="the same rules for IPv6 with ip6tables: auto (default: when ip6tables "
                        "is installed, else a warning), on (required), off")
    p.add_argument("--ip6tables", default="ip6tables", metavar="PATH",
                   help="the ip6tables binary (default: ip6tables on PATH)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, change nothing")
    p.add_argument("--remove", action="store_true", help="delete the rules and chains")


def tables(args, say) -> list[tuple[int, str]]:
    """(IP version, binary) for each table to change; RuntimeError when --ipv6 on cannot be."""
    found = [(4, args.iptables)]
    if args.ipv6 == "off":
        return found
    if shutil.which(args.ip6tables) is not None:
        return found + [(6, args.ip6tables)]
    if args.ipv6 == "on":
        raise RuntimeError(f"{args.ip6tables} is not installed (Debian: apt-get install "
                           f"iptables), and --ipv6 on asks for IPv6 rules")
    say(f"warning: {args.ip6tables} is not installed: IPv6 TCP is NOT intercepted (it reaches "
        f"the app directly); install it, or give --ipv6 off to silence this", err=True)
    return found


def main(args) -> int:
    def say(message: str, err: bool = False) -> None:
        print(f"fastmesh mesh-init: {message}", file=sys.stderr if err else sys.stdout,
              flush=True)

    try:
        chosen = tables(args, say) if not args.dry_run else \
            [(4, args.iptables)] + ([(6, args.ip6tables)] if args.ipv6 != "off" else [])
    except RuntimeError as exc:
        say(str(exc), err=True)
        return 1
    if args.remove:
        if args.dry_run:
            for _, binary in chosen:
                for hook, chain in HOOKS:
                    print(f"{binary} -t nat -D {hook} -p tcp -j {chain}")
                for _, chain in HOOKS:
                    print(f"{binary} -t nat -F {chain}")
                    print(f"{binary} -t nat -X {chain}")
            return 0
        removed = []
        try:
            for version, binary in chosen:
                chains = remove(Iptables(binary))
                if chains:
                    removed.append(f"{', '.join(chains)} (IPv{version})")
        except RuntimeError as exc:
            say(str(exc), err=True)
            return 1
        say(f"removed {'; '.join(removed)}" if removed else "no fastmesh rules were installed")
        return 0
    spec = Interception(args.inbound_port, args.outbound_port, tuple(args.proxy_uid),
                        tuple(args.proxy_gid), args.proxy_mark, args.exclude_ports,
                        args.exclude_cidrs, not args.no_inbound)
    problems = spec.problems()
    if problems:
        for problem in problems:
            say(problem, err=True)
        return 2
    if args.dry_run:
        for version, binary in chosen:
            print("\n".join(shell_lines(rules(spec, version), binary)))
        return 0
    try:
        for version, binary in chosen:
            install(spec, Iptables(binary), version)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        say(str(exc), err=True)
        return 1
    excluded = [f"uid {u}" for u in spec.proxy_uids] + [f"gid {g}" for g in spec.proxy_gids]
    if spec.proxy_mark is not None:
        excluded.append(f"mark {spec.proxy_mark:#x}")
    say(f"outbound TCP -> :{spec.outbound_port}"
        + (f", inbound TCP -> :{spec.inbound_port}" if spec.inbound else "")
        + f" ({' and '.join(f'IPv{v}' for v, _ in chosen)})"
        + f"; not redirected: {', '.join(excluded)}, loopback"
        + "".join(f", port {p}" for p in spec.exclude_ports)
        + "".join(f", {c}" for c in spec.exclude_cidrs))
    return 0
