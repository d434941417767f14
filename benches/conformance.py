#!/usr/bin/env python3
"""HTTP/1.1 conformance and smuggling: fastmesh vs nginx vs HAProxy, measured, not quoted.

Each proxy (one worker, the reverse-proxy configs of benches/servers.py, otherwise defaults) is
started in front of the same *recording* upstream: an in-process raw TCP server that parses every
request it receives (head, then the body by Content-Length or chunked) and records it. The same
raw hostile requests go to each proxy; every attack ends with a pipelined `GET /smuggled`, so a
request that reaches the upstream under that name is a smuggled one.

Prints a Markdown table: rule | fastmesh | nginx | haproxy. Each cell: what the client got (the
statuses, then "closed" or "open") and what reached the upstream ("upstream saw nothing",
"forwarded as chunked", "SMUGGLED" ...).

    python3 benches/conformance.py [--only fastmesh,nginx] [--timeout 1.0] [--out table.md]

Needs nginx (Debian nginx-light is enough) and haproxy on PATH; a missing one is skipped.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import (  # noqa: E402
    StartError, fastmesh_conf, fastmesh_server, free_port, haproxy_conf, haproxy_server,
    nginx_proxy_conf, nginx_server)

SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
P = b"POST / HTTP/1.1\r\nHost: x\r\n"
G = b"GET / HTTP/1.1\r\nHost: x\r\n"
CH = b"5\r\nhello\r\n0\r\n\r\n"
TEC = P + b"Transfer-Encoding: chunked\r\n\r\n"

# (rule, raw request). Every attack carries SMUGGLE after what the proxy should see as the end.
CASES: list[tuple[str, bytes]] = [
    ("CL + TE (CL.TE)", P + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG" + SMUGGLE),
    ("TE + CL (TE.CL)", P + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLE), SMUGGLE)),
    ("TE: xchunked + CL", P + b"Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\n" + CH + SMUGGLE),
    ("`Transfer-Encoding : chunked` + CL", P + b"Transfer-Encoding : chunked\r\nContent-Length: 15\r\n\r\n"
     + CH + SMUGGLE),
    ("TE: chunked + TE: identity", P + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
     + CH + SMUGGLE),
    ("TE with vertical tab", P + b"Transfer-Encoding:\x0bchunked\r\n\r\n" + CH + SMUGGLE),
    ("TE: chunked, gzip (last not chunked)", P + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + CH + SMUGGLE),
    ("TE: identity", P + b"Transfer-Encoding: identity\r\n\r\n" + SMUGGLE),
    ("TE in an HTTP/1.0 request", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n" + CH + SMUGGLE),
    ("`Transfer_Encoding: chunked` + CL", P + b"Transfer_Encoding: chunked\r\nContent-Length: 15\r\n\r\n"
     + CH + SMUGGLE),
    ("differing duplicate CL", P + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!" + SMUGGLE),
    ("CL list `5, 6`", P + b"Content-Length: 5, 6\r\n\r\nhello!" + SMUGGLE),
    ("identical duplicate CL", P + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLE),
    ("CL `+5`", P + b"Content-Length: +5\r\n\r\nhello" + SMUGGLE),
    ("CL 2^64+5 (overflow)", P + b"Content-Length: 18446744073709551621\r\n\r\nhello" + SMUGGLE),
    ("chunk size `0x5`", TEC + b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLE),
    ("chunk size with trailing space", TEC + b"5 \r\nhello\r\n0\r\n\r\n" + SMUGGLE),
    ("chunk size overflow", TEC + b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n" + SMUGGLE),
    ("chunk data not followed by CRLF", TEC + b"5\r\nhelloXX0\r\n\r\n" + SMUGGLE),
    ("chunk extension of 5000 bytes", TEC + b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n0\r\n\r\n" + SMUGGLE),
    ("trailers of 20 KB", TEC + b"0\r\n" + b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
     + b"\r\n" + SMUGGLE),
    ("Content-Length in trailers", TEC + b"0\r\nContent-Length: 5\r\n\r\n" + SMUGGLE),
    ("LF-only chunk lines", TEC + b"5\nhello\n0\n\n" + SMUGGLE),
    ("LF-only head", b"GET / HTTP/1.1\nHost: x\n\n" + SMUGGLE),
    ("obs-fold", G + b"X-A: b\r\n folded\r\n\r\n" + SMUGGLE),
    ("whitespace before colon", G + b"X-A : b\r\n\r\n" + SMUGGLE),
    ("NUL in a header value", G + b"X-A: b\x00c\r\n\r\n" + SMUGGLE),
    ("bare CR in a header value", G + b"X-A: b\rc\r\n\r\n" + SMUGGLE),
    ("method with a separator", b"G(ET / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE),
    ("two spaces in the request line", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE),
    ("space in the target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE),
    ("HTTP/1.2", b"GET /v12 HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n" + SMUGGLE),
    ("HTTP/0.9 request line", b"GET /\r\n\r\n" + SMUGGLE),
    ("missing Host (HTTP/1.1)", b"GET / HTTP/1.1\r\n\r\n" + SMUGGLE),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + SMUGGLE),
    ("absolute-form, other Host", b"GET http://target.example/abs HTTP/1.1\r\nHost: other.example\r\n"
     b"Connection: close\r\n\r\n"),
    ("Upgrade request with a body", b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
     b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLE), SMUGGLE)),
]


# ---------------------------------------------------------------------------------------
# the recording upstream


class RecordingUpstream:
    """Thread-per-connection raw upstream that parses and records every request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.raw = bytearray()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.raw.clear()

    def stop(self):
        self.stopped.set()
        self.sock.close()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(30)
        try:
            self._handle(conn)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def _handle(self, conn):
        buf = bytearray()

        def fill():
            data = conn.recv(65536)
            if not data:
                return False
            with self.lock:
                self.raw += data
            buf.extend(data)
            return True

        def line():
            while b"\r\n" not in buf:
                if not fill():
                    return None
            i = buf.index(b"\r\n")
            out = bytes(buf[:i])
            del buf[:i + 2]
            return out

        def exactly(n):
            while len(buf) < n:
                if not fill():
                    return None
            out = bytes(buf[:n])
            del buf[:n]
            return out

        while True:
            while b"\r\n\r\n" not in buf:
                if not fill():
                    return
            i = buf.index(b"\r\n\r\n")
            head = bytes(buf[:i])
            del buf[:i + 4]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            headers = []
            for hl in lines[1:]:
                k, _, v = hl.partition(b":")
                headers.append((k.strip().lower().decode("latin-1"), v.strip().decode("latin-1")))
            req = {"method": parts[0].decode("latin-1"),
                   "target": parts[1].decode("latin-1") if len(parts) > 1 else "",
                   "headers": headers, "body": b"", "complete": False}
            with self.lock:
                self.requests.append(req)
            te = [v for k, v in headers if k == "transfer-encoding"]
            cl = [v for k, v in headers if k == "content-length"]
            if te and "chunked" in te[-1].lower():
                body = bytearray()
                while True:
                    size_line = line()
                    if size_line is None:
                        return
                    size = int(size_line.split(b";")[0].strip() or b"x", 16)
                    if size == 0:
                        while line() not in (b"", None):
                            pass
                        break
                    data = exactly(size + 2)
                    if data is None:
                        return
                    body += data[:-2]
                req["body"] = bytes(body)
            elif cl:
                data = exactly(int(cl[0].split(",")[0]))
                if data is None:
                    return
                req["body"] = data
            req["complete"] = True
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")


# ---------------------------------------------------------------------------------------
# one exchange and its description


def exchange(port: int, payload: bytes, timeout: float) -> tuple[bytes, bool]:
    """Send; read until the server closes or stays silent for `timeout`. (raw, closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(payload)
        except OSError:
            pass
        s.settimeout(timeout)
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except socket.timeout:
                return out, False
            except OSError:
                return out, True
            if not data:
                return out, True
            out += data


def statuses(raw: bytes) -> tuple[list[str], bool]:
    """Statuses of the responses in raw (framed by CL, chunked or the close); and whether
    something that is not an HTTP/1.x response was there (e.g. an HTTP/0.9 style answer)."""
    out = []
    while raw:
        if not (raw.startswith(b"HTTP/1.") and raw[9:12].isdigit()):
            return out, True
        head, sep, raw = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        out.append(lines[0][9:12].decode())
        hdrs = {}
        for hl in lines[1:]:
            k, _, v = hl.partition(b":")
            hdrs[k.strip().lower()] = v.strip()
        code = int(lines[0][9:12])
        if code < 200 or code in (204, 304):
            continue
        if b"content-length" in hdrs:
            raw = raw[int(hdrs[b"content-length"]):]
        elif b"chunked" in hdrs.get(b"transfer-encoding", b""):
            while raw:
                size_line, _, raw = raw.partition(b"\r\n")
                try:
                    size = int(size_line.split(b";")[0], 16)
                except ValueError:
                    return out, True
                if size == 0:
                    _, _, raw = raw.partition(b"\r\n")
                    break
                raw = raw[size + 2:]
        else:
            raw = b""
    return out, False


def describe(raw: bytes, closed: bool, reqs: list[dict], upstream_raw: bytes) -> str:
    st, other = statuses(raw)
    final = [s for s in st if not s.startswith("1")]
    client = "+".join(st) if st else ""
    if other:
        client = (client + "+" if client else "") + "answer without a status line"
    client = (client or "no answer") + (", closed" if closed else ", open")
    if not reqs:
        return f"{client}; upstream saw nothing"
    notes = []
    # a request the upstream saw but the client got no answer for was hidden from the proxy
    desync = len(reqs) > len(final)
    for r in reqs:
        if "smuggled" in r["target"]:
            notes.append("**SMUGGLED: upstream saw GET /smuggled**" if desync
                         else "then GET /smuggled, answered (a visible pipelined request)")
            continue
        te = [v for k, v in r["headers"] if k == "transfer-encoding"]
        cl = [v for k, v in r["headers"] if k == "content-length"]
        how = []
        if te:
            how.append("as chunked" if te == ["chunked"] else f"TE `{', '.join(te)}`")
        if cl:
            how.append(f"CL {', '.join(cl)}")
        if any(k == "transfer_encoding" for k, _ in r["headers"]):
            how.append("Transfer_Encoding passed on")
        if any(k == "upgrade" for k, _ in r["headers"]):
            how.append("Upgrade passed on")
        if not r["complete"]:
            how.append("body never completed")
        host = [v for k, v in r["headers"] if k == "host"]
        if r["target"].startswith("/abs") and host:
            how.append(f"Host {host[0]}")
        notes.append(f"forwarded {r['method']} {r['target']}" + (" " + ", ".join(how) if how else ""))
    if b"smuggled" in upstream_raw and not any("smuggled" in r["target"] for r in reqs):
        notes.append("`GET /smuggled` only inside a body")
    return f"{client}; " + "; ".join(notes)


# ---------------------------------------------------------------------------------------


def start_servers(names: list[str], upstream_port: int, workdir: Path):
    servers = []
    for name in names:
        port = free_port()
        if name == "fastmesh":
            srv = fastmesh_server("fastmesh", fastmesh_conf(upstream_port), port, workdir)
        elif name == "nginx":
            exe = shutil.which("nginx") or "/usr/sbin/nginx"
            if not Path(exe).exists():
                print(f"nginx not found: skipped", file=sys.stderr)
                continue
            srv = nginx_server("nginx", nginx_proxy_conf(workdir, port, upstream_port), port, workdir, exe)
        elif name == "haproxy":
            exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
            if not Path(exe).exists():
                print(f"haproxy not found: skipped", file=sys.stderr)
                continue
            srv = haproxy_server(haproxy_conf(workdir, port, upstream_port), port, workdir, exe)
        else:
            raise SystemExit(f"unknown server {name}")
        try:
            srv.start(ready_timeout=20)
        except StartError as e:
            print(f"{name} did not start: {e}", file=sys.stderr)
            continue
        servers.append(srv)
    return servers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="fastmesh,nginx,haproxy")
    ap.add_argument("--timeout", type=float, default=1.0, help="silence that ends one exchange (s)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    up = RecordingUpstream()
    with tempfile.TemporaryDirectory(prefix="fastmesh-conformance-") as tmp:
        servers = start_servers(names, up.port, Path(tmp))
        try:
            results: dict[str, list[str]] = {s.name: [] for s in servers}
            for rule, payload in CASES:
                for srv in servers:
                    time.sleep(0.05)
                    up.reset()
                    raw, closed = exchange(srv.port, payload, args.timeout)
                    time.sleep(0.2)      # let the upstream record what reached it
                    with up.lock:
                        reqs = [dict(r) for r in up.requests]
                        uraw = bytes(up.raw)
                    results[srv.name].append(describe(raw, closed, reqs, uraw))
                print(f"  {rule}", file=sys.stderr)
        finally:
            for srv in servers:
                srv.stop()
            up.stop()
    cols = [s.name for s in servers]
    out = ["| rule | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for i, (rule, _) in enumerate(CASES):
        out.append(f"| {rule} | " + " | ".join(results[c][i] for c in cols) + " |")
    table = "\n".join(out)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
