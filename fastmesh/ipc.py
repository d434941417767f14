"""Supervisor <-> worker messages: length-prefixed msgpack over a Unix socket pair.

A frame is a 4-byte big-endian length followed by one msgpack map. The validated Config travels
as msgpack too (`encode_config` / `decode_config`): the supervisor validates once, the worker
rebuilds the same frozen dataclasses without validating again, and checks that it got the version
the supervisor announced.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import struct
from functools import lru_cache

import msgpack

from fastmesh.config import Config

HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


class ChannelClosed(Exception):
    """The other end of the pipe went away."""


def pack(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


class Channel:
    """One end of the pipe, on an asyncio loop: send() frames, recv() the next frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock) -> "Channel":
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME)
        return cls(reader, writer)

    def send(self, message: dict) -> None:
        if self.writer.is_closing():
            raise ChannelClosed("pipe closed")
        self.writer.write(pack(message))

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None

    async def recv(self) -> dict:
        try:
            head = await self.reader.readexactly(HEADER.size)
            (size,) = HEADER.unpack(head)
            if size > MAX_FRAME:
                raise ChannelClosed(f"frame of {size} bytes is too large")
            body = await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise ChannelClosed(str(exc) or "pipe closed") from None
        return msgpack.unpackb(body, raw=False, strict_map_key=False)

    def close(self) -> None:
        self.writer.close()


# --- the validated Config as msgpack ----------------------------------------------------------
# Exact round trip of the frozen dataclasses whatever the model grows: a dataclass travels as
# {"~dc": "module:QualName", "f": {field: value}} (only classes of fastmesh.config.* are rebuilt),
# a tuple as {"~t": [...]}, a mapping as {"~d": [[key, value], ...]}; scalars and lists as they are.

def encode_config(config: Config) -> bytes:
    """The validated Config as msgpack."""
    return msgpack.packb(_plain(config), use_bin_type=True)


def decode_config(data: bytes, version: str | None = None) -> Config:
    """Rebuild the Config from encode_config output; ValueError if it is not the `version` announced."""
    config = _build(msgpack.unpackb(data, raw=False, strict_map_key=False))
    if not isinstance(config, Config):
        raise ValueError(f"expected a Config, found {type(config).__name__}")
    if version is not None and config.version != version:
        raise ValueError(f"config arrived as version {config.version}, expected {version}")
    return config


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"~dc": f"{cls.__module__}:{cls.__qualname__}",
                "f": {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"~t": [_plain(v) for v in value]}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {"~d": [[_plain(k), _plain(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__} to workers (config values must be "
                    "dataclasses, tuples, lists, dicts or scalars)")


@lru_cache(maxsize=None)
def _dataclass(name: str):
    module, _, qualname = name.partition(":")
    if module != "fastmesh.config" and not module.startswith("fastmesh.config."):
        raise ValueError(f"refusing to rebuild {name}: not a config class")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"{name} is not a dataclass")
    return obj


def _build(value):
    if isinstance(value, list):
        return [_build(v) for v in value]
    if isinstance(value, dict):
        if "~dc" in value:
            cls = _dataclass(value["~dc"])
            fields = {k: _build(v) for k, v in value["f"].items()}
            init = {f.name for f in dataclasses.fields(cls) if f.init}
            obj = cls(**{k: v for k, v in fields.items() if k in init})
            for k, v in fields.items():          # init=False fields: set as the original had them
                if k not in init:
                    object.__setattr__(obj, k, v)
            return obj
        if "~t" in value:
            return tuple(_build(v) for v in value["~t"])
        if "~d" in value:
            return {_build(k): _build(v) for k, v in value["~d"]}
        raise ValueError(f"unexpected mapping in config message: {sorted(value)}")
    return value
