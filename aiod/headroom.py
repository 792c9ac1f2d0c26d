"""Pools that yield AIO headroom to the rest of the host: the policy.

fs.aio-max-nr is one budget for the whole machine. When other processes push
the free headroom (aio-max-nr - aio-nr) below ``headroom_reserve``, aiod gives
contexts back: elastic pools (``min_contexts`` < ``contexts``) shrink toward
``min_contexts``, just far enough to restore the reserve. When the headroom
comes back they grow again, with hysteresis so they do not flap:

- a context is added only while the headroom stays at least one context's
  events above the reserve after adding it;
- and only once the headroom has been above the reserve for GROW_SETTLE
  seconds since the last shortage.

This module only decides; the daemon applies its targets through
``Pool.resize``, the same lossless path a reload uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiod.config import Config, PoolConfig

CHECK_INTERVAL = 1.0   # seconds between reads of fs.aio-nr (the issue asks for <= 5 s)
GROW_SETTLE = 3.0      # seconds of enough headroom before growing back


@dataclass
class Decision:
    targets: dict[str, int]                 # pool -> contexts it should have now
    shrunk: dict[str, int] = field(default_factory=dict)   # pool -> contexts given back
    grown: dict[str, int] = field(default_factory=dict)    # pool -> contexts taken back
    free: int = 0
    reserve: int = 0


class HeadroomPolicy:
    """Targets for the pools from fs.aio-nr readings. Pure: no I/O, no clock of its own."""

    def __init__(self, cfg: Config) -> None:
        self.pools: dict[str, PoolConfig] = {}
        self.targets: dict[str, int] = {}
        self.configure(cfg)
        self._ok_since: float | None = None

    def configure(self, cfg: Config) -> None:
        """A (re)loaded config: keep yields in force, within the new bounds."""
        self.reserve = cfg.headroom_reserve
        old = self.targets
        self.pools = {p.name: p for p in cfg.pools}
        self.targets = {}
        for p in cfg.pools:
            t = old.get(p.name, p.contexts)
            self.targets[p.name] = p.contexts if not self.active else \
                max(p.min_contexts, min(p.contexts, t))

    @property
    def active(self) -> bool:
        return self.reserve.enabled and any(p.elastic for p in self.pools.values())

    def yielded(self) -> int:
        """Contexts the pools hold fewer than configured, because of the reserve."""
        return sum(p.contexts - self.targets[n] for n, p in self.pools.items())

    def decide(self, aio_nr: int, aio_max_nr: int, now: float,
               releasing: int = 0) -> Decision:
        """New targets for a reading of fs.aio-nr / fs.aio-max-nr.

        ``releasing``: events of contexts already given back but not yet
        destroyed (still charged to aio-nr); they are counted as free so one
        shortage is not answered twice.
        """
        reserve = self.reserve.resolve(aio_max_nr)
        free = aio_max_nr - aio_nr + releasing
        d = Decision(targets=dict(self.targets), free=free, reserve=reserve)
        if not self.active:
            return d
        if free < reserve:
            self._ok_since = None
            deficit = reserve - free
            while deficit > 0:
                # The pool with the most contexts above its minimum gives first.
                cands = [(self.targets[n] - p.min_contexts, p.nr_events, n)
                         for n, p in self.pools.items() if self.targets[n] > p.min_contexts]
                if not cands:
                    break
                _, nr_events, name = max(cands)
                self.targets[name] -= 1
                d.shrunk[name] = d.shrunk.get(name, 0) + 1
                deficit -= nr_events
        else:
            if self._ok_since is None:
                self._ok_since = now
            if now - self._ok_since >= GROW_SETTLE:
                while True:
                    growable = [(p.nr_events, n) for n, p in self.pools.items()
                                if self.targets[n] < p.contexts and
                                free - 2 * p.nr_events >= reserve]
                    if not growable:
                        break
                    nr_events, name = min(growable)
                    self.targets[name] += 1
                    d.grown[name] = d.grown.get(name, 0) + 1
                    free -= nr_events
        d.targets = dict(self.targets)
        return d

    def initial_targets(self, aio_nr: int, aio_max_nr: int) -> dict[str, int]:
        """Sizes to create the pools at: as if all of them were up at full size."""
        full = sum(p.contexts * p.nr_events for p in self.pools.values())
        self.decide(aio_nr + full, aio_max_nr, now=0.0)
        self._ok_since = None
        return dict(self.targets)


def room_problem(cfg: Config, aio_max_nr: int) -> str | None:
    """One line when the reserve leaves the pools no room at all, else None."""
    if not cfg.headroom_reserve.enabled:
        return None
    reserve = cfg.headroom_reserve.resolve(aio_max_nr)
    need = sum(p.min_contexts * p.nr_events for p in cfg.pools)
    if reserve + need > aio_max_nr:
        return (f"{cfg.source}: headroom_reserve: {cfg.headroom_reserve} ({reserve} events) "
                f"plus the pools' minimum of {need} events (min_contexts x nr_events) is more "
                f"than fs.aio-max-nr ({aio_max_nr}): the pools would have no room at all; "
                f"lower headroom_reserve or min_contexts")
    return None
