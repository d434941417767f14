"""Markdown report for benches/compare.py (pasteable into README)."""
from __future__ import annotations

import shlex

DASH = "–"


def _num(v, fmt="{:,.0f}") -> str:
    return DASH if v is None else fmt.format(v)


def _ratio(v) -> str:
    return DASH if v is None else f"{v:.2f}×"


def _signed(v) -> str:
    return DASH if v is None else f"{v:+,.0f}"


def _mib(kb) -> str:
    return DASH if not kb else f"{kb / 1024:.1f}"


def _cell(text: str, limit: int = 300) -> str:
    """One table cell: no pipes or newlines, bounded length."""
    flat = " / ".join(line.strip() for line in str(text).splitlines() if line.strip())
    flat = flat.replace("|", "\\|")
    if len(flat) <= limit:
        return flat
    return flat[:60] + " … " + flat[-(limit - 63):]     # the end holds the actual error


def _errors(e: dict) -> str:
    parts = []
    if e["non2xx"]:
        parts.append(f"{e['non2xx']:,} status≥400")
    if e["socket"]:
        parts.append(f"{e['socket']:,} socket")
    if e["failed_runs"]:
        parts.append(f"{e['failed_runs']}/{e['runs']} runs failed")
    return ", ".join(parts) or "0"


def results_table(rows, summary: dict, baseline_label: str) -> list[str]:
    head = ["target", "req/s (-c50)", f"vs {baseline_label}", "vs direct", "p50 µs", "p99 µs",
            "-c1 p50 µs", "-c1 p99 µs", "added p50 µs", "added p99 µs", "errors"]
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for t in rows:
        s = summary[t.name]
        if s["failed"]:
            out.append(f"| {t.name} | {_cell(s['failed'])} |" + " |" * (len(head) - 2))
            continue
        empty = {"rps": None, "p50": None, "p99": None}
        tp, lat = s.get("throughput", empty), s.get("latency", empty)
        if tp["rps"] is None and lat["p50"] is None:
            msg = (s.get("run_errors") or ["no successful run"])[-1]
            out.append(f"| {t.name} | error: {_cell(msg)} |" + " |" * (len(head) - 2))
            continue
        cells = [t.name, _num(tp["rps"]), _ratio(s["vs_baseline"]), _ratio(s["vs_direct"]),
                 _num(tp["p50"]), _num(tp["p99"]), _num(lat["p50"]), _num(lat["p99"]),
                 DASH if t.name == "direct" else _signed(s["added_p50"]),
                 DASH if t.name == "direct" else _signed(s["added_p99"]),
                 _errors(s["errors"])]
        out.append("| " + " | ".join(cells) + " |")
    return out


def memory_table(rows, summary: dict) -> list[str]:
    out = ["| target | processes | idle RSS MiB | RSS after load MiB | peak (VmHWM) MiB |",
           "|---|---:|---:|---:|---:|"]
    for t in rows:
        s = summary[t.name]
        if t.name == "direct" or s["failed"]:
            continue
        idle, after = s["mem_idle"], s["mem_after"]
        out.append(f"| {t.name} | {idle.get('processes', DASH)} | {_mib(idle.get('rss_kb'))} | "
                   f"{_mib(after.get('rss_kb'))} | {_mib(after.get('hwm_kb'))} |")
    return out


def bars(summary: dict, name: str, baseline: str | None) -> list[str]:
    """The DESIGN.md section 8 bars for one fastmesh row, when measured."""
    s = summary.get(name)
    if not s or s["failed"] or s["throughput"]["rps"] is None:
        return []
    checks = []
    if baseline and s["vs_baseline"] is not None:
        checks.append(("throughput ≥ nginx proxy", s["vs_baseline"] >= 1.0,
                       f"{s['vs_baseline']:.2f}×"))
    if s["added_p50"] is not None:
        checks.append(("added p50 ≤ 40 µs", s["added_p50"] <= 40, f"{s['added_p50']:+.0f} µs"))
        checks.append(("added p99 ≤ 150 µs", s["added_p99"] <= 150, f"{s['added_p99']:+.0f} µs"))
    idle = s["mem_idle"].get("max_proc_rss_kb")
    if idle:
        checks.append(("idle worker RSS ≤ 30 MB", idle <= 30 * 1024,
                       f"largest process {idle / 1024:.1f} MiB"))
    return [f"- {'✅' if ok else '❌'} {what}: {val}" for what, ok, val in checks]


def settings_block(args, info: dict, commands: dict, note, tmp) -> list[str]:
    out = ["### How this was measured", ""]
    out.append(f"- machine: {info['nproc']} CPUs ({info['cpus_usable']} usable), {info['cpu']}, "
               f"Linux {info['kernel']}; load average at start "
               f"{', '.join(f'{x:.2f}' for x in info['loadavg_start'])}, at end "
               f"{', '.join(f'{x:.2f}' for x in info.get('loadavg_end', ()))}")
    out.append(f"- versions: {info['nginx']}; {info['haproxy']}; {info['wrk']}; "
               f"Python {info['python']}; fastmesh {info['fastmesh']}")
    out.append(f"- {args.rounds} interleaved round(s) (row order rotated each round), medians "
               f"shown; {args.duration:g} s per wrk run, {args.warmup:g} s unmeasured -c"
               f"{args.connections} warm-up before each throughput run; wrk, upstream and "
               "proxies share the machine")
    if args.scenario == "scaling":
        workers = "the worker count of its row (fastmesh `--workers N`, nginx `worker_processes N`)"
        threads = "HAProxy not run"
    else:
        workers = _workers(args.workers)
        threads = f"HAProxy: nbthread {args.workers}, http-reuse always"
    out.append(f"- upstream: nginx, {_workers(args.upstream_workers)}, `return 200 \"ok\"`, "
               f"access_log off; every proxy has {workers} and keep-alive pooled upstream "
               f"connections (nginx: keepalive 64 per worker, HTTP/1.1, `Connection \"\"`; "
               f"{threads}); fastmesh's admin API is off")
    out.append("- memory: RSS summed over the server's processes (nginx master + worker, "
               "fastmesh supervisor + worker(s), HAProxy one process); peak = summed VmHWM")
    out.append("- errors: wrk socket errors (connect/read/write/timeout) and responses with "
               "status ≥ 400, summed over all runs")
    if note:
        out.append(f"- note: {note}")
    out += ["", "Commands (configs were in a temp dir, removed afterwards"
            + (f"; kept: {tmp}" if args.keep_tmp else "") + "):", "", "```"]
    for name, argv in commands.items():
        out.append(f"# {name}\n{shlex.join(argv)}")
    out.append("# load (per row; stats.lua prints exact percentiles from wrk's latency object)")
    threads = min(args.wrk_threads, args.connections)
    out.append(f"wrk -t{threads} -c{args.connections} -d{args.duration:g}s --timeout 2s "
               f"-s benches/stats.lua URL    # throughput")
    if args.scenario != "scaling":
        out.append(f"wrk -t1 -c1 -d{args.duration:g}s --timeout 2s -s benches/stats.lua URL"
                   "    # latency")
    out.append("```")
    return out


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n != 1 else ''}"


def scaling_table(rows, summary: dict) -> list[str]:
    """req/s by worker count: fastmesh and nginx side by side, their ratio, and each one's
    gain over its own 1-worker row (when 1 was measured)."""
    def rps(kind, n):
        t = next((r for r in rows if r.kind == kind and r.workers == n), None)
        if t is None or summary[t.name]["failed"]:
            return None
        return summary[t.name]["throughput"]["rps"]

    def errors(kind, n):
        t = next((r for r in rows if r.kind == kind and r.workers == n), None)
        if t is None:
            return DASH
        s = summary[t.name]
        return _cell(s["failed"], 80) if s["failed"] else _errors(s["errors"])

    counts = sorted({r.workers for r in rows if r.kind in ("fastmesh", "nginx")})
    head = ["workers", "fastmesh req/s", "nginx req/s", "fastmesh / nginx",
            "fastmesh vs 1 worker", "nginx vs 1 worker", "errors (fastmesh; nginx)"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * (len(head) - 1) + ["---"]) + "|"]
    for n in counts:
        fm, ng = rps("fastmesh", n), rps("nginx", n)
        fm1, ng1 = rps("fastmesh", 1), rps("nginx", 1)
        out.append("| " + " | ".join([
            str(n), _num(fm), _num(ng), _ratio(fm / ng if fm and ng else None),
            _ratio(fm / fm1 if fm and fm1 else None), _ratio(ng / ng1 if ng and ng1 else None),
            f"{errors('fastmesh', n)}; {errors('nginx', n)}"]) + " |")
    direct = next((r for r in rows if r.kind == "direct"), None)
    if direct is not None and not summary[direct.name]["failed"]:
        d = summary[direct.name]["throughput"]["rps"]
        out += ["", f"direct (wrk straight to the upstream, {_workers(direct.workers)}): "
                    f"{_num(d)} req/s, the ceiling of this machine for any row."]
    return out


def markdown(args, info, rows, summary, baseline, commands, note, tmp) -> str:
    lines = []
    if args.scenario == "compare":
        each = "one worker each" if args.workers == 1 else f"{args.workers} workers each"
        lines += [f"## fastmesh vs nginx vs HAProxy ({each})", ""]
        lines += results_table(rows, summary, "nginx")
        checks = bars(summary, "fastmesh", "nginx" if "nginx" in summary else None)
    elif args.scenario == "scaling":
        lines += ["## Throughput by worker count: fastmesh and nginx (wrk -c"
                  f"{args.connections}, {args.wrk_threads} wrk thread(s))", ""]
        lines += scaling_table(rows, summary)
        lines += ["", f"Machine: {info['cpus_usable']} usable CPU(s) shared by wrk, the "
                      "upstream and the proxy: beyond that many workers (all processes "
                      "counted), rows compete for the same cores and cannot scale.", ""]
        lines += results_table(rows, summary, "nginx")
        checks = []
    else:
        lines += [f"## fastmesh: 1 route vs {args.routes:,} routes", ""]
        lines += results_table(rows, summary, "1 route")
        checks = []
        big = rows[-1].name
        ratio = summary[big].get("vs_baseline")
        if ratio is not None:
            cost = (1 - ratio) * 100
            checks = [f"- {'✅' if cost <= 5 else '❌'} {args.routes:,} routes cost "
                      f"{cost:.1f} % throughput against one route (bar ≤ 5 %); the "
                      f"benchmarked route is #{int(args.routes * args.route_position) + 1} "
                      "of the list, matched by Host and path prefix"]
    lines += ["", "Memory:", ""] + memory_table(rows, summary)
    if checks:
        lines += ["", "Bars (DESIGN.md §8):", ""] + checks
    lines += [""] + settings_block(args, info, commands, note, tmp)
    return "\n".join(lines)
