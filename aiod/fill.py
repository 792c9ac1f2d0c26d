"""Filling a new target with random data: the writer, and its worker thread.

A file aiod creates is filled with real data: after fallocate alone, reads of
unwritten extents never reach the device and a probe would measure nothing.
The fill goes to a hidden partial file beside the target (``.NAME.aiod-fill``,
marked with the ``user.aiod.fill`` attribute), is recorded as aiod's, and is
linked into place only once complete: a fill cut short by a signal, a crash or
a full disk never leaves a short file under the target's name, and the next
start redoes it.

Filling takes as long as writing it (seconds per GiB, minutes on a slow
disk). The loop must keep measuring meanwhile, so :class:`Fill` runs the
fill on its own thread; the loop reads ``done``, ``written`` and ``error``
whenever it likes and never waits for the thread.
"""

from __future__ import annotations

import errno as _errno
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aiod.durable import fsync_dir, unlink_quietly
from aiod.owned import OwnedFiles
from aiod.target_error import TargetError, errno_reason, from_os_error

FILL_XATTR = "user.aiod.fill"
FILL_SUFFIX = ".aiod-fill"
FILL_CHUNK = 1 << 20


class FillCancelled(Exception):
    """A fill stopped because its job was stopped; its partial file is gone."""


def partial_path(path: Path) -> Path:
    """Where a fill of path is written until it is complete."""
    return path.with_name(f".{path.name}{FILL_SUFFIX}")


def _is_our_partial(partial: Path, st: os.stat_result) -> bool:
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        return os.getxattr(partial, FILL_XATTR) == b"1"
    except OSError:
        # No xattrs on this filesystem: the name alone says it is aiod's.
        return st.st_uid == os.geteuid()


def remove_stale_partial(path: Path) -> None:
    """Remove a partial file an interrupted fill left beside path (when it is aiod's)."""
    partial = partial_path(path)
    try:
        st = os.lstat(partial)
    except OSError:
        return
    if _is_our_partial(partial, st):
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass


def _clear_interrupted(path: Path, partial: Path) -> None:
    """Remove the partial file of an interrupted fill; refuse one aiod did not make."""
    try:
        st = os.lstat(partial)
    except FileNotFoundError:
        return
    except OSError as e:
        raise from_os_error(e, f"cannot stat {partial}") from e
    if not _is_our_partial(partial, st):
        raise TargetError("partial_foreign", f"cannot create {path}: {partial} exists and "
                          "aiod did not create it; remove it")
    os.unlink(partial)  # an interrupted fill: redo it from the start


def _write_random(fd: int, size: int, progress: Callable[[int], None] | None = None,
                  cancelled: Callable[[], bool] | None = None) -> None:
    left = size
    while left > 0:
        if cancelled is not None and cancelled():
            raise FillCancelled()
        chunk = os.urandom(min(FILL_CHUNK, left))
        view = memoryview(chunk)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        left -= len(chunk)
        if progress is not None:
            progress(size - left)


def _record_owned(owned: OwnedFiles, path: Path, fd: int) -> None:
    try:
        owned.add(path, os.fstat(fd), fd=fd)
    except OSError as e:
        raise TargetError(errno_reason(e.errno or 0), f"cannot record {path} as aiod's own "
                          f"in {owned.path}: {e.strerror}; not creating it", e.errno) from e


def _link_into_place(partial: Path, path: Path) -> None:
    try:
        os.link(partial, path)  # unlike rename, never replaces a file made meanwhile
    except FileExistsError:
        raise TargetError("exists", f"cannot create {path}: a file appeared there while "
                          "aiod was filling it; left as it is", _errno.EEXIST) from None


def fill_target(path: Path, size: int, owned: OwnedFiles | None, *,
                progress: Callable[[int], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> None:
    """Create path holding size bytes of random data, recorded as aiod's.

    Written to the partial file, then linked to path only when complete and
    synced, so path is either missing or whole. A partial file from an
    interrupted fill is removed and the fill redone. May take minutes on a
    large target: call it from a worker, never from the I/O loop. Raises
    TargetError, or FillCancelled when ``cancelled()`` turns true.
    """
    partial = partial_path(path)
    _clear_interrupted(path, partial)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise from_os_error(e, f"cannot create {partial}") from e
    linked = False
    try:
        try:
            os.setxattr(fd, FILL_XATTR, b"1")
        except OSError:
            pass
        _write_random(fd, size, progress, cancelled)
        os.fsync(fd)
        if owned is not None:
            # Recorded before it appears under its name: a crash between the two
            # leaves a partial file (redone), never an unowned target.
            _record_owned(owned, path, fd)
        _link_into_place(partial, path)
        linked = True
        os.unlink(partial)
        fsync_dir(path.parent)
    except OSError as e:
        if not linked:
            unlink_quietly(partial)
        raise from_os_error(e, f"cannot fill {path} with {size} bytes") from e
    except BaseException:  # TargetError, FillCancelled, a signal's exception
        if not linked:
            unlink_quietly(partial)
        raise
    finally:
        os.close(fd)


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
