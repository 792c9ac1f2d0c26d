"""Writing files so that a crash or a full disk leaves the old file or the new, never half.

A state file is written beside its name, synced, renamed into place and its
directory synced; whatever fails on the way, the temporary file is removed.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write text to path so that a reader sees the old file or the new, never half.

    On failure (a full disk, say) the temporary file is removed: nothing is
    left behind but the old file.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        try:
            data = memoryview(text.encode())
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def unlink_quietly(path: Path) -> None:
    """Remove path if it is there; a failure leaves it, and says nothing."""
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_dir(path: Path) -> None:
    """Sync a directory, so a name just linked or renamed in it survives a crash."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
