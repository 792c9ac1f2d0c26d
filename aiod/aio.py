"""The kernel AIO layer's one front door: ``from aiod import aio; aio.Context(...)``.

Everything above this layer (pools, jobs, the daemon) decides *what* to
submit and how to account for it; this layer only knows how to speak to the
kernel correctly, and has no policy in it. Its parts, one concern each:

- :mod:`aiod.aio_abi`: ``struct iocb`` / ``struct io_event`` as laid out in
  linux/aio_abi.h, the syscall numbers, the raw ``syscall(2)`` prototypes,
  and :class:`AioError` naming the syscall that failed;
- :mod:`aiod.aio_buffers`: page-aligned buffers and slabs for O_DIRECT;
- :mod:`aiod.aio_ops`: :class:`Op` and its constructors, operations that own
  their buffers so a buffer can never be freed while the kernel may still
  write into it;
- :mod:`aiod.aio_context`: :class:`Context`, one kernel context, which turns
  the kernel's awkward edges into plain Python results;
- :mod:`aiod.aio_sysctl`: the host's fs.aio-nr and fs.aio-max-nr.

This module only gathers their names, so callers import one module.
"""

from __future__ import annotations

from aiod.aio_abi import (
    IOCB,
    IOCB_FLAG_IOPRIO,
    IOCB_FLAG_RESFD,
    MAX_NR_EVENTS,
    NR_IO_CANCEL,
    NR_IO_DESTROY,
    NR_IO_GETEVENTS,
    NR_IO_SETUP,
    NR_IO_SUBMIT,
    RWF_APPEND,
    RWF_DSYNC,
    RWF_HIPRI,
    RWF_NOWAIT,
    RWF_SYNC,
    AioError,
    IoEvent,
    IoVec,
    Timespec,
    io_cancel,
    io_destroy,
    io_setup,
)
from aiod.aio_buffers import PAGE_SIZE, SLAB_ALIGNMENT, Buffer, aligned_buffer, aligned_buffers
from aiod.aio_context import Context, SubmitResult
from aiod.aio_ops import Op, fdsync, fsync, poll, read, readv, write, writev
from aiod.aio_sysctl import system_aio_usage
from aiod.opkind import (
    IOCB_CMD_FDSYNC,
    IOCB_CMD_FSYNC,
    IOCB_CMD_POLL,
    IOCB_CMD_PREAD,
    IOCB_CMD_PREADV,
    IOCB_CMD_PWRITE,
    IOCB_CMD_PWRITEV,
)

__all__ = [
    "IOCB",
    "IOCB_CMD_FDSYNC",
    "IOCB_CMD_FSYNC",
    "IOCB_CMD_POLL",
    "IOCB_CMD_PREAD",
    "IOCB_CMD_PREADV",
    "IOCB_CMD_PWRITE",
    "IOCB_CMD_PWRITEV",
    "IOCB_FLAG_IOPRIO",
    "IOCB_FLAG_RESFD",
    "MAX_NR_EVENTS",
    "NR_IO_CANCEL",
    "NR_IO_DESTROY",
    "NR_IO_GETEVENTS",
    "NR_IO_SETUP",
    "NR_IO_SUBMIT",
    "PAGE_SIZE",
    "RWF_APPEND",
    "RWF_DSYNC",
    "RWF_HIPRI",
    "RWF_NOWAIT",
    "RWF_SYNC",
    "SLAB_ALIGNMENT",
    "AioError",
    "Buffer",
    "Context",
    "IoEvent",
    "IoVec",
    "Op",
    "SubmitResult",
    "Timespec",
    "aligned_buffer",
    "aligned_buffers",
    "fdsync",
    "fsync",
    "io_cancel",
    "io_destroy",
    "io_setup",
    "poll",
    "read",
    "readv",
    "system_aio_usage",
    "write",
    "writev",
]
