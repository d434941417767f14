"""correlation-id: one id per request, kept from the client or generated, sent upstream (Kong's shape).

Defaults are Kong's (`Kong-Request-ID`, `uuid#counter`), so a fleet moving from Kong keeps its log
queries. A client-sent id (non-empty) is kept and forwarded unchanged; otherwise one is generated
and added to the upstream request. With `echo_downstream` the id goes back on the response too
(replacing any the upstream set), so the caller can quote it.

Generators:
- `uuid`: a random UUID per request.
- `uuid#counter`: one random UUID per worker process and a per-worker counter, `<uuid>#<n>`;
  cheaper than a UUID each time and still unique across workers and restarts.
- `tracker`: `<client ip>-<worker pid>-<n>-<unix time, ms>`: says where and when at a glance.
"""
from __future__ import annotations

import itertools
import os
import time
import uuid

from fastmesh.config.schema import Invalid, boolean, describe, token
from fastmesh.plugins import RESERVED, Field, Plugin

GENERATORS = ("uuid", "uuid#counter", "tracker")


def header_name(value) -> str:
    name = token(value, "header name")
    if name.lower().encode() in RESERVED:
        raise Invalid(f"header {name!r} is managed by the gateway")
    return name


def generator(value) -> str:
    if value not in GENERATORS:
        raise Invalid(f"expected one of {', '.join(GENERATORS)}, found {describe(value)}")
    return value


class _Worker:
    """Per-process state: a fresh UUID and counter after a fork, so workers never collide."""
    pid = None
    uuid = ""
    counter = None

    @classmethod
    def next(cls) -> tuple[str, int]:
        pid = os.getpid()
        if pid != cls.pid:
            cls.pid, cls.uuid, cls.counter = pid, str(uuid.uuid4()), itertools.count(1)
        return cls.uuid, next(cls.counter)


def _uuid(request) -> bytes:
    return str(uuid.uuid4()).encode()


def _uuid_counter(request) -> bytes:
    base, n = _Worker.next()
    return b"%s#%d" % (base.encode(), n)


def _tracker(request) -> bytes:
    _, n = _Worker.next()
    return b"%s-%d-%d-%.3f" % (request.client_ip, os.getpid(), n, time.time())


_MAKE = {"uuid": _uuid, "uuid#counter": _uuid_counter, "tracker": _tracker}
CTX_KEY = "correlation-id"


class CorrelationId(Plugin):
    name = "correlation-id"
    priority = 1
    schema = {
        "header_name": Field(header_name, "Kong-Request-ID"),
        "generator": Field(generator, "uuid#counter"),
        "echo_downstream": Field(boolean, False),
    }

    def __init__(self, config):
        super().__init__(config)
        self.header = config["header_name"].encode()
        self.make = _MAKE[config["generator"]]
        if not config["echo_downstream"]:
            self.response = None       # no response phase at all: the chain skips it

    def access(self, request):
        value = request.get_header(self.header)
        if not value:
            value = self.make(request)
            request.set_header(self.header, value)
        if request.ctx is None:
            request.ctx = {}
        request.ctx[CTX_KEY] = value
        return None

    def response(self, request, response):
        value = (request.ctx or {}).get(CTX_KEY)
        if value is not None:
            response.set_header(self.header, value)
