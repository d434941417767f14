"""The access log and X-Request-Id, driven through a real gateway and echo upstream in-process."""
from __future__ import annotations

import asyncio
import json

import uvloop

from fastmesh._core.proxy import Gateway
from fastmesh.accesslog import AccessLog
from fastmesh.config import load_config_data
from fastmesh.echo import start_echo
from fastmesh.plan import PoolRegistry, compile_plan


async def _exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    body = await reader.readexactly(length)
    writer.close()
    return head + body


def run_gateway(scenario, *, request_id=False, log_path=None):
    async def main():
        loop = asyncio.get_running_loop()
        echo = await start_echo("127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        config = load_config_data({"services": [{
            "name": "echo", "url": f"http://127.0.0.1:{echo_port}",
            "routes": [{"name": "all", "paths": ["/"]}]}]})
        gw = Gateway(loop, compile_plan(config, PoolRegistry()))
        if request_id:
            gw.enable_request_id(True)
        log = AccessLog(gw, loop, str(log_path)) if log_path else None
        if log:
            log.start()
        server = await loop.create_server(gw.protocol_factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await scenario(port, gw)
        finally:
            if log:
                log.stop()
            server.close()
            gw.stop()
            echo.close()
    return uvloop.run(main())


def test_access_log_writes_one_json_line_per_request(tmp_path):
    path = tmp_path / "access.log"

    async def scenario(port, gw):
        await _exchange(port, b"GET /a?x=1 HTTP/1.1\r\nHost: h.example\r\nUser-Agent: t/1\r\n\r\n")
        await _exchange(port, b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        await _exchange(port, b"GET / HTTP/1.1\r\n\r\n")   # no Host: answered 400 by the gateway
        await asyncio.sleep(0.3)

    run_gateway(scenario, log_path=path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [l["status"] for l in lines] == [200, 200, 400]
    first, second, bad = lines
    assert first["method"] == "GET" and first["uri"] == "/a?x=1" and first["host"] == "h.example"
    assert first["user_agent"] == "t/1" and first["route"] == "all" and first["service"] == "echo"
    assert first["remote_addr"] == "127.0.0.1"
    assert first["upstream"].startswith("127.0.0.1:")
    assert first["request_time"] >= first["upstream_time"] > 0
    assert abs(first["added_time"] - (first["request_time"] - first["upstream_time"])) < 1e-5
    assert first["body_bytes_sent"] > 100
    assert second["request_bytes"] > len(b"hello") and second["method"] == "POST"
    assert bad["route"] is None and bad["upstream"] is None


def test_request_id_is_generated_propagated_and_returned():
    async def scenario(port, gw):
        generated = await _exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        kept = await _exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-123\r\n\r\n")
        return generated, kept

    generated, kept = run_gateway(scenario, request_id=True)
    head, _, body = generated.partition(b"\r\n\r\n")
    rid = next(l.split(b": ")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"x-request-id"))
    upstream_saw = [v for k, v in json.loads(body)["headers"] if k.lower() == "x-request-id"]
    assert upstream_saw == [rid.decode()] and len(rid) == 24
    head, _, body = kept.partition(b"\r\n\r\n")
    assert b"X-Request-Id: abc-123" in head
    assert [v for k, v in json.loads(body)["headers"] if k.lower() == "x-request-id"] == ["abc-123"]


def test_route_counts_request_and_response_bytes():
    async def scenario(port, gw):
        request = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
        response = await _exchange(port, request)
        target = gw.plan.targets[0]
        return len(request), len(response), target.bytes_in, target.bytes_out

    sent, received, bytes_in, bytes_out = run_gateway(scenario)
    assert bytes_in == sent
    assert bytes_out == received


def test_configured_access_log_and_request_id_through_a_real_gateway(tmp_path, echo, gateway):
    import time

    from conftest import config, get, service

    log = tmp_path / "gw-access.log"
    gw = gateway(config(service("s", echo.url, [{"name": "r", "paths": ["/"]}]),
                        access_log=str(log), request_id=True))
    resp = get(gw.port, "/logged")
    rid = resp.header("x-request-id")
    assert rid
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.05)
    record = json.loads(log.read_text().splitlines()[0])
    assert record["uri"] == "/logged" and record["status"] == 200 and record["request_id"] == rid
