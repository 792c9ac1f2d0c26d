"""One kernel AIO operation: its iocb, the buffers it owns, and its constructors.

An op owns its memory for as long as it lives, so a buffer can never be
freed while the kernel may still write into it; the constructors (read,
write, readv, writev, fsync, fdsync, poll) fill the iocb for each opcode.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from aiod.aio_abi import IOCB, IoVec
from aiod.aio_buffers import Buffer, aligned_buffer
from aiod.opkind import (
    IOCB_CMD_FDSYNC,
    IOCB_CMD_FSYNC,
    IOCB_CMD_POLL,
    IOCB_CMD_PREAD,
    IOCB_CMD_PREADV,
    IOCB_CMD_PWRITE,
    IOCB_CMD_PWRITEV,
    OpKind,
)


class Op:
    """One operation: its iocb and the buffers the kernel will touch.

    The op owns its memory for as long as it lives; the Context keeps every
    in-flight op referenced, so nothing is freed under the kernel. ``res`` and
    ``res2`` hold the completion.
    """

    __slots__ = ("__weakref__", "_iov", "buffers", "iocb", "res", "res2")

    def __init__(self, opcode: int, fd: int, *, buf: int = 0, nbytes: int = 0,
                 offset: int = 0, buffers: tuple[Buffer, ...] = (), rw_flags: int = 0,
                 iov: ctypes.Array[Any] | None = None) -> None:
        cb = IOCB()
        cb.aio_lio_opcode = opcode
        cb.aio_fildes = fd
        cb.aio_buf = buf
        cb.aio_nbytes = nbytes
        cb.aio_offset = offset
        cb.aio_rw_flags = rw_flags
        self.iocb = cb
        self.buffers = buffers
        self._iov = iov
        self.res: int | None = None
        self.res2: int | None = None

    @property
    def opcode(self) -> int:
        return int(self.iocb.aio_lio_opcode)

    @property
    def name(self) -> str:
        kind = OpKind.of(self.opcode)
        return kind.syscall if kind is not None else str(self.opcode)

    @property
    def kind(self) -> OpKind | None:
        return OpKind.of(self.opcode)

    @property
    def address(self) -> int:
        return ctypes.addressof(self.iocb)

    @property
    def fd(self) -> int:
        return int(self.iocb.aio_fildes)

    @property
    def offset(self) -> int:
        return int(self.iocb.aio_offset)

    def set_offset(self, offset: int) -> None:
        """Re-arm a completed op at a new offset (the load loop reuses ops)."""
        self.iocb.aio_offset = offset
        self.res = self.res2 = None

    def __repr__(self) -> str:
        return f"<Op {self.name} fd={self.fd} off={self.offset} res={self.res}>"


def read(fd: int, buffer: Buffer | int, offset: int = 0, *, rw_flags: int = 0) -> Op:
    """PREAD into buffer (a Buffer, or a size to allocate an aligned one)."""
    b = aligned_buffer(buffer) if isinstance(buffer, int) else buffer
    return Op(IOCB_CMD_PREAD, fd, buf=b.address, nbytes=b.size, offset=offset,
              buffers=(b,), rw_flags=rw_flags)


def write(fd: int, data: Buffer | bytes, offset: int = 0, *, rw_flags: int = 0) -> Op:
    """PWRITE of data (a Buffer, or bytes copied into a new aligned buffer)."""
    if isinstance(data, Buffer):
        b = data
    else:
        b = aligned_buffer(len(data))
        b.view[:len(data)] = data
    return Op(IOCB_CMD_PWRITE, fd, buf=b.address, nbytes=b.size, offset=offset,
              buffers=(b,), rw_flags=rw_flags)


def _vector(opcode: int, fd: int, buffers: Sequence[Buffer], offset: int, rw_flags: int) -> Op:
    if not buffers:
        raise ValueError("a vectored op needs at least one buffer")
    iov = (IoVec * len(buffers))()
    for i, b in enumerate(buffers):
        iov[i].iov_base = b.address
        iov[i].iov_len = b.size
    return Op(opcode, fd, buf=ctypes.addressof(iov), nbytes=len(buffers), offset=offset,
              buffers=tuple(buffers), rw_flags=rw_flags, iov=iov)


def readv(fd: int, buffers: Sequence[Buffer], offset: int = 0, *, rw_flags: int = 0) -> Op:
    return _vector(IOCB_CMD_PREADV, fd, buffers, offset, rw_flags)


def writev(fd: int, buffers: Sequence[Buffer], offset: int = 0, *, rw_flags: int = 0) -> Op:
    return _vector(IOCB_CMD_PWRITEV, fd, buffers, offset, rw_flags)


def fsync(fd: int) -> Op:
    return Op(IOCB_CMD_FSYNC, fd)


def fdsync(fd: int) -> Op:
    return Op(IOCB_CMD_FDSYNC, fd)


def poll(fd: int, events: int = 0x001) -> Op:
    """POLL for events (POLLIN by default); the event mask comes back in res."""
    return Op(IOCB_CMD_POLL, fd, buf=events)
