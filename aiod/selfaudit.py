"""aiod's own AIO contexts checked against the kernel's view of them.

The kernel maps every context's completion ring at the address that is the
context id, with a size set by its nr_events (aiod.aio_ring.ring_pages). So
/proc/self/maps says exactly which contexts this process holds. Any
difference from the pools' live records is a leak:

- ``unrecorded``: a ring no pool knows (a context made behind the pools'
  back); it is charged to fs.aio-nr until the process exits;
- ``missing``: a pool holds a context as live, but the kernel has no ring for
  it (destroyed behind the pool's back): the books are wrong;
- ``size``: the ring at a recorded address has the wrong size: the context
  there is not the one recorded.

Contexts are created and destroyed while an audit reads /proc/self/maps, so
one sighting proves nothing: a difference counts once it is seen by two
audits in a row (the daemon audits every few seconds, far longer than any
io_setup or io_destroy takes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aiod.aio_ring import PAGE, ring_pages
from aiod.procmaps import Ring, parse_rings


@dataclass(frozen=True)
class Expected:
    """A context a pool holds as live (not yet handed to io_destroy)."""

    pool: str
    index: int
    kernel_id: int
    nr_events: int


@dataclass(frozen=True)
class Leak:
    kind: str            # "unrecorded", "missing" or "size"
    address: int
    pages: int           # the ring's pages (0 when there is none)
    pool: str | None = None
    index: int | None = None
    nr_events: int | None = None
    want_pages: int = 0

    def describe(self) -> str:
        if self.kind == "unrecorded":
            return (f"an AIO ring of {self.pages} pages at {self.address:#x} is mapped in aiod "
                    f"but no pool owns it: a context was created behind the pools' back and "
                    f"stays charged to fs.aio-nr until aiod exits")
        if self.kind == "missing":
            return (f"pool {self.pool} context {self.index} ({self.address:#x}, nr_events "
                    f"{self.nr_events}) is recorded live but the kernel has no ring for it: "
                    f"it was destroyed behind the pool's back")
        return (f"pool {self.pool} context {self.index} ({self.address:#x}) should have a ring "
                f"of {self.want_pages} pages for nr_events {self.nr_events}, the kernel shows "
                f"{self.pages}: the context there is not the one recorded")


def own_rings(procfs_root: str | os.PathLike[str] = "/proc") -> list[Ring]:
    with open(f"{os.fspath(procfs_root)}/self/maps", "rb") as f:
        return parse_rings(f.read())


def compare(expected: list[Expected], rings: list[Ring], cpus: int) -> set[Leak]:
    """Every difference between the live records and the rings, as leaks."""
    by_addr = {r.start: r for r in rings}
    leaks: set[Leak] = set()
    claimed: set[int] = set()
    for e in expected:
        r = by_addr.get(e.kernel_id)
        if r is None:
            leaks.add(Leak("missing", e.kernel_id, 0, e.pool, e.index, e.nr_events))
            continue
        claimed.add(r.start)
        want = ring_pages(e.nr_events, cpus)
        if r.size // PAGE != want:
            leaks.add(Leak("size", r.start, r.size // PAGE, e.pool, e.index, e.nr_events, want))
    for r in rings:
        if r.start not in claimed:
            leaks.add(Leak("unrecorded", r.start, r.size // PAGE))
    return leaks


class SelfAudit:
    """Leaks confirmed by two audits in a row; remembers every one it confirmed."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self._last: set[Leak] = set()
        self.current: set[Leak] = set()     # confirmed and still there
        self.seen: set[Leak] = set()        # every leak confirmed since start

    def observe(self, expected: list[Expected], rings: list[Ring]) -> list[Leak]:
        """Feed one audit; returns the leaks confirmed by this one for the first time."""
        now = compare(expected, rings, self.cpus)
        confirmed = now & self._last
        self._last = now
        new = sorted(confirmed - self.seen, key=lambda x: (x.kind, x.address))
        self.current = confirmed
        self.seen |= confirmed
        return new
