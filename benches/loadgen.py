"""Run wrk against one URL and parse the line benches/stats.lua prints."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

LUA = Path(__file__).resolve().parent / "stats.lua"
_LINE = re.compile(r"^FMBENCH (.*)$", re.M)


def wrk_argv(wrk: str, url: str, connections: int, duration: float,
             threads: int = 1, host: str | None = None, timeout_s: int = 2) -> list[str]:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s",
            "--timeout", f"{timeout_s}s", "-s", str(LUA)]
    if host:
        argv += ["-H", f"Host: {host}"]
    return argv + [url]


def parse(output: str) -> dict:
    """The FMBENCH line as numbers, plus derived rps and error totals."""
    m = _LINE.search(output)
    if not m:
        raise ValueError("wrk printed no FMBENCH line:\n" + output[-800:])
    r = {k: float(v) for k, v in (kv.split("=", 1) for kv in m.group(1).split())}
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    r["socket_errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
    r["non2xx"] = r["status"]
    return r


def run_wrk(argv: list[str], duration: float) -> dict:
    """One bounded wrk run; raises RuntimeError when wrk fails or hangs."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish within {duration + 30:.0f}s") from None
    if p.returncode != 0:
        raise RuntimeError(f"wrk exited {p.returncode}: {(p.stderr or p.stdout)[-400:]}")
    return parse(p.stdout)
