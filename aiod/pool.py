"""A named pool of kernel AIO contexts, with exact accounting.

The pool is driven by one thread, the I/O loop: it submits and reaps, and
takes contexts out of service (shrink, removal, shutdown) through its
:class:`~aiod.teardown.Teardown`, which the reap polls and which never blocks.
Any other thread may call :meth:`Pool.snapshot` at any time (a metrics
scrape); it gets copies taken under the locks.

Back-pressure: the pool never queues. ``submit`` places each op in the
context with the fewest in flight that still has room (in_flight <
nr_events); ops that do not fit are handed straight back to the caller, which
holds them or drops them and counts them as it sees fit. Nothing waits inside
the pool where accounting could not see it, and the kernel never gets to
answer EAGAIN for a full ring.

Accounting: every op a context accepted is counted submitted, and leaves
in_flight exactly once, as completed, cancelled or failed:
- completed: res >= 0 and no cancel was asked for it;
- failed: res < 0 (its errno counted), or refused by io_submit itself;
- cancelled: we asked the kernel to cancel it and it agreed, or its context
  was destroyed before its completion reached us.
"""

from __future__ import annotations

import errno as _errno
import heapq
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aiod import aio
from aiod.accounting import Ledger, OpStats
from aiod.lifecycle import (
    KEEP_ENDED,
    ContextState,
    EndedRecords,
    FoldedRecords,
    LifecycleRecord,
    RecordSnapshot,
    fold,
)
from aiod.teardown import CANCEL_WAIT, DESTROY_TIMEOUT, Step, Teardown, TeardownCounts

log = logging.getLogger("aiod.pool")

class PoolError(Exception):
    """A pool could not do what it was asked; the message is for operators."""


class PoolCapacityError(PoolError):
    """The kernel's aio-max-nr leaves too little room for the pool."""

    def __init__(self, message: str, needed_max_nr: int) -> None:
        super().__init__(message)
        self.needed_max_nr = needed_max_nr


class PoolClosed(PoolError):
    """Submit after drain started."""


class _Slot:
    """A live context and its record."""

    __slots__ = ("ctx", "record")

    def __init__(self, ctx: aio.Context, record: LifecycleRecord) -> None:
        self.ctx = ctx
        self.record = record


@dataclass
class PoolSnapshot:
    name: str
    state: str
    nr_events: int
    records: list[RecordSnapshot]
    stats: list[OpStats]
    setups: int
    destroys: int
    destroy_failures: int
    setup_failures: dict[int, int]
    oldest_in_flight_seconds: float
    folded: FoldedRecords = field(default_factory=FoldedRecords)  # ended records not kept
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    in_flight: int = 0

    def __post_init__(self) -> None:
        f = self.folded
        self.submitted += f.submitted
        self.completed += f.completed
        self.cancelled += f.cancelled
        self.failed += f.failed
        for r in self.records:
            self.submitted += r.submitted
            self.completed += r.completed
            self.cancelled += r.cancelled
            self.failed += r.failed
            self.in_flight += r.in_flight

    @property
    def balanced(self) -> bool:
        return self.submitted == self.completed + self.cancelled + self.failed + self.in_flight

    def totals(self) -> dict[str, int]:
        return {"submitted": self.submitted, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed, "in_flight": self.in_flight}

    def contexts_by_state(self) -> dict[str, int]:
        out = {s.value: 0 for s in ContextState}
        for r in self.records:
            out[r.state.value] += 1
        for state, n in self.folded.by_state.items():
            out[state] += n
        return out

    def merged(self, later: PoolSnapshot) -> PoolSnapshot:
        """This ended pool and a later one of the same name as one, for reports:
        counters add up; the later pool's records stay in full, and of the
        earlier ones only the last KEEP_ENDED, as within a pool."""
        older = self.records
        folded = self.folded.plus(later.folded)
        if len(older) > KEEP_ENDED:
            folded = folded.plus(fold(older[:-KEEP_ENDED]))
            older = older[-KEEP_ENDED:]
        records = older + later.records
        stats = {(st.job, st.op): st.copy() for st in self.stats}
        for st in later.stats:
            mine = stats.get((st.job, st.op))
            if mine is None:
                stats[(st.job, st.op)] = st.copy()
            else:
                mine.add(st)
        failures = dict(self.setup_failures)
        for err, n in later.setup_failures.items():
            failures[err] = failures.get(err, 0) + n
        return PoolSnapshot(
            name=later.name, state=later.state, nr_events=later.nr_events, records=records,
            stats=list(stats.values()), setups=self.setups + later.setups,
            destroys=self.destroys + later.destroys,
            destroy_failures=self.destroy_failures + later.destroy_failures,
            setup_failures=failures, oldest_in_flight_seconds=later.oldest_in_flight_seconds,
            folded=folded)


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
        self._procfs_root = procfs_root
        self._setup_retries = setup_retries
        self._setup_backoff = setup_backoff
        self._clock = clock
        self._sleep = sleep
        self._wall = wall_clock
        self._on_setup_failure = on_setup_failure
        self._slots: list[_Slot] = []        # contexts the pool reaps
        self._active: list[_Slot] = []       # the ones of those that take submissions
        self._detached: list[_Slot] = []     # being destroyed, or stuck in io_destroy
        self._ended = EndedRecords()         # destroyed, or failed for good
        self._members_lock = threading.Lock()  # moves between the lists above vs snapshots
        self._given_back: list[aio.Op] = []  # lost ops whose context io_destroy returned
        self._wake_lock = threading.Lock()   # the eventfd vs destroy threads that signal it
        self._next_index = 0
        self._accepting = True
        self._ledger = Ledger(wall_clock)
        self._counts_lock = threading.Lock()
        self.setups = 0
        self.destroys = 0
        self.destroy_failures = 0
        self.setup_failures: dict[int, int] = {}
        self.eventfd: int | None = (
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if use_eventfd else None)
        self._teardown = Teardown(self, cancel_wait=cancel_wait, destroy_timeout=destroy_timeout,
                                  clock=clock, wake=self._wake)
        try:
            self._add_contexts(contexts)
        except BaseException:
            self._close_eventfd()
            raise

    # ------------------------------------------------------------------ setup
    def _check_headroom(self, count: int) -> None:
        need = count * self.nr_events
        nr, max_nr = aio.system_aio_usage(self._procfs_root)
        if max_nr - nr < need:
            raise PoolCapacityError(
                f"pool '{self.name}' needs {need} AIO events ({count} contexts x "
                f"{self.nr_events} nr_events) but only {max(max_nr - nr, 0)} are left "
                f"(fs.aio-nr={nr}, fs.aio-max-nr={max_nr}); raise fs.aio-max-nr to at "
                f"least {nr + need}", needed_max_nr=nr + need)

    def _setup_one(self) -> aio.Context:
        """io_setup with bounded retries: EAGAIN can be another process's burst."""
        delay = self._setup_backoff
        for attempt in range(self._setup_retries + 1):
            try:
                ctx = aio.Context(self.nr_events,
                                  eventfd=self.eventfd if self.eventfd is not None else False)
                with self._counts_lock:
                    self.setups += 1
                return ctx
            except aio.AioError as e:
                err = e.errno or 0
                with self._counts_lock:
                    self.setup_failures[err] = self.setup_failures.get(err, 0) + 1
                if self._on_setup_failure is not None:
                    self._on_setup_failure(self.name, err)
                if err != _errno.EAGAIN or attempt == self._setup_retries:
                    if e.errno == _errno.EAGAIN:
                        nr, max_nr = aio.system_aio_usage(self._procfs_root)
                        raise PoolCapacityError(
                            f"pool '{self.name}': the kernel refused io_setup({self.nr_events}) "
                            f"with EAGAIN after {attempt + 1} tries (fs.aio-nr={nr}, "
                            f"fs.aio-max-nr={max_nr}); raise fs.aio-max-nr to at least "
                            f"{nr + self.nr_events}", needed_max_nr=nr + self.nr_events) from e
                    raise PoolError(f"pool '{self.name}': {e}") from e
                log.warning("pool %s: io_setup(%d) failed with EAGAIN, retrying in %.2fs",
                            self.name, self.nr_events, delay,
                            extra={"AIOD_POOL": self.name, "ERRNO": e.errno})
                self._sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _add_contexts(self, count: int) -> None:
        """Create count contexts; on any failure destroy the ones made here."""
        if count == 0:
            return
        self._check_headroom(count)
        made: list[_Slot] = []
        try:
            for _ in range(count):
                ctx = self._setup_one()
                rec = LifecycleRecord(self.name, self._next_index, ctx.id, self.nr_events,
                                      clock=self._wall)
                self._next_index += 1
                made.append(_Slot(ctx, rec))
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
        return sum(s.ctx.in_flight for s in self._slots)

    def contexts(self) -> list[aio.Context]:
        return [s.ctx for s in self._active]

    def register(self, job: str, ops: Iterable[str]) -> None:
        """Make a job's series exist (at zero) before its first op."""
        self._ledger.register(job, ops)

    def forget(self, job: str) -> None:
        """Drop a removed job's series once none of its ops is in flight."""
        self._ledger.forget(job)

    # ------------------------------------------------------------------ submit
    def submit(self, ops: Sequence[aio.Op], job: str) -> list[aio.Op]:
        """Submit ops for job. Returns the ops that did not fit (back-pressure).

        Ops the kernel refused outright (a bad fd, say) are accounted as failed
        with their errno, and are not returned: their tag says so.
        """
        if not self._accepting:
            raise PoolClosed(f"pool '{self.name}' is draining; no new submissions")
        if not ops:
            return []
        slots = self._active
        if len(slots) == 1:
            s = slots[0]
            room = s.ctx.nr_events - s.ctx.in_flight
            if room >= len(ops):
                return self._submit_to(s, ops, job)
            return self._submit_to(s, ops[:room], job) + list(ops[room:]) if room > 0 else list(ops)
        # Least in flight first: a heap of (in_flight, index) per context with room.
        heap = [(s.ctx.in_flight, i) for i, s in enumerate(slots)
                if s.ctx.in_flight < s.ctx.nr_events]
        heapq.heapify(heap)
        batches: dict[int, list[aio.Op]] = {}
        refused: list[aio.Op] = []
        for k, op in enumerate(ops):
            if not heap:
                refused.extend(ops[k:])
                break
            load, i = heap[0]
            batches.setdefault(i, []).append(op)
            if load + 1 < slots[i].ctx.nr_events:
                heapq.heapreplace(heap, (load + 1, i))
            else:
                heapq.heappop(heap)
        for i, batch in batches.items():
            refused.extend(self._submit_to(slots[i], batch, job))
        return refused

    def _submit_to(self, s: _Slot, ops: Sequence[aio.Op], job: str) -> list[aio.Op]:
        self._ledger.tag(ops, job, s, time.perf_counter_ns())
        res = s.ctx.submit(ops)
        issued = time.perf_counter_ns()
        if res.failed:
            last = self._ledger.refused(res.failed)
            s.record.add_rejected(len(res.failed), f"io_submit: {os.strerror(last)}")
        if res.submitted:
            s.record.add_submitted(len(res.submitted))
            self._ledger.submitted(res.submitted, issued)
        return res.unsubmitted

    # -------------------------------------------------------------------- reap
    def reap(self, timeout: float | None = 0.0, min_nr: int = 1) -> list[aio.Op]:
        """Collect completions; wait up to timeout seconds (None: block) for min_nr.

        Every returned op has ``op.tag.outcome`` set and has been accounted.
        Ops that were lost with a destroyed context come back here too (counted
        cancelled), once io_destroy has returned and their buffers are free.
        Contexts on their way out move on through their teardown.
        """
        live = [s for s in self._slots if s.ctx.in_flight]
        done: list[aio.Op] = []
        if len(live) == 1:
            s = live[0]
            got = s.ctx.reap(min(min_nr, s.ctx.in_flight) if timeout != 0 else 0,
                             timeout=timeout)
            if got:
                self._finish(s, got)
                done = got
        elif live:
            if self.eventfd is not None:
                try:
                    os.eventfd_read(self.eventfd)
                except BlockingIOError:
                    pass
            for s in live:
                got = s.ctx.reap(0, timeout=0)
                if got:
                    self._finish(s, got)
                    done.extend(got)
            if not done and timeout != 0:
                self._wait_any(live, timeout)
                for s in live:
                    got = s.ctx.reap(0, timeout=0)
                    if got:
                        self._finish(s, got)
                        done.extend(got)
        teardown = self._teardown
        if teardown.size:
            teardown.poll()
            if not self._accepting and not self._slots and not teardown.busy:
                self._close_eventfd()
        if self._given_back:
            done.extend(self._given_back)
            self._given_back = []
        return done

    def _wait_any(self, live: list[_Slot], timeout: float | None) -> None:
        if self.eventfd is not None:
            select.select([self.eventfd], [], [], timeout)
        else:
            # Without an eventfd, wait on the first context only; the others
            # are polled right after. Fine for the tests; the daemon uses eventfd.
            got = live[0].ctx.reap(1, timeout=timeout)
            if got:
                self._finish(live[0], got)

    def _finish(self, s: _Slot, ops: list[aio.Op]) -> None:
        cancelled, failed, last_error = self._ledger.finish(ops)
        s.record.add_outcomes(len(ops) - cancelled - failed, cancelled, failed,
                              None if last_error is None else os.strerror(last_error))

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
        return bool(self.in_flight or self._teardown.size or self._given_back)

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
        self.reap(0)  # hands back what the last destroys freed
        self._close_eventfd()
        return self._teardown.counts.minus(before)

    # The teardown's side of the pool (aiod.teardown.Host).
    def cancel_ops(self, ops: Iterable[aio.Op]) -> int:
        """Ask the kernel to cancel these in-flight ops; returns how many it accepted.

        Accepted ones complete through reap as cancelled; the others (file and
        block I/O, which Linux cannot cancel) complete normally.
        """
        started = 0
        for op in ops:
            tag = op.tag
            if tag is None or tag.slot is None or tag.outcome is not None:
                continue
            tag.cancel_requested = True
            try:
                ok = tag.slot.ctx.cancel(op)
            except aio.AioError as e:
                ok = False
                log.warning("pool %s: io_cancel failed: %s", self.name, e,
                            extra={"AIOD_POOL": self.name, "ERRNO": e.errno})
            if ok:
                started += 1
            else:
                tag.cancel_requested = False
        return started

    def detach(self, member: object) -> list[aio.Op]:
        """Stop reaping a context about to be destroyed. Its ops still in flight
        will never be seen complete: they are counted cancelled, as shutdown
        always has, and returned."""
        s = member
        assert isinstance(s, _Slot)
        with self._members_lock:
            self._slots.remove(s)
            self._detached.append(s)
        lost = s.ctx.inflight_ops()
        if lost:
            self._ledger.lost(lost)
            s.record.add_outcomes(0, len(lost), 0)
        return lost

    def count_destroy(self, ok: bool) -> None:
        with self._counts_lock:
            if ok:
                self.destroys += 1
            else:
                self.destroy_failures += 1

    def retired(self, member: object) -> None:
        """A context is gone for good: its record joins the pool's history."""
        assert isinstance(member, _Slot)
        with self._members_lock:
            self._detached.remove(member)
            self._ended.add(member.record)

    def give_back(self, ops: Sequence[aio.Op]) -> None:
        self._given_back.extend(ops)

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
            self._teardown.poll()

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
        stats = self._ledger.copies()
        oldest = 0.0
        now = time.perf_counter_ns()
        for s in live:
            # One look per context, not a walk of every op in flight: a scrape
            # must cost the I/O loop (which shares the GIL) next to nothing.
            op = s.ctx.oldest_inflight()
            tag = op.tag if op is not None else None
            if tag is not None and tag.submitted_ns:
                oldest = max(oldest, (now - tag.submitted_ns) / 1e9)
        with self._counts_lock:
            return PoolSnapshot(
                name=self.name,
                state="open" if self._accepting else "closed",
                nr_events=self.nr_events, records=records, stats=stats,
                setups=self.setups, destroys=self.destroys,
                destroy_failures=self.destroy_failures,
                setup_failures=dict(self.setup_failures),
                oldest_in_flight_seconds=oldest, folded=folded)

