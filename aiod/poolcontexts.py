"""A pool's kernel contexts and their way out of service: the base of a Pool.

:class:`PoolContexts` makes the contexts (aiod.poolsetup), keeps them
(aiod.poolmembers) and takes them out of service through a
:class:`~aiod.teardown.Teardown` (shrink, removal, shutdown), which never
blocks and which each reap moves on. :class:`aiod.pool.Pool` adds the I/O on
top: placing, submitting, reaping and accounting.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

from aiod.engine import EngineContext
from aiod.poolmembers import Members
from aiod.poolsetup import ContextSetup, PoolClosed
from aiod.teardown import CANCEL_WAIT, DESTROY_TIMEOUT, Step, Teardown, TeardownCounts


class PoolContexts:
    """A named set of kernel AIO contexts, made, kept and torn down."""

    def __init__(self, name: str, contexts: int, nr_events: int, *,
                 procfs_root: str | os.PathLike[str] = "/proc",
                 use_eventfd: bool = True,
                 setup_retries: int = 3,
                 setup_backoff: float = 0.05,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 wall_clock: Callable[[], float] = time.time,
                 on_setup_failure: Callable[[str, int], None] | None = None,
                 destroy_timeout: float = DESTROY_TIMEOUT,
                 cancel_wait: float = CANCEL_WAIT) -> None:
        if contexts < 0 or nr_events < 1:
            raise ValueError("contexts must be >= 0 and nr_events >= 1")
        self.name = name
        self.nr_events = nr_events
        self._clock = clock
        self._sleep = sleep
        self._setup = ContextSetup(name, nr_events, procfs_root=procfs_root,
                                   retries=setup_retries, backoff=setup_backoff, sleep=sleep,
                                   on_failure=on_setup_failure)
        self._members = Members(name, self._setup, wall_clock=wall_clock)
        self._wake_lock = threading.Lock()  # the eventfd vs destroy threads that signal it
        self._accepting = True
        self.eventfd: int | None = (
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if use_eventfd else None)
        self._teardown = Teardown(self._members, cancel_wait=cancel_wait,
                                  destroy_timeout=destroy_timeout, clock=clock, wake=self._wake)
        try:
            self._members.add(contexts, self.eventfd)
        except BaseException:
            self._close_eventfd()
            raise

    def reap(self, timeout: float | None = 0.0, min_nr: int = 1) -> int:
        """Reap, and move the teardown on (the Pool's)."""
        raise NotImplementedError

    def _teardown_moved(self) -> None:
        """Ops were accounted lost, or given back, by the teardown outside a reap."""

    @property
    def _slots(self) -> list[EngineContext]:
        return self._members.slots

    @property
    def _active(self) -> list[EngineContext]:
        return self._members.active

    # -------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        """Contexts that accept submissions."""
        return len(self._active)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self._slots)

    @property
    def setups(self) -> int:
        return self._setup.setups

    @property
    def setup_failures(self) -> dict[int, int]:
        return self._setup.failures

    @property
    def destroys(self) -> int:
        return self._members.destroys

    @property
    def destroy_failures(self) -> int:
        return self._members.destroy_failures

    def contexts(self) -> list[EngineContext]:
        return list(self._active)

    # --------------------------------------------------------------- teardown
    def retire(self, drain_timeout: float, destroy_timeout: float | None = None) -> None:
        """Take the whole pool out of service: no new submissions, and every
        context drained (up to drain_timeout), cancelled and destroyed by the
        teardown, which each reap moves on. Contexts a shrink was already
        retiring keep going, their deadlines brought in to these."""
        self._accepting = False
        self._teardown.add(self._members.retire_all(), drain_timeout)
        self._teardown.expedite(drain_timeout, destroy_timeout)

    def hurry(self) -> None:
        """End every drain now: cancel and destroy what is left."""
        self._teardown.hurry()

    @property
    def torn_down(self) -> bool:
        """Retired, and every context destroyed or given up on (stuck in io_destroy)."""
        return not self._accepting and not self._slots and not self._teardown.busy

    @property
    def busy(self) -> bool:
        """Something for reap to do: ops in flight, or contexts on their way out."""
        return bool(self.in_flight or self._teardown.size)

    @property
    def retiring(self) -> int:
        """Contexts on their way out and not yet destroyed (stuck ones included)."""
        return self._teardown.size

    @property
    def stuck(self) -> int:
        """Contexts whose io_destroy missed its deadline and has not returned since."""
        return self._teardown.count(Step.STUCK)

    def teardown_step(self, step: Step) -> int:
        """Contexts on this step of their teardown."""
        return self._teardown.count(step)

    @property
    def teardown_counts(self) -> TeardownCounts:
        return self._teardown.counts

    def next_deadline(self) -> float | None:
        """When the teardown has something to do by the clock alone (the loop's wake-up)."""
        return self._teardown.next_deadline()

    def close(self, drain_timeout: float = 0.0, destroy_timeout: float = 30.0) -> TeardownCounts:
        """Retire the pool and wait until it is torn down: for tests and one-shot
        tools, never the daemon's loop. Returns what the teardown did."""
        before = TeardownCounts().plus(self._teardown.counts)
        if self._accepting:
            self.retire(drain_timeout, destroy_timeout)
        while not self.torn_down:
            self.reap(0)
            if self.torn_down:
                break
            wait = 0.05
            deadline = self._teardown.next_deadline()
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - self._clock()))
            if self.eventfd is not None:
                select.select([self.eventfd], [], [], wait)
                try:
                    os.eventfd_read(self.eventfd)
                except (BlockingIOError, OSError):
                    pass
            else:
                self._sleep(min(wait, 0.005))
        self.reap(0)
        self._close_eventfd()
        return self._teardown.counts.minus(before)

    def _wake(self) -> None:
        """From a destroy thread: wake whoever waits on the eventfd."""
        with self._wake_lock:
            if self.eventfd is not None:
                os.eventfd_write(self.eventfd, 1)

    def _close_eventfd(self) -> None:
        with self._wake_lock:
            if self.eventfd is not None:
                os.close(self.eventfd)
                self.eventfd = None

    # ------------------------------------------------------------------ resize
    def resize(self, contexts: int, retire_timeout: float = 10.0) -> None:
        """Grow now, or shrink by retiring the surplus contexts.

        A retiring context takes no new submissions. Its teardown (polled by
        every reap) destroys it once its in-flight ops are done, or, past
        retire_timeout, cancels them and destroys it; io_destroy runs on a
        thread. No op is lost either way, and nothing here blocks.
        """
        if not self._accepting:
            raise PoolClosed(f"pool '{self.name}' is draining; cannot resize")
        if contexts < 0:
            raise ValueError("contexts must be >= 0")
        have = len(self._active)
        if contexts > have:
            self._members.add(contexts - have, self.eventfd)
        elif contexts < have:
            self._teardown.add(self._members.shrink(contexts), retire_timeout)
            if self._teardown.poll():
                self._teardown_moved()

    def live_contexts(self) -> list[tuple[int, int, int]]:
        """(index, kernel id, nr_events) of every context not yet handed to
        io_destroy. Safe from another thread: a copy, taken without the loop."""
        return self._members.live_contexts()
