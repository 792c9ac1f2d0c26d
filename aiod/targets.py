"""The files and devices jobs do I/O on: opening them, and noticing when they change.

Users' data is never touched by default: a target is opened for writing only
when aiod created it (:mod:`aiod.owned` keeps that record) or the job says
``allow_write: true``; a block device or a file someone else made is opened
read-only. A missing target is created and filled (:mod:`aiod.fill`) before it
is opened. While a job runs, :class:`TargetCheck` asks, on a worker, whether
the file at the target's path is still the one it has open.

The names of the owned-files record, the fill and the errors are re-exported
here, where jobs and tests have always imported them from.
"""

from __future__ import annotations

import errno as _errno
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from aiod.durable import write_atomic
from aiod.fill import (
    FILL_CHUNK,
    FILL_SUFFIX,
    FILL_XATTR,
    FillCancelled,
    fill_target,
    partial_path,
    remove_stale_partial,
)
from aiod.owned import OWNED_FILE, TOKEN_XATTR, OwnedFiles
from aiod.target_error import TargetError, from_os_error

__all__ = [
    "FILL_CHUNK",
    "FILL_SUFFIX",
    "FILL_XATTR",
    "NEVER_CREATE_UNDER",
    "OWNED_FILE",
    "TOKEN_XATTR",
    "FillCancelled",
    "OpenTarget",
    "OwnedFiles",
    "TargetCheck",
    "TargetError",
    "fill_target",
    "open_fifo",
    "open_target",
    "partial_path",
    "remove_stale_partial",
    "target_change",
    "target_missing",
    "write_atomic",
]


@dataclass
class OpenTarget:
    path: Path
    fd: int
    size: int
    is_block: bool
    writable: bool
    created: bool
    keep_fd: int = -1  # a FIFO's write end, held open by aiod itself

    def close(self) -> None:
        for name in ("fd", "keep_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                try:
                    os.close(fd)
                except OSError:
                    # Linux frees the descriptor even when close reports an
                    # error (EIO, or ENOTCONN from a dead FUSE/NFS server).
                    pass


# Kernel filesystems: a missing name there is a mistyped device, never a file
# to make (in /dev, as root, it would be a 64 MiB file held in RAM).
NEVER_CREATE_UNDER = (Path("/dev"), Path("/proc"), Path("/sys"))


def _stat_existing(path: Path) -> os.stat_result | None:
    """The target's stat, or None when it is missing and may be created."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        top = next((d for d in NEVER_CREATE_UNDER if path.is_relative_to(d)), None)
        if top is not None:
            raise TargetError("missing", f"{path} does not exist, and aiod creates no files "
                              f"under {top}: is the device name right?", _errno.ENOENT) from None
        if not path.parent.is_dir():
            raise TargetError("missing", f"cannot create {path}: directory {path.parent} "
                              "does not exist", _errno.ENOENT) from None
        return None
    except OSError as e:
        raise from_os_error(e, f"cannot stat {path}") from e


def target_missing(path: Path) -> bool:
    """True when path does not exist and may be created. Raises TargetError."""
    return _stat_existing(path) is None


def open_target(path: Path, *, size: int, block_size: int, direct: bool,
                needs_write: bool, allow_write: bool, owned: OwnedFiles | None,
                filled: bool = False) -> OpenTarget:
    """Open a job's target, creating it first when missing. Raises TargetError.

    Creating blocks for as long as the fill takes: jobs fill in the
    background and pass ``filled=True`` once their fill put the file there.
    """
    created = filled
    existing = _stat_existing(path)
    if existing is not None:
        st = existing
    else:
        fill_target(path, size, owned)
        created = True
        st = os.stat(path)
    is_block = stat.S_ISBLK(st.st_mode)
    if not is_block and not stat.S_ISREG(st.st_mode):
        raise TargetError("not_a_file", f"{path} is neither a regular file nor a block device")
    ours = created or (owned is not None and not is_block and owned.owns(path, st))
    writable = ours or allow_write
    if needs_write and not writable:
        raise TargetError("write_refused",
                          f"refusing to write to {path}: aiod did not create it "
                          "(set allow_write: true on the job to allow it)")
    flags = (os.O_RDWR if needs_write else os.O_RDONLY) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == _errno.EINVAL and direct:
            raise TargetError("direct_unsupported",
                              f"cannot open {path} with O_DIRECT: the filesystem does not "
                              "support it (set direct: false)", e.errno) from e
        raise from_os_error(e, f"cannot open {path}") from e
    real_size = os.lseek(fd, 0, os.SEEK_END) if is_block else st.st_size
    if real_size < block_size:
        os.close(fd)
        raise TargetError("too_small", f"{path} holds {real_size} bytes, less than one "
                          f"block of {block_size}")
    return OpenTarget(path=path, fd=fd, size=real_size, is_block=is_block,
                      writable=writable, created=created)


def target_change(t: OpenTarget) -> str | None:
    """How the file at t.path differs from the one t has open, or None when it is
    the same. Calls stat, which can hang on a dead filesystem: run it on a worker."""
    try:
        st = os.stat(t.path)
    except FileNotFoundError:
        return "was deleted" if not os.path.islink(t.path) else "was replaced by a dangling symlink"
    except OSError:
        return None  # cannot tell (permission, I/O error): keep going, the ops will say
    try:
        fst = os.fstat(t.fd)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
        what = "a symlink to another file" if os.path.islink(t.path) else "another file"
        return f"was replaced by {what}"
    if not t.is_block and st.st_size < t.size:
        return f"shrank from {t.size} to {st.st_size} bytes"
    return None


class TargetCheck:
    """One :func:`target_change` on a worker thread; the loop polls ``done``."""

    def __init__(self, target: OpenTarget, name: str) -> None:
        self.change: str | None = None
        self._done = threading.Event()
        self._target = target
        threading.Thread(target=self._run, name=f"aiod-check-{name}", daemon=True).start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _run(self) -> None:
        try:
            self.change = target_change(self._target)
        finally:
            self._done.set()


def open_fifo(path: Path) -> OpenTarget:
    """Open (creating when missing) a FIFO for a `poll` job.

    aiod opens the read end for the POLLs (IOCB_CMD_POLL on a FIFO opened
    O_RDWR fails with EINVAL) and holds a write end itself, so a writer
    that comes and goes never turns the POLLs into hang-ups: they wait for
    data forever. Such a job measures nothing;
    it holds AIO capacity in use, which is how shutdown and capacity are tested.
    """
    created = False
    existing = _stat_existing(path)
    if existing is not None:
        st = existing
    else:
        try:
            os.mkfifo(path, 0o640)
        except OSError as e:
            raise from_os_error(e, f"cannot create FIFO {path}") from e
        created = True
        st = os.stat(path)
    if not stat.S_ISFIFO(st.st_mode):
        raise TargetError("not_a_fifo", f"{path} is not a FIFO (op: poll needs one)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise from_os_error(e, f"cannot open {path}") from e
    try:
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        os.close(fd)
        raise from_os_error(e, f"cannot open {path}") from e
    return OpenTarget(path=path, fd=fd, size=0, is_block=False, writable=False, created=created,
                      keep_fd=wfd)
