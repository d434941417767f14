"""The embedded default config: `fastmesh run` with no file routes everything to the echo upstream."""
from __future__ import annotations


def embedded_config(echo_port: int, listen: str) -> dict:
    return {
        "_format_version": "1",
        "gateway": {"listen": listen, "server_timing": True},
        "services": [{
            "name": "echo",
            "url": f"http://127.0.0.1:{echo_port}",
            "routes": [{"name": "echo", "paths": ["/"]}],
        }],
    }
