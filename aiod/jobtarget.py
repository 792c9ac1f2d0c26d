"""Watching a job's target from the I/O loop: its fill, and its identity.

Neither ever makes the loop wait. A missing target is created and filled by
a worker (aiod.fill) while the job is preparing; :class:`FillWatch` logs its
progress and says when it is done. A running job's path is checked on a
worker now and then (aiod.targets.TargetCheck: stat may hang on a dead
filesystem); :class:`IdentityWatch` says when the path is no longer the file
the job opened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from aiod.config import JobConfig
from aiod.fill import Fill
from aiod.opkind import JobOp
from aiod.targets import (
    OpenTarget,
    OwnedFiles,
    TargetCheck,
    open_fifo,
    open_target,
    remove_stale_partial,
    target_missing,
)

log = logging.getLogger("aiod.jobs")

CHECK_INTERVAL = 5.0  # how often a running job checks that its path is still its file
FILL_PROGRESS_INTERVAL = 5.0   # seconds between progress lines of a fill


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def open_job_target(cfg: JobConfig, mode: JobOp, owned: OwnedFiles | None, *,
                    filled: bool) -> OpenTarget | None:
    """A job's target, opened; None when it is missing and must be filled first.
    filled: our own fill just put it there. Raises TargetError."""
    if mode is JobOp.POLL:
        return open_fifo(cfg.target)
    if target_missing(cfg.target):
        return None
    if not filled:
        remove_stale_partial(cfg.target)
    return open_target(cfg.target, size=cfg.size, block_size=cfg.block_size,
                       direct=cfg.direct, needs_write=mode.writes,
                       allow_write=cfg.allow_write, owned=owned, filled=filled)


class FillWatch:
    """A job's missing target, being created and filled by a worker."""

    def __init__(self, job: str, target: Path, size: int, owned: OwnedFiles | None,
                 now: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.job, self.target = job, target
        self.fill = Fill(target, size, owned, name=job, clock=clock).start()
        self._next_log = now + FILL_PROGRESS_INTERVAL
        log.info("job %s: creating %s and filling it with %s of random data in the "
                 "background; the job starts when it is done", job, target,
                 size_text(size), extra={"AIOD_JOB": job})

    def poll(self, now: float) -> bool:
        """True once the fill ended (its error, if any, is fill.error)."""
        fill = self.fill
        if not fill.done:
            if now >= self._next_log:
                self._next_log = now + FILL_PROGRESS_INTERVAL
                log.info("job %s: filling %s: %s of %s (%d%%)", self.job, self.target,
                         size_text(fill.written), size_text(fill.size),
                         100 * fill.written // max(1, fill.size), extra={"AIOD_JOB": self.job})
            return False
        if fill.error is None:
            log.info("job %s: created %s (%d bytes of data) in %.1fs", self.job, self.target,
                     fill.size, (fill.finished_at or now) - fill.started_at,
                     extra={"AIOD_JOB": self.job})
        return True


class IdentityWatch:
    """Every CHECK_INTERVAL (or soon, when asked): is the path still the job's file?"""

    def __init__(self, job: str) -> None:
        self.job = job
        self.next_at = 0.0
        self._check: TargetCheck | None = None

    @property
    def busy(self) -> bool:
        """A check is under way on a worker."""
        return self._check is not None

    def soon(self) -> None:
        self.next_at = 0.0

    def started(self, now: float) -> None:
        self.next_at = now + CHECK_INTERVAL

    def poll(self, now: float, target: OpenTarget) -> str | None:
        """What changed under the job (a sentence fragment), or None."""
        if self._check is None:
            if now >= self.next_at:
                self._check = TargetCheck(target, self.job)
            return None
        if not self._check.done:
            return None  # stat may hang on a dead filesystem; the loop never waits for it
        change, self._check = self._check.change, None
        self.next_at = now + CHECK_INTERVAL
        return change
