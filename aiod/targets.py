"""The files and devices jobs do I/O on, and which of them aiod may write.

Users' data is never touched by default: aiod writes only to files it created
itself, and it remembers which those are in ``owned-targets.json`` in its
state directory: path, device, inode and a random token that is also stored
in the file's ``user.aiod.token`` extended attribute. Inode numbers are reused
at once on ext4, so a file deleted and replaced behind aiod's back would match
on inode alone; it does not carry the token. Anything else, a block device or a
file someone else made, is opened read-only unless the job says
``allow_write: true``.

A file aiod creates is filled with real data: after fallocate alone, reads of
unwritten extents never reach the device and a probe would measure nothing.
The fill goes to a hidden partial file beside the target (``.NAME.aiod-fill``,
marked with the ``user.aiod.fill`` attribute), is recorded as aiod's, and is
linked into place only once complete: a fill cut short by a signal, a crash or
a full disk never leaves a short file under the target's name, and the next
start redoes it.
"""

from __future__ import annotations

import errno as _errno
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("aiod.targets")

OWNED_FILE = "owned-targets.json"
TOKEN_XATTR = "user.aiod.token"
FILL_XATTR = "user.aiod.fill"
FILL_SUFFIX = ".aiod-fill"
FILL_CHUNK = 1 << 20


class TargetError(Exception):
    """A target cannot be used. ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.errno = err


def _reason(err: int) -> str:
    return {_errno.ENOENT: "missing", _errno.EACCES: "permission", _errno.EPERM: "permission",
            _errno.ENOSPC: "no_space", _errno.EDQUOT: "no_space", _errno.EROFS: "read_only",
            _errno.EIO: "io_error"}.get(err, "os_error")


class FillCancelled(Exception):
    """A fill stopped because its job was stopped; its partial file is gone."""


class OwnedFiles:
    """The set of files aiod created, persisted atomically in the state directory.

    Fills record their files from worker threads: ``add`` is serialised.

    A record that cannot be read (truncated, not JSON, the wrong shape, a
    directory) is renamed ``owned-targets.json.corrupt-<time>`` and logged;
    until a new record is complete, a file that carries an aiod token in its
    ``user.aiod.token`` attribute is taken back as aiod's (only aiod writes
    that attribute, and only on files it created), and any other file is
    refused for writing as usual.
    """

    def __init__(self, state_directory: Path) -> None:
        self.path = state_directory / OWNED_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, int, str | None]] = {}
        self._reclaim = False
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self._set_aside(e.strerror or str(e))
            return
        try:
            self._entries = _parse_owned(json.loads(text))
        except RecursionError:
            self._set_aside("nested too deeply")
        except (ValueError, TypeError, OverflowError) as e:  # UnicodeDecodeError is a ValueError
            self._set_aside(str(e).splitlines()[0] if str(e) else type(e).__name__)

    def _set_aside(self, why: str) -> None:
        self._reclaim = True
        aside = self.path.with_name(
            f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.rename(self.path, aside)
            kept = f"kept aside as {aside}"
        except OSError as e:
            kept = f"not kept aside ({e.strerror}; it is left as it is)"
        log.error("%s cannot be read (%s); %s. Files that carry aiod's token are taken back "
                  "as aiod's; writes to any other file are refused", self.path, why, kept)

    def owns(self, path: Path, st: os.stat_result) -> bool:
        entry = self._entries.get(str(path))
        if entry is None or entry[:2] != (st.st_dev, st.st_ino):
            return self._reclaim and self._take_back(path, st)
        token = entry[2]
        if token is None:  # the filesystem could not store the token
            return True
        try:
            return os.getxattr(path, TOKEN_XATTR) == token.encode()
        except OSError:
            return False

    def _take_back(self, path: Path, st: os.stat_result) -> bool:
        """After a lost record: a file carrying an aiod token is aiod's; record it again."""
        try:
            token = os.getxattr(path, TOKEN_XATTR).decode("ascii")
        except (OSError, UnicodeDecodeError):
            return False
        if not _TOKEN_RE.fullmatch(token):
            return False
        try:
            self._record(path, st, token)
        except OSError as e:
            log.warning("cannot record %s as aiod's own again in %s: %s", path, self.path,
                        e.strerror)
        log.info("%s carries aiod's token: taken back as aiod's own", path)
        return True

    def add(self, path: Path, st: os.stat_result, fd: int | None = None) -> None:
        """Record path (dev/ino of st) as aiod's; the token goes on fd when given."""
        token: str | None = secrets.token_hex(16)
        try:
            if fd is not None:
                os.setxattr(fd, TOKEN_XATTR, token.encode())  # type: ignore[union-attr]
            else:
                os.setxattr(path, TOKEN_XATTR, token.encode())  # type: ignore[union-attr]
        except OSError:
            token = None
        self._record(path, st, token)

    def _record(self, path: Path, st: os.stat_result, token: str | None) -> None:
        with self._lock:
            entries = dict(self._entries)
            entries[str(path)] = (st.st_dev, st.st_ino, token)
            doc = {"files": {p: {"dev": d, "ino": i, "token": t}
                             for p, (d, i, t) in entries.items()}}
            write_atomic(self.path, json.dumps(doc, indent=2) + "\n")
            self._entries = entries  # only once it is on disk


_TOKEN_RE = re.compile(r"[0-9a-f]{32}")


def _parse_owned(data: object) -> dict[str, tuple[int, int, str | None]]:
    """The entries of a decoded record; ValueError when it has the wrong shape."""
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError('expected {"files": {...}}')
    out: dict[str, tuple[int, int, str | None]] = {}
    for p, v in data["files"].items():
        if not isinstance(v, dict):
            raise ValueError(f"the entry for {p} is not a mapping")
        dev, ino, token = v.get("dev"), v.get("ino"), v.get("token")
        for name, n in (("dev", dev), ("ino", ino)):
            if type(n) is not int or not 0 <= n < 1 << 64:
                raise ValueError(f"the entry for {p} has a bad {name}")
        if token is not None and not (isinstance(token, str) and _TOKEN_RE.fullmatch(token)):
            raise ValueError(f"the entry for {p} has a bad token")
        out[p] = (dev, ino, token)  # type: ignore[assignment]
    return out


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
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


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
    try:
        st = os.lstat(partial)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise TargetError(_reason(e.errno or 0), f"cannot stat {partial}: {e.strerror}",
                          e.errno) from e
    else:
        if not _is_our_partial(partial, st):
            raise TargetError("partial_foreign", f"cannot create {path}: {partial} exists and "
                              "aiod did not create it; remove it")
        os.unlink(partial)  # an interrupted fill: redo it from the start
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise TargetError(_reason(e.errno or 0), f"cannot create {partial}: {e.strerror}",
                          e.errno) from e
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
            try:
                owned.add(path, os.fstat(fd), fd=fd)
            except OSError as e:
                raise TargetError(_reason(e.errno or 0), f"cannot record {path} as aiod's own "
                                  f"in {owned.path}: {e.strerror}; not creating it",
                                  e.errno) from e
        try:
            os.link(partial, path)  # unlike rename, never replaces a file made meanwhile
        except FileExistsError:
            raise TargetError("exists", f"cannot create {path}: a file appeared there while "
                              "aiod was filling it; left as it is", _errno.EEXIST) from None
        linked = True
        os.unlink(partial)
        _fsync_dir(path.parent)
    except TargetError:
        if not linked:
            _unlink_quietly(partial)
        raise
    except OSError as e:
        if not linked:
            _unlink_quietly(partial)
        raise TargetError(_reason(e.errno or 0),
                          f"cannot fill {path} with {size} bytes: {e.strerror}", e.errno) from e
    except BaseException:
        if not linked:
            _unlink_quietly(partial)
        raise
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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
        raise TargetError(_reason(e.errno or 0), f"cannot stat {path}: {e.strerror}", e.errno) from e


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
        raise TargetError(_reason(e.errno or 0), f"cannot open {path}: {e.strerror}", e.errno) from e
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
            raise TargetError(_reason(e.errno or 0), f"cannot create FIFO {path}: {e.strerror}",
                              e.errno) from e
        created = True
        st = os.stat(path)
    if not stat.S_ISFIFO(st.st_mode):
        raise TargetError("not_a_fifo", f"{path} is not a FIFO (op: poll needs one)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TargetError(_reason(e.errno or 0), f"cannot open {path}: {e.strerror}", e.errno) from e
    try:
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        os.close(fd)
        raise TargetError(_reason(e.errno or 0), f"cannot open {path}: {e.strerror}", e.errno) from e
    return OpenTarget(path=path, fd=fd, size=0, is_block=False, writable=False, created=created,
                      keep_fd=wfd)
