"""The file registry: a static YAML/JSON file of services and instances, re-read on change.

```yaml
services:
  payments:
    - {address: "10.0.0.5:15006", id: payments-1, zone: a, version: v2, weight: 100,
       metadata: {team: billing}}
    - {address: "10.0.0.6:15006"}          # id defaults to the address
```

The file is the whole truth: sidecars do not write to it (registering is a no-op). It is checked
every POLL_INTERVAL seconds and re-read when its mtime, size or inode changed; a file that cannot
be read or is invalid keeps the last good view (the problems are printed with their paths).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Callable

from fastmesh.config.datafile import read_data_file
from fastmesh.config.schema import Fields, Invalid, Issues, child, describe, item
from fastmesh.osutil import file_stamp
from fastmesh.mesh.registry import (
    INSTANCE_FIELDS, Instance, Registry, View, make_view, read_instance, service_name,
)

POLL_INTERVAL = 0.5


def read_data(path: str) -> object:
    """The file's data: JSON (what deploy tools and the benches write) with the json module the
    process has loaded anyway, anything else (YAML, or JSON json refuses) with yaml.

    A sidecar whose registry file is JSON never imports yaml: ~0.6 MiB of RSS it would keep.
    Every JSON document is YAML; the few values the two read differently (1e5: a number to
    json, a string to YAML 1.1) are not ones a registry entry takes.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        raw = b""                   # read_data_file says what is wrong with the file
    if raw.lstrip()[:1] == b"{":
        try:
            return json.loads(raw)
        except ValueError:
            pass                    # a YAML flow mapping, or broken: yaml reads it or says where
    return read_data_file(path)


def read_registry_file(path: str) -> View:
    """The view in `path`; ValueError with every problem (file, path inside it, what is wrong)."""
    data = read_data(path)
    issues = Issues(path)
    instances: list[Instance] = []
    top = Fields.of(issues, "", data if data is not None else {}, ("services",))
    services = top.raw("services") if top is not None else None
    if top is not None and services is not None and not isinstance(services, dict):
        issues.add("services", f"expected a mapping of service name to instances, "
                               f"found {describe(services)}")
    elif isinstance(services, dict):
        for raw_name, listed in services.items():
            path_here = child("services", str(raw_name))
            try:
                name = service_name(raw_name)
            except Invalid as exc:
                issues.add(path_here, exc.message)
                continue
            if not isinstance(listed, list):
                issues.add(path_here, f"expected a list of instances, found {describe(listed)}")
                continue
            seen: dict[str, str] = {}
            for index, raw in enumerate(listed):
                fields = Fields.of(issues, item(path_here, index), raw, INSTANCE_FIELDS)
                found = read_instance(fields, name) if fields is not None else None
                if found is None:
                    continue
                if found.id in seen:
                    issues.add(fields.path, f"duplicate instance id '{found.id}' "
                                            f"(first at {seen[found.id]})")
                    continue
                seen[found.id] = fields.path
                instances.append(found)
    if issues:
        raise ValueError("\n".join(str(i) for i in issues.items))
    return make_view(instances)


class FileRegistry(Registry):
    kind = "file"
    writable = False

    def __init__(self, path: str, on_change: Callable[[], None]):
        super().__init__(on_change)
        self.path = os.path.abspath(path)
        self.stamp = None
        self.task: asyncio.Task | None = None
        self.reloads = 0

    async def start(self, wait: float) -> None:
        self.check()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="registry file")

    def check(self) -> bool:
        """Re-read the file when it changed; True when it was read successfully."""
        stamp = file_stamp(self.path)
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            view = read_registry_file(self.path)
        except ValueError as exc:
            kept = f"keeping the last view ({sum(map(len, self._view.values()))} instance(s))"
            print(f"fastmesh sidecar: registry file refused, {kept}:\n{exc}", file=sys.stderr,
                  flush=True)
            self.error = str(exc)
            return False
        self.error = None
        self.reloads += 1
        self._set_view(view)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                self.check()
            except Exception as exc:            # never let the watcher die
                print(f"fastmesh sidecar: registry file {self.path}: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)

    async def register(self, instance: Instance) -> None:
        """The file is maintained by hand or by a deploy tool: nothing to write."""

    async def deregister(self, instance: Instance) -> None:
        """See `register`."""

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task], timeout=1.0)

    def state(self) -> dict:
        state = super().state()
        state.update(path=self.path, reloads=self.reloads)
        return state
