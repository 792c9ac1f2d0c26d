"""Which contexts a pool has, and where each is in its life.

A pool's contexts move between three lists: ``slots`` (reaped by the pool),
``active`` (the slots that take submissions) and ``detached`` (handed to
io_destroy, or stuck in it), and then into the ended records. The I/O loop
moves them; a snapshot on another thread reads the lists under ``lock``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from aiod.engine import EngineContext
from aiod.lifecycle import ContextState, EndedRecords, FoldedRecords, RecordSnapshot
from aiod.poolsetup import ContextSetup


class Members:
    """The contexts of one pool, made by its ContextSetup."""

    def __init__(self, name: str, setup: ContextSetup, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.setup = setup
        self._wall = wall_clock
        self.slots: list[EngineContext] = []     # contexts the pool reaps
        self.active: list[EngineContext] = []    # the ones of those that take submissions
        self.detached: list[EngineContext] = []  # being destroyed, or stuck in io_destroy
        self.ended = EndedRecords()              # destroyed, or failed for good
        self.lock = threading.Lock()             # moves between the lists above vs snapshots
        self._next_index = 0
        self.destroys = 0
        self.destroy_failures = 0

    def add(self, count: int, eventfd: int | None) -> None:
        """Create count contexts; on any failure destroy the ones made here."""
        if count == 0:
            return
        self.setup.check_headroom(count)
        made: list[EngineContext] = []
        try:
            for _ in range(count):
                ctx = self.setup.make(eventfd)
                made.append(EngineContext(self.name, self._next_index, self.setup.nr_events,
                                          eventfd=eventfd, wall_clock=self._wall, ctx=ctx,
                                          active=False))
                self._next_index += 1
        except BaseException:
            # Nothing was ever submitted to these: io_destroy returns at once.
            for s in made:
                s.ctx.destroy()
                s.record.change_state(ContextState.DESTROYED)
                self.count_destroy(True)
                self.ended.add(s.record)
            raise
        for s in made:
            s.record.change_state(ContextState.ACTIVE)
        with self.lock:
            self.slots.extend(made)
        self.active.extend(made)

    def retire_all(self) -> list[EngineContext]:
        """Every active context leaves service; the pool's last contexts all
        keep their records in full, for its final report."""
        members, self.active = self.active, []
        with self.lock:
            self.ended.make_room(len(self.slots) + len(self.detached))
        return members

    def shrink(self, keep: int) -> list[EngineContext]:
        """The active contexts past the first keep leave service."""
        surplus = self.active[keep:]
        self.active = self.active[:keep]
        return surplus

    # The teardown's side (aiod.teardown.Host), through the pool.
    def detach(self, member: EngineContext) -> None:
        """Stop reaping a context about to be destroyed."""
        with self.lock:
            self.slots.remove(member)
            self.detached.append(member)

    def retired(self, member: EngineContext) -> None:
        """A context is gone for good: its record joins the pool's history."""
        with self.lock:
            self.detached.remove(member)
            self.ended.add(member.record)

    def count_destroy(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.destroys += 1
            else:
                self.destroy_failures += 1

    # Reads, safe from another thread.
    def live_contexts(self) -> list[tuple[int, int, int]]:
        """(index, kernel id, nr_events) of every context not yet handed to
        io_destroy: a copy, taken without the loop."""
        with self.lock:
            members = self.slots + self.detached  # detached: io_destroy not yet called
        return [(s.record.index, s.ctx.id, s.ctx.nr_events)
                for s in members if not s.ctx.destroyed]

    def records(self) -> tuple[list[EngineContext], list[RecordSnapshot], FoldedRecords,
                               tuple[int, int]]:
        """The reaped contexts, every record (sorted by index), the folded ended
        ones, and (destroys, destroy failures), all taken at one instant."""
        with self.lock:
            live = list(self.slots)
            detached = list(self.detached)
            ended, folded = self.ended.snapshot()
            counts = (self.destroys, self.destroy_failures)
        records = [s.record.snapshot() for s in live + detached] + ended
        records.sort(key=lambda r: r.index)
        return live, records, folded, counts
