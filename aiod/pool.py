"""A named pool of kernel AIO contexts, with exact accounting.

The pool is driven by one thread, the I/O loop: it submits and reaps, and
takes contexts out of service (shrink, removal, shutdown) through its
:class:`~aiod.teardown.Teardown`, which the reap polls and which never blocks.
Any other thread may call :meth:`Pool.snapshot` at any time (a metrics
scrape); it gets copies taken under the locks.

The hot path is the compiled engine (:mod:`aiod.engine`): each context is
an :class:`~aiod.engine.EngineContext` (its kernel context, its engine Ring
and its lifecycle record), a job's ops live in an engine OpSet whose rows are
in the pool's :class:`~aiod.engine.Ledger`, and one engine call submits or
reaps a whole batch. Records are updated once per batch from the counts the
engine returns.

Back-pressure: the pool never queues. ``submit`` places ops in the contexts
with the fewest in flight that still have room (in_flight < nr_events); ops
that do not fit stay free in their OpSet and are counted ``unsubmitted`` for
the caller. Nothing waits inside the pool where accounting could not see it,
and the kernel never gets to answer EAGAIN for a full ring.

Accounting: every op a context accepted is counted submitted, and leaves
in_flight exactly once, as completed, cancelled or failed:
- completed: res >= 0 and no cancel was asked for it;
- failed: res < 0 (its errno counted), or refused by io_submit itself;
- cancelled: we asked the kernel to cancel it and it agreed, or its context
  was destroyed before its completion reached us.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from aiod import engine
from aiod.engine import EngineContext, Ledger
from aiod.poolcontexts import PoolContexts
from aiod.poolsetup import PoolCapacityError, PoolClosed, PoolError
from aiod.snapshot import PoolSnapshot

__all__ = ["Pool", "PoolCapacityError", "PoolClosed", "PoolError", "PoolSnapshot", "Submitted",
           "place"]

log = logging.getLogger("aiod.pool")


class Submitted(NamedTuple):
    """What became of a submit: in flight now, refused by io_submit (counted
    failed), and not submitted for want of room (still free in the OpSet)."""

    submitted: int
    rejected: int
    unsubmitted: int


def place(loads: list[int], room: list[int], n: int) -> list[int]:
    """How many of n ops go to each context: the least loaded first, as one
    op at a time to the least loaded would (ties to the lowest index), never
    past a context's room. Water-filling, without a step per op."""
    n = min(n, sum(room))
    if n <= 0:
        return [0] * len(loads)
    caps = [f + r for f, r in zip(loads, room)]

    def fill(level: int) -> int:
        return sum(max(0, min(level, c) - f) for f, c in zip(loads, caps))

    lo, hi = min(loads), max(caps)
    while lo < hi:  # the highest level whose fill is at most n
        mid = (lo + hi + 1) // 2
        if fill(mid) <= n:
            lo = mid
        else:
            hi = mid - 1
    out = [max(0, min(lo, c) - f) for f, c in zip(loads, caps)]
    left = n - sum(out)
    for i, (f, c) in enumerate(zip(loads, caps)):
        if left and f + out[i] == lo and lo < c:
            out[i] += 1
            left -= 1
    return out


class Pool(PoolContexts):
    """A named set of kernel AIO contexts. See the module docstring."""

    def __init__(self, name: str, contexts: int, nr_events: int, **kw: Any) -> None:
        """See PoolContexts for the keywords (procfs_root, use_eventfd, clocks, timeouts)."""
        self.ledger = Ledger()
        self._listeners: dict[int, Callable[[], None]] = {}
        super().__init__(name, contexts, nr_events, **kw)

    @property
    def accounting(self) -> Any:
        """The engine Accounting an OpSet of this pool's jobs counts into."""
        return self.ledger.acct

    def row(self, job: str, op: str) -> int:
        """The ledger row of (job, op), for OpSet.add."""
        return self.ledger.row(job, op)

    def register(self, job: str, ops: Iterable[str]) -> None:
        """Make a job's series exist (at zero) before its first op."""
        for op in ops:
            self.ledger.row(job, op)

    def forget(self, job: str) -> None:
        """Drop a removed job's series once none of its ops is in flight."""
        self.ledger.forget(job)

    def listen(self, owner: object, callback: Callable[[], None]) -> None:
        """Call back after every reap that accounted something: the owner's
        OpSet has its completions (and its notes) in it by then."""
        self._listeners[id(owner)] = callback

    def unlisten(self, owner: object) -> None:
        self._listeners.pop(id(owner), None)

    # ------------------------------------------------------------------ submit
    def submit(self, opset: Any, n: int) -> Submitted:
        """Submit up to n of opset's ready ops, least-in-flight context first.

        Ops io_submit refused (a bad fd, say) are counted failed with their
        errno and noted in the OpSet (take_notes); ops that did not fit stay free.
        """
        if not self._accepting:
            raise PoolClosed(f"pool '{self.name}' is draining; no new submissions")
        n = min(n, int(opset.ready))
        if n <= 0:
            return Submitted(0, 0, 0)
        slots = self._active
        if len(slots) == 1:
            shares = [min(n, max(0, self.nr_events - slots[0].in_flight))]
        else:
            loads = [s.in_flight for s in slots]
            shares = place(loads, [max(0, self.nr_events - f) for f in loads], n)
        batch = engine.DIRECT_BATCH if opset.direct else 0
        ok = rejected = 0
        unsubmitted = n - sum(shares)  # no room for them
        for s, k in zip(slots, shares):
            if k:
                r = s.submit(opset, k, batch=batch)
                ok += r[0]
                rejected += r[1]
                unsubmitted += r[2]
        return Submitted(ok, rejected, unsubmitted)

    def cancel(self, opset: Any, limit: int) -> int:
        """io_cancel up to limit of opset's ops in flight (tests and rare
        paths); returns how many the kernel accepted."""
        started = 0
        for s in self._slots:
            for owner, index in s.ring.inflight_ops():
                if started < limit and owner is opset and s.ring.cancel(opset, index):
                    started += 1
        return started

    # -------------------------------------------------------------------- reap
    def reap(self, timeout: float | None = 0.0, min_nr: int = 1) -> int:
        """Collect completions; wait up to timeout seconds (None: block) for min_nr.

        Returns how many ops left flight, accounted: reaped, and lost with a
        destroyed context (counted cancelled). Contexts on their way out move
        on through their teardown; the listeners hear of it after.
        """
        live = [s for s in self._slots if s.in_flight]
        n = 0
        if len(live) == 1:
            s = live[0]
            r = s.reap(min_nr if timeout != 0 else 0, timeout)
            n = r[0] + r[1] + r[2]
        elif live:
            if self.eventfd is not None:
                try:
                    os.eventfd_read(self.eventfd)
                except BlockingIOError:
                    pass
            n = self._reap_each(live)
            if not n and timeout != 0:
                n = self._wait_any(live, timeout) + self._reap_each(live)
        teardown = self._teardown
        if teardown.size:
            n += teardown.poll()
            if not self._accepting and not self._slots and not teardown.busy:
                self._close_eventfd()
        if n:
            self._tell_listeners()
        return n

    def _teardown_moved(self) -> None:
        self._tell_listeners()

    def _tell_listeners(self) -> None:
        for callback in list(self._listeners.values()):
            callback()

    @staticmethod
    def _reap_each(live: list[EngineContext]) -> int:
        n = 0
        for s in live:
            r = s.reap(0, 0.0)
            n += r[0] + r[1] + r[2]
        return n

    def _wait_any(self, live: list[EngineContext], timeout: float | None) -> int:
        if self.eventfd is not None:
            select.select([self.eventfd], [], [], timeout)
            return 0
        # Without an eventfd, wait on the first context only; the others
        # are polled right after. Fine for the tests; the daemon uses eventfd.
        r = live[0].reap(1, timeout)
        return int(r[0] + r[1] + r[2])

    # ---------------------------------------------------------------- snapshot
    def snapshot(self) -> PoolSnapshot:
        """A consistent copy for another thread (metrics, reports)."""
        live, records, folded, (destroys, destroy_failures) = self._members.records()
        stats = self.ledger.stats()
        # One look per context, not a walk of every op in flight: a scrape
        # must cost the I/O loop (which shares the GIL) next to nothing.
        now = time.monotonic_ns()
        oldest = 0.0
        for s in live:
            t = s.ring.oldest_submitted_ns
            if t is not None:
                oldest = max(oldest, (now - t) / 1e9)
        with self._setup.lock:
            setups, setup_failures = self._setup.setups, dict(self._setup.failures)
        return PoolSnapshot(
            name=self.name, state="open" if self._accepting else "closed",
            nr_events=self.nr_events, records=records, stats=stats, setups=setups,
            destroys=destroys, destroy_failures=destroy_failures,
            setup_failures=setup_failures, oldest_in_flight_seconds=oldest, folded=folded)
