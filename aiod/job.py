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
import os
import random
import select
import time
from collections.abc import Callable
from typing import Any

from aiod import aio, engine
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
        self._opset: Any = None    # the engine OpSet of the open target
        self._launched = 0         # ops of the OpSet that went in flight, ever
        self._landed = 0           # of those, the ones that have left flight
        self._abandoned = False    # shutdown accounted every op: none comes back
        self._retry_at = 0.0
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
        self._drop_ops()
        if self.start():
            log.info("job %s: reopened %s (it %s)", self.name, self.cfg.target,
                     self._reopen_because,
                     extra={"AIOD_JOB": self.name, "AIOD_TARGET": str(self.cfg.target)})

    def _build_ops(self) -> None:
        """The job's OpSet on its open target, over the buffers allocate() made."""
        assert self.target is not None and self._buffers is not None
        assert self.in_flight == 0
        fd, bs = self.target.fd, self.cfg.block_size
        nblocks = max(1, self.target.size // bs) if self.target.size else 1
        depth = max(1, self.cfg.iodepth)
        kinds = self._kinds
        # randrw: a read and a write op per slot; the engine picks one at random.
        opset = engine.require().OpSet(
            self.pool.accounting, depth * len(kinds),
            pattern="seq" if self.mode.sequential else "rand", nblocks=nblocks,
            block_size=bs, seed=self._rng.getrandbits(64),
            mix=0.5 if len(kinds) == 2 else 0.0, depth=depth)
        for cls, kind in enumerate(kinds):
            row = self.pool.row(self.name, kind.value)
            for i in range(depth):
                if kind.moves_data:
                    buf = self._buffers[kind][i]
                    opset.add(kind.opcode, fd, buf.address, buf.size, row, cls=cls, owner=buf)
                elif kind is OpKind.POLL:
                    opset.add(kind.opcode, fd, select.POLLIN, 0, row, cls=cls)
                else:
                    opset.add(kind.opcode, fd, 0, 0, row, cls=cls)
        self._opset = opset
        self._launched = self._landed = 0
        self._abandoned = False
        self.pool.listen(self, self._reaped)

    def _drop_ops(self) -> None:
        """Forget the OpSet (nothing of it in flight): its target is closed."""
        self.pool.unlisten(self)
        self._opset = None

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
            self.pool.unlisten(self)
            self.state = JobState.STOPPED
        return self.state is JobState.STOPPED

    def abandon(self) -> None:
        """Shutdown accounted every op (destroyed contexts included): none
        will complete to the job any more."""
        self._abandoned = True

    @property
    def in_flight(self) -> int:
        """Ops not back with the job: in flight, or lost with a context whose
        io_destroy has not returned (the kernel may still use their buffers,
        and closing their file could block on a hung device)."""
        if self._opset is None or self._abandoned:
            return 0
        return int(self._opset.size - self._opset.free)

    @property
    def opset(self) -> Any:
        """The engine OpSet of the open target (None before the first start)."""
        return self._opset

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
        if n <= 0 or self._opset is None:
            return
        try:
            r = self.pool.submit(self._opset, n)
        except PoolClosed:
            self.skipped += n
            return
        self.skipped += r.unsubmitted  # pool full: back-pressure, try next time
        self._launched += r.submitted
        if r.rejected:  # refused by io_submit itself (already accounted by the pool)
            self._reaped()

    def _reaped(self) -> None:
        """The pool accounted completions (or lost ops): read what the OpSet noted."""
        opset = self._opset
        if opset is None:
            return
        landed = self._launched - (int(opset.size) - int(opset.free))
        done, self._landed = landed - self._landed, landed
        notes, dropped = opset.take_notes()
        failed = sum(1 for _, kind, _ in notes if kind == "failed")
        if done > failed:
            self._succeeded()
        now = self._clock()
        for index, kind, value in notes:
            if kind == "short":
                self._short(index, value)
            else:  # failed in flight, or refused by io_submit: value is the errno
                self._note_failure(index, value, now)
        for _ in range(dropped):  # more than the OpSet keeps notes of: failures all the same
            self._failed(now)
        if self.state is JobState.STOPPING:
            self.close_if_idle()

    def _op_text(self, index: int) -> tuple[str, dict[str, Any]]:
        info: dict[str, Any] = self._opset.op_info(index)
        kind = OpKind.of(info["opcode"])
        return (kind.syscall if kind is not None else str(info["opcode"])), info

    def _short(self, index: int, moved: int) -> None:
        """A read or write that moved fewer bytes than asked is an error, not a fast op:
        the file is shorter than when the job opened it."""
        name, info = self._op_text(index)
        kind = OpKind.of(info["opcode"])
        self._count_error(f"short_{kind}")
        self.check_target_soon()
        self._limiter.log(f"short_{kind}", logging.ERROR, f"short-{kind} errors for job "
                          f"{self.name}", "job %s: %s at offset %d of %s moved %d of %d bytes "
                          "(short %s): the file is shorter than when the job opened it",
                          self.name, name, info["offset"], self.cfg.target, moved,
                          info["nbytes"], kind,
                          extra={"AIOD_JOB": self.name, "AIOD_POOL": self.pool.name,
                                 "AIOD_TARGET": str(self.cfg.target)})

    def _note_failure(self, index: int, err: int, now: float) -> None:
        self._failed(now)
        name, _ = self._op_text(index)
        self._limiter.log(("failed", err), logging.ERROR,
                          f"'{os.strerror(err)}' errors for job {self.name}",
                          "job %s: %s on %s failed: %s", self.name, name,
                          self.cfg.target, os.strerror(err),
                          extra={"AIOD_JOB": self.name, "AIOD_POOL": self.pool.name,
                                 "AIOD_TARGET": str(self.cfg.target), "ERRNO": err})

    def _check_timeouts(self, now: float) -> None:
        """Flag (once) each op in flight longer than the job's timeout: hung I/O."""
        self._next_timeout_check = now + TIMEOUT_CHECK_INTERVAL
        if not self.in_flight:
            return
        # The engine stamps submits with CLOCK_MONOTONIC, as time.monotonic_ns.
        for index in self._opset.overdue(time.monotonic_ns(), int(self.cfg.timeout * 1e9)):
            self.timeouts += 1
            name, _ = self._op_text(index)
            self._limiter.log("timeout", logging.WARNING,
                              f"'hung I/O' warnings for job {self.name} "
                              f"(aiod_job_op_timeouts_total counts every one)",
                              "job %s: %s on %s has been in flight for more than %gs "
                              "(hung I/O?)", self.name, name, self.cfg.target,
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


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"

