"""A TLS echo server on fastmesh._core.tls_transport, run as a process by test_tls_transport.

Usage: python tests/tls_echo.py CERT KEY HANDSHAKE_TIMEOUT. Prints one JSON line when
listening: {"port": N, "native": bool}, then one line per connection as it ends:
{"native": bool, "eof": bool, "bytes": N, "handshake": "ok" | exception class name}.
"""
import asyncio
import json
import ssl
import sys

import uvloop

from fastmesh._core import tls_transport


class Echo(asyncio.Protocol):
    """Echoes everything; on the peer's close_notify (eof_received), closes."""

    def __init__(self):
        self.transport = None
        self.eof = False
        self.count = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.count += len(data)
        self.transport.write(data)

    def eof_received(self):
        self.eof = True
        return False

    def connection_lost(self, exc):
        report({"native": self.transport.native_records, "eof": self.eof, "bytes": self.count})


def report(line: dict) -> None:
    print(json.dumps(line), flush=True)


def handshake_done(tls, exc):
    report({"handshake": "ok" if exc is None else type(exc).__name__})


async def main(cert: str, key: str, timeout: float) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: tls_transport.TLSTransport(ctx, True, Echo(), None, timeout, handshake_done),
        "127.0.0.1", 0)
    report({"port": server.sockets[0].getsockname()[1], "native": tls_transport.native()})
    await asyncio.sleep(3600)


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
