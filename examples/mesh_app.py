#!/usr/bin/env python3
"""A tiny app for the mesh demo: answers JSON naming itself, after calling the next service.

    python3 examples/mesh_app.py --name orders --port 18082 --next payments --outbound 18011

With --next it calls `http://127.0.0.1:<outbound>/<same path>` with `Host: <next>` (its own
sidecar's outbound listener, which routes by service name) and nests the answer under "next".
Standard library only, so the demo needs nothing beyond fastmesh itself.
"""
from __future__ import annotations

import argparse
import http.client
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the service this app is")
    p.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    p.add_argument("--next", help="the service to call for every request")
    p.add_argument("--outbound", type=int, help="this pod's sidecar outbound port")
    args = p.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            answer = {"service": args.name, "path": self.path}
            status = 200
            if args.next:
                conn = http.client.HTTPConnection("127.0.0.1", args.outbound, timeout=10)
                try:
                    conn.request("GET", self.path, headers={"Host": args.next})
                    resp = conn.getresponse()
                    body = resp.read()
                    status = resp.status
                    try:
                        answer["next"] = json.loads(body)
                    except ValueError:
                        answer["next"] = body.decode("utf-8", "replace")
                except OSError as exc:
                    status, answer["error"] = 502, f"calling {args.next}: {exc}"
                finally:
                    conn.close()
            data = json.dumps(answer).encode() + b"\n"
            # Head and body in one write: two small writes would meet Nagle's algorithm and
            # the caller's delayed ACK (40 ms per call).
            self.wfile.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s"
                             % (status, self.responses[status][0].encode(), len(data), data))

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
