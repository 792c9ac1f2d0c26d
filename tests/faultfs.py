"""pytest fixture ``faultfs``: a FUSE filesystem whose I/O the test controls.

Real kernel AIO (O_DIRECT through :mod:`aiod.aio`) against files that return
data, fail, stall or hang, switched per file while the test runs::

    from tests.faultfs import FaultFS, faultfs, pattern  # noqa: F401

    def test_x(faultfs: FaultFS) -> None:
        fd = os.open(faultfs.path("ok.dat"), os.O_RDONLY | os.O_DIRECT)
        faultfs.set_mode("ok.dat", "delay:0.2")

Files (FILE_SIZE = 1 MiB each, mounted with direct_io so O_DIRECT works):
``ok.dat`` (mode ``ok``), ``eio.dat`` (``eio``), ``slow.dat`` (``delay:0.3``),
``hang.dat`` (``hang``). ``set_mode`` on another name adds a file.

Modes, applied to read, write and fsync (never to open/flush/close, so a
close() cannot hang):

- ``ok``            reads return :func:`pattern` bytes; writes are accepted
                    and dropped (reads always return the pattern)
- ``eio``           fail with EIO; ``errno:<N or NAME>`` with any errno
- ``delay:<secs>``  answer as ``ok`` after the delay (requests run in parallel)
- ``hang``          never answer, until :meth:`FaultFS.release` (answers them
                    now) or :meth:`FaultFS.abort` (the kernel fails them with
                    ENOTCONN and the mount is dead from then on)

A request keeps the behaviour it started with: changing a file's mode does
not touch requests already held by the server.

The server runs in its own process (``python tests/faultfs.py --serve``),
multi-threaded, so a hung request holds one server thread and nothing else:
the control channel (the server's stdin/stdout) keeps answering. It also
watches the test process: when that is exiting (or gone) it answers every
held request with EIO, unmounts and exits, so a hung request can never keep
the test process from exiting, even when teardown never ran (SIGKILL).

``mount_faultfs(directory, max_threads=1)`` serves one request at a time
instead (a slow or hung request then stalls the whole "device", like a dead
disk; the control channel still answers). Use it in a fixture of your own for
that behaviour or for another scope.

Teardown, always: abort the connection if the server holds or the kernel
queues any request, tell the server to answer what it holds and exit,
unmount, stop the server by pid if still there (SIGTERM, then SIGKILL) and
check that the mount is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_SIZE = 1 << 20
DEFAULT_DELAY = 0.3
FILES: dict[str, str] = {
    "ok.dat": "ok",
    "eio.dat": "eio",
    "slow.dat": f"delay:{DEFAULT_DELAY}",
    "hang.dat": "hang",
}
FUSECTL = Path("/sys/fs/fuse/connections")
_SKIP_EXIT = 77  # the server could not load mfusepy/libfuse: the fixture skips
_MNT_DETACH = 2
_PF_EXITING = 0x4


def _make_pattern(size: int) -> bytes:
    """Every 512-byte block starts with its own offset (8 bytes, big-endian),
    then filler bytes (i % 251): a read at the wrong offset cannot pass."""
    block = bytearray(i % 251 for i in range(512))
    out = bytearray()
    for off in range(0, size, 512):
        block[:8] = off.to_bytes(8, "big")
        out += block
    return bytes(out[:size])


_PATTERN = _make_pattern(FILE_SIZE)


def pattern(offset: int, size: int) -> bytes:
    """The bytes an ``ok`` file holds at [offset, offset+size), cut at FILE_SIZE."""
    return _PATTERN[offset:offset + size]


def parse_mode(mode: str) -> tuple[str, float]:
    """('ok'|'errno'|'delay'|'hang', argument); raises ValueError for a bad mode."""
    if mode in ("ok", "hang"):
        return mode, 0.0
    if mode == "eio":
        return "errno", float(errno.EIO)
    kind, sep, arg = mode.partition(":")
    if sep and kind == "delay":
        secs = float(arg)
        if not secs >= 0:
            raise ValueError(f"bad delay in mode {mode!r}")
        return "delay", secs
    if sep and kind == "errno":
        num = int(arg) if arg.isdigit() else getattr(errno, arg.upper(), None)
        if not isinstance(num, int) or num <= 0:
            raise ValueError(f"unknown errno in mode {mode!r}")
        return "errno", float(num)
    raise ValueError(f"unknown mode {mode!r} (ok, eio, errno:<N>, delay:<secs>, hang)")


def _umount_lazy(path: str) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.umount2(os.fsencode(path), _MNT_DETACH) == 0


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == target:
                return True
    return False


# =============================================================================
# The server (runs in its own process)
# =============================================================================
class _Held:
    __slots__ = ("event", "name", "outcome")

    def __init__(self, name: str) -> None:
        self.name = name
        self.event = threading.Event()
        self.outcome = "ok"  # what release() says to answer: ok or errno:<N>


class _State:
    """Modes and held requests, shared by the FUSE threads and the control thread."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.modes: dict[str, str] = dict(FILES)
        self.held: set[_Held] = set()
        self.stats: dict[str, dict[str, int]] = {}
        self.closing = False

    def count(self, name: str, what: str) -> None:
        with self.lock:
            per = self.stats.setdefault(name, {"read": 0, "write": 0, "fsync": 0})
            per[what] += 1

    def behave(self, name: str) -> None:
        """Apply name's mode to one request: return to answer ok, raise to fail."""
        from mfusepy import FuseOSError

        with self.lock:
            mode = self.modes.get(name)
            if mode is None:
                raise FuseOSError(errno.ENOENT)
            kind, arg = parse_mode(mode)
            if kind == "ok":
                return
            if kind == "errno":
                raise FuseOSError(int(arg))
            if self.closing:
                raise FuseOSError(errno.EIO)
            held = _Held(name)
            self.held.add(held)
            self.lock.notify_all()
        try:
            held.event.wait(arg if kind == "delay" else None)
        finally:
            with self.lock:
                self.held.discard(held)
                self.lock.notify_all()
        kind, arg = parse_mode(held.outcome)
        if kind == "errno":
            raise FuseOSError(int(arg))

    def release(self, name: str | None, outcome: str) -> int:
        parse_mode(outcome)
        with self.lock:
            n = 0
            for h in self.held:
                if (name is None or h.name == name) and not h.event.is_set():
                    h.outcome = outcome
                    h.event.set()
                    n += 1
            return n

    def pending(self, name: str | None) -> int:
        return sum(1 for h in self.held if name is None or h.name == name)


def _operations(state: _State) -> Any:
    from mfusepy import FuseOSError, Operations

    now = time.time()
    times = {"st_mtime": now, "st_ctime": now, "st_atime": now}

    class FaultOps(Operations):
        use_ns = True  # no utimens here; silences mfusepy's float-time warning

        def init(self, path: str) -> None:
            _send({"ready": True, "pid": os.getpid()})

        def getattr(self, path: str, fh: object = None) -> dict[str, float]:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **times}
            with state.lock:
                known = path[1:] in state.modes
            if not known:
                raise FuseOSError(errno.ENOENT)
            return {"st_mode": stat.S_IFREG | 0o666, "st_nlink": 1, "st_size": FILE_SIZE,
                    "st_blksize": 4096, "st_blocks": FILE_SIZE // 512, **times}

        def readdir(self, path: str, fh: object) -> list[str]:
            with state.lock:
                return [".", "..", *state.modes]

        def open(self, path: str, fi: Any) -> int:
            with state.lock:
                if path[1:] not in state.modes:
                    raise FuseOSError(errno.ENOENT)
            fi.direct_io = 1  # O_DIRECT opens need it; also bypasses the page cache
            return 0

        def read(self, path: str, size: int, offset: int, fh: object) -> bytes:
            state.count(path[1:], "read")
            state.behave(path[1:])
            return pattern(offset, size)

        def write(self, path: str, data: bytes, offset: int, fh: object) -> int:
            state.count(path[1:], "write")
            state.behave(path[1:])
            return len(data)

        def fsync(self, path: str, datasync: int, fh: object) -> int:
            state.count(path[1:], "fsync")
            state.behave(path[1:])
            return 0

        def truncate(self, path: str, length: int, fh: object = None) -> int:
            return 0

        def flush(self, path: str, fh: object) -> int:
            return 0  # never blocks: close() on a hung file must return

        def release(self, path: str, fh: object) -> int:
            return 0

    return FaultOps()


_out_lock = threading.Lock()
_out_fd = 1


def _send(msg: dict[str, Any]) -> None:
    data = (json.dumps(msg) + "\n").encode()
    with _out_lock:
        os.write(_out_fd, data)


def _owner_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    state, flags = fields[0], int(fields[6])
    return state not in ("Z", "X", "x") and not flags & _PF_EXITING


def _give_up(state: _State, mnt: str, code: int) -> None:
    """Answer every held request (EIO), unmount, exit: the owner is gone."""
    with state.lock:
        state.closing = True
    state.release(None, "eio")
    time.sleep(0.05)  # let the FUSE threads write their answers
    _umount_lazy(mnt)
    os._exit(code)


def _control(state: _State, owner: int, mnt: str) -> None:
    """Serve the test's requests, one JSON object per line on stdin."""
    buf = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            _give_up(state, mnt, 0)  # the test process closed the pipe (or died)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req: dict[str, Any] = {}
            try:
                req = json.loads(line)
                reply = _handle(state, req)
                _send({"ok": True, **reply})
            except Exception as e:  # noqa: BLE001 - reported to the test
                _send({"ok": False, "error": f"{type(e).__name__}: {e}"})
            if req.get("op") == "quit":
                os._exit(0)


def _handle(state: _State, req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    name = req.get("name")
    if op == "set_mode":
        parse_mode(req["mode"])
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad file name {name!r}")
        with state.lock:
            state.modes[name] = req["mode"]
        return {}
    if op == "modes":
        with state.lock:
            return {"modes": dict(state.modes)}
    if op == "release":
        return {"released": state.release(name, req.get("outcome", "ok"))}
    if op == "pending":
        with state.lock:
            return {"pending": state.pending(name)}
    if op == "wait_pending":
        deadline = time.monotonic() + float(req["timeout"])
        with state.lock:
            while state.pending(name) < int(req["n"]):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                state.lock.wait(left)
            return {"pending": state.pending(name)}
    if op == "stats":
        with state.lock:
            return {"stats": {k: dict(v) for k, v in state.stats.items()}}
    if op == "quit":
        with state.lock:
            state.closing = True
        return {"released": state.release(None, "eio")}
    raise ValueError(f"unknown op {op!r}")


def _watch_owner(state: _State, owner: int, mnt: str) -> None:
    while _owner_alive(owner):
        time.sleep(0.1)
    _give_up(state, mnt, 0)


def serve(mnt: str, owner: int, max_threads: int) -> None:
    global _out_fd
    # stdout is the control channel: keep it for _send and point fd 1 (where
    # libfuse or a stray print would write) at stderr.
    _out_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        import mfusepy
    except (ImportError, OSError) as e:
        _send({"error": f"cannot load mfusepy/libfuse: {e}"})
        os._exit(_SKIP_EXIT)
    state = _State()
    threading.Thread(target=_control, args=(state, owner, mnt), daemon=True).start()
    threading.Thread(target=_watch_owner, args=(state, owner, mnt), daemon=True).start()
    opts: dict[str, Any] = {"fsname": "faultfs", "subtype": "faultfs",
                            "max_threads": max_threads, "max_idle_threads": max_threads}
    try:
        mfusepy.FUSE(_operations(state), mnt, foreground=True, raw_fi=True, **opts)
    except BaseException as e:  # noqa: BLE001 - tell the test why
        _send({"error": f"FUSE mount failed: {e}"})
        os._exit(1)
    os._exit(0)  # never run Python finalisation with FUSE threads around


# =============================================================================
# The test side
# =============================================================================
class FaultFSError(RuntimeError):
    pass


class FaultFS:
    """A mounted fault-injection filesystem and its server process."""

    def __init__(self, mountpoint: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.mountpoint = mountpoint
        self.proc = proc
        self.pid = proc.pid
        self.log = log
        self.aborted = False
        self.closed = False
        self._lock = threading.Lock()
        self._buf = b""
        self.connection: Path | None = None

    # -- control channel
    def _recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise FaultFSError(f"faultfs server (pid {self.pid}) did not answer "
                                   f"within {timeout:g}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise FaultFSError(f"faultfs server (pid {self.pid}) exited: "
                                   f"{self.server_log()[-500:]}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _call(self, op: str, _timeout: float = 5.0, **args: Any) -> dict[str, Any]:
        with self._lock:
            if self.closed:
                raise FaultFSError(f"faultfs at {self.mountpoint} is closed")
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:
                raise FaultFSError(f"faultfs server (pid {self.pid}) is gone: {e}") from e
            reply = self._recv(_timeout)
        if not reply.get("ok"):
            raise FaultFSError(reply.get("error", str(reply)))
        return reply

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    # -- the API
    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def set_mode(self, name: str, mode: str) -> None:
        """Set name's mode (ok, eio, errno:<N|NAME>, delay:<secs>, hang); a new
        name adds a FILE_SIZE file. Requests already held keep their behaviour."""
        parse_mode(mode)
        self._call("set_mode", name=name, mode=mode)

    def modes(self) -> dict[str, str]:
        return dict(self._call("modes")["modes"])

    def pending(self, name: str | None = None) -> int:
        """Requests the server holds now (hanging or delayed), of name or all."""
        return int(self._call("pending", name=name)["pending"])

    def wait_pending(self, n: int = 1, name: str | None = None, timeout: float = 5.0) -> None:
        """Wait until the server holds at least n requests (of name): the kernel
        has handed them over. Raises FaultFSError on timeout."""
        got = int(self._call("wait_pending", _timeout=timeout + 5, n=n, name=name,
                             timeout=timeout)["pending"])
        if got < n:
            raise FaultFSError(f"faultfs: {got} request(s) held after {timeout:g}s, wanted {n}")

    def release(self, name: str | None = None, outcome: str = "ok") -> int:
        """Answer the held requests (of name, or all) now, as outcome ('ok':
        data; 'eio' or 'errno:<N>': that error). Returns how many. The file
        keeps its mode: new requests on a hang file hang again."""
        return int(self._call("release", name=name, outcome=outcome)["released"])

    def stats(self) -> dict[str, dict[str, int]]:
        """Requests seen per file: {"ok.dat": {"read": n, "write": n, "fsync": n}}."""
        return dict(self._call("stats")["stats"])

    def kernel_waiting(self) -> int:
        """Requests of this connection not yet answered, as the kernel counts them
        (fusectl 'waiting'); -1 when that cannot be read."""
        if self.connection is None:
            return -1
        try:
            return int((self.connection / "waiting").read_text())
        except (OSError, ValueError):
            return -1

    def abort(self) -> None:
        """Abort the FUSE connection: every pending request (held by the server
        or queued in the kernel) fails with ENOTCONN, and so does all later I/O
        on the mount. The server lets go of its threads. Idempotent."""
        if self.connection is None:
            raise FaultFSError("faultfs: no fusectl connection directory known")
        if not self.aborted:
            _ensure_fusectl()
            (self.connection / "abort").write_text("1")
            self.aborted = True
        with contextlib.suppress(FaultFSError):
            self.release(None, "eio")  # answers go nowhere: the kernel forgot them

    # -- teardown
    def close(self) -> None:
        """Abort if anything is pending, unmount, stop the server. Never raises
        for a server that is already gone; raises if the mount stays."""
        try:
            if not self.aborted and self.proc.poll() is None:
                try:
                    busy = self.pending() > 0 or self.kernel_waiting() != 0
                except FaultFSError:
                    busy = True
                if busy and self.connection is not None:
                    with contextlib.suppress(OSError, FaultFSError):
                        self.abort()
            if self.proc.poll() is None:
                with contextlib.suppress(FaultFSError, OSError):
                    self._call("quit", _timeout=2)
        finally:
            try:
                _unmount(self.mountpoint)
            finally:
                _stop(self.proc)
                self.closed = True
                for f in (self.proc.stdin, self.proc.stdout):
                    with contextlib.suppress(OSError):
                        if f is not None:
                            f.close()
        if _mounted(self.mountpoint):
            raise FaultFSError(f"faultfs: {self.mountpoint} is still mounted after teardown")


def _ensure_fusectl() -> None:
    if not os.path.ismount(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)],
                       check=False, capture_output=True)


def _unmount(mnt: Path) -> None:
    if not _mounted(mnt):
        return
    if _umount_lazy(str(mnt)):
        return
    fm = shutil.which("fusermount3") or shutil.which("fusermount")
    if fm:
        subprocess.run([fm, "-u", "-z", str(mnt)], check=False, capture_output=True)
    if _mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


class FaultFSUnavailable(Exception):
    """This machine cannot run the fixture (not root, no /dev/fuse, no libfuse)."""


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "faultfs needs root (mount, fusectl abort)"
    if not os.path.exists("/dev/fuse"):
        return "faultfs needs /dev/fuse (FUSE kernel support)"
    import importlib.util

    if importlib.util.find_spec("mfusepy") is None:
        return "faultfs needs the mfusepy package (pip install -e '.[test]')"
    return None


@contextlib.contextmanager
def mount_faultfs(directory: Path, *, max_threads: int = 64,
                  timeout: float = 10.0) -> Iterator[FaultFS]:
    """Mount a FaultFS at directory/faultfs for the with-block; always cleaned up.

    Raises FaultFSUnavailable when this machine cannot do it (the fixture
    turns that into a skip), FaultFSError when the mount fails otherwise.
    """
    why = unavailable_reason()
    if why:
        raise FaultFSUnavailable(why)
    mnt = Path(directory) / "faultfs"
    mnt.mkdir(parents=True, exist_ok=True)
    log = Path(directory) / "faultfs-server.log"
    with open(log, "wb") as errf:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", str(mnt), str(os.getpid()),
             str(max_threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf,
            start_new_session=True)  # a ^C to pytest must not kill it before teardown
    fs = FaultFS(mnt, proc, log)
    try:
        try:
            hello = fs._recv(timeout)
        except FaultFSError:
            hello = {"error": fs.server_log().strip()[-500:] or "no answer"}
        if not hello.get("ready"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            msg = hello.get("error") or str(hello)
            if proc.returncode == _SKIP_EXIT:
                raise FaultFSUnavailable(msg)
            raise FaultFSError(f"faultfs: mount at {mnt} failed (server exit "
                               f"{proc.returncode}): {msg}\n{fs.server_log()[-800:]}")
        st = os.stat(mnt)  # answered now, while nothing hangs
        if st.st_dev == os.stat(mnt.parent).st_dev:
            raise FaultFSError(f"faultfs: {mnt} is not a mount point")
        _ensure_fusectl()
        conn = FUSECTL / str(os.minor(st.st_dev))
        if os.major(st.st_dev) != 0 or not conn.is_dir():
            raise FaultFSError(f"faultfs: no fusectl connection {conn} for {mnt}")
        fs.connection = conn
        yield fs
    finally:
        fs.close()


if __name__ != "__main__":  # the server process has no use for pytest
    import pytest

    @pytest.fixture
    def faultfs(tmp_path: Path) -> Iterator[FaultFS]:
        """A fresh FaultFS per test (FILES with their default modes), skipped
        when the machine cannot mount one; always unmounted afterwards."""
        try:
            with mount_faultfs(tmp_path) as fs:
                yield fs
        except FaultFSUnavailable as e:
            pytest.skip(str(e))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--serve":
    serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
