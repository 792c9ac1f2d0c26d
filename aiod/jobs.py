"""Jobs: the I/O aiod drives through its pools.

:class:`ProbeJob` issues operations at a fixed rate (at most ``iodepth`` in
flight) and measures each one's latency from submit to completion;
:class:`LoadJob` keeps ``iodepth`` operations in flight all the time. Both
are a :class:`Job`, which owns the target, the ops, their states and their
errors; the two differ only in what they submit when (``_submit_due``).
:func:`make_job` builds the one a config names. Both reuse a fixed set of
ops, so a running job allocates nothing per operation.

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
import os
import random
import select
import time
from collections.abc import Callable

from aiod import aio
from aiod.accounting import OpTag, Outcome
from aiod.config import JobConfig
from aiod.fill import Fill
from aiod.logs import LogLimiter
from aiod.opkind import JobOp, OpKind
from aiod.pool import Pool, PoolClosed
from aiod.targets import (
    OpenTarget,
    OwnedFiles,
    TargetCheck,
    TargetError,
    open_fifo,
    open_target,
    remove_stale_partial,
    target_missing,
)

log = logging.getLogger("aiod.jobs")

RETRY_INTERVAL = 10.0  # seconds between attempts to open a target that failed
# After a failed op a load job pauses, doubling up to the maximum while the
# failures go on: an I/O error storm must not become a busy loop.
FAILURE_BACKOFF_MIN = 0.05
FAILURE_BACKOFF_MAX = 5.0
TIMEOUT_CHECK_INTERVAL = 0.25
LOG_INTERVAL = 10.0  # a job logs at most LOG_BURST lines of one kind per interval
LOG_BURST = 3
CHECK_INTERVAL = 5.0  # how often a running job checks that its path is still its file
FILL_POLL_INTERVAL = 0.25      # how often pump looks at a fill in progress
FILL_PROGRESS_INTERVAL = 5.0   # seconds between progress lines of a fill


class JobResourceError(Exception):
    """A job's buffers cannot be allocated; the message is one line for operators."""


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
        self._free: dict[OpKind, list[aio.Op]] = {k: [] for k in self._kinds}
        self._ops: list[aio.Op] = []
        self.in_flight = 0
        self._retry_at = 0.0
        self._seq = 0
        self._nblocks = 0
        self._flagged: set[int] = set()
        self._next_timeout_check = 0.0
        # Repeated lines (hung I/O, failing ops, short reads): a few per
        # interval, then a count of the rest.
        self._limiter = LogLimiter(log, interval=LOG_INTERVAL, burst=LOG_BURST, clock=clock)
        self._next_log_flush = 0.0
        self._fill: Fill | None = None
        self._filled = False  # our own fill just put the target there
        self._next_fill_log = 0.0
        self._check: TargetCheck | None = None
        self._next_check = 0.0
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
        if self._buffers is not None:
            return
        bs, depth = self.cfg.block_size, max(1, self.cfg.iodepth)
        buffers: dict[OpKind, list[aio.Buffer]] = {}
        try:
            for kind in self.mode.buffered_kinds:
                # One slab per kind, not a mapping per buffer (vm.max_map_count).
                bufs = buffers[kind] = aio.aligned_buffers(depth, bs)
                if kind is OpKind.WRITE:
                    for buf in bufs:
                        buf.view[:] = self._rng.randbytes(bs)
        except (OSError, MemoryError, OverflowError, ValueError) as e:
            buffers.clear()
            n = depth * len(self.mode.buffered_kinds)
            why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or
                                                                            type(e).__name__)
            raise JobResourceError(f"job {self.name}: cannot allocate its I/O buffers "
                                   f"({n} x {_size_text(bs)}): {why}") from None
        self._buffers = buffers

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
            if self.mode is JobOp.POLL:
                self.target = open_fifo(self.cfg.target)
            else:
                if target_missing(self.cfg.target):
                    self._begin_fill(now)
                    return False
                if not self._filled:
                    remove_stale_partial(self.cfg.target)
                self.target = open_target(
                    self.cfg.target, size=self.cfg.size, block_size=self.cfg.block_size,
                    direct=self.cfg.direct, needs_write=self.needs_write,
                    allow_write=self.cfg.allow_write, owned=self._owned, filled=self._filled)
        except TargetError as e:
            self._fail(e, now)
            return False
        finally:
            self._filled = False
        self._build_ops()
        self.state = JobState.RUNNING
        self._started(now)
        self._next_check = now + CHECK_INTERVAL
        return True

    def _fail(self, e: TargetError, now: float) -> None:
        self._count_error(e.reason)
        self.state = JobState.ERROR
        self._retry_at = now + RETRY_INTERVAL
        log.error("job %s: %s; retrying in %.0fs", self.name, e, RETRY_INTERVAL,
                  extra={"AIOD_JOB": self.name, "AIOD_POOL": self.pool.name,
                         "AIOD_TARGET": str(self.cfg.target), "ERRNO": e.errno})

    def _begin_fill(self, now: float) -> None:
        self._fill = Fill(self.cfg.target, self.cfg.size, self._owned, name=self.name,
                          clock=self._clock).start()
        self.state = JobState.PREPARING
        self._next_fill_log = now + FILL_PROGRESS_INTERVAL
        log.info("job %s: creating %s and filling it with %s of random data in the "
                 "background; the job starts when it is done", self.name, self.cfg.target,
                 _size_text(self.cfg.size), extra={"AIOD_JOB": self.name})

    def _poll_fill(self, now: float) -> None:
        fill = self._fill
        assert fill is not None
        if not fill.done:
            if now >= self._next_fill_log:
                self._next_fill_log = now + FILL_PROGRESS_INTERVAL
                log.info("job %s: filling %s: %s of %s (%d%%)", self.name, self.cfg.target,
                         _size_text(fill.written), _size_text(fill.size),
                         100 * fill.written // max(1, fill.size),
                         extra={"AIOD_JOB": self.name})
            return
        self._fill = None
        if fill.error is not None:
            self._fail(fill.error, now)
            return
        log.info("job %s: created %s (%d bytes of data) in %.1fs", self.name, self.cfg.target,
                 fill.size, (fill.finished_at or now) - fill.started_at,
                 extra={"AIOD_JOB": self.name})
        self._filled = True
        self.start()

    # ------------------------------------------- is the path still our file?
    def check_target_soon(self) -> None:
        """Check the target's identity at the next pump (SIGHUP asks for this)."""
        self._next_check = 0.0

    def _poll_check(self, now: float) -> None:
        if self.target is None or self.mode is JobOp.POLL:
            return
        if self._check is None:
            if now >= self._next_check:
                self._check = TargetCheck(self.target, self.name)
            return
        if not self._check.done:
            return  # stat may hang on a dead filesystem; the loop never waits for it
        change, self._check = self._check.change, None
        self._next_check = now + CHECK_INTERVAL
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
        self._ops = []
        self._free = {k: [] for k in self._free}
        if self.start():
            log.info("job %s: reopened %s (it %s)", self.name, self.cfg.target,
                     self._reopen_because,
                     extra={"AIOD_JOB": self.name, "AIOD_TARGET": str(self.cfg.target)})

    def _build_ops(self) -> None:
        """The job's ops on its open target, over the buffers allocate() made."""
        assert self.target is not None and self._buffers is not None
        assert self.in_flight == 0
        fd = self.target.fd
        self._nblocks = max(1, self.target.size // self.cfg.block_size) if self.target.size else 1
        depth = max(1, self.cfg.iodepth)
        self._ops = []
        self._free = {k: [] for k in self._free}
        self._flagged.clear()
        for kind in self._kinds:
            for i in range(depth):
                if kind is OpKind.READ:
                    op = aio.read(fd, self._buffers[kind][i], 0)
                elif kind is OpKind.WRITE:
                    op = aio.write(fd, self._buffers[kind][i], 0)
                elif kind is OpKind.POLL:
                    op = aio.poll(fd, select.POLLIN)
                else:
                    op = aio.fsync(fd)
                op.tag = OpTag(owner=self)  # the daemon hands completions back through it
                self._ops.append(op)
                self._free[kind].append(op)

    def stop(self) -> None:
        """No new submissions; in-flight ops complete and are accounted as usual.

        A fill in progress is told to stop; its partial file is removed by its
        worker (or, after a crash, by the next start).
        """
        if self._fill is not None:
            self._fill.cancel()
            self._fill = None
        self._limiter.flush(everything=True)
        if self.state is not JobState.STOPPED:
            self.state = JobState.STOPPING
        self.close_if_idle()

    def close_if_idle(self) -> bool:
        if self.state is JobState.STOPPING and self.in_flight == 0:
            if self.target is not None:
                self.target.close()
            self.state = JobState.STOPPED
        return self.state is JobState.STOPPED

    @property
    def ops(self) -> list[aio.Op]:
        """Every op this job owns; each carries the job as its tag's owner."""
        return self._ops

    # ------------------------------------------------------------------ I/O
    def _next_op(self) -> aio.Op | None:
        kinds = self._kinds
        kind = kinds[0] if len(kinds) == 1 else self._rng.choice(kinds)
        free = self._free[kind]
        if not free:
            other = [k for k in kinds if self._free[k]]
            if not other:
                return None
            kind = other[0]
            free = self._free[kind]
        op = free.pop()
        if kind.moves_data:
            if self.mode.sequential:
                off = self._seq
                self._seq = (self._seq + 1) % self._nblocks
            else:
                off = self._rng.randrange(self._nblocks)
            op.set_offset(off * self.cfg.block_size)
        return op

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

    def _submit(self, ops: list[aio.Op]) -> None:
        if not ops:
            return
        try:
            refused = self.pool.submit(ops, job=self.name)
        except PoolClosed:
            refused = ops
        refused_ids = {id(op) for op in refused}
        for op in ops:
            if id(op) in refused_ids:  # pool full: back-pressure, try next time
                self.skipped += 1
                self._release(op)
            elif op.tag is not None and op.tag.outcome is Outcome.FAILED:
                # Refused by io_submit itself (already accounted by the pool).
                self._note_failure(op)
                self._release(op)
            else:
                self.in_flight += 1

    def _release(self, op: aio.Op) -> None:
        kind = op.kind
        assert kind is not None  # a job builds only ops of its own kinds
        self._free[kind].append(op)

    def complete(self, op: aio.Op) -> None:
        """The pool accounted op's completion; take it back for reuse."""
        self.in_flight -= 1
        self._flagged.discard(id(op))
        if op.tag is not None and op.tag.outcome is Outcome.FAILED:
            self._note_failure(op)
        else:
            self._succeeded()
            if op.tag is not None and op.tag.outcome is Outcome.COMPLETED:
                self._check_length(op)
        self._release(op)
        if self.state is JobState.STOPPING:
            self.close_if_idle()

    def _check_length(self, op: aio.Op) -> None:
        """A read or write that moved fewer bytes than asked is an error, not a fast op:
        the file is shorter than when the job opened it."""
        kind = op.kind
        if kind is None or not kind.moves_data:
            return
        want = int(op.iocb.aio_nbytes)
        if op.res is None or op.res >= want:
            return
        self._count_error(f"short_{kind}")
        self.check_target_soon()
        self._limiter.log(f"short_{kind}", logging.ERROR, f"short-{kind} errors for job "
                          f"{self.name}", "job %s: %s at offset %d of %s moved %d of %d bytes "
                          "(short %s): the file is shorter than when the job opened it",
                          self.name, op.name, op.offset, self.cfg.target, op.res, want, kind,
                          extra={"AIOD_JOB": self.name, "AIOD_POOL": self.pool.name,
                                 "AIOD_TARGET": str(self.cfg.target)})

    def _note_failure(self, op: aio.Op) -> None:
        err = op.tag.errno if op.tag is not None else 0
        self._failed(self._clock())
        self._limiter.log(("failed", err), logging.ERROR,
                          f"'{os.strerror(err)}' errors for job {self.name}",
                          "job %s: %s on %s failed: %s", self.name, op.name,
                          self.cfg.target, os.strerror(err),
                          extra={"AIOD_JOB": self.name, "AIOD_POOL": self.pool.name,
                                 "AIOD_TARGET": str(self.cfg.target), "ERRNO": err})

    def _check_timeouts(self, now: float) -> None:
        """Flag (once) each op in flight longer than the job's timeout: hung I/O."""
        self._next_timeout_check = now + TIMEOUT_CHECK_INTERVAL
        if not self.in_flight:
            return
        limit_ns = int(self.cfg.timeout * 1e9)
        now_ns = time.perf_counter_ns()
        # In flight = not in a free list (a refused op is back in one).
        free = {id(op) for ops in self._free.values() for op in ops}
        for op in self._ops:
            if id(op) in free or id(op) in self._flagged:
                continue
            if now_ns - op.tag.submitted_ns > limit_ns:
                self._flagged.add(id(op))
                self.timeouts += 1
                self._limiter.log("timeout", logging.WARNING,
                                  f"'hung I/O' warnings for job {self.name} "
                                  f"(aiod_job_op_timeouts_total counts every one)",
                                  "job %s: %s on %s has been in flight for more than %gs "
                                  "(hung I/O?)", self.name, op.name, self.cfg.target,
                                  self.cfg.timeout,
                                  extra={"AIOD_JOB": self.name, "AIOD_POOL": self.pool.name,
                                         "AIOD_TARGET": str(self.cfg.target)})

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
        if self._check is not None:
            return self._clock() + FILL_POLL_INTERVAL
        return self._due_wakeup()


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
            op = self._next_op()
            if op is not None:
                self._submit([op])
        self._next_due += interval
        if self._next_due < now - interval:  # fell behind (stalled loop): no burst
            self._next_due = now + interval
        return True

    def _due_wakeup(self) -> float | None:
        return min(self._next_due, self._next_check)


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
            self._submit([op for op in (self._next_op() for _ in range(want)) if op])
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


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"

