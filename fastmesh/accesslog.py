"""Access log: one JSON line per request, written in batches off the request path.

The data path only appends a tuple per request (when the log is on); this
module takes them every `interval` seconds, formats them with orjson and
writes one block per batch. Field names follow nginx's combined log where
one exists, plus the gateway's own (route, service, upstream, timings).
"""
from __future__ import annotations

import os
import sys
import time

import orjson

FLUSH_INTERVAL = 0.1


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _seconds(ns: int | None) -> float | None:
    return round(ns / 1e9, 6) if ns is not None else None


def format_record(rec: tuple) -> dict:
    """One record from Gateway.take_log_records() as the JSON object written to the log."""
    (t, client_ip, method, target, host, user_agent, status, route, service, upstream,
     total_ns, upstream_ns, bytes_in, bytes_out, request_id, peer) = rec
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z",
        "remote_addr": _text(client_ip),
        "method": _text(method),
        "uri": _text(target),
        "host": _text(host),
        "status": status,
        "request_bytes": bytes_in,
        "body_bytes_sent": bytes_out,
        "user_agent": _text(user_agent),
        "route": route,
        "service": service,
        "upstream": upstream,
        "request_time": _seconds(total_ns),
        "upstream_time": _seconds(upstream_ns),
        "added_time": _seconds(total_ns - upstream_ns) if upstream_ns is not None else None,
        "request_id": _text(request_id),
    }
    if peer is not None:
        record["peer"] = _text(peer)    # the client's verified TLS identity (mesh mTLS)
    return record


class AccessLog:
    """Drains a Gateway's log records to stdout ('-') or a file, every FLUSH_INTERVAL seconds."""

    def __init__(self, gateway, loop, path: str = "-", interval: float = FLUSH_INTERVAL):
        self.gateway = gateway
        self.loop = loop
        self.interval = interval
        self.path = path
        self.fd = sys.stdout.fileno() if path == "-" else os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.timer = None

    def start(self) -> None:
        self.gateway.enable_access_log(True)
        self.timer = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self.flush()
        self.timer = self.loop.call_later(self.interval, self._tick)

    def flush(self) -> int:
        records = self.gateway.take_log_records()
        if not records:
            return 0
        block = b"".join(orjson.dumps(format_record(r)) + b"\n" for r in records)
        view = memoryview(block)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        return len(records)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.gateway.enable_access_log(False)
        self.flush()
        if self.path != "-":
            os.close(self.fd)
