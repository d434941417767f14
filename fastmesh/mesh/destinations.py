"""Which destinations a sidecar's outbound Plan holds: only those its app calls.

A compiled destination (its upstream, balancer, route, pools, histograms) costs about 9 KB; a
sidecar that compiled every service of a 1,000-service mesh would carry 9 MB it never uses, and
recompile all of it on every registry change. So, with `--destinations called` (the default):

- the outbound Plan starts with no destination but the catch-all route;
- the first call to a service the registry knows reaches the catch-all, whose plugin
  (fastmesh.mesh.unknown_service) asks `activate` for it: the destination is added and the Plan
  recompiled and swapped in at once (one compile, milliseconds), and the held request is routed
  again under the new Plan (REROUTE): the app sees one ordinary response;
- a destination that served no request for `idle` seconds is dropped again (checked every
  idle / 4 seconds), so the Plan follows what the app uses now.

The registry view itself (names and addresses) is still the whole mesh: interception needs it to
tell mesh HTTP from other traffic, and it is plain data, a few hundred bytes per instance.
`--destinations all` compiles every service of the view, as before.
"""
from __future__ import annotations

import time

MODES = ("called", "all")
DEFAULT_IDLE = 300.0                # a destination unused this long is dropped
SWEEPS_PER_IDLE = 4


class Destinations:
    def __init__(self, mode: str = "called", idle: float = DEFAULT_IDLE, clock=time.monotonic):
        if mode not in MODES:
            raise ValueError(f"destinations must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.idle = idle
        self.clock = clock
        self.active: dict[str, list] = {}     # name -> [requests seen, time they last moved]
        self.activations = 0
        self.drops = 0

    @property
    def lazy(self) -> bool:
        return self.mode == "called"

    def chosen(self, view) -> frozenset[str] | None:
        """The services to compile (None: all of them)."""
        if not self.lazy:
            return None
        return frozenset(name for name in self.active if name in view)

    def add(self, name: str) -> bool:
        """Hold `name` from now on; False when it was held already."""
        if name in self.active:
            return False
        self.active[name] = [0, self.clock()]
        self.activations += 1
        return True

    def sweep(self, requests: dict[str, int]) -> list[str]:
        """Given each held destination's request count so far, drop the ones that have not
        moved for `idle` seconds; returns the names dropped."""
        now = self.clock()
        dropped = []
        for name, seen in list(self.active.items()):
            count = requests.get(name, 0)
            if count != seen[0]:
                seen[0], seen[1] = count, now
            elif now - seen[1] >= self.idle:
                del self.active[name]
                dropped.append(name)
        self.drops += len(dropped)
        return dropped

    def status(self) -> dict:
        return {"mode": self.mode, "held": sorted(self.active), "idle_seconds": self.idle,
                "activations": self.activations, "drops": self.drops}
