"""The kernel AIO ABI: struct layouts, syscall numbers and the raw syscalls.

Exactly what linux/aio_abi.h and the syscall table say, checked at import
(a wrong layout would corrupt memory silently), and nothing else: the
ctypes prototypes that :mod:`aiod.aio_context` drives, and the three
syscalls that are plain calls (io_setup, io_destroy, io_cancel), which
raise :class:`AioError` naming the syscall.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform

# --- opcodes and flags (linux/aio_abi.h, linux/fs.h) -------------------------
# The opcodes (IOCB_CMD_*) come from aiod.opkind, the op-kind vocabulary.

IOCB_FLAG_RESFD = 1 << 0
IOCB_FLAG_IOPRIO = 1 << 1

RWF_HIPRI = 0x00000001
RWF_DSYNC = 0x00000002
RWF_SYNC = 0x00000004
RWF_NOWAIT = 0x00000008
RWF_APPEND = 0x00000010

# The most events one context can have. io_setup doubles nr_events (half the
# ring may sit in other CPUs' per-CPU counters) and refuses a ring over
# 0x10000000 bytes of io_events with EINVAL, whatever fs.aio-max-nr says
# (fs/aio.c: ioctx_alloc). tests/test_aio.py finds it on the running kernel.
MAX_NR_EVENTS = 0x10000000 // 32 // 2   # 4194304


class IOCB(ctypes.Structure):
    """struct iocb. aio_key/aio_rw_flags order is the little-endian one."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class IoEvent(ctypes.Structure):
    """struct io_event."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check_layout() -> None:
    """The kernel ABI is fixed; a wrong layout would corrupt memory silently.
    A check that raises, not asserts: ``python -O`` drops those."""
    expected = {"sizeof(struct iocb)": (ctypes.sizeof(IOCB), 64),
                "sizeof(struct io_event)": (ctypes.sizeof(IoEvent), 32),
                "iocb.aio_lio_opcode offset": (IOCB.aio_lio_opcode.offset, 16),
                "iocb.aio_fildes offset": (IOCB.aio_fildes.offset, 20),
                "iocb.aio_buf offset": (IOCB.aio_buf.offset, 24),
                "iocb.aio_flags offset": (IOCB.aio_flags.offset, 56)}
    wrong = [f"{what} is {got}, the kernel's is {want}"
             for what, (got, want) in expected.items() if got != want]
    if wrong:
        raise ImportError("aiod.aio: the kernel AIO structs are laid out wrongly: "
                          + "; ".join(wrong))


_check_layout()

# --- syscall numbers ---------------------------------------------------------
_SYSCALLS = {
    # io_setup, io_destroy, io_getevents, io_submit, io_cancel
    "x86_64": (206, 207, 208, 209, 210),
    "aarch64": (0, 1, 4, 2, 3),
}
_machine = platform.machine()
if _machine not in _SYSCALLS:  # pragma: no cover - depends on the host
    raise ImportError(f"aiod.aio: unsupported architecture {_machine!r} (x86_64 or aarch64)")
NR_IO_SETUP, NR_IO_DESTROY, NR_IO_GETEVENTS, NR_IO_SUBMIT, NR_IO_CANCEL = _SYSCALLS[_machine]

_libc = ctypes.CDLL(None, use_errno=True)

# One prototype per call shape, so ctypes converts arguments without guessing.
# Each takes the syscall number first, as syscall(2) does.
sys_io_setup = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_uint,
                                ctypes.POINTER(ctypes.c_ulong), use_errno=True)(("syscall", _libc))
sys_io_destroy = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_ulong,
                                  use_errno=True)(("syscall", _libc))
sys_io_submit = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_long,
                                 ctypes.c_void_p, use_errno=True)(("syscall", _libc))
sys_io_cancel = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p,
                                 ctypes.c_void_p, use_errno=True)(("syscall", _libc))
sys_io_getevents = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_long,
                                    ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                                    use_errno=True)(("syscall", _libc))


class AioError(OSError):
    """A kernel AIO syscall failed. ``.errno`` is the kernel's errno."""

    def __init__(self, syscall: str, err: int, detail: str = "") -> None:
        msg = f"{syscall}: {os.strerror(err)}"
        if detail:
            msg = f"{msg} ({detail})"
        super().__init__(err, msg)
        self.syscall = syscall

    def __str__(self) -> str:
        return str(self.strerror)


def _fail(name: str, detail: str = "") -> AioError:
    return AioError(name, ctypes.get_errno(), detail)


# --- the syscalls that are plain calls ---------------------------------------
def io_setup(nr_events: int) -> int:
    """Create a kernel AIO context for nr_events in-flight operations; return its id."""
    if nr_events < 0 or nr_events > 0xFFFFFFFF:
        raise AioError("io_setup", _errno.EINVAL, f"nr_events={nr_events}")
    ctx = ctypes.c_ulong(0)
    if sys_io_setup(NR_IO_SETUP, nr_events, ctypes.byref(ctx)) < 0:
        raise _fail("io_setup", f"nr_events={nr_events}")
    return ctx.value


def io_destroy(ctx_id: int) -> None:
    """Destroy a context. Blocks until uncancellable in-flight I/O completes."""
    if sys_io_destroy(NR_IO_DESTROY, ctx_id & 0xFFFFFFFFFFFFFFFF) < 0:
        raise _fail("io_destroy", f"ctx={ctx_id:#x}")


def io_cancel(ctx_id: int, iocb_addr: int, result_addr: int) -> int:
    """Raw io_cancel: 0 when the kernel wrote the event to result_addr, else raises."""
    if sys_io_cancel(NR_IO_CANCEL, ctx_id, iocb_addr, result_addr) < 0:
        raise _fail("io_cancel")
    return 0
