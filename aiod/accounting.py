"""What became of every operation: outcomes, counters and latency histograms.

The pool places, submits and reaps; this module keeps the books. Each op
carries an :class:`OpTag` between submit and completion, and every (job, op)
pair of a pool has one :class:`OpStats` in the pool's :class:`Ledger`.

Every op a context accepted is counted submitted, and leaves in flight exactly
once, as completed, cancelled or failed:
- completed: res >= 0 and no cancel was asked for it;
- failed: res < 0 (its errno counted), or refused by io_submit itself;
- cancelled: we asked the kernel to cancel it and it agreed, or its context
  was destroyed before its completion reached us.

One lock guards a ledger's counters: the I/O loop adds to them, a scrape
thread copies them (:meth:`Ledger.copies`).
"""

from __future__ import annotations

import bisect
import enum
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiod import aio

# Prometheus histogram bounds for op latency, in seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
    25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)
_BUCKETS_NS = [int(b * 1e9) for b in LATENCY_BUCKETS]

class Outcome(str, enum.Enum):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class OpStats:
    """Counters and latency histogram of one (job, op) pair, under the pool's stats lock."""

    __slots__ = (
        "buckets",
        "cancelled",
        "completed",
        "failed",
        "job",
        "last_completion",
        "latency_count",
        "latency_sum_ns",
        "op",
        "submitted",
    )

    def __init__(self, job: str, op: str) -> None:
        self.job = job
        self.op = op
        self.submitted = 0
        self.completed = 0
        self.cancelled = 0
        self.failed: dict[int, int] = {}
        self.buckets = [0] * (len(_BUCKETS_NS) + 1)  # last one is +Inf
        self.latency_sum_ns = 0
        self.latency_count = 0
        self.last_completion: float | None = None

    def copy(self) -> OpStats:
        c = OpStats(self.job, self.op)
        c.submitted, c.completed, c.cancelled = self.submitted, self.completed, self.cancelled
        c.failed = dict(self.failed)
        c.buckets = list(self.buckets)
        c.latency_sum_ns, c.latency_count = self.latency_sum_ns, self.latency_count
        c.last_completion = self.last_completion
        return c

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def add(self, other: OpStats) -> None:
        """Add another pool's counters of the same (job, op) to these."""
        self.submitted += other.submitted
        self.completed += other.completed
        self.cancelled += other.cancelled
        for err, n in other.failed.items():
            self.failed[err] = self.failed.get(err, 0) + n
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        self.latency_sum_ns += other.latency_sum_ns
        self.latency_count += other.latency_count
        if other.last_completion is not None:
            self.last_completion = max(self.last_completion or 0.0, other.last_completion)


class OpTag:
    """What the pool keeps on each op (``op.tag``) between submit and completion.

    Reused when an op is resubmitted, so the load loop allocates nothing per op.
    ``owner`` is whoever hands the op's completion on (a job): it travels with
    the op, so no table of ops can fall out of step with the ops in use.
    """

    __slots__ = (
        "cancel_requested",
        "errno",
        "issued_ns",
        "job",
        "latency_ns",
        "outcome",
        "owner",
        "slot",
        "stats",
        "submitted_ns",
    )

    def __init__(self, owner: object = None) -> None:
        self.owner = owner
        self.job: str | None = None
        self.stats: OpStats | None = None
        self.slot: Any = None   # the pool's slot of the context the op is in
        self.submitted_ns = 0   # before io_submit: latency_ns counts from here
        self.issued_ns = 0      # after io_submit returned (fio's clat starts here)
        self.cancel_requested = False
        self.outcome: Outcome | None = None
        self.errno = 0
        self.latency_ns = 0



class Ledger:
    """The (job, op) counters of one pool, and the one place outcomes are decided."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], OpStats] = {}

    def stats_for(self, job: str, op: str) -> OpStats:
        st = self._stats.get((job, op))
        if st is None:
            with self._lock:
                st = self._stats.setdefault((job, op), OpStats(job, op))
        return st

    def register(self, job: str, ops: Iterable[str]) -> None:
        """Make a job's series exist (at zero) before its first op."""
        for op in ops:
            self.stats_for(job, op)

    def forget(self, job: str) -> None:
        """Drop a removed job's series once none of its ops is in flight."""
        with self._lock:
            for key in [k for k in self._stats if k[0] == job]:
                del self._stats[key]

    def copies(self) -> list[OpStats]:
        """Copies of every series, for another thread."""
        with self._lock:
            return [st.copy() for st in self._stats.values()]

    def tag(self, ops: Sequence[aio.Op], job: str, slot: object, now_ns: int) -> None:
        """Ready each op's tag for a submit to slot, timed from now_ns."""
        stats_for = self.stats_for
        for op in ops:
            tag = op.tag
            if tag is None:
                tag = op.tag = OpTag()
            if tag.job != job or tag.stats is None:
                tag.job = job
                kind = op.kind
                tag.stats = stats_for(job, kind.value if kind is not None else "other")
            tag.slot = slot
            tag.submitted_ns = now_ns
            tag.cancel_requested = False
            tag.outcome = None

    def submitted(self, ops: Sequence[aio.Op], issued_ns: int) -> None:
        with self._lock:
            for op in ops:
                tag = op.tag
                tag.issued_ns = issued_ns
                tag.stats.submitted += 1

    def refused(self, failed: Sequence[tuple[aio.Op, int]]) -> int:
        """Ops io_submit refused, with their errno: submitted and failed at
        once. Returns the last errno."""
        last = 0
        with self._lock:
            for op, err in failed:
                st = op.tag.stats
                st.submitted += 1
                st.failed[err] = st.failed.get(err, 0) + 1
                op.tag.outcome = Outcome.FAILED
                op.tag.errno = err
                op.res = -err
                last = err
        return last

    def lost(self, ops: Sequence[aio.Op]) -> None:
        """Ops whose context was destroyed under them: cancelled."""
        with self._lock:
            for op in ops:
                op.tag.outcome = Outcome.CANCELLED
                op.tag.stats.cancelled += 1

    def finish(self, ops: Sequence[aio.Op]) -> tuple[int, int, int | None]:
        """Classify a batch of completions and account for it. Returns how
        many were cancelled and failed, and the last errno (None if none).

        Hot path. Completed ops of the same OpStats in a row are summed locally
        and added once (under the same lock hold, so no snapshot sees the
        difference), and ops of one submit batch reaped together share one
        latency, so its bucket is looked up once.
        """
        now = time.perf_counter_ns()
        wall = self._wall()
        cancelled = failed = 0
        last_error = None
        bounds = _BUCKETS_NS
        bis = bisect.bisect_left
        COMPLETED = Outcome.COMPLETED
        cur: OpStats | None = None      # whose completed ops are being summed
        buckets: list[int] = []
        n = lat_sum = 0
        last_lat = -1
        idx = 0
        with self._lock:
            for op in ops:
                tag = op.tag
                lat = now - tag.submitted_ns
                tag.latency_ns = lat
                st = tag.stats
                if tag.cancel_requested:
                    tag.outcome = Outcome.CANCELLED
                    st.cancelled += 1
                    cancelled += 1
                    continue
                res = op.res
                if res < 0:  # type: ignore[operator]
                    err = -res  # type: ignore[operator]
                    tag.outcome = Outcome.FAILED
                    tag.errno = err
                    st.failed[err] = st.failed.get(err, 0) + 1
                    failed += 1
                    last_error = err
                    st.buckets[bis(bounds, lat)] += 1
                    st.latency_sum_ns += lat
                    st.latency_count += 1
                    st.last_completion = wall
                    continue
                tag.outcome = COMPLETED
                if st is not cur:
                    if cur is not None:
                        cur.completed += n
                        cur.latency_sum_ns += lat_sum
                        cur.latency_count += n
                        cur.last_completion = wall
                    cur = st
                    buckets = st.buckets
                    n = lat_sum = 0
                n += 1
                lat_sum += lat
                if lat != last_lat:
                    idx = bis(bounds, lat)
                    last_lat = lat
                buckets[idx] += 1
            if cur is not None:
                cur.completed += n
                cur.latency_sum_ns += lat_sum
                cur.latency_count += n
                cur.last_completion = wall
        return cancelled, failed, last_error
