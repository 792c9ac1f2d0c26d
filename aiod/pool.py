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
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from aiod.engine import EngineContext, Ledger
from aiod.lifecycle import ContextState, EndedRecords
from aiod.poolsetup import ContextSetup, PoolCapacityError, PoolError
from aiod.snapshot import PoolSnapshot
from aiod.teardown import CANCEL_WAIT, DESTROY_TIMEOUT, Step, Teardown, TeardownCounts

__all__ = ["Pool", "PoolCapacityError", "PoolClosed", "PoolError", "PoolSnapshot", "Submitted",
           "place"]

log = logging.getLogger("aiod.pool")


class PoolClosed(PoolError):
    """Submit after drain started."""


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


class Pool:
    """A named set of kernel AIO contexts. See the module docstring."""

    def __init__(self, name: str, contexts: int, nr_events: int, *,
                 procfs_root: str | os.PathLike[str] = "/proc",
                 use_eventfd: bool = True,
                 setup_retries: int = 3,
                 setup_backoff: float = 0.05,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 wall_clock: Callable[[], float] = time.time,
                 on_setup_failure: Callable[[str, int], None] | None = None,
                 destroy_timeout: float = DESTROY_TIMEOUT,
                 cancel_wait: float = CANCEL_WAIT) -> None:
        if contexts < 0 or nr_events < 1:
            raise ValueError("contexts must be >= 0 and nr_events >= 1")
        self.name = name
        self.nr_events = nr_events
        self._clock = clock
        self._sleep = sleep
        self._wall = wall_clock
        self._setup = ContextSetup(name, nr_events, procfs_root=procfs_root,
                                   retries=setup_retries, backoff=setup_backoff, sleep=sleep,
                                   on_failure=on_setup_failure)
        self._slots: list[EngineContext] = []     # contexts the pool reaps
        self._active: list[EngineContext] = []    # the ones of those that take submissions
        self._detached: list[EngineContext] = []  # being destroyed, or stuck in io_destroy
        self._ended = EndedRecords()              # destroyed, or failed for good
        self._members_lock = threading.Lock()     # moves between the lists above vs snapshots
        self._wake_lock = threading.Lock()        # the eventfd vs destroy threads that signal it
        self._next_index = 0
        self._accepting = True
        self.ledger = Ledger()
        self._listeners: dict[int, Callable[[], None]] = {}
        self._counts_lock = threading.Lock()
        self.destroys = 0
        self.destroy_failures = 0
        self.eventfd: int | None = (
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if use_eventfd else None)
        self._teardown = Teardown(self, cancel_wait=cancel_wait, destroy_timeout=destroy_timeout,
                                  clock=clock, wake=self._wake)
        try:
            self._add_contexts(contexts)
        except BaseException:
            self._close_eventfd()
            raise

    def _add_contexts(self, count: int) -> None:
        """Create count contexts; on any failure destroy the ones made here."""
        if count == 0:
            return
        self._setup.check_headroom(count)
        made: list[EngineContext] = []
        try:
            for _ in range(count):
                ctx = self._setup.make(self.eventfd)
                made.append(EngineContext(self.name, self._next_index, self.nr_events,
                                          eventfd=self.eventfd, wall_clock=self._wall,
                                          ctx=ctx, active=False))
                self._next_index += 1
        except BaseException:
            # Nothing was ever submitted to these: io_destroy returns at once.
            for s in made:
                s.ctx.destroy()
                s.record.change_state(ContextState.DESTROYED)
                with self._counts_lock:
                    self.destroys += 1
                self._ended.add(s.record)
            raise
        for s in made:
            s.record.change_state(ContextState.ACTIVE)
        with self._members_lock:
            self._slots.extend(made)
        self._active.extend(made)

    # -------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        """Contexts that accept submissions."""
        return len(self._active)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self._slots)

    @property
    def setups(self) -> int:
        return self._setup.setups

    @property
    def setup_failures(self) -> dict[int, int]:
        return self._setup.failures

    @property
    def accounting(self) -> Any:
        """The engine Accounting an OpSet of this pool's jobs counts into."""
        return self.ledger.acct

    def contexts(self) -> list[EngineContext]:
        return list(self._active)

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
        ok = rejected = 0
        for s, k in zip(slots, shares):
            if k:
                r = s.submit(opset, k)
                ok += r[0]
                rejected += r[1]
        return Submitted(ok, rejected, n - ok - rejected)

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
            for callback in list(self._listeners.values()):
                callback()
        return n

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

    # --------------------------------------------------------------- teardown
    def retire(self, drain_timeout: float, destroy_timeout: float | None = None) -> None:
        """Take the whole pool out of service: no new submissions, and every
        context drained (up to drain_timeout), cancelled and destroyed by the
        teardown, which each reap moves on. Contexts a shrink was already
        retiring keep going, their deadlines brought in to these."""
        self._accepting = False
        members, self._active = self._active, []
        with self._members_lock:
            # The pool's last contexts all belong in its final report.
            self._ended.make_room(len(self._slots) + len(self._detached))
        self._teardown.add(members, drain_timeout)
        self._teardown.expedite(drain_timeout, destroy_timeout)

    def hurry(self) -> None:
        """End every drain now: cancel and destroy what is left."""
        self._teardown.hurry()

    @property
    def torn_down(self) -> bool:
        """Retired, and every context destroyed or given up on (stuck in io_destroy)."""
        return not self._accepting and not self._slots and not self._teardown.busy

    @property
    def busy(self) -> bool:
        """Something for reap to do: ops in flight, or contexts on their way out."""
        return bool(self.in_flight or self._teardown.size)

    @property
    def retiring(self) -> int:
        """Contexts on their way out and not yet destroyed (stuck ones included)."""
        return self._teardown.size

    @property
    def stuck(self) -> int:
        """Contexts whose io_destroy missed its deadline and has not returned since."""
        return self._teardown.count(Step.STUCK)

    def teardown_step(self, step: Step) -> int:
        """Contexts on this step of their teardown."""
        return self._teardown.count(step)

    @property
    def teardown_counts(self) -> TeardownCounts:
        return self._teardown.counts

    def next_deadline(self) -> float | None:
        """When the teardown has something to do by the clock alone (the loop's wake-up)."""
        return self._teardown.next_deadline()

    def close(self, drain_timeout: float = 0.0, destroy_timeout: float = 30.0) -> TeardownCounts:
        """Retire the pool and wait until it is torn down: for tests and one-shot
        tools, never the daemon's loop. Returns what the teardown did."""
        before = TeardownCounts().plus(self._teardown.counts)
        if self._accepting:
            self.retire(drain_timeout, destroy_timeout)
        while not self.torn_down:
            self.reap(0)
            if self.torn_down:
                break
            wait = 0.05
            deadline = self._teardown.next_deadline()
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - self._clock()))
            if self.eventfd is not None:
                select.select([self.eventfd], [], [], wait)
                try:
                    os.eventfd_read(self.eventfd)
                except (BlockingIOError, OSError):
                    pass
            else:
                self._sleep(min(wait, 0.005))
        self.reap(0)
        self._close_eventfd()
        return self._teardown.counts.minus(before)

    # The teardown's side of the pool (aiod.teardown.Host).
    def detach(self, member: EngineContext) -> None:
        """Stop reaping a context about to be destroyed."""
        with self._members_lock:
            self._slots.remove(member)
            self._detached.append(member)

    def count_destroy(self, ok: bool) -> None:
        with self._counts_lock:
            if ok:
                self.destroys += 1
            else:
                self.destroy_failures += 1

    def retired(self, member: EngineContext) -> None:
        """A context is gone for good: its record joins the pool's history."""
        with self._members_lock:
            self._detached.remove(member)
            self._ended.add(member.record)

    def _wake(self) -> None:
        """From a destroy thread: wake whoever waits on the eventfd."""
        with self._wake_lock:
            if self.eventfd is not None:
                os.eventfd_write(self.eventfd, 1)

    def _close_eventfd(self) -> None:
        with self._wake_lock:
            if self.eventfd is not None:
                os.close(self.eventfd)
                self.eventfd = None

    # ------------------------------------------------------------------ resize
    def resize(self, contexts: int, retire_timeout: float = 10.0) -> None:
        """Grow now, or shrink by retiring the surplus contexts.

        A retiring context takes no new submissions. Its teardown (polled by
        every reap) destroys it once its in-flight ops are done, or, past
        retire_timeout, cancels them and destroys it; io_destroy runs on a
        thread. No op is lost either way, and nothing here blocks.
        """
        if not self._accepting:
            raise PoolClosed(f"pool '{self.name}' is draining; cannot resize")
        if contexts < 0:
            raise ValueError("contexts must be >= 0")
        have = len(self._active)
        if contexts > have:
            self._add_contexts(contexts - have)
        elif contexts < have:
            surplus = self._active[contexts:]
            self._active = self._active[:contexts]
            self._teardown.add(surplus, retire_timeout)
            if self._teardown.poll() and self._listeners:
                for callback in list(self._listeners.values()):
                    callback()

    def live_contexts(self) -> list[tuple[int, int, int]]:
        """(index, kernel id, nr_events) of every context not yet handed to
        io_destroy. Safe from another thread: a copy, taken without the loop."""
        with self._members_lock:
            members = self._slots + self._detached  # detached: io_destroy not yet called
        return [(s.record.index, s.ctx.id, s.ctx.nr_events)
                for s in members if not s.ctx.destroyed]

    # ---------------------------------------------------------------- snapshot
    def snapshot(self) -> PoolSnapshot:
        """A consistent copy for another thread (metrics, reports)."""
        with self._members_lock:
            live = list(self._slots)
            detached = list(self._detached)
            ended, folded = self._ended.snapshot()
        records = [s.record.snapshot() for s in live + detached] + ended
        records.sort(key=lambda r: r.index)
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
        with self._counts_lock:
            return PoolSnapshot(
                name=self.name,
                state="open" if self._accepting else "closed",
                nr_events=self.nr_events, records=records, stats=stats,
                setups=setups, destroys=self.destroys,
                destroy_failures=self.destroy_failures,
                setup_failures=setup_failures,
                oldest_in_flight_seconds=oldest, folded=folded)
