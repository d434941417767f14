"""The TLS policy every fastmesh context shares (edge listeners, HTTPS upstreams, mesh mTLS).

One place decides the protocol floor and the ciphers, so the edge, the upstream side and the
mesh cannot drift apart: TLS 1.2 and 1.3 only, forward-secret AEAD ciphers for TLS 1.2 (TLS
1.3's suites are all AEAD and OpenSSL's defaults are kept), no compression, no renegotiation.
The TLS itself is the standard library's ssl module (OpenSSL), run by uvloop.
"""
from __future__ import annotations

import ssl

# ECDHE only (forward secrecy), AEAD only (GCM, ChaCha20-Poly1305); ECDSA and RSA certificates.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
ALPN_HTTP1 = ["http/1.1"]


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Apply the shared policy to a new context (server or client side); returns it."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx
