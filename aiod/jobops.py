"""A job's I/O on the engine: its buffers, its OpSet, what came of its ops.

:func:`allocate_buffers` maps a job's data buffers once (a slab per kind of
op, page-aligned, fit for O_DIRECT). :class:`JobOps` is the job's engine
OpSet on its open target, over those buffers: ``iodepth`` ops per kind,
offsets chosen by the engine (block after block, or at random over the
target's blocks), counted in the pool's ledger. :meth:`JobOps.landed` says
what became of the ops since the last look, from the OpSet's notes (failed,
refused and short ops). :class:`OpLog` writes the job's rate-limited lines
about them.
"""

from __future__ import annotations

import logging
import os
import random
import select
import time
from dataclasses import dataclass
from typing import Any

from aiod import aio, engine
from aiod.jobtarget import size_text
from aiod.logs import LogLimiter
from aiod.opkind import JobOp, OpKind
from aiod.pool import Pool, Submitted


class JobResourceError(Exception):
    """A job's buffers cannot be allocated; the message is one line for operators."""


def allocate_buffers(job: str, mode: JobOp, block_size: int, iodepth: int,
                     rng: random.Random) -> dict[OpKind, list[aio.Buffer]]:
    """iodepth buffers per kind that moves data; writes carry random data.
    Raises JobResourceError (and keeps nothing) when they cannot be had."""
    buffers: dict[OpKind, list[aio.Buffer]] = {}
    try:
        for kind in mode.buffered_kinds:
            # One slab per kind, not a mapping per buffer (vm.max_map_count).
            bufs = buffers[kind] = aio.aligned_buffers(iodepth, block_size)
            if kind is OpKind.WRITE:
                for buf in bufs:
                    buf.view[:] = rng.randbytes(block_size)
    except (OSError, MemoryError, OverflowError, ValueError) as e:
        buffers.clear()
        n = iodepth * len(mode.buffered_kinds)
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or
                                                                        type(e).__name__)
        raise JobResourceError(f"job {job}: cannot allocate its I/O buffers "
                               f"({n} x {size_text(block_size)}): {why}") from None
    return buffers


@dataclass
class Landed:
    """What became of a job's ops since the last look."""

    succeeded: int                      # left flight without failing (completed or cancelled)
    notes: list[tuple[int, str, int]]   # (op, "failed" | "rejected" | "short", errno or bytes)
    dropped: int                        # notes the OpSet had no room for


class JobOps:
    """A job's engine OpSet on one open target (see the module docstring)."""

    def __init__(self, pool: Pool, job: str, mode: JobOp, *, fd: int, size: int,
                 block_size: int, iodepth: int, buffers: dict[OpKind, list[aio.Buffer]],
                 seed: int) -> None:
        self.pool = pool
        nblocks = max(1, size // block_size) if size else 1
        depth = max(1, iodepth)
        kinds = mode.kinds
        # randrw: a read and a write op per slot; the engine picks one at random.
        self.set: Any = engine.require().OpSet(
            pool.accounting, depth * len(kinds), pattern="seq" if mode.sequential else "rand",
            nblocks=nblocks, block_size=block_size, seed=seed,
            mix=0.5 if len(kinds) == 2 else 0.0, depth=depth)
        for cls, kind in enumerate(kinds):
            row = pool.row(job, kind.value)
            for i in range(depth):
                if kind.moves_data:
                    buf = buffers[kind][i]
                    self.set.add(kind.opcode, fd, buf.address, buf.size, row, cls=cls, owner=buf)
                elif kind is OpKind.POLL:
                    self.set.add(kind.opcode, fd, select.POLLIN, 0, row, cls=cls)
                else:
                    self.set.add(kind.opcode, fd, 0, 0, row, cls=cls)
        self._launched = 0   # ops that went in flight, ever
        self._landed = 0     # of those, the ones back with the job

    @property
    def in_flight(self) -> int:
        """Ops not back with the job: in flight, or lost with a context whose
        io_destroy has not returned (the kernel may still use their buffers,
        and closing their file could block on a hung device)."""
        return int(self.set.size) - int(self.set.free)

    def submit(self, n: int) -> Submitted:
        """Up to n ready ops into the pool, one engine call per context.
        Raises PoolClosed once the pool drains."""
        r = self.pool.submit(self.set, n)
        self._launched += r.submitted
        return r

    def landed(self) -> Landed:
        """What became of the ops since the last call, from the OpSet's notes."""
        landed = self._launched - self.in_flight
        done, self._landed = landed - self._landed, landed
        notes, dropped = self.set.take_notes()
        failed = sum(1 for _, kind, _ in notes if kind == "failed")
        return Landed(done - failed, notes, int(dropped))

    def overdue(self, limit: float) -> list[int]:
        """Ops in flight longer than limit seconds, each reported once per flight."""
        # The engine stamps submits with CLOCK_MONOTONIC, as time.monotonic_ns.
        return list(self.set.overdue(time.monotonic_ns(), int(limit * 1e9)))

    def describe(self, index: int) -> tuple[str, dict[str, Any]]:
        """(the kernel's name for the op, its opcode, offset, nbytes...), for log lines."""
        info: dict[str, Any] = self.set.op_info(index)
        kind = OpKind.of(info["opcode"])
        return (kind.syscall if kind is not None else str(info["opcode"])), info


class OpLog:
    """A job's lines about its ops: a few per interval of each kind, then a count."""

    def __init__(self, job: str, pool: str, target: str, limiter: LogLimiter) -> None:
        self._job, self._target = job, target
        self._limiter = limiter
        self._extra = {"AIOD_JOB": job, "AIOD_POOL": pool, "AIOD_TARGET": target}

    def failed(self, name: str, err: int) -> None:
        self._limiter.log(("failed", err), logging.ERROR,
                          f"'{os.strerror(err)}' errors for job {self._job}",
                          "job %s: %s on %s failed: %s", self._job, name, self._target,
                          os.strerror(err), extra={**self._extra, "ERRNO": err})

    def short(self, name: str, kind: OpKind | None, offset: int, moved: int, want: int) -> None:
        self._limiter.log(f"short_{kind}", logging.ERROR, f"short-{kind} errors for job "
                          f"{self._job}", "job %s: %s at offset %d of %s moved %d of %d bytes "
                          "(short %s): the file is shorter than when the job opened it",
                          self._job, name, offset, self._target, moved, want, kind,
                          extra=self._extra)

    def hung(self, name: str, timeout: float) -> None:
        self._limiter.log("timeout", logging.WARNING,
                          f"'hung I/O' warnings for job {self._job} "
                          f"(aiod_job_op_timeouts_total counts every one)",
                          "job %s: %s on %s has been in flight for more than %gs "
                          "(hung I/O?)", self._job, name, self._target, timeout,
                          extra=self._extra)
