"""What became of every operation, as the rest of aiod reads it.

The books themselves are kept by the compiled engine (aiod.engine: counters
and histograms in C arrays, one row per (job, op) of a pool). This module
holds the shapes they are read in: :class:`OpStats`, one row's counters and
latency histogram, and the histogram's bounds.

Every op a context accepted is counted submitted, and leaves in flight exactly
once, as completed, cancelled or failed:
- completed: res >= 0 and no cancel was asked for it;
- failed: res < 0 (its errno counted), or refused by io_submit itself;
- cancelled: we asked the kernel to cancel it and it agreed, or its context
  was destroyed before its completion reached us.
"""

from __future__ import annotations

# Prometheus histogram bounds for op latency, in seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
    25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)
_BUCKETS_NS = [int(b * 1e9) for b in LATENCY_BUCKETS]

class OpStats:
    """Counters and latency histogram of one (job, op) pair: a copy, for any thread."""

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
