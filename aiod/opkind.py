"""The one vocabulary for kinds of operation.

:class:`OpKind` is what one kernel AIO operation does (its iocb opcode) and
is the ``op`` label value of every per-op metric. :class:`JobOp` is what a
job (or a bench run) does, the ``op`` config value: which kinds it issues,
in what order, and whether it writes. Both are string enums whose values are
the words users see in config and metrics, so they compare equal to them.

This module depends on nothing else in aiod: the kernel ABI layer (aio.py)
takes its opcodes from here.
"""

from __future__ import annotations

import enum

# linux/aio_abi.h
IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_FSYNC = 2
IOCB_CMD_FDSYNC = 3
IOCB_CMD_POLL = 5
IOCB_CMD_NOOP = 6
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8


class OpKind(enum.StrEnum):
    """One operation's kind; the value is its metric label."""

    READ = "read"
    WRITE = "write"
    READV = "readv"
    WRITEV = "writev"
    FSYNC = "fsync"
    FDSYNC = "fdsync"
    POLL = "poll"
    NOOP = "noop"

    @property
    def opcode(self) -> int:
        return _OPCODES[self]

    @property
    def syscall(self) -> str:
        """The kernel's name for the operation (pread, pwrite, ...), for log lines."""
        return _SYSCALLS.get(self, self.value)

    @property
    def moves_data(self) -> bool:
        """A read or write of one buffer: it has an offset and a length to check."""
        return self in (OpKind.READ, OpKind.WRITE)

    @classmethod
    def of(cls, opcode: int) -> OpKind | None:
        """The kind of an iocb opcode; None for one we have no word for."""
        return _BY_OPCODE.get(opcode)


_OPCODES: dict[OpKind, int] = {
    OpKind.READ: IOCB_CMD_PREAD, OpKind.WRITE: IOCB_CMD_PWRITE,
    OpKind.FSYNC: IOCB_CMD_FSYNC, OpKind.FDSYNC: IOCB_CMD_FDSYNC,
    OpKind.POLL: IOCB_CMD_POLL, OpKind.NOOP: IOCB_CMD_NOOP,
    OpKind.READV: IOCB_CMD_PREADV, OpKind.WRITEV: IOCB_CMD_PWRITEV,
}
_BY_OPCODE: dict[int, OpKind] = {code: kind for kind, code in _OPCODES.items()}
_SYSCALLS: dict[OpKind, str] = {
    OpKind.READ: "pread", OpKind.WRITE: "pwrite",
    OpKind.READV: "preadv", OpKind.WRITEV: "pwritev",
}


class JobOp(enum.StrEnum):
    """What a job does; the value is the ``op`` config value."""

    READ = "read"
    RANDREAD = "randread"
    WRITE = "write"
    RANDWRITE = "randwrite"
    RANDRW = "randrw"
    FSYNC = "fsync"
    POLL = "poll"

    @property
    def kinds(self) -> tuple[OpKind, ...]:
        """The kinds of operation it issues."""
        return _JOB_KINDS[self]

    @property
    def buffered_kinds(self) -> tuple[OpKind, ...]:
        """The kinds that need a data buffer per op in flight."""
        return tuple(k for k in self.kinds if k.moves_data)

    @property
    def writes(self) -> bool:
        return OpKind.WRITE in self.kinds

    @property
    def sequential(self) -> bool:
        """Offsets go block after block (else they are random)."""
        return self in (JobOp.READ, JobOp.WRITE)

    @property
    def moves_data(self) -> bool:
        """Reads or writes blocks of a file (what bench can measure)."""
        return bool(self.buffered_kinds)


_JOB_KINDS: dict[JobOp, tuple[OpKind, ...]] = {
    JobOp.READ: (OpKind.READ,), JobOp.RANDREAD: (OpKind.READ,),
    JobOp.WRITE: (OpKind.WRITE,), JobOp.RANDWRITE: (OpKind.WRITE,),
    JobOp.RANDRW: (OpKind.READ, OpKind.WRITE),
    JobOp.FSYNC: (OpKind.FSYNC,), JobOp.POLL: (OpKind.POLL,),
}
