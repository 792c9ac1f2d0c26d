"""The kinds of job: latency probes and sustained load.

:class:`ProbeJob` issues operations at a fixed rate (at most ``iodepth`` in
flight) and measures each one's latency from submit to completion;
:class:`LoadJob` keeps ``iodepth`` operations in flight all the time. Both
are a :class:`~aiod.job.Job` (target, ops, states, errors); they differ only
in what they submit when. :func:`make_job` builds the one a config names.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from aiod.config import JobConfig
from aiod.job import (
    FAILURE_BACKOFF_MAX,
    FAILURE_BACKOFF_MIN,
    FILL_POLL_INTERVAL,
    RETRY_INTERVAL,
    TIMEOUT_CHECK_INTERVAL,
    Job,
    JobState,
)
from aiod.jobops import JobResourceError
from aiod.jobtarget import CHECK_INTERVAL
from aiod.pool import Pool
from aiod.targets import OwnedFiles

__all__ = ["CHECK_INTERVAL", "FAILURE_BACKOFF_MAX", "FAILURE_BACKOFF_MIN", "FILL_POLL_INTERVAL",
           "JOB_CLASSES", "RETRY_INTERVAL", "TIMEOUT_CHECK_INTERVAL", "Job", "JobResourceError",
           "JobState", "LoadJob", "ProbeJob", "make_job"]


class ProbeJob(Job):
    """Issues one op every 1/rate seconds, skipping (and counting) a tick when
    iodepth ops are still in flight; it never bursts to catch up."""

    def __init__(self, cfg: JobConfig, pool: Pool, owned: OwnedFiles | None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        super().__init__(cfg, pool, owned, clock=clock, rng=rng)
        self._next_due = 0.0

    def _started(self, now: float) -> None:
        self._next_due = now

    def _submit_due(self, now: float) -> bool:
        interval = 1.0 / self.cfg.rate
        if now < self._next_due:
            return False
        if self.in_flight >= self.cfg.iodepth:
            self.skipped += 1
        else:
            self._submit(1)
        self._next_due += interval
        if self._next_due < now - interval:  # fell behind (stalled loop): no burst
            self._next_due = now + interval
        return True

    def _due_wakeup(self) -> float | None:
        return min(self._next_due, self._watch.next_at)


class LoadJob(Job):
    """Keeps iodepth ops in flight; after a failed op it pauses, doubling the
    pause while failures go on (FAILURE_BACKOFF_MIN to FAILURE_BACKOFF_MAX)."""

    def __init__(self, cfg: JobConfig, pool: Pool, owned: OwnedFiles | None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        super().__init__(cfg, pool, owned, clock=clock, rng=rng)
        self._pause_until = 0.0
        self._backoff = 0.0

    def _submit_due(self, now: float) -> bool:
        if now < self._pause_until:
            return False
        want = self.cfg.iodepth - self.in_flight
        if want > 0:
            self._submit(want)
        return True

    def _due_wakeup(self) -> float | None:
        if self._pause_until > self._clock():
            return self._pause_until
        return None

    def _failed(self, now: float) -> None:
        self._backoff = min(FAILURE_BACKOFF_MAX, max(FAILURE_BACKOFF_MIN, self._backoff * 2))
        self._pause_until = now + self._backoff

    def _succeeded(self) -> None:
        self._backoff = 0.0


JOB_CLASSES: dict[str, type[Job]] = {"probe": ProbeJob, "load": LoadJob}


def make_job(cfg: JobConfig, pool: Pool, owned: OwnedFiles | None,
             clock: Callable[[], float] = time.monotonic,
             rng: random.Random | None = None) -> Job:
    """The job a config's ``type`` names, bound to its pool."""
    return JOB_CLASSES[cfg.type](cfg, pool, owned, clock=clock, rng=rng)
