"""Setting up a pool's kernel contexts: the headroom check and io_setup with retries.

fs.aio-max-nr is system-wide: a pool checks there is room for all its
contexts before making any, and io_setup's EAGAIN (another process's burst)
is retried a few times with a growing pause before the pool gives up with a
message that names the sysctl and the value it needs.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import threading
import time
from collections.abc import Callable

from aiod import aio

log = logging.getLogger("aiod.pool")


class PoolError(Exception):
    """A pool could not do what it was asked; the message is for operators."""


class PoolCapacityError(PoolError):
    """The kernel's aio-max-nr leaves too little room for the pool."""

    def __init__(self, message: str, needed_max_nr: int) -> None:
        super().__init__(message)
        self.needed_max_nr = needed_max_nr


class PoolClosed(PoolError):
    """Submit or resize after drain started."""


class ContextSetup:
    """Makes one pool's contexts, and counts setups and their failures (by errno).

    The counters are read by snapshots from other threads under ``lock``.
    """

    def __init__(self, pool: str, nr_events: int, *,
                 procfs_root: str | os.PathLike[str] = "/proc",
                 retries: int = 3, backoff: float = 0.05,
                 sleep: Callable[[float], None] = time.sleep,
                 on_failure: Callable[[str, int], None] | None = None) -> None:
        self.pool = pool
        self.nr_events = nr_events
        self._procfs_root = procfs_root
        self._retries = retries
        self._backoff = backoff
        self._sleep = sleep
        self._on_failure = on_failure
        self.lock = threading.Lock()
        self.setups = 0
        self.failures: dict[int, int] = {}

    def check_headroom(self, count: int) -> None:
        """Raise PoolCapacityError unless count more contexts fit under fs.aio-max-nr."""
        need = count * self.nr_events
        nr, max_nr = aio.system_aio_usage(self._procfs_root)
        if max_nr - nr < need:
            raise PoolCapacityError(
                f"pool '{self.pool}' needs {need} AIO events ({count} contexts x "
                f"{self.nr_events} nr_events) but only {max(max_nr - nr, 0)} are left "
                f"(fs.aio-nr={nr}, fs.aio-max-nr={max_nr}); raise fs.aio-max-nr to at "
                f"least {nr + need}", needed_max_nr=nr + need)

    def make(self, eventfd: int | None) -> aio.Context:
        """io_setup with bounded retries: EAGAIN can be another process's burst."""
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                ctx = aio.Context(self.nr_events, eventfd=eventfd if eventfd is not None else False)
                with self.lock:
                    self.setups += 1
                return ctx
            except aio.AioError as e:
                err = e.errno or 0
                self._failed(err)
                if err != _errno.EAGAIN or attempt == self._retries:
                    raise self._error(e, attempt) from e
                log.warning("pool %s: io_setup(%d) failed with EAGAIN, retrying in %.2fs",
                            self.pool, self.nr_events, delay,
                            extra={"AIOD_POOL": self.pool, "ERRNO": e.errno})
                self._sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _failed(self, err: int) -> None:
        with self.lock:
            self.failures[err] = self.failures.get(err, 0) + 1
        if self._on_failure is not None:
            self._on_failure(self.pool, err)

    def _error(self, e: aio.AioError, attempt: int) -> PoolError:
        if e.errno != _errno.EAGAIN:
            return PoolError(f"pool '{self.pool}': {e}")
        nr, max_nr = aio.system_aio_usage(self._procfs_root)
        return PoolCapacityError(
            f"pool '{self.pool}': the kernel refused io_setup({self.nr_events}) "
            f"with EAGAIN after {attempt + 1} tries (fs.aio-nr={nr}, "
            f"fs.aio-max-nr={max_nr}); raise fs.aio-max-nr to at least "
            f"{nr + self.nr_events}", needed_max_nr=nr + self.nr_events)
