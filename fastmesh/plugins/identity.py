"""The consumer identity that every authentication plugin sets, and what goes upstream with it.

One place decides how an authenticated (or anonymous) consumer is recorded on the request and which
headers the upstream sees, so key-auth, basic-auth and jwt cannot drift apart:

- `request.consumer` = the consumer's username (later plugins and the consumer-scoped chain use it);
- upstream headers `X-Consumer-Username`, `X-Consumer-Custom-ID`, `X-Credential-Identifier` and
  `X-Anonymous-Consumer` are always *set or removed*, never appended, so a client cannot smuggle
  its own copy past an auth plugin;
- `request.ctx["fastmesh.anonymous"]` tells later auth plugins whether the consumer is only the
  anonymous fallback (Kong's "logical OR" of several auth plugins: a plugin configured with
  `anonymous` does nothing when an earlier one already authenticated a real consumer).

Uses only the public request API (get_header, set_header, remove_header, consumer, ctx).
"""
from __future__ import annotations

USERNAME = b"X-Consumer-Username"
CUSTOM_ID = b"X-Consumer-Custom-ID"
CREDENTIAL = b"X-Credential-Identifier"
ANONYMOUS = b"X-Anonymous-Consumer"
# Lower-case names of every identity header: native plugins drop client copies of all of them.
NAMES = frozenset(n.lower() for n in (USERNAME, CUSTOM_ID, CREDENTIAL, ANONYMOUS))
ANONYMOUS_KEY = "fastmesh.anonymous"
CREDENTIAL_KEY = "fastmesh.credential"


def directory(gateway_config) -> dict:
    """username -> Consumer, for plugins' setup()."""
    return {c.username: c for c in getattr(gateway_config, "consumers", ())}


def _ctx(request) -> dict:
    ctx = request.ctx
    if ctx is None:
        ctx = request.ctx = {}
    return ctx


def authenticated(request) -> bool:
    """True when an earlier plugin identified a real (not anonymous) consumer."""
    if request.consumer is None:
        return False
    ctx = request.ctx
    return not (ctx is not None and ctx.get(ANONYMOUS_KEY))


def is_anonymous(request) -> bool:
    ctx = request.ctx
    return request.consumer is not None and ctx is not None and bool(ctx.get(ANONYMOUS_KEY))


def authenticate(request, consumer, credential: str | None) -> None:
    """Record `consumer` (a config Consumer) as authenticated by `credential` and tell upstream."""
    ctx = _ctx(request)
    ctx[ANONYMOUS_KEY] = False
    ctx[CREDENTIAL_KEY] = credential
    request.consumer = consumer.username
    _replace_identity(request, headers_for(consumer, credential))


def anonymous(request, consumer) -> None:
    """Record the anonymous fallback consumer (the plugin's `anonymous` setting)."""
    ctx = _ctx(request)
    ctx[ANONYMOUS_KEY] = True
    ctx[CREDENTIAL_KEY] = None
    request.consumer = consumer.username
    _replace_identity(request, headers_for(consumer, None) + [(ANONYMOUS, b"true")])


def headers_for(consumer, credential: str | None) -> list[tuple[bytes, bytes]]:
    """The identity headers an authenticated `consumer` gets upstream (native plugins
    precompute them per credential at setup)."""
    out = [(USERNAME, consumer.username.encode())]
    if consumer.custom_id is not None:
        out.append((CUSTOM_ID, consumer.custom_id.encode()))
    if credential is not None:
        out.append((CREDENTIAL, credential.encode()))
    return out


def _replace_identity(request, lines) -> None:
    """Every identity header is set or removed, never appended: client copies never pass."""
    for name in NAMES:
        request.remove_header(name)
    for name, value in lines:
        request.add_header(name, value)


def fail_or_anonymous(request, anonymous_consumer, answer):
    """The plugin's failure `answer`, or None after falling back to the anonymous consumer.

    A request that an earlier auth plugin left anonymous stays anonymous (and is not refused) when
    this plugin also has `anonymous` set, as in Kong.
    """
    if anonymous_consumer is None:
        return answer
    anonymous(request, anonymous_consumer)
    return None


def already_done(request, anonymous_name) -> bool:
    """Kong's OR semantics: with `anonymous` set, an already authenticated request skips this plugin."""
    return anonymous_name is not None and authenticated(request)
