"""Framing and smuggling proof (issue 3): raw bytes in, and two things checked every time.

1. What the client got: the status, `Connection: close`, and that the connection really closed.
2. What the upstream received: a *recording* upstream parses every request it is sent (head, then
   the body by Content-Length or chunked, with its own parser, independent of fastmesh's) and
   records it. No smuggled second request ever reaches it: every attack below carries a request
   for `/smuggled`, and the upstream must never see those bytes at all.

Our documented choice for Content-Length together with Transfer-Encoding in a request: 400 and
close (never forwarded in any form). A transfer-coding other than chunked: 501. The upstream-side
rules (invalid responses, 1xx, 101, bodiless responses, close-delimited and CL+TE responses) are at
the end; they count upstream connections to prove a suspicious connection is never reused.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
import yaml

from conftest import (Proc, RawClient, ScriptedUpstream, config, free_port, raw_exchange,
                      read_request_head, service)

SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
SETTLE = 0.25       # time for the upstream threads to record what (if anything) reached them


# ---------------------------------------------------------------------------------------
# the recording upstream


class Recorder:
    """A ScriptedUpstream handler that parses and records every request it receives.

    Each record: {"conn", "method", "target", "version", "headers", "body", "complete"}.
    "complete" is False when the connection ended mid-body (the gateway gave up on it).
    The answer to each complete request is 200 with body b"seen:" + target, so the client
    can tell which request the upstream thought it was answering.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.raw: dict[int, bytearray] = {}
        self.garbage: list[tuple[int, bytes]] = []
        self.up = ScriptedUpstream(self.handler)

    @property
    def url(self) -> str:
        return self.up.url

    @property
    def connections(self) -> int:
        return self.up.connections

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.raw.clear()
            self.garbage.clear()

    def all_raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(v) for v in self.raw.values())

    def stop(self) -> None:
        self.up.stop()

    # -- the handler ------------------------------------------------------------------
    def handler(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(30)
        buf = bytearray()

        def fill() -> bool:
            data = conn.recv(65536)
            if not data:
                return False
            with self.lock:
                self.raw.setdefault(index, bytearray()).extend(data)
            buf.extend(data)
            return True

        def line() -> bytes | None:
            while b"\r\n" not in buf:
                if not fill():
                    return None
            i = buf.index(b"\r\n")
            out = bytes(buf[:i])
            del buf[:i + 2]
            return out

        def exactly(n: int) -> bytes | None:
            while len(buf) < n:
                if not fill():
                    return None
            out = bytes(buf[:n])
            del buf[:n]
            return out

        while True:
            while b"\r\n\r\n" not in buf:
                if not fill():
                    if buf:
                        self._garbage(index, bytes(buf))
                    return
            i = buf.index(b"\r\n\r\n")
            head = bytes(buf[:i])
            del buf[:i + 4]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                self._garbage(index, head)
                return
            headers = []
            for hl in lines[1:]:
                name, sep, value = hl.partition(b":")
                if not sep or not name or name != name.strip():
                    self._garbage(index, head)
                    return
                headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
            req = {"conn": index, "method": parts[0].decode("latin-1"),
                   "target": parts[1].decode("latin-1"), "version": parts[2].decode(),
                   "headers": headers, "body": b"", "complete": False}
            with self.lock:
                self.requests.append(req)
            te = [v for k, v in headers if k == "transfer-encoding"]
            cl = [v for k, v in headers if k == "content-length"]
            if te:
                body = bytearray()
                while True:
                    size_line = line()
                    if size_line is None:
                        return
                    try:
                        size = int(size_line.split(b";")[0], 16)
                    except ValueError:
                        self._garbage(index, size_line)
                        return
                    if size == 0:
                        while True:       # trailers
                            t = line()
                            if t is None:
                                return
                            if not t:
                                break
                        break
                    data = exactly(size + 2)
                    if data is None:
                        return
                    body += data[:-2]
                req["body"] = bytes(body)
            elif cl:
                data = exactly(int(cl[0]))
                if data is None:
                    return
                req["body"] = data
            req["complete"] = True
            answer = b"seen:" + parts[1]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))

    def _garbage(self, index: int, data: bytes) -> None:
        with self.lock:
            self.garbage.append((index, data))


def header_values(req: dict, name: str) -> list[str]:
    return [v for k, v in req["headers"] if k == name]


def assert_clean_framing(req: dict) -> None:
    """What the gateway forwards never has ambiguous framing."""
    cl = header_values(req, "content-length")
    te = header_values(req, "transfer-encoding")
    assert not (cl and te), req
    assert len(cl) <= 1 and len(te) <= 1, req
    if te:
        assert te == ["chunked"], req
    if cl:
        assert cl[0].isdigit(), req


# ---------------------------------------------------------------------------------------
# a client that reads everything and says whether the server closed


class Exchange:
    def __init__(self, raw: bytes, closed: bool):
        self.raw = raw
        self.closed = closed
        self.responses = split_responses(raw)

    @property
    def statuses(self) -> list[int]:
        return [r[0] for r in self.responses]

    def __repr__(self):
        return f"Exchange(closed={self.closed}, raw={self.raw[:600]!r})"


def split_responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """(status, {lower name: value}, body) for each response in raw (gateway output: framed)."""
    out = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"truncated head {head!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for hl in lines[1:]:
            k, _, v = hl.partition(":")
            headers[k.strip().lower()] = v.strip()
        body = b""
        if status >= 200 and status not in (204, 304):
            if "content-length" in headers:
                n = int(headers["content-length"])
                body, raw = raw[:n], raw[n:]
            elif "chunked" in headers.get("transfer-encoding", ""):
                while True:
                    size_line, _, raw = raw.partition(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        _, _, raw = raw.partition(b"\r\n\r\n") if not raw.startswith(b"\r\n") \
                            else (b"", b"", raw[2:])
                        break
                    body += raw[:size]
                    raw = raw[size + 2:]
            else:
                body, raw = raw, b""
        out.append((status, headers, body))
    return out


def exchange(port: int, payload: bytes, timeout: float = 3.0, wait_close: bool = True) -> Exchange:
    """Send payload; read until the server closes (closed=True) or `timeout` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass     # the gateway may close before it has read all of a hostile payload
        sock.settimeout(timeout)
        chunks = []
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            chunks.append(data)
    return Exchange(b"".join(chunks), closed)


# ---------------------------------------------------------------------------------------
# fixtures: one gateway for the whole module in front of one recorder (fast)


@pytest.fixture(scope="module")
def rec():
    r = Recorder()
    yield r
    r.stop()


def start_gateway(tmp_path_factory, cfg: dict) -> Proc:
    path = tmp_path_factory.mktemp("smuggling") / "fastmesh.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    return Proc(["run", "--config", str(path), "--listen", f"127.0.0.1:{port}"], port)


@pytest.fixture(scope="module")
def gw(rec, tmp_path_factory):
    proc = start_gateway(tmp_path_factory, config(
        service("s", rec.url, [{"name": "r", "paths": ["/"]}]),
        limits={"header_timeout": "3s", "keepalive_timeout": "3s", "body_timeout": "3s",
                "max_body_size": "1m", "max_line_size": "4k", "max_head_size": "16k"}))
    yield proc
    proc.stop()


@pytest.fixture
def fresh(rec):
    rec.reset()
    return rec


def test_the_recorder_does_see_a_smuggled_request():
    """Self-check of the harness: sent straight to the recorder (no gateway), a CL.TE payload
    does show up as two requests, so "the upstream saw nothing" below means something."""
    rec = Recorder()
    try:
        ex = exchange(rec.up.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLE, timeout=1)
        assert ex.statuses == [200, 200]
        assert [r["target"] for r in rec.requests] == ["/", "/smuggled"]
    finally:
        rec.stop()


# ---------------------------------------------------------------------------------------
# A. rejected at the head: the client gets the status and a close; the upstream sees nothing

H = b"POST / HTTP/1.1\r\nHost: x\r\n"
G = b"GET / HTTP/1.1\r\nHost: x\r\n"
CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"

HEAD_REJECTS = [
    # --- Content-Length and Transfer-Encoding together (documented: 400 + close) ---
    ("CL.TE", H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG" + SMUGGLE, 400),
    ("CL.TE smuggle in chunk", H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n" + SMUGGLE, 400),
    ("TE.CL", H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
     b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLE), SMUGGLE), 400),
    ("TE.CL, CL 0", H + b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n"
     b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLE), SMUGGLE), 400),
    # --- TE.TE: a second, obfuscated Transfer-Encoding one side may ignore ---
    ("TE xchunked + CL", H + b"Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLE, 400),
    ("TE xchunked", H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLE, 501),
    ("TE space before colon", H + b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n"
     + CHUNKED_BODY + SMUGGLE, 400),
    ("TE space before colon, no CL", H + b"Transfer-Encoding : chunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE chunked then identity", H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
     + CHUNKED_BODY + SMUGGLE, 501),
    ("TE chunked then identity + CL", H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"
     b"Content-Length: 5\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE chunked twice", H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     + CHUNKED_BODY + SMUGGLE, 400),
    ("TE chunked, chunked", H + b"Transfer-Encoding: chunked, chunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE vertical tab before", H + b"Transfer-Encoding:\x0bchunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE vertical tab after", H + b"Transfer-Encoding: chunked\x0b\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE form feed", H + b"Transfer-Encoding: \x0cchunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE tab inside", H + b"Transfer-Encoding: chun\tked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE quoted", H + b"Transfer-Encoding: \"chunked\"\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE chunked with parameter", H + b"Transfer-Encoding: chunked;q=1\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE empty", H + b"Transfer-Encoding: \r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE leading comma element", H + b"Transfer-Encoding: , chunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE obs-folded", H + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE line starts with space", H + b" Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE after bare LF", H + b"X: y\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE name with NUL", H + b"Transfer-Encoding\x00: chunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    ("TE not ending in chunked", H + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 501),
    ("TE identity", H + b"Transfer-Encoding: identity\r\n\r\n" + SMUGGLE, 501),
    ("TE gzip, chunked (unsupported coding)", H + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
     + CHUNKED_BODY + SMUGGLE, 501),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY + SMUGGLE, 400),
    # --- Content-Length values ---
    ("CL differing duplicates", H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!" + SMUGGLE, 400),
    ("CL differing list", H + b"Content-Length: 5, 6\r\n\r\nhello!" + SMUGGLE, 400),
    ("CL plus sign", H + b"Content-Length: +5\r\n\r\nhello" + SMUGGLE, 400),
    ("CL minus sign", H + b"Content-Length: -5\r\n\r\nhello" + SMUGGLE, 400),
    ("CL hex", H + b"Content-Length: 0x5\r\n\r\nhello" + SMUGGLE, 400),
    ("CL space inside", H + b"Content-Length: 1 5\r\n\r\nhello" + SMUGGLE, 400),
    ("CL trailing letter", H + b"Content-Length: 5a\r\n\r\nhello" + SMUGGLE, 400),
    ("CL empty", H + b"Content-Length: \r\n\r\nhello" + SMUGGLE, 400),
    ("CL decimal point", H + b"Content-Length: 5.0\r\n\r\nhello" + SMUGGLE, 400),
    ("CL 2^63", H + b"Content-Length: 9223372036854775808\r\n\r\nhello" + SMUGGLE, 400),
    ("CL 2^64+5 (wraps to 5)", H + b"Content-Length: 18446744073709551621\r\n\r\nhello" + SMUGGLE, 400),
    ("CL 20 nines", H + b"Content-Length: 99999999999999999999\r\n\r\nhello" + SMUGGLE, 400),
    ("CL space before colon", H + b"Content-Length : 5\r\n\r\nhello" + SMUGGLE, 400),
    ("CL vertical tab", H + b"Content-Length:\x0b5\r\n\r\nhello" + SMUGGLE, 400),
    ("CL obs-folded", H + b"Content-Length: 5\r\n 0\r\n\r\nhello" + SMUGGLE, 400),
    # --- header syntax ---
    ("obs-fold", G + b"X-A: b\r\n folded\r\n\r\n" + SMUGGLE, 400),
    ("obs-fold with tab", G + b"X-A: b\r\n\tfolded\r\n\r\n" + SMUGGLE, 400),
    ("whitespace before colon", G + b"X-A : b\r\n\r\n" + SMUGGLE, 400),
    ("tab before colon", G + b"X-A\t: b\r\n\r\n" + SMUGGLE, 400),
    ("NUL in value", G + b"X-A: b\x00c\r\n\r\n" + SMUGGLE, 400),
    ("bare CR in value", G + b"X-A: b\rc\r\n\r\n" + SMUGGLE, 400),
    ("bare LF in value line", G + b"X-A: b\nc: d\r\n\r\n" + SMUGGLE, 400),
    ("CTL 0x01 in value", G + b"X-A: b\x01c\r\n\r\n" + SMUGGLE, 400),
    ("DEL in value", G + b"X-A: b\x7fc\r\n\r\n" + SMUGGLE, 400),
    ("ESC in value", G + b"X-A: \x1b[31m\r\n\r\n" + SMUGGLE, 400),
    ("space in name", G + b"X A: b\r\n\r\n" + SMUGGLE, 400),
    ("separator in name", G + b"X(A): b\r\n\r\n" + SMUGGLE, 400),
    ("empty name", G + b": b\r\n\r\n" + SMUGGLE, 400),
    ("name without colon", G + b"X-A\r\n\r\n" + SMUGGLE, 400),
    ("non-ASCII in name", G + b"X-\xc3\xa9: b\r\n\r\n" + SMUGGLE, 400),
    ("LF-only line endings", b"GET / HTTP/1.1\nHost: x\n\n" + SMUGGLE, 400),
    ("LF-only end of head", G + b"\n" + SMUGGLE, 400),
    ("CR-only line endings", b"GET / HTTP/1.1\rHost: x\r\r" + SMUGGLE, 400),
    # --- request line ---
    ("method with separator", b"G(ET / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("method with NUL", b"GE\x00T / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("empty method", b" / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("two spaces after method", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("two spaces before version", b"GET /  HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("tab separator", b"GET\t/ HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("trailing space after version", b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("leading space", b" GET / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("tab in target", b"GET /a\tb HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("CR in target", b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("NUL in target", b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("non-ASCII in target", b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("fragment in target", b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("HTTP/0.9 style line", b"GET /\r\n\r\n" + SMUGGLE, 400),
    ("lower-case version", b"GET / http/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("version 1.10", b"GET / HTTP/1.10\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("version without minor", b"GET / HTTP/1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("HTTP/2.0 is 505", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n" + SMUGGLE, 505),
    ("HTTP/3.0 is 505", b"GET / HTTP/3.0\r\nHost: x\r\n\r\n" + SMUGGLE, 505),
    ("HTTP/0.9 is 505", b"GET / HTTP/0.9\r\nHost: x\r\n\r\n" + SMUGGLE, 505),
    ("HTTP/9.9 is 505", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n" + SMUGGLE, 505),
    ("too many leading CRLFs", b"\r\n" * 8 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    # --- Host ---
    ("missing Host on HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n" + SMUGGLE, 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + SMUGGLE, 400),
    ("two identical Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n" + SMUGGLE, 400),
    ("Host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n" + SMUGGLE, 400),
    ("Host with userinfo", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n" + SMUGGLE, 400),
    ("Host with path", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n" + SMUGGLE, 400),
    # --- absolute-form ---
    ("absolute-form with userinfo", b"GET http://u@x/ HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("absolute-form other scheme", b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("absolute-form empty authority", b"GET http:///a HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 400),
    ("absolute-form without Host on 1.1", b"GET http://x/ HTTP/1.1\r\n\r\n" + SMUGGLE, 400),
    # --- methods we do not proxy ---
    ("CONNECT", b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n" + SMUGGLE, 405),
    # --- limits: the answer comes before any byte goes upstream ---
    ("request line over the limit (414)", b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE, 414),
    ("header block over the limit (431)", G + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n" + SMUGGLE, 431),
    ("too many headers (431)", G + b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n" + SMUGGLE, 431),
    ("body over max_body_size (413)", H + b"Content-Length: 2000000\r\n\r\n" + SMUGGLE, 413),
]


@pytest.mark.parametrize("payload,status", [c[1:] for c in HEAD_REJECTS], ids=[c[0] for c in HEAD_REJECTS])
def test_rejected_head_reaches_nothing_upstream(gw, fresh, payload, status):
    ex = exchange(gw.port, payload)
    assert ex.statuses == [status], ex
    assert ex.responses[0][1].get("connection") == "close", ex
    assert ex.closed, ex
    assert b'{"message":' in ex.raw
    time.sleep(SETTLE)
    assert fresh.requests == [], fresh.requests
    assert b"smuggled" not in fresh.all_raw()


# ---------------------------------------------------------------------------------------
# B. bad chunked framing: the head went upstream, the body never completes there, the
#    upstream connection is dropped, and nothing after the bad chunk is ever a request

CHUNK_HEAD = H + b"Transfer-Encoding: chunked\r\n\r\n"

BAD_CHUNKS = [
    ("0x size", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("size with trailing space", b"5 \r\nhello\r\n0\r\n\r\n"),
    ("size with trailing tab", b"5\t\r\nhello\r\n0\r\n\r\n"),
    ("size with leading space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("negative size", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("non-hex size", b"g\r\nhello\r\n0\r\n\r\n"),
    ("empty size line", b"\r\nhello\r\n0\r\n\r\n"),
    ("size with plus", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("size overflow", b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n"),
    ("size overflow to zero", b"10000000000000000\r\n\r\n"),
    ("extension with BWS", b"5 ;a=b\r\nhello\r\n0\r\n\r\n"),
    ("extension too long", b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n0\r\n\r\n"),
    ("missing CRLF after data", b"5\r\nhelloXX0\r\n\r\n"),
    ("data longer than size", b"3\r\nhello\r\n0\r\n\r\n"),
    ("LF-only chunk lines", b"5\nhello\n0\n\n"),
    ("bare CR after size", b"5\rhello\r\n0\r\n\r\n"),
    ("LF-only after data", b"5\r\nhello\n0\r\n\r\n"),
    ("trailers too long", b"0\r\n" + b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(200)) + b"\r\n"),
    ("obs-folded trailer", b"0\r\nX-T: a\r\n b\r\n\r\n"),
    ("trailer with NUL", b"0\r\nX-T: a\x00\r\n\r\n"),
    ("trailer space before colon", b"0\r\nX-T : a\r\n\r\n"),
    ("Content-Length trailer", b"0\r\nContent-Length: 5\r\n\r\n"),
    ("Transfer-Encoding trailer", b"0\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("request instead of trailers", b"0\r\n" + SMUGGLE),
    ("LF-only final line", b"0\r\n\n"),
]


@pytest.mark.parametrize("body", [c[1] for c in BAD_CHUNKS], ids=[c[0] for c in BAD_CHUNKS])
def test_bad_chunk_closes_and_nothing_after_it_is_a_request(gw, fresh, body):
    ex = exchange(gw.port, CHUNK_HEAD + body + SMUGGLE)
    assert ex.statuses == [400], ex
    assert ex.responses[0][1].get("connection") == "close"
    assert ex.closed
    time.sleep(SETTLE)
    # the head may have been forwarded already; its body never completes upstream
    assert [r["target"] for r in fresh.requests] in ([], ["/"]), fresh.requests
    assert all(not r["complete"] for r in fresh.requests), fresh.requests
    assert b"smuggled" not in fresh.all_raw()


def test_bad_chunk_in_a_later_read_drops_the_upstream_connection(gw, fresh):
    """Good chunks were already relayed; a bad one arrives later: the upstream connection is
    closed (its request never completes) and the next client gets a fresh upstream connection."""
    before = fresh.connections
    with RawClient(gw.port) as c:
        c.send(CHUNK_HEAD + b"5\r\nhello\r\n")
        time.sleep(0.2)
        c.send(b"zz\r\n" + SMUGGLE)
        resp = c.read_response()
        assert resp.status == 400
        assert c.is_closed()
    time.sleep(SETTLE)
    assert len(fresh.requests) == 1 and not fresh.requests[0]["complete"]
    assert b"smuggled" not in fresh.all_raw()
    ex = exchange(gw.port, b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [200] and ex.responses[0][2] == b"seen:/after"
    assert fresh.connections == before + 1 or fresh.requests[-1]["conn"] != fresh.requests[0]["conn"]
    assert fresh.requests[-1]["conn"] != fresh.requests[0]["conn"]


# ---------------------------------------------------------------------------------------
# C. accepted (and legitimate): the gateway's message boundaries are the upstream's

ACCEPTED = [
    # (id, payload, [(target, body)] the upstream must see, in order)
    ("TE with tab OWS", H + b"Transfer-Encoding:\tchunked\r\n\r\n" + CHUNKED_BODY,
     [("/", b"hello")]),
    ("TE with trailing tab", H + b"Transfer-Encoding: chunked\t\r\n\r\n" + CHUNKED_BODY,
     [("/", b"hello")]),
    ("TE upper case", H + b"Transfer-Encoding: CHUNKED\r\n\r\n" + CHUNKED_BODY, [("/", b"hello")]),
    ("CL identical duplicates", H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
     [("/", b"hello")]),
    ("CL identical list", H + b"Content-Length: 5, 5\r\n\r\nhello", [("/", b"hello")]),
    ("CL leading zeros", H + b"Content-Length: 005\r\n\r\nhello", [("/", b"hello")]),
    ("chunk extensions and trailers", CHUNK_HEAD + b"5;a=b;c=\"d e\"\r\nhello\r\n0\r\nX-T: v\r\n\r\n",
     [("/", b"hello")]),
    ("chunk size with leading zeros", CHUNK_HEAD + b"0005\r\nhello\r\n0000\r\n\r\n", [("/", b"hello")]),
    ("HTTP/1.2 is HTTP/1.1", b"GET /v HTTP/1.2\r\nHost: x\r\n\r\n", [("/v", b"")]),
    ("HTTP/1.0 without Host", b"GET /v HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", [("/v", b"")]),
    ("leading empty lines", b"\r\n\r\nGET /v HTTP/1.1\r\nHost: x\r\n\r\n", [("/v", b"")]),
    ("empty Host", b"GET /v HTTP/1.1\r\nHost:\r\n\r\n", [("/v", b"")]),
    ("absolute-form", b"GET http://x/abs?q=1 HTTP/1.1\r\nHost: x\r\n\r\n", [("/abs?q=1", b"")]),
    ("chunked body that looks like a request", CHUNK_HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLE), SMUGGLE),
     [("/", SMUGGLE)]),
    ("CL body that looks like a request", H + b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLE), SMUGGLE),
     [("/", SMUGGLE)]),
    ("pipelined: CL body then a request", H + b"Content-Length: 5\r\n\r\nhello" + b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n",
     [("/", b"hello"), ("/second", b"")]),
    ("pipelined: chunked body then a request", CHUNK_HEAD + CHUNKED_BODY + b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n",
     [("/", b"hello"), ("/second", b"")]),
    ("pipelined: CL 0 then a request", H + b"Content-Length: 0\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n",
     [("/", b""), ("/second", b"")]),
]


@pytest.mark.parametrize("payload,expected", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_request_boundaries_match_the_upstream(gw, fresh, payload, expected):
    # end the conversation cleanly so the gateway closes: one more request with Connection: close
    payload += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    expected = expected + [("/last", b"")]
    ex = exchange(gw.port, payload)
    assert ex.closed, ex
    assert ex.statuses == [200] * len(expected), ex
    assert [r[2] for r in ex.responses] == [b"seen:" + t.encode() for t, _ in expected]
    time.sleep(0.05)
    with fresh.lock:
        got = [(r["target"], r["body"]) for r in fresh.requests]
        assert got == expected, fresh.requests
        for r in fresh.requests:
            assert r["complete"] and r["version"] == "HTTP/1.1", r
            assert_clean_framing(r)
        assert fresh.garbage == []


def test_bad_request_after_good_ones_poisons_nothing(gw, fresh):
    payload = (b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
               b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
               b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n" + SMUGGLE)
    ex = exchange(gw.port, payload)
    assert ex.statuses == [200, 200, 400], ex
    assert ex.closed
    time.sleep(SETTLE)
    assert [(r["target"], r["body"]) for r in fresh.requests] == [("/first", b""), ("/second", b"abc")]
    assert b"smuggled" not in fresh.all_raw() and b"/bad" not in fresh.all_raw()


def test_forwarded_head_has_one_clean_framing_header(gw, fresh):
    """Whatever framing headers the client sent, the gateway emits exactly its own."""
    ex = exchange(gw.port, H + b"Content-Length: 5, 5\r\nConnection: close\r\n\r\nhello")
    assert ex.statuses == [200]
    time.sleep(0.05)
    (req,) = fresh.requests
    assert header_values(req, "content-length") == ["5"]
    assert header_values(req, "transfer-encoding") == []
    ex = exchange(gw.port, CHUNK_HEAD.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
                  + CHUNKED_BODY)
    assert ex.statuses == [200]
    time.sleep(0.05)
    req = fresh.requests[-1]
    assert header_values(req, "transfer-encoding") == ["chunked"]
    assert header_values(req, "content-length") == []


def test_gateway_still_serves_after_all_that(gw, fresh):
    ex = exchange(gw.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [200] and ex.responses[0][2] == b"seen:/ok"


# ---------------------------------------------------------------------------------------
# D. absolute-form (RFC 9112 3.2.2): the target's authority is the host; not an open proxy


@pytest.fixture(scope="module")
def abs_gw(rec, tmp_path_factory):
    proc = start_gateway(tmp_path_factory, config(
        service("s", rec.url, [{"name": "api", "hosts": ["api.example.com"], "paths": ["/"]},
                               {"name": "kept", "hosts": ["kept.example.com"], "paths": ["/"],
                                "preserve_host": True}])))
    yield proc
    proc.stop()


def test_absolute_form_to_an_unrouted_host_goes_nowhere(abs_gw, fresh):
    ex = exchange(abs_gw.port, b"GET http://evil.example.net/steal HTTP/1.1\r\n"
                               b"Host: api.example.com\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [404], ex
    time.sleep(SETTLE)
    assert fresh.requests == []


def test_absolute_form_authority_wins_over_host(abs_gw, fresh):
    ex = exchange(abs_gw.port, b"GET http://api.example.com/ok?q=1 HTTP/1.1\r\n"
                               b"Host: evil.example.net\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [200], ex
    time.sleep(0.05)
    (req,) = fresh.requests
    assert req["target"] == "/ok?q=1"                         # origin-form upstream
    assert header_values(req, "host") == [f"127.0.0.1:{fresh.up.port}"]
    assert "evil.example.net" not in header_values(req, "host")


def test_absolute_form_with_preserve_host_forwards_the_authority(abs_gw, fresh):
    ex = exchange(abs_gw.port, b"GET http://kept.example.com/ok HTTP/1.1\r\n"
                               b"Host: evil.example.net\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [200], ex
    time.sleep(0.05)
    (req,) = fresh.requests
    assert header_values(req, "host") == ["kept.example.com"], req["headers"]
    assert header_values(req, "x-forwarded-host") == ["kept.example.com"], req["headers"]


# ---------------------------------------------------------------------------------------
# E. upstream side: the gateway is just as strict with what upstreams send back


@pytest.fixture
def proxied(tmp_path_factory):
    """Factory: proxied(handler) -> (upstream, gateway) with a catch-all route."""
    started = []

    def start(handler, **limits):
        up = ScriptedUpstream(handler)
        cfg = config(service("s", up.url, [{"name": "r", "paths": ["/"]}], read_timeout="3s"),
                     limits=limits or {"keepalive_timeout": "5s"})
        proc = start_gateway(tmp_path_factory, cfg)
        started.append((up, proc))
        return up, proc

    yield start
    for up, proc in started:
        proc.stop()
        up.stop()


def serve_ok_forever(conn):
    """Answer every request on this connection with 200 "ok" (keep-alive)."""
    while True:
        head = read_request_head(conn)
        if not head:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def first_conn_then_ok(first_reply: bytes, closed_by_gateway: list):
    """Connection 0 gets first_reply and then records whether the gateway hung up on it."""
    def handler(conn, index):
        if index == 0:
            read_request_head(conn)
            conn.sendall(first_reply)
            conn.settimeout(3)
            try:
                closed_by_gateway.append(conn.recv(1) == b"")
            except socket.timeout:
                closed_by_gateway.append(False)
            except ConnectionResetError:
                closed_by_gateway.append(True)
            return
        serve_ok_forever(conn)
    return handler


BAD_RESPONSES = [
    ("non-digit status", b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n"),
    ("two-digit status", b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n"),
    ("status starting with 0", b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n"),
    ("HTTP/2 status line", b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("HTTP/2.0 status line", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("ICY status line", b"ICY 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("lower-case version", b"http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("LF-only lines", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("NUL in reason", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n"),
    ("space in header name", b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 0\r\n\r\n"),
    ("space before colon", b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n"),
    ("NUL in value", b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n"),
    ("bare CR in value", b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n"),
    ("differing Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
    ("Content-Length with sign", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"),
    ("Content-Length overflow", b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nok"),
    ("chunked in HTTP/1.0", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("chunked twice", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
    ("TE with vertical tab", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("reply", [c[1] for c in BAD_RESPONSES], ids=[c[0] for c in BAD_RESPONSES])
def test_invalid_upstream_response_is_502_and_the_connection_discarded(proxied, reply):
    closed = []
    up, gw = proxied(first_conn_then_ok(reply, closed))
    ex = exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [502], ex
    assert b"invalid" in ex.raw
    ex = exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [200], ex
    assert up.connections == 2            # the next request needed a new upstream connection
    deadline = time.monotonic() + 3
    while not closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed == [True]               # and the bad one was closed by the gateway


def test_bad_chunk_from_upstream_cuts_the_client_and_drops_the_connection(proxied):
    closed = []
    up, gw = proxied(first_conn_then_ok(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", closed))
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        c.sock.settimeout(3)
        try:
            while True:
                data = c.sock.recv(65536)
                if not data:
                    break
                raw += data
        except (socket.timeout, ConnectionResetError):
            pytest.fail(f"client connection not closed: {raw!r}")
    assert raw.startswith(b"HTTP/1.1 200 ") and not raw.endswith(b"0\r\n\r\n")
    ex = exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [200] and up.connections == 2


def test_response_with_cl_and_te_is_read_as_chunked_and_not_reused(proxied):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n")
        serve_ok_forever(conn)
    up, gw = proxied(handler)
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200 and resp.body == b"hello"
        assert resp.header("content-length") is None
        assert resp.header("transfer-encoding") == "chunked"
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
    assert up.connections == 2            # a CL+TE response poisons its connection


def test_100_continue_is_relayed_to_a_client_that_expects_it(proxied):
    def handler(conn, index):
        head = read_request_head(conn)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = head.partition(b"\r\n\r\n")[2]
        while len(body) < 5:
            body += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        serve_ok_forever(conn)
    up, gw = proxied(handler)
    with RawClient(gw.port) as c:
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = c.read_response()
        assert interim.status == 100
        c.send(b"hello")
        resp = c.read_response()
        assert resp.status == 200 and resp.body == b"hello"


@pytest.mark.parametrize("interim", [b"HTTP/1.1 100 Continue\r\n\r\n",
                                     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"])
def test_interim_responses_are_swallowed_for_a_client_that_did_not_expect(proxied, interim):
    def handler(conn, index):
        head = read_request_head(conn)
        body = head.partition(b"\r\n\r\n")[2]
        while len(body) < 5:
            body += conn.recv(65536)
        conn.sendall(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        serve_ok_forever(conn)
    up, gw = proxied(handler)
    ex = exchange(gw.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert ex.statuses == [200], ex
    assert ex.responses[0][2] == b"hello"
    assert b" 100 " not in ex.raw and b" 102 " not in ex.raw


def test_101_without_an_upgrade_request_is_502(proxied):
    closed = []
    up, gw = proxied(first_conn_then_ok(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nraw-bytes", closed))
    ex = exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [502], ex
    assert b"raw-bytes" not in ex.raw
    ex = exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ex.statuses == [200] and up.connections == 2
    deadline = time.monotonic() + 3
    while not closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed == [True]


SPLIT = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"


@pytest.mark.parametrize("delay", [0.0, 0.1], ids=["same-write", "later-write"])
@pytest.mark.parametrize("method,reply", [
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
], ids=["204", "204+CL", "304", "HEAD+CL", "HEAD+chunked", "200 CL then more", "200 chunked then more"])
def test_bytes_after_a_complete_response_are_ignored_and_the_connection_not_reused(
        proxied, method, reply, delay):
    """A response that ended (bodiless, or its framing done) followed by more bytes: those bytes
    never become a response to anyone, and that upstream connection is never reused."""
    def handler(conn, index):
        if index == 0:
            read_request_head(conn)
            if delay:
                conn.sendall(reply)
                time.sleep(delay)
                conn.sendall(SPLIT)
            else:
                conn.sendall(reply + SPLIT)
            conn.settimeout(3)
            try:
                conn.recv(1)
            except OSError:
                pass
            return
        serve_ok_forever(conn)
    up, gw = proxied(handler)
    with RawClient(gw.port) as c:
        c.send(f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = c.read_response(head_request=method == "HEAD")
        assert first.status == int(reply[9:12])
        assert first.body == (b"ok" if first.status == 200 and method == "GET" else b"")
        time.sleep(0.3)
        c.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        second = c.read_response()
        assert second.status == 200 and second.body == b"ok", second.body
        assert b"smuggled" not in c.buf
    assert up.connections == 2


def test_response_without_framing_is_relayed_close_delimited(proxied):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\npart one, ")
        time.sleep(0.05)
        conn.sendall(b"part two")
    up, gw = proxied(handler)
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
        assert resp.header("connection") == "close"
        assert resp.header("content-length") is None and resp.header("transfer-encoding") is None
        assert resp.body == b"part one, part two"


def test_response_whose_last_coding_is_not_chunked_is_read_until_close(proxied):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot-really-gzip")
    up, gw = proxied(handler)
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
        assert resp.header("connection") == "close"
        assert resp.header("transfer-encoding") == "gzip"
        assert resp.body == b"not-really-gzip"


def test_http10_client_never_gets_a_chunked_claim_with_a_dechunked_body(proxied):
    def handler(conn, index):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        time.sleep(0.5)
    up, gw = proxied(handler)
    raw = raw_exchange(gw.port, b"GET / HTTP/1.0\r\n\r\n", timeout=3)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    te = [line for line in head.split(b"\r\n") if line.lower().startswith(b"transfer-encoding:")]
    if body == b"hello":              # de-chunked for HTTP/1.0: the head must not claim chunked
        assert not any(b"chunked" in line.lower() for line in te), head
    else:                             # or relayed as chunked, and then the head must say so
        assert body == b"5\r\nhello\r\n0\r\n\r\n" and te, (head, body)
