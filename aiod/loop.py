"""The I/O loop's wake-ups: when it next has work, what it sleeps on, and reaping.

One turn of the loop submits what is due, sleeps, and reaps. It sleeps in
one select() on every pool's eventfd (the kernel signals it when a
completion lands, and teardown threads when a context is destroyed) and the
signal inbox's wakeup fd, until the earliest deadline: a job's next
submission, a pool's teardown step, the watchdog or status line, and never
longer than MAX_WAIT. Reaping hands each completion to the job on its tag.
"""

from __future__ import annotations

import os
import select

from aiod.registry import Registry
from aiod.signals import SignalInbox

MAX_WAIT = 0.5          # the loop wakes at least this often (watchdog, status, timers)


class Wakeups:
    """See the module docstring. Reads the registry; never changes it."""

    def __init__(self, live: Registry, signals: SignalInbox) -> None:
        self.live = live
        self.signals = signals

    def pump(self, now: float) -> None:
        """Every job submits what is due."""
        for job in list(self.live.jobs.values()):
            job.pump(now)

    def next_deadline(self, now: float, due: float, max_wait: float = MAX_WAIT) -> float:
        """The earliest of due, now + max_wait, and every job's and pool's next wake-up."""
        deadline = min(now + max_wait, due)
        for job in self.live.jobs.values():
            t = job.next_wakeup()
            if t is not None:
                deadline = min(deadline, t)
        for pool in self.live.all_pools():
            t = pool.next_deadline()
            if t is not None:
                deadline = min(deadline, t)
        return deadline

    def wait(self, timeout: float) -> None:
        """Sleep until a completion, a signal or the timeout, whichever is first."""
        fds: list[int] = [p.eventfd for p in self.live.all_pools() if p.eventfd is not None]
        wakeup = self.signals.fileno()
        if wakeup is not None:
            fds.append(wakeup)
        if timeout > 0 and not self.signals:
            select.select(fds, [], [], timeout)
        self.signals.clear_wakeup()

    def reap(self) -> int:
        """Every completion the kernel has, handed to its job; returns how many."""
        n = 0
        for pool in self.live.all_pools():
            if pool.eventfd is not None:
                try:
                    os.eventfd_read(pool.eventfd)  # reset before reaping: no lost wakeup
                except BlockingIOError:
                    pass
            if not pool.busy:
                continue
            n += pool.reap(timeout=0)  # the pool tells each job of its completions
        return n
