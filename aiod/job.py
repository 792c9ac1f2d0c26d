"""A job: the I/O aiod drives through a pool, on one target.

A :class:`Job` owns its target, its ops, their states and their errors. Its
ops are an engine OpSet (aiod.engine): ``iodepth`` preallocated ops per kind
over buffers allocated once, offsets chosen by the engine (block after block,
or at random over the target's blocks), counted in the pool's ledger. A
running job allocates nothing per operation, and its per-op work (fill,
submit, reap, classify, count) is the engine's, one call per batch. After
each reap the job reads the OpSet's notes (failed, refused and short ops) for
its failure backoff, its error counts and its log lines.

The kinds of job (aiod.jobs: probes and load) differ only in what they
submit when (``_submit_due``).

A job whose target cannot be used (missing, permission, full disk, refused
write) does not stop the daemon: the error is counted, logged, and the job
tries again later.

A job whose target does not exist yet is ``preparing`` while a worker creates
and fills it (see fill.py); pump polls the fill and starts the job when it is
done. The loop never waits for a fill.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from aiod import aio
from aiod.config import JobConfig
from aiod.jobops import JobOps, OpLog, allocate_buffers
from aiod.jobtarget import FillWatch, IdentityWatch, open_job_target
from aiod.logs import LogLimiter
from aiod.opkind import JobOp, OpKind
from aiod.pool import Pool, PoolClosed
from aiod.targets import OpenTarget, OwnedFiles, TargetError

log = logging.getLogger("aiod.jobs")

RETRY_INTERVAL = 10.0  # seconds between attempts to open a target that failed
# After a failed op a load job pauses, doubling up to the maximum while the
# failures go on: an I/O error storm must not become a busy loop.
FAILURE_BACKOFF_MIN = 0.05
FAILURE_BACKOFF_MAX = 5.0
TIMEOUT_CHECK_INTERVAL = 0.25
LOG_INTERVAL = 10.0  # a job logs at most LOG_BURST lines of one kind per interval
LOG_BURST = 3
FILL_POLL_INTERVAL = 0.25      # how often pump looks at a fill in progress


class JobState(str, enum.Enum):
    STARTING = "starting"
    PREPARING = "preparing"  # its target is being created and filled on a worker
    RUNNING = "running"
    REOPENING = "reopening"  # its target changed: waiting for its ops, then opening again
    ERROR = "error"        # target unusable; retried every RETRY_INTERVAL
    STOPPING = "stopping"  # no new submissions; waiting for in-flight ops
    STOPPED = "stopped"


class Job:
    """One configured job bound to its pool: what probes and load jobs share.

    Subclasses say what to submit when the job is running (``_submit_due``)
    and when that next needs the loop (``_due_wakeup``).
    """

    def __init__(self, cfg: JobConfig, pool: Pool, owned: OwnedFiles | None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.pool = pool
        self._owned = owned
        self._clock = clock
        self._rng = rng or random.Random()
        self.state = JobState.STARTING
        self.target: OpenTarget | None = None
        self.mode = JobOp(cfg.op)
        self._kinds = self.mode.kinds
        self._ops: JobOps | None = None  # the engine OpSet on the open target
        self._abandoned = False          # shutdown accounted every op: none comes back
        self._retry_at = 0.0
        self._next_timeout_check = 0.0
        # Repeated lines (hung I/O, failing ops, short reads): a few per
        # interval, then a count of the rest.
        self._limiter = LogLimiter(log, interval=LOG_INTERVAL, burst=LOG_BURST, clock=clock)
        self._oplog = OpLog(self.name, pool.name, str(cfg.target), self._limiter)
        self._next_log_flush = 0.0
        self._fill: FillWatch | None = None
        self._filled = False  # our own fill just put the target there
        self._watch = IdentityWatch(self.name)
        self._reopen_because = ""
        # Counters read by the metrics collector (plain ints: written by the
        # I/O loop only, read as whole values by the scrape thread).
        self.errors: dict[str, int] = {}
        self.timeouts = 0
        self.skipped = 0
        self.needs_write = self.mode.writes
        self._buffers: dict[OpKind, list[aio.Buffer]] | None = None

    def allocate(self) -> None:
        """Allocate the job's I/O buffers: the one part of starting that can fail
        for lack of memory, done before a reload commits to anything.

        Raises JobResourceError (and keeps nothing) when they cannot be had.
        """
        if self._buffers is None:
            self._buffers = allocate_buffers(self.name, self.mode, self.cfg.block_size,
                                             max(1, self.cfg.iodepth), self._rng)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> bool:
        """Open the target and build the ops. True when the job is running.

        A missing target is not created here: a worker fills it and the job is
        PREPARING until pump sees the fill done. False on error or while preparing.
        """
        now = self._clock()
        self.allocate()
        self.pool.register(self.name, [k.value for k in self._kinds])  # its series exist from the first start
        try:
            target = open_job_target(self.cfg, self.mode, self._owned, filled=self._filled)
        except TargetError as e:
            self._fail(e, now)
            return False
        finally:
            self._filled = False
        if target is None:
            self._begin_fill(now)
            return False
        self.target = target
        self._build_ops()
        self.state = JobState.RUNNING
        self._started(now)
        self._watch.started(now)
        return True

    def _fail(self, e: TargetError, now: float) -> None:
        self._count_error(e.reason)
        self.state = JobState.ERROR
        self._retry_at = now + RETRY_INTERVAL
        log.error("job %s: %s; retrying in %.0fs", self.name, e, RETRY_INTERVAL,
                  extra={"AIOD_JOB": self.name, "AIOD_POOL": self.pool.name,
                         "AIOD_TARGET": str(self.cfg.target), "ERRNO": e.errno})

    def _begin_fill(self, now: float) -> None:
        self._fill = FillWatch(self.name, self.cfg.target, self.cfg.size, self._owned, now,
                               clock=self._clock)
        self.state = JobState.PREPARING

    def _poll_fill(self, now: float) -> None:
        assert self._fill is not None
        if not self._fill.poll(now):
            return
        fill, self._fill = self._fill.fill, None
        if fill.error is not None:
            self._fail(fill.error, now)
            return
        self._filled = True
        self.start()

    # ------------------------------------------- is the path still our file?
    def check_target_soon(self) -> None:
        """Check the target's identity at the next pump (SIGHUP asks for this)."""
        self._watch.soon()

    def _poll_check(self, now: float) -> None:
        if self.target is None or self.mode is JobOp.POLL:
            return
        change = self._watch.poll(now, self.target)
        if change is not None:
            self.state = JobState.REOPENING
            self._reopen_because = change
            log.warning("job %s: %s %s under the running job; opening it again once the "
                        "%d operations in flight are done", self.name, self.cfg.target, change,
                        self.in_flight, extra={"AIOD_JOB": self.name,
                                               "AIOD_TARGET": str(self.cfg.target)})

    def _reopen(self) -> None:
        """No op in flight on the old file: close it and start over on the path."""
        if self.target is not None:
            self.target.close()
            self.target = None
        self._drop_ops()
        if self.start():
            log.info("job %s: reopened %s (it %s)", self.name, self.cfg.target,
                     self._reopen_because,
                     extra={"AIOD_JOB": self.name, "AIOD_TARGET": str(self.cfg.target)})

    def _build_ops(self) -> None:
        """The job's OpSet on its open target, over the buffers allocate() made."""
        assert self.target is not None and self._buffers is not None
        assert self.in_flight == 0
        self._ops = JobOps(self.pool, self.name, self.mode, fd=self.target.fd,
                           size=self.target.size, block_size=self.cfg.block_size,
                           iodepth=self.cfg.iodepth, buffers=self._buffers,
                           seed=self._rng.getrandbits(64))
        self._abandoned = False
        self.pool.listen(self, self._reaped)  # completions reach the job from the pool's reap

    def _drop_ops(self) -> None:
        """Forget the OpSet (nothing of it in flight): its target is closed."""
        self.pool.unlisten(self)
        self._ops = None

    def stop(self) -> None:
        """No new submissions; in-flight ops complete and are accounted as usual.

        A fill in progress is told to stop; its partial file is removed by its
        worker (or, after a crash, by the next start).
        """
        if self._fill is not None:
            self._fill.fill.cancel()
            self._fill = None
        self._limiter.flush(everything=True)
        if self.state is not JobState.STOPPED:
            self.state = JobState.STOPPING
        self.close_if_idle()

    def close_if_idle(self) -> bool:
        if self.state is JobState.STOPPING and self.in_flight == 0:
            if self.target is not None:
                self.target.close()
            self.pool.unlisten(self)
            self.state = JobState.STOPPED
        return self.state is JobState.STOPPED

    def abandon(self) -> None:
        """Shutdown accounted every op (destroyed contexts included): none
        will complete to the job any more."""
        self._abandoned = True

    @property
    def in_flight(self) -> int:
        """Ops not back with the job (see JobOps.in_flight)."""
        return 0 if self._ops is None or self._abandoned else self._ops.in_flight

    @property
    def opset(self) -> Any:
        """The engine OpSet of the open target (None before the first start)."""
        return None if self._ops is None else self._ops.set

    # ------------------------------------------------------------------ I/O

    def pump(self, now: float) -> None:
        """Submit what is due now."""
        if now >= self._next_log_flush:
            self._next_log_flush = now + 1.0
            self._limiter.flush()
        if self.state is JobState.ERROR and now >= self._retry_at:
            self.start()
        if self.state is JobState.PREPARING:
            self._poll_fill(now)
        if self.state is JobState.RUNNING:
            self._poll_check(now)
        if self.state is JobState.REOPENING and self.in_flight == 0:
            self._reopen()
        if self.state is not JobState.RUNNING:
            return
        if not self._submit_due(now):
            return
        if now >= self._next_timeout_check:
            self._check_timeouts(now)

    # What the two kinds of job differ in.
    def _started(self, now: float) -> None:
        """The job is running from now on."""

    def _submit_due(self, now: float) -> bool:
        """Submit what is due at now; False when nothing else is to be done in this pump."""
        raise NotImplementedError

    def _due_wakeup(self) -> float | None:
        """When the running job next has something to submit (None: on completions)."""
        raise NotImplementedError

    def _failed(self, now: float) -> None:
        """An op of the job failed at now."""

    def _succeeded(self) -> None:
        """An op of the job did not fail."""

    def _submit(self, n: int) -> None:
        """Up to n of the OpSet's ready ops into the pool (one engine call per context)."""
        if n <= 0 or self._ops is None:
            return
        try:
            r = self._ops.submit(n)
        except PoolClosed:
            self.skipped += n
            return
        self.skipped += r.unsubmitted  # pool full: back-pressure, try next time
        if r.rejected:  # refused by io_submit itself (already accounted by the pool)
            self._reaped()

    def _reaped(self) -> None:
        """The pool accounted completions (or lost ops): act on what the OpSet noted."""
        ops = self._ops
        if ops is None:
            return
        got = ops.landed()
        if got.succeeded > 0:
            self._succeeded()
        now = self._clock()
        for index, kind, value in got.notes:
            name, info = ops.describe(index)
            if kind == "short":
                # Fewer bytes than asked is an error, not a fast op: the file
                # is shorter than when the job opened it.
                op = OpKind.of(info["opcode"])
                self._count_error(f"short_{op}")
                self.check_target_soon()
                self._oplog.short(name, op, info["offset"], value, info["nbytes"])
            else:  # failed in flight, or refused by io_submit: value is the errno
                self._failed(now)
                self._oplog.failed(name, value)
        for _ in range(got.dropped):  # more than the OpSet keeps notes of: failures all the same
            self._failed(now)
        if self.state is JobState.STOPPING:
            self.close_if_idle()

    def _check_timeouts(self, now: float) -> None:
        """Flag (once) each op in flight longer than the job's timeout: hung I/O."""
        self._next_timeout_check = now + TIMEOUT_CHECK_INTERVAL
        if not self.in_flight or self._ops is None:
            return
        for index in self._ops.overdue(self.cfg.timeout):
            self.timeouts += 1
            self._oplog.hung(self._ops.describe(index)[0], self.cfg.timeout)

    def _count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def next_wakeup(self) -> float | None:
        """When pump next has something to do (None: only completions matter)."""
        if self.state is JobState.ERROR:
            return self._retry_at
        if self.state in (JobState.PREPARING, JobState.REOPENING):
            return self._clock() + FILL_POLL_INTERVAL
        if self.state is not JobState.RUNNING:
            return None
        if self._watch.busy:
            return self._clock() + FILL_POLL_INTERVAL
        return self._due_wakeup()


