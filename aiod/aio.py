"""The Linux kernel AIO ABI and its five syscalls, with no policy in it.

Everything above this module (pools, jobs, the daemon) decides *what* to
submit and how to account for it; this module only knows how to speak to the
kernel correctly:

- ``struct iocb`` / ``struct io_event`` as laid out in linux/aio_abi.h;
- raw ``syscall(2)`` wrappers that raise :class:`AioError` naming the syscall;
- :class:`Context`, one kernel context, which turns the kernel's awkward edges
  (short submits that say nothing about the failing iocb, cancels whose
  completion arrives later, destroy that must never run twice) into plain
  Python results;
- :class:`Op` and its constructors, operations that own their buffers so a
  buffer can never be freed while the kernel may still write into it.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

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

__all__ = [
    "IOCB",
    "AioError",
    "Buffer",
    "Context",
    "IoEvent",
    "Op",
    "SubmitResult",
    "aligned_buffer",
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

# --- opcodes and flags (linux/aio_abi.h, linux/fs.h) -------------------------
# The opcodes (IOCB_CMD_*) come from aiod.opkind, the op-kind vocabulary.

IOCB_FLAG_RESFD = 1 << 0
IOCB_FLAG_IOPRIO = 1 << 1

RWF_HIPRI = 0x00000001
RWF_DSYNC = 0x00000002
RWF_SYNC = 0x00000004
RWF_NOWAIT = 0x00000008
RWF_APPEND = 0x00000010

PAGE_SIZE = mmap.PAGESIZE

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

# io_event unpacked in bulk: data, obj, res, res2.
_EVENT = struct.Struct("=QQqq")
_addressof = ctypes.addressof

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
_sys_setup = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_uint,
                              ctypes.POINTER(ctypes.c_ulong), use_errno=True)(("syscall", _libc))
_sys_destroy = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_ulong,
                                use_errno=True)(("syscall", _libc))
_sys_submit = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_long,
                               ctypes.c_void_p, use_errno=True)(("syscall", _libc))
_sys_cancel = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p,
                               ctypes.c_void_p, use_errno=True)(("syscall", _libc))
_sys_getevents = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_long,
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


# --- the five syscalls -------------------------------------------------------
def io_setup(nr_events: int) -> int:
    """Create a kernel AIO context for nr_events in-flight operations; return its id."""
    if nr_events < 0 or nr_events > 0xFFFFFFFF:
        raise AioError("io_setup", _errno.EINVAL, f"nr_events={nr_events}")
    ctx = ctypes.c_ulong(0)
    if _sys_setup(NR_IO_SETUP, nr_events, ctypes.byref(ctx)) < 0:
        raise _fail("io_setup", f"nr_events={nr_events}")
    return ctx.value


def io_destroy(ctx_id: int) -> None:
    """Destroy a context. Blocks until uncancellable in-flight I/O completes."""
    if _sys_destroy(NR_IO_DESTROY, ctx_id & 0xFFFFFFFFFFFFFFFF) < 0:
        raise _fail("io_destroy", f"ctx={ctx_id:#x}")


def io_cancel(ctx_id: int, iocb_addr: int, result_addr: int) -> int:
    """Raw io_cancel: 0 when the kernel wrote the event to result_addr, else raises."""
    if _sys_cancel(NR_IO_CANCEL, ctx_id, iocb_addr, result_addr) < 0:
        raise _fail("io_cancel")
    return 0


# --- buffers and operations --------------------------------------------------
class Buffer:
    """Memory the kernel reads from or writes into, kept alive by its owner.

    Backed by an anonymous mmap, so it is page-aligned and fit for O_DIRECT.
    ``slice`` gives a view at an offset (used to make a deliberately
    misaligned buffer) that keeps the parent mapping alive.
    """

    __slots__ = ("_map", "_parent", "address", "size", "view")

    def __init__(self, size: int, *, _parent: Buffer | None = None, _offset: int = 0) -> None:
        if size <= 0:
            raise ValueError("buffer size must be positive")
        self._parent = _parent
        if _parent is None:
            self._map: mmap.mmap | None = mmap.mmap(-1, size)
            base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            self.view = memoryview(self._map)
            self.address = base
        else:
            self._map = None
            self.view = _parent.view[_offset:_offset + size]
            self.address = _parent.address + _offset
        self.size = size

    def slice(self, offset: int, size: int) -> Buffer:
        if offset < 0 or offset + size > self.size:
            raise ValueError("slice outside the buffer")
        return Buffer(size, _parent=self, _offset=offset)

    def bytes(self) -> bytes:
        return self.view.tobytes()


def aligned_buffer(size: int, alignment: int = PAGE_SIZE) -> Buffer:
    """A buffer of at least size bytes aligned for O_DIRECT (page-aligned)."""
    if alignment > PAGE_SIZE or PAGE_SIZE % alignment:
        raise ValueError(f"alignment must divide the page size ({PAGE_SIZE})")
    return Buffer(size)


# O_DIRECT's smallest alignment. A size that is a multiple of the page size
# keeps every buffer of a slab page-aligned; any other size can only work on
# a device with 512-byte logical blocks, which is what 512 gives.
SLAB_ALIGNMENT = 512


def aligned_buffers(count: int, size: int) -> list[Buffer]:
    """count buffers of size bytes carved from one mapping (a slab), each aligned for O_DIRECT.

    One mapping per buffer runs into vm.max_map_count (65530 by default): a
    randrw job at iodepth 33000 needs 66000 buffers. A slab is one mapping
    however many buffers it holds. Raises MemoryError when the memory cannot
    be mapped.
    """
    if count <= 0:
        return []
    stride = -(-size // SLAB_ALIGNMENT) * SLAB_ALIGNMENT
    try:
        slab = Buffer(stride * count)
    except OSError as e:
        raise MemoryError(f"cannot map {count} buffers of {size} bytes "
                          f"({stride * count} bytes): {e.strerror}") from None
    return [slab.slice(i * stride, size) for i in range(count)]


class Op:
    """One operation: its iocb and the buffers the kernel will touch.

    The op owns its memory for as long as it lives; the Context keeps every
    in-flight op referenced, so nothing is freed under the kernel. ``res`` and
    ``res2`` hold the completion; ``tag`` is free for the layer above.
    """

    __slots__ = ("__weakref__", "_iov", "buffers", "iocb", "res", "res2", "tag")

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
        self.tag: Any = None  # the pool's OpTag; Any keeps this layer free of pool types

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


# --- one kernel context ------------------------------------------------------
@dataclass
class SubmitResult:
    """What became of a batch handed to Context.submit.

    Every op of the batch is in exactly one of the three lists.
    """

    submitted: list[Op] = field(default_factory=list)
    failed: list[tuple[Op, int]] = field(default_factory=list)  # (op, errno)
    unsubmitted: list[Op] = field(default_factory=list)


class Context:
    """One kernel AIO context.

    Not thread-safe on its own: the pool serialises submit/cancel/destroy per
    context and runs a single reaper for it.
    """

    def __init__(self, nr_events: int, *, eventfd: bool | int = False) -> None:
        """eventfd=True makes an eventfd owned by this context; an int uses an
        eventfd owned by the caller (a pool shares one across its contexts)."""
        self.nr_events = nr_events
        self.id = io_setup(nr_events)
        self.destroyed = False
        self._inflight: dict[int, Op] = {}
        self._pending: list[tuple[Op, int, int]] = []  # completions from io_cancel returning 0
        # Arrays sized once: no per-call ctypes allocation on the hot path.
        self._ptrs = (ctypes.c_void_p * nr_events)()
        self._ptrs_addr = ctypes.addressof(self._ptrs)
        self._events = (IoEvent * nr_events)()
        self._events_addr = ctypes.addressof(self._events)
        self._events_view = memoryview(self._events).cast("B")
        self._cancel_event = IoEvent()
        self._timeout = Timespec()
        self._timeout_addr = ctypes.addressof(self._timeout)
        self._timeout_value: float | None = None  # what _timeout holds now
        self.eventfd: int | None = None
        self._owns_eventfd = eventfd is True
        if eventfd is not True and eventfd is not False:
            self.eventfd = int(eventfd)
        elif eventfd:
            try:
                self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            except OSError:
                io_destroy(self.id)
                raise

    # -- context manager
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def inflight_ops(self) -> list[Op]:
        return list(self._inflight.values())

    def oldest_inflight(self) -> Op | None:
        """The op submitted longest ago that is still in flight, without a walk.

        ``_inflight`` is filled in submit order and an op leaves it when it
        completes (a resubmitted op goes to the end), so its first entry is
        the oldest. Safe from another thread (a metrics scrape): the lookup is
        a few C calls, and a change under it is retried, then given up.
        """
        for _ in range(3):
            try:
                return next(iter(self._inflight.values()), None)
            except RuntimeError:  # the I/O loop changed it between iter() and next()
                continue
        return None

    def _check_live(self, what: str) -> None:
        if self.destroyed:
            raise AioError(what, _errno.EINVAL, "context already destroyed")

    def submit(self, ops: Iterable[Op]) -> SubmitResult:
        """Submit a batch with as few io_submit calls as the kernel allows.

        The kernel stops a batch at the first iocb it rejects and reports only
        the count before it; that iocb is then submitted alone so its own
        errno is learned, and the rest of the batch goes on. EAGAIN (no room
        in the ring) is not an op's fault: the remainder is handed back.
        """
        if self.destroyed:
            self._check_live("io_submit")
        ops = list(ops)
        inflight = self._inflight
        efd = self.eventfd
        # One pass fills each iocb and collects its address (hot path: no
        # per-op ctypes array stores; the pointer array is filled by slices).
        addrs: list[ctypes.c_void_p | int | None] = []
        add = addrs.append
        for op in ops:
            key = id(op)
            if key in inflight:
                raise ValueError(f"{op!r} is already in flight")
            cb = op.iocb
            cb.aio_data = key
            if efd is not None:
                cb.aio_flags |= IOCB_FLAG_RESFD
                cb.aio_resfd = efd
            add(_addressof(cb))
        n = len(ops)
        cap = self.nr_events
        ptrs = self._ptrs
        result = SubmitResult()
        i = 0
        while i < n:
            m = min(n - i, cap)
            ptrs[:m] = addrs[i:i + m]
            got = _sys_submit(NR_IO_SUBMIT, self.id, m, self._ptrs_addr)
            if got == n:  # the common case: the whole batch in one call
                inflight.update(zip(map(id, ops), ops))
                result.submitted = ops
                return result
            if got < 0:
                err = ctypes.get_errno()
                if err == _errno.EAGAIN or err == _errno.EINTR:
                    result.unsubmitted.extend(ops[i:])
                    return result
                # The first iocb of this chunk was rejected with err.
                result.failed.append((ops[i], err))
                i += 1
                continue
            went = ops[i:i + got]
            inflight.update(zip(map(id, went), went))
            result.submitted.extend(went)
            i += got
        return result

    def reap(self, min_nr: int = 1, max_nr: int | None = None,
             timeout: float | None = None) -> list[Op]:
        """Wait for at least min_nr completions (up to timeout seconds; None blocks).

        Returns the completed ops with ``res``/``res2`` set. A signal that
        interrupts the wait returns what has arrived (possibly nothing).
        """
        if self.destroyed:
            self._check_live("io_getevents")
        done: list[Op] = []
        if self._pending:
            for op, res, res2 in self._pending:
                op.res, op.res2 = res, res2
                done.append(op)
            self._pending.clear()
            min_nr = 0
        cap = self.nr_events if max_nr is None else min(max_nr, self.nr_events)
        if cap <= 0:
            return done
        if timeout is None:
            taddr = None
        else:
            if timeout != self._timeout_value:
                t = self._timeout
                if timeout < 0:
                    timeout = 0.0
                t.tv_sec = int(timeout)
                t.tv_nsec = int((timeout - int(timeout)) * 1e9)
                self._timeout_value = timeout
            taddr = self._timeout_addr
        got = _sys_getevents(NR_IO_GETEVENTS, self.id, min(cap, min_nr), cap,
                             self._events_addr, taddr)
        if got < 0:
            err = ctypes.get_errno()
            if err == _errno.EINTR:
                return done
            raise AioError("io_getevents", err)
        if got:
            pop = self._inflight.pop
            for data, _obj, res, res2 in _EVENT.iter_unpack(self._events_view[:got * 32]):
                op = pop(data)
                op.res = res
                op.res2 = res2
                done.append(op)
        return done

    def cancel(self, op: Op) -> bool:
        """Ask the kernel to cancel an in-flight op.

        True: the cancel started; the completion follows through reap.
        False: the kernel cannot cancel this op (EINVAL: file and block I/O);
        it will complete normally. Other errors raise AioError.
        """
        self._check_live("io_cancel")
        if id(op) not in self._inflight:
            return False
        ev = self._cancel_event
        rc = _sys_cancel(NR_IO_CANCEL, self.id, ctypes.addressof(op.iocb), ctypes.addressof(ev))
        if rc == 0:
            # Older kernels hand the event back here instead of via the ring.
            self._inflight.pop(id(op), None)
            self._pending.append((op, ev.res, ev.res2))
            return True
        err = ctypes.get_errno()
        if err == _errno.EINPROGRESS:
            return True
        if err == _errno.EINVAL or err == _errno.EAGAIN:
            return False
        raise AioError("io_cancel", err)

    def destroy(self) -> list[Op]:
        """io_destroy this context once. Returns the ops still in flight,
        whose completions will never be delivered."""
        if self.destroyed:
            return []
        self.destroyed = True
        try:
            io_destroy(self.id)
        finally:
            if self.eventfd is not None and self._owns_eventfd:
                os.close(self.eventfd)
            self.eventfd = None
        lost = list(self._inflight.values())
        self._inflight.clear()
        return lost

    def drain_eventfd(self) -> int:
        """Read (and reset) the eventfd counter; 0 when nothing is pending."""
        if self.eventfd is None:
            return 0
        try:
            return os.eventfd_read(self.eventfd)
        except BlockingIOError:
            return 0


def system_aio_usage(procfs_root: str | os.PathLike[str] = "/proc") -> tuple[int, int]:
    """(aio-nr, aio-max-nr) from procfs_root/sys/fs."""
    base = Path(procfs_root) / "sys" / "fs"
    return (int((base / "aio-nr").read_text().strip()),
            int((base / "aio-max-nr").read_text().strip()))
