"""Target fills on worker threads, polled by the I/O loop.

Filling a new target with random data takes as long as writing it (seconds
per GiB, minutes on a slow disk). The loop must keep measuring meanwhile, so
the fill runs on its own thread; the loop reads ``done``, ``written`` and
``error`` whenever it likes and never waits for the thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from aiod.targets import FillCancelled, OwnedFiles, TargetError, fill_target


class Fill:
    """One fill of one target. ``start`` returns at once; poll ``done``."""

    def __init__(self, path: Path, size: int, owned: OwnedFiles | None, *, name: str,
                 fill: Callable[..., None] = fill_target,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.size = size
        self.written = 0          # bytes so far; written by the worker, read by the loop
        self.error: TargetError | None = None
        self.cancelled = False
        self.started_at = clock()
        self.finished_at: float | None = None
        self._owned = owned
        self._fill = fill
        self._clock = clock
        self._cancel = threading.Event()
        self._done = threading.Event()
        # A daemon thread: a fill stuck in a write on a hung device must not
        # keep the process from exiting.
        self._thread = threading.Thread(target=self._run, name=f"aiod-fill-{name}", daemon=True)

    def start(self) -> Fill:
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the worker to stop; it removes its partial file and ends on its own."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """For tests and tools only: the loop never calls this."""
        return self._done.wait(timeout)

    def _progress(self, n: int) -> None:
        self.written = n

    def _run(self) -> None:
        try:
            self._fill(self.path, self.size, self._owned, progress=self._progress,
                       cancelled=self._cancel.is_set)
        except FillCancelled:
            self.cancelled = True
        except TargetError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - reported to the loop, never lost
            self.error = TargetError("os_error", f"cannot fill {self.path}: {e}")
        finally:
            self.finished_at = self._clock()
            self._done.set()
