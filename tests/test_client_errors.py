"""Malformed or hostile client input gets the right 4xx/5xx, and the connection closes when framing is in doubt."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, RawClient, config, get, raw_exchange, service


@pytest.fixture
def gw(echo, gateway):
    return gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}]),
                          limits={"header_timeout": "1s", "keepalive_timeout": "1s"}))


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw[9:12])


@pytest.mark.parametrize("payload,status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),            # space in name
    (b"GET / HTTP/1.1\r\nHost: x\r\nName : y\r\n\r\n", 400),                  # whitespace before colon
    (b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n folded\r\n\r\n", 400),          # obs-fold
    (b"GET / HTTP/1.1\r\nHost: x\r\nA: b\x00c\r\n\r\n", 400),                # NUL in value
    (b"GET / HTTP/1.1\r\nHost: x\r\nA: b\rc\r\n\r\n", 400),                  # bare CR
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),                             # double space
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                          # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),                   # two Hosts
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
])
def test_malformed_request_is_answered_and_the_connection_closed(gw, payload, status):
    raw = raw_exchange(gw.port, payload)
    assert status_of(raw) == status
    assert b"Connection: close" in raw
    assert b'{"message":' in raw


def test_overlong_request_line_is_414(gw):
    raw = raw_exchange(gw.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(raw) == 414


def test_oversized_header_block_is_431(gw):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(80))
    raw = raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status_of(raw) == 431


def test_too_many_headers_is_431(gw):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    raw = raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status_of(raw) == 431


def test_bad_chunk_size_closes_and_nothing_after_it_is_a_new_request(gw):
    raw = raw_exchange(gw.port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(raw) == 400
    assert b"/smuggled" not in raw
    assert raw.count(b"HTTP/1.1 ") == 1


def test_slow_request_head_gets_408(gw):
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        resp = c.read_response()
        assert resp.status == 408
        assert time.monotonic() - start < 3
        assert c.is_closed()


def test_idle_keepalive_connection_is_closed(gw):
    with RawClient(gw.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200
        assert c.is_closed(timeout=3)


def test_gateway_keeps_serving_after_garbage(gw):
    for junk in (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", b"\r\n\r\n\r\n\r\n\r\n", b"\xff" * 1000):
        try:
            raw_exchange(gw.port, junk, timeout=2)
        except OSError:
            pass
    assert get(gw.port).status == 200


def test_client_disconnect_mid_request_does_not_disturb_others(gw):
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    s.close()
    assert get(gw.port).status == 200


def run_check(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "fm.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "fastmesh", "check", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)


def test_check_accepts_a_valid_config(tmp_path):
    out = run_check(tmp_path, "services:\n- name: a\n  url: http://127.0.0.1:9/\n  routes:\n  - name: r\n    paths: [/]\n")
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_check_reports_every_error_with_file_and_path(tmp_path):
    out = run_check(tmp_path, (
        "services:\n"
        "- name: a\n  url: http://127.0.0.1:9/\n  routes:\n"
        "  - name: r1\n    paths: [/ok, '~/bad[']\n"
        "  - name: r2\n    pathz: [/x]\n"
    ))
    assert out.returncode == 1
    assert "fm.yaml: services[0].routes[0].paths[1]" in out.stderr
    assert "invalid regex" in out.stderr
    assert "services[0].routes[1]" in out.stderr and "pathz" in out.stderr


def test_run_with_an_invalid_config_exits_with_the_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("services:\n- name: a\n  url: ftp://x\n")
    out = subprocess.run([sys.executable, "-m", "fastmesh", "run", "--config", str(path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 1
    assert "bad.yaml: services[0].url" in out.stderr


def test_head_sent_one_byte_at_a_time_is_parsed(gw):
    payload = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Long: " + b"v" * 2000 + b"\r\n\r\n"
    with RawClient(gw.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(payload), 7):
            c.send(payload[i:i + 7])
        resp = c.read_response()
        assert resp.status == 200 and resp.json()["path"] == "/slow"


def test_request_line_without_newline_past_the_limit_is_414(gw):
    with RawClient(gw.port) as c:
        c.send(b"GET /" + b"a" * 5000)
        c.send(b"b" * 5000)
        assert c.read_response().status == 414
