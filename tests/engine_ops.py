"""Tests' ops for a pool: an engine OpSet of polls, reads, writes and fsyncs.

The daemon's jobs build their OpSets from a config; tests build them op by
op here, each counted under the (job, kind) row of the pool's ledger, and
submit them through the pool as a job does.
"""

from __future__ import annotations

import select
from typing import Any

from aiod import aio, engine
from aiod.opkind import OpKind
from aiod.pool import Pool, Submitted


class Ops:
    """One job's ops in an OpSet of a pool (fixed offsets: each op keeps its own)."""

    def __init__(self, pool: Pool, job: str, capacity: int) -> None:
        self.pool = pool
        self.job = job
        self.set: Any = engine.require().OpSet(pool.accounting, capacity)
        self.buffers: list[aio.Buffer] = []

    def _add(self, kind: OpKind, fd: int, buf: int = 0, nbytes: int = 0, offset: int = 0,
             owner: object = None) -> int:
        row = self.pool.row(self.job, kind.value)
        return int(self.set.add(kind.opcode, fd, buf, nbytes, row, offset=offset, owner=owner))

    def poll(self, fd: int, n: int = 1) -> list[int]:
        return [self._add(OpKind.POLL, fd, select.POLLIN) for _ in range(n)]

    def read(self, fd: int, offset: int = 0, size: int = 4096,
             buffer: aio.Buffer | None = None) -> int:
        b = buffer if buffer is not None else aio.aligned_buffer(size)
        self.buffers.append(b)
        return self._add(OpKind.READ, fd, b.address, b.size, offset, owner=b)

    def write(self, fd: int, data: bytes, offset: int = 0) -> int:
        b = aio.aligned_buffer(len(data))
        b.view[:] = data
        self.buffers.append(b)
        return self._add(OpKind.WRITE, fd, b.address, b.size, offset, owner=b)

    def fsync(self, fd: int) -> int:
        return self._add(OpKind.FSYNC, fd)

    def submit(self, n: int | None = None) -> Submitted:
        """Submit n (default: every free) op through the pool."""
        return self.pool.submit(self.set, int(self.set.free) if n is None else n)

    def counts(self, kind: str | None = None) -> dict[str, Any]:
        """The job's ledger counters, summed over its kinds (or of one kind)."""
        out: dict[str, Any] = {"submitted": 0, "completed": 0, "cancelled": 0, "failed": {},
                               "in_flight": 0, "short": 0}
        for (job, op), d in self.pool.ledger.raw().items():
            if job != self.job or (kind is not None and op != kind):
                continue
            for k in ("submitted", "completed", "cancelled", "in_flight", "short"):
                out[k] += d[k]
            for err, n in d["failed"].items():
                out["failed"][err] = out["failed"].get(err, 0) + n
        return out

    @property
    def free(self) -> int:
        return int(self.set.free)

    @property
    def in_flight(self) -> int:
        return int(self.set.in_flight)
