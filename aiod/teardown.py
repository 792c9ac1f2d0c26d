"""Taking kernel AIO contexts out of service without ever blocking the I/O loop.

Shutdown, a pool's shrink and a pool's removal all end contexts this one way.
Each context goes through three steps, and :meth:`Teardown.poll` moves every
context as far as it can go *now* and returns; the loop polls it every turn:

``draining``
    The context takes no new submissions. Its ops complete and are reaped by
    the pool as usual, until none is in flight or the drain deadline passes.
``cancelling``
    io_cancel for every op still in flight (the engine's ``cancel_all``),
    then up to ``cancel_wait`` for the cancelled ops' completions. POLL ops
    can be cancelled; file and block I/O cannot, and is counted uncancellable.
``destroying``
    The pool stops reaping the context, and io_destroy runs on a thread of
    its own, because the kernel makes it wait for every uncancellable op.
    Once it returns, every op still in flight is accounted cancelled (the
    engine's ``account_lost``): its completion will never be delivered, and
    the op is free for its owner again.

A context whose io_destroy has not returned by its deadline is stuck behind
I/O the kernel will not give up. Its ops in flight are accounted cancelled
then, but kept out of use (``account_lost(keep_alive=True)``): the kernel may
still write into their buffers. Its record becomes ``failed``, it is counted
in the pool's destroy failures, it is logged once, and nothing waits on it
again: its thread finishes whenever the kernel lets it. If that happens, the
record becomes ``destroyed`` after all and the kept ops go back to their
owners.

Contexts are independent of one another: every context of every pool being
torn down is destroyed in parallel with the others.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Protocol

from aiod import aio
from aiod.lifecycle import ContextState, LifecycleRecord

log = logging.getLogger("aiod.teardown")

CANCEL_WAIT = 1.0        # seconds to wait for the completions of cancelled ops
DESTROY_TIMEOUT = 30.0   # seconds io_destroy may take before the context is failed


class Step(str, enum.Enum):
    DRAINING = "draining"
    CANCELLING = "cancelling"
    DESTROYING = "destroying"
    STUCK = "stuck"      # io_destroy missed its deadline; never waited on again
    DONE = "done"


class Member(Protocol):
    """A context being torn down (an aiod.engine.EngineContext)."""

    ctx: aio.Context
    record: LifecycleRecord

    @property
    def in_flight(self) -> int: ...
    def cancel_all(self) -> tuple[int, int]: ...
    def account_lost(self, keep_alive: bool = False) -> int: ...
    def release_kept(self) -> int: ...


class Host(Protocol):
    """What a teardown needs of the pool its contexts belong to (aiod.poolmembers.Members)."""

    name: str

    def detach(self, member: Any) -> None: ...
    def count_destroy(self, ok: bool) -> None: ...
    def retired(self, member: Any) -> None: ...


@dataclass
class TeardownCounts:
    """What a teardown did, cumulative over its life."""

    requested: int = 0       # cancels the kernel accepted (EINPROGRESS)
    cancelled: int = 0       # of those, completed as cancelled before destroy
    uncancellable: int = 0   # cancels the kernel refused: file or block I/O
    lost: int = 0            # in flight at destroy, never seen complete: counted cancelled
    destroyed: int = 0       # io_destroy returned in time
    failed: int = 0          # io_destroy failed or missed its deadline
    late: int = 0            # of the failed, io_destroy returned after its deadline

    def minus(self, other: TeardownCounts) -> TeardownCounts:
        return TeardownCounts(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                                 for f in fields(self)})

    def plus(self, other: TeardownCounts) -> TeardownCounts:
        return TeardownCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                                 for f in fields(self)})


class _Entry:
    __slots__ = (
        "cancel_until",
        "cancelled_before",
        "destroy_until",
        "drain_until",
        "errors",
        "finished",
        "lost",
        "member",
        "requested",
        "step",
        "stuck_since",
        "thread",
    )

    def __init__(self, member: Member, drain_until: float) -> None:
        self.member = member
        self.step = Step.DRAINING
        self.drain_until = drain_until
        self.cancel_until = 0.0
        self.destroy_until = 0.0
        self.requested = 0
        self.cancelled_before = 0
        self.lost = 0
        self.thread: threading.Thread | None = None
        # Set by the destroy thread before it wakes the loop: the thread itself
        # is still alive for a moment after the wake, and a poll that looked at
        # is_alive() then would sleep a whole loop turn on a finished destroy.
        self.finished = threading.Event()
        self.errors: list[BaseException] = []
        self.stuck_since = 0.0


class Teardown:
    """The contexts of one pool on their way out. See the module docstring.

    Driven by the I/O loop only: :meth:`add`, :meth:`poll`, :meth:`expedite`
    and :meth:`hurry` never block. ``wake`` is called from a destroy thread
    when its io_destroy returns, so the loop need not poll to notice.
    """

    def __init__(self, host: Host, *, cancel_wait: float = CANCEL_WAIT,
                 destroy_timeout: float = DESTROY_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 wake: Callable[[], None] = lambda: None) -> None:
        self._host = host
        self.cancel_wait = cancel_wait
        self.destroy_timeout = destroy_timeout
        self._clock = clock
        self._wake = wake
        self._entries: list[_Entry] = []
        self.counts = TeardownCounts()

    # ------------------------------------------------------------- control
    def add(self, members: Iterable[Member], drain_timeout: float) -> None:
        """Start tearing these contexts down: drain for up to drain_timeout seconds."""
        until = self._clock() + drain_timeout
        for m in members:
            if m.record.state is ContextState.ACTIVE:
                m.record.change_state(ContextState.DRAINING)
            self._entries.append(_Entry(m, until))

    def expedite(self, drain_timeout: float, destroy_timeout: float | None = None) -> None:
        """Bring every deadline in to at most these timeouts from now (shutdown
        takes over contexts a shrink or a removal had already started on)."""
        now = self._clock()
        if destroy_timeout is not None:
            self.destroy_timeout = min(self.destroy_timeout, destroy_timeout)
        for e in self._entries:
            e.drain_until = min(e.drain_until, now + drain_timeout)
            if e.step is Step.DESTROYING:
                e.destroy_until = min(e.destroy_until, now + self.destroy_timeout)

    def hurry(self) -> None:
        """End every drain now (a second SIGTERM)."""
        now = self._clock()
        for e in self._entries:
            e.drain_until = min(e.drain_until, now)

    # --------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        """Some context is still on a step the loop must see through."""
        return any(e.step is not Step.STUCK for e in self._entries)

    def count(self, step: Step) -> int:
        return sum(1 for e in self._entries if e.step is step)

    @property
    def size(self) -> int:
        """Contexts on their way out and not yet destroyed (stuck ones included)."""
        return len(self._entries)

    def next_deadline(self) -> float | None:
        """When poll next has something to do by the clock alone."""
        soonest: float | None = None
        for e in self._entries:
            if e.step is Step.DRAINING:
                t = e.drain_until
            elif e.step is Step.CANCELLING:
                t = e.cancel_until
            elif e.step is Step.DESTROYING:
                t = e.destroy_until
            else:
                continue  # stuck: nothing to wait for by the clock
            soonest = t if soonest is None else min(soonest, t)
        return soonest

    # ---------------------------------------------------------------- poll
    def poll(self) -> int:
        """Move every context as far as it can go now. Never blocks. Returns
        how many ops left flight here (lost with a context, counted cancelled)
        or went back to their owners (kept ops, once io_destroy returned)."""
        if not self._entries:
            return 0
        now = self._clock()
        uncancellable = moved = 0
        for e in list(self._entries):
            refused, m = self._advance(e, now)
            uncancellable += refused
            moved += m
        if uncancellable:
            log.warning("pool %s: %d in-flight operations cannot be cancelled by the kernel "
                        "(file or block I/O); they keep their contexts until those are "
                        "destroyed", self._host.name, uncancellable,
                        extra={"AIOD_POOL": self._host.name})
        return moved

    def _advance(self, e: _Entry, now: float) -> tuple[int, int]:
        """One context's steps; returns how many of its ops could not be
        cancelled, and how many were accounted lost or given back."""
        refused = 0
        member = e.member
        if e.step is Step.DRAINING:
            if member.in_flight and now < e.drain_until:
                return 0, 0
            refused = self._cancel(e, now)
        if e.step is Step.CANCELLING:
            waiting = e.requested - (member.record.cancelled - e.cancelled_before)
            if now < e.cancel_until and waiting > 0 and member.in_flight:
                return refused, 0
            self._destroy(e, now)
        if e.step is Step.DESTROYING:
            if not e.finished.is_set():
                if now >= e.destroy_until:
                    return refused, self._stuck(e, now)
                return refused, 0
            return refused, self._destroyed(e)
        if e.step is Step.STUCK and e.finished.is_set():  # a look, never a wait
            return refused, self._destroyed_late(e, now)
        return refused, 0

    def _cancel(self, e: _Entry, now: float) -> int:
        member = e.member
        e.step = Step.CANCELLING
        if not member.in_flight:
            e.cancel_until = now
            return 0
        member.record.change_state(ContextState.CANCELLING)
        e.cancelled_before = member.record.cancelled
        e.requested, refused = member.cancel_all()
        self.counts.requested += e.requested
        self.counts.uncancellable += refused
        e.cancel_until = now + self.cancel_wait if e.requested else now
        return refused

    def _destroy(self, e: _Entry, now: float) -> None:
        self._host.detach(e.member)
        # What is still in flight now never completes to us: io_destroy takes it.
        e.lost = e.member.in_flight
        self.counts.lost += e.lost
        self.counts.cancelled += e.member.record.cancelled - e.cancelled_before
        rec = e.member.record
        e.thread = threading.Thread(target=_destroy_context,
                                    args=(e.member.ctx, e.errors, e.finished, self._wake),
                                    name=f"io_destroy-{self._host.name}-{rec.index}",
                                    daemon=True)
        e.step = Step.DESTROYING
        e.destroy_until = now + self.destroy_timeout
        e.thread.start()

    def _destroyed(self, e: _Entry) -> int:
        rec = e.member.record
        # io_destroy failing leaves the kernel's hold on the buffers unknown: kept.
        lost = e.member.account_lost(keep_alive=bool(e.errors))
        if e.errors:
            why = f"io_destroy failed: {e.errors[0]}"
            rec.change_state(ContextState.FAILED, error=why)
            self.counts.failed += 1
            self._host.count_destroy(False)
            log.error("pool %s: context %d: %s", self._host.name, rec.index, why,
                      extra={"AIOD_POOL": self._host.name, "AIOD_CONTEXT": rec.index})
        else:
            rec.change_state(ContextState.DESTROYED)
            self.counts.destroyed += 1
            self._host.count_destroy(True)
        self._finish(e)
        return lost

    def _stuck(self, e: _Entry, now: float) -> int:
        rec = e.member.record
        lost = e.member.account_lost(keep_alive=True)
        why = (f"io_destroy did not return within {self.destroy_timeout:g}s "
               f"(I/O stuck in the device?)")
        rec.change_state(ContextState.FAILED, error=why)
        self.counts.failed += 1
        self._host.count_destroy(False)
        e.step = Step.STUCK
        e.stuck_since = now
        log.error("pool %s: context %d: %s; it is marked failed and left to the kernel, "
                  "which frees it when the device answers; %d operations in flight on it "
                  "are counted cancelled", self._host.name, rec.index, why, e.lost,
                  extra={"AIOD_POOL": self._host.name, "AIOD_CONTEXT": rec.index})
        return lost

    def _destroyed_late(self, e: _Entry, now: float) -> int:
        rec = e.member.record
        back = 0
        if not e.errors:
            rec.change_state(ContextState.DESTROYED,
                             error=f"io_destroy returned {now - e.stuck_since:.1f}s after "
                                   f"its deadline")
            self.counts.late += 1
            self._host.count_destroy(True)
            log.warning("pool %s: context %d: io_destroy returned at last, %.1fs after its "
                        "deadline; the context is destroyed", self._host.name, rec.index,
                        now - e.stuck_since,
                        extra={"AIOD_POOL": self._host.name, "AIOD_CONTEXT": rec.index})
            back = e.member.release_kept()  # the kernel is done with their buffers
        self._finish(e)
        return back

    def _finish(self, e: _Entry) -> None:
        e.step = Step.DONE
        self._entries.remove(e)
        self._host.retired(e.member)


def _destroy_context(ctx: aio.Context, errors: list[BaseException],
                     finished: threading.Event, wake: Callable[[], None]) -> None:
    try:
        ctx.destroy()
    except BaseException as e:  # noqa: BLE001 - reported by the teardown, never raised in a thread
        errors.append(e)
    finally:
        finished.set()
        wake()
