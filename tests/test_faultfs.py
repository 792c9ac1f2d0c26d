"""Kernel AIO against I/O that fails, stalls and hangs (tests/faultfs.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiod import aio
from aiod.pool import Pool
from tests.conftest import live_contexts
from tests.engine_ops import Ops
from tests.faultfs import (  # noqa: F401
    FILE_SIZE,
    FaultFS,
    FaultFSError,
    faultfs,
    mount_faultfs,
    pattern,
    unavailable_reason,
)

# What an aborted FUSE connection fails pending requests with (6.x: ECONNABORTED).
ABORTED = {-errno.ECONNABORTED, -errno.ENOTCONN, -errno.EIO}


@contextlib.contextmanager
def opened(fs: FaultFS, name: str, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(fs.path(name), flags | os.O_DIRECT)
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN once the mount is aborted
            os.close(fd)


def read_one(ctx: aio.Context, fd: int, size: int = 4096, offset: int = 0) -> aio.Op:
    op = aio.read(fd, size, offset)
    assert ctx.submit([op]).submitted == [op]
    return op


def test_ok_file_reads_the_expected_bytes_and_accepts_writes(faultfs: FaultFS) -> None:
    with opened(faultfs, "ok.dat", os.O_RDWR) as fd, aio.Context(4) as ctx:
        op = read_one(ctx, fd, 65536, 8192)
        (done,) = ctx.reap(1, timeout=5)
        assert done is op and op.res == 65536
        assert op.buffers[0].bytes() == pattern(8192, 65536)
        tail = read_one(ctx, fd, 8192, FILE_SIZE - 4096)  # short read at EOF
        assert ctx.reap(1, timeout=5) == [tail] and tail.res == 4096
        wr = aio.write(fd, b"x" * 4096, 0)
        ctx.submit([wr])
        assert ctx.reap(1, timeout=5) == [wr] and wr.res == 4096
    assert faultfs.stats()["ok.dat"] == {"read": 2, "write": 1, "fsync": 0}


def test_eio_file_completes_with_minus_eio(faultfs: FaultFS) -> None:
    with opened(faultfs, "eio.dat", os.O_RDWR) as fd, aio.Context(4) as ctx:
        rd = read_one(ctx, fd)
        wr = aio.write(fd, b"y" * 4096, 4096)
        ctx.submit([wr])
        done = ctx.reap(2, timeout=5)
        assert sorted(map(id, done)) == sorted(map(id, [rd, wr]))
        assert rd.res == -errno.EIO and wr.res == -errno.EIO


def test_modes_switch_per_file_while_mounted(faultfs: FaultFS) -> None:
    faultfs.set_mode("ok.dat", "eio")
    faultfs.set_mode("extra.dat", "errno:ENOSPC")  # a new file
    assert faultfs.modes()["extra.dat"] == "errno:ENOSPC"
    with opened(faultfs, "ok.dat") as fd, opened(faultfs, "extra.dat", os.O_WRONLY) as fd2, \
            aio.Context(4) as ctx:
        op = read_one(ctx, fd)
        assert ctx.reap(1, timeout=5) == [op] and op.res == -errno.EIO
        wr = aio.write(fd2, b"z" * 4096, 0)
        ctx.submit([wr])
        assert ctx.reap(1, timeout=5) == [wr] and wr.res == -errno.ENOSPC
        faultfs.set_mode("ok.dat", "ok")
        op = read_one(ctx, fd)
        assert ctx.reap(1, timeout=5) == [op] and op.res == 4096
    with pytest.raises(ValueError):
        faultfs.set_mode("ok.dat", "sometimes")


def test_delay_file_completes_after_the_delay(faultfs: FaultFS) -> None:
    with opened(faultfs, "slow.dat") as fd, aio.Context(4) as ctx:  # delay:0.3
        t0 = time.monotonic()
        op = read_one(ctx, fd)
        (done,) = ctx.reap(1, timeout=30)  # completes: waited for, not timed
        took = time.monotonic() - t0
        assert done.res == 4096 and done.buffers[0].bytes() == pattern(0, 4096)
        assert took >= 0.3, took  # and never before the delay
    assert op.res == 4096


def test_hung_read_cannot_be_cancelled_and_abort_releases_it(faultfs: FaultFS) -> None:
    with opened(faultfs, "hang.dat") as fd:
        ctx = aio.Context(2)
        op = read_one(ctx, fd)
        assert ctx.reap(1, timeout=0.5) == []
        assert faultfs.pending("hang.dat") == 1 and faultfs.kernel_waiting() >= 1
        assert ctx.cancel(op) is False  # EINVAL: file I/O cannot be cancelled
        faultfs.abort()
        (done,) = ctx.reap(1, timeout=5)
        assert done is op and op.res in ABORTED
        t0 = time.monotonic()
        ctx.destroy()
        assert time.monotonic() - t0 < 1
        with pytest.raises(OSError) as e:  # the mount is dead from now on
            os.stat(faultfs.path("ok.dat"))
        assert e.value.errno == errno.ENOTCONN


def test_release_answers_hung_requests_and_the_mount_stays_usable(faultfs: FaultFS) -> None:
    with opened(faultfs, "hang.dat") as fd, aio.Context(4) as ctx:
        ops = [read_one(ctx, fd, 4096, 4096 * i) for i in range(3)]
        faultfs.wait_pending(3, "hang.dat")
        assert ctx.reap(1, timeout=0.2) == []
        assert faultfs.release("hang.dat") == 3
        done = ctx.reap(3, timeout=5)
        assert len(done) == 3 and all(op.res == 4096 for op in ops)
        assert ops[2].buffers[0].bytes() == pattern(8192, 4096)
        # The file still hangs; release with an error this time.
        op = read_one(ctx, fd)
        faultfs.wait_pending(1)
        assert faultfs.release(outcome="eio") == 1
        assert ctx.reap(1, timeout=5) == [op] and op.res == -errno.EIO
        assert faultfs.pending() == 0


def test_io_destroy_blocks_on_a_hung_read_until_abort(faultfs: FaultFS) -> None:
    with opened(faultfs, "hang.dat") as fd:
        ctx = aio.Context(2)
        read_one(ctx, fd)
        faultfs.wait_pending(1)
        lost: list[list[aio.Op]] = []
        th = threading.Thread(target=lambda: lost.append(ctx.destroy()), daemon=True)
        th.start()
        th.join(0.5)
        assert th.is_alive(), "io_destroy should wait for the hung read"
        faultfs.abort()
        th.join(60)  # the abort is what releases it: waited for, not timed
        assert not th.is_alive()
        assert len(lost) == 1 and len(lost[0]) == 1  # its event is never delivered


def test_pool_destroy_with_a_hung_device_reports_failure_instead_of_hanging(
        faultfs: FaultFS) -> None:
    with opened(faultfs, "hang.dat") as fd:
        before = live_contexts()
        pool = Pool("stuck", 2, 8)
        ops = Ops(pool, "probe", 3)
        for _ in range(3):
            ops.read(fd, 0)
        try:
            assert ops.submit() == (3, 0, 0)
            faultfs.wait_pending(3, "hang.dat")
            t0 = time.monotonic()
            rep = pool.close(drain_timeout=0.2, destroy_timeout=0.5)
            took = time.monotonic() - t0
            assert took < 3, "destroy must not wait for the stuck device"
            assert rep.uncancellable == 3 and rep.requested == 0 and rep.lost == 3
            assert rep.failed == 2 and pool.stuck == 2  # both contexts hold a hung read
            snap = pool.snapshot()
            assert snap.in_flight == 0 and snap.cancelled == 3 and snap.balanced
            assert snap.contexts_by_state()["failed"] == 2 and snap.destroy_failures == 2
            assert all("did not return" in str(r.last_error) for r in snap.records)
            assert ops.counts()["cancelled"] == 3 and ops.counts()["in_flight"] == 0
            # Their buffers are not handed back while the kernel may still fill them.
            pool.reap(0)
            assert ops.free == 0
        finally:
            # Release the device: the blocked io_destroy threads then return.
            faultfs.abort()
        back = 0
        deadline = time.monotonic() + 5
        while pool.stuck and time.monotonic() < deadline:
            back += pool.reap(0)
            time.sleep(0.02)
        assert live_contexts() == before
        assert not [t for t in threading.enumerate() if t.name.startswith("io_destroy-stuck")]
        # io_destroy returned at last: destroyed after all, and the ops come back.
        snap = pool.snapshot()
        assert snap.contexts_by_state()["destroyed"] == 2 and snap.destroys == 2
        assert snap.destroy_failures == 2 and snap.balanced
        assert back == 3 and ops.free == 3


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_teardown_aborts_unmounts_and_stops_the_server_when_a_test_fails(
        tmp_path: Path) -> None:
    if unavailable_reason():
        pytest.skip(unavailable_reason() or "")
    ctx = aio.Context(2)
    with pytest.raises(RuntimeError, match="test failed"), mount_faultfs(tmp_path) as fs:
        fd = os.open(fs.path("hang.dat"), os.O_RDONLY | os.O_DIRECT)
        op = read_one(ctx, fd)
        fs.wait_pending(1)
        raise RuntimeError("test failed with a hung request")
    assert fs.aborted and op in ctx.reap(1, timeout=5) and op.res in ABORTED
    ctx.destroy()
    with contextlib.suppress(OSError):
        os.close(fd)
    assert not _mounted(fs.mountpoint) and fs.proc.poll() is not None
    with pytest.raises(FaultFSError):
        fs.set_mode("ok.dat", "ok")


CHILD = """
import os, sys, time
from pathlib import Path
from aiod import aio
from tests.faultfs import mount_faultfs
cm = mount_faultfs(Path(sys.argv[1]))
fs = cm.__enter__()   # and no teardown, ever
fd = os.open(fs.path("hang.dat"), os.O_RDONLY | os.O_DIRECT)
ctx = aio.Context(2)
ctx.submit([aio.read(fd, 4096, 0)])
fs.wait_pending(1)
print(fs.pid, flush=True)
os._exit(0)   # the kernel waits for the hung read in exit_aio
"""


def test_a_process_with_hung_io_exits_even_without_teardown(tmp_path: Path) -> None:
    """The server watches its owner: when the owner exits it answers the hung
    requests (so the exit finishes), unmounts and exits itself."""
    if unavailable_reason():
        pytest.skip(unavailable_reason() or "")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 5
    server = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while (not _gone(server) or _mounted(tmp_path / "faultfs")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(server) and not _mounted(tmp_path / "faultfs")
