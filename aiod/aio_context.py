"""One kernel AIO context, with the kernel's awkward edges turned into plain results.

Short submits that say nothing about the failing iocb, cancels whose
completion arrives later (or, on older kernels, at once), destroy that must
never run twice: :class:`Context` hides each behind a Python result
(:class:`SubmitResult`, a list of completed ops, a bool) and keeps every
in-flight op referenced so its buffers outlive the kernel's use of them.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Self

from aiod.aio_abi import (
    IOCB_FLAG_RESFD,
    NR_IO_CANCEL,
    NR_IO_GETEVENTS,
    NR_IO_SUBMIT,
    AioError,
    IoEvent,
    Timespec,
    io_destroy,
    io_setup,
    sys_io_cancel,
    sys_io_getevents,
    sys_io_submit,
)
from aiod.aio_ops import Op

# io_event unpacked in bulk: data, obj, res, res2.
_EVENT = struct.Struct("=QQqq")
_addressof = ctypes.addressof


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

    def _arm(self, ops: list[Op]) -> list[ctypes.c_void_p | int | None]:
        """Fill each op's iocb for this context; return the iocbs' addresses.

        One pass (hot path: no per-op ctypes array stores; submit fills the
        pointer array by slices).
        """
        inflight = self._inflight
        efd = self.eventfd
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
        return addrs

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
        addrs = self._arm(ops)
        n = len(ops)
        cap = self.nr_events
        ptrs = self._ptrs
        result = SubmitResult()
        i = 0
        while i < n:
            m = min(n - i, cap)
            ptrs[:m] = addrs[i:i + m]
            got = sys_io_submit(NR_IO_SUBMIT, self.id, m, self._ptrs_addr)
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

    def _timeout_address(self, timeout: float | None) -> int | None:
        """The address of a timespec holding timeout (None: block), rewritten only on change."""
        if timeout is None:
            return None
        if timeout != self._timeout_value:
            t = self._timeout
            if timeout < 0:
                timeout = 0.0
            t.tv_sec = int(timeout)
            t.tv_nsec = int((timeout - int(timeout)) * 1e9)
            self._timeout_value = timeout
        return self._timeout_addr

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
        got = sys_io_getevents(NR_IO_GETEVENTS, self.id, min(cap, min_nr), cap,
                               self._events_addr, self._timeout_address(timeout))
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
        rc = sys_io_cancel(NR_IO_CANCEL, self.id, ctypes.addressof(op.iocb), ctypes.addressof(ev))
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
