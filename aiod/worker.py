"""One function at a time on a thread, polled by the I/O loop.

What can wait on the kernel, a disk or a big file (a host scan, reading and
parsing the configuration at reload) runs here; the loop starts it, keeps
turning, and picks the result up on a later turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Worker:
    """Runs one function at a time on a daemon thread; the loop starts it and polls.

    A daemon thread, not an executor: a read stuck in the kernel must not
    keep aiod from exiting.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = False
        self._result: object = None
        self._error: BaseException | None = None
        self.started_at = 0.0

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, fn: Callable[[], object], now: float) -> bool:
        if self._thread is not None:
            return False

        def run() -> None:
            try:
                result, error = fn(), None
            except BaseException as e:  # noqa: BLE001 - handed to the loop, never raised in the thread
                result, error = None, e
            with self._lock:
                self._result, self._error, self._done = result, error, True

        self.started_at = now
        self._done = False
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        return True

    def poll(self) -> tuple[bool, object, BaseException | None]:
        """(finished, result, error); a finished job frees the worker."""
        with self._lock:
            if not self._done:
                return False, None, None
            self._thread = None
            self._done = False
            return True, self._result, self._error
