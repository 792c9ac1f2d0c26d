"""Kernel AIO against I/O that fails, stalls and hangs (a FUSE filesystem)."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time

from aiod import aio
from aiod.pool import Outcome, Pool
from tests.conftest import live_contexts
from tests.faults.faultfs import FaultFS, faultfs  # noqa: F401
from tests.faults.faultfs_server import pattern


def odirect(fs: FaultFS, name: str) -> int:
    return os.open(fs.path(name), os.O_RDONLY | os.O_DIRECT)


def test_ok_file_reads_the_expected_bytes(faultfs: FaultFS) -> None:
    fd = odirect(faultfs, "ok.dat")
    try:
        with aio.Context(2) as ctx:
            op = aio.read(fd, 8192, 4096)
            ctx.submit([op])
            (done,) = ctx.reap(1, timeout=5)
            assert done.res == 8192
            assert op.buffers[0].bytes() == pattern(4096, 8192)
    finally:
        os.close(fd)


def test_eio_completes_with_minus_eio(faultfs: FaultFS) -> None:
    fd = odirect(faultfs, "eio.dat")
    try:
        with aio.Context(2) as ctx:
            op = aio.read(fd, 4096, 0)
            ctx.submit([op])
            (done,) = ctx.reap(1, timeout=5)
            assert done.res == -errno.EIO
    finally:
        os.close(fd)


def test_slow_file_completes_after_the_delay(faultfs: FaultFS) -> None:
    fd = odirect(faultfs, "slow.dat")
    try:
        with aio.Context(2) as ctx:
            t0 = time.monotonic()
            ctx.submit([aio.read(fd, 4096, 0)])
            (done,) = ctx.reap(1, timeout=5)
            assert done.res == 4096 and time.monotonic() - t0 >= 0.29
    finally:
        os.close(fd)


def test_hung_read_cannot_be_cancelled_and_abort_releases_it(faultfs: FaultFS) -> None:
    fd = odirect(faultfs, "hang.dat")
    try:
        ctx = aio.Context(2)
        op = aio.read(fd, 4096, 0)
        ctx.submit([op])
        assert ctx.reap(1, timeout=0.5) == []
        assert ctx.cancel(op) is False  # EINVAL: file I/O cannot be cancelled
        faultfs.abort()
        (done,) = ctx.reap(1, timeout=5)
        assert done.res is not None and done.res < 0
        t0 = time.monotonic()
        ctx.destroy()
        assert time.monotonic() - t0 < 2
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN once the mount is aborted
            os.close(fd)


def test_pool_destroy_with_a_hung_device_reports_failure_instead_of_hanging(
        faultfs: FaultFS) -> None:
    fd = odirect(faultfs, "hang.dat")
    before = live_contexts()
    pool = Pool("stuck", 2, 8)
    try:
        ops = [aio.read(fd, 4096, 0) for _ in range(3)]
        assert pool.submit(ops, job="probe") == []
        pool.drain(0.2)
        c = pool.cancel(timeout=0.2)
        assert c.uncancellable == 3 and c.requested == 0
        t0 = time.monotonic()
        rep = pool.destroy(timeout=0.5)
        took = time.monotonic() - t0
        assert took < 3, "destroy must not wait for the stuck device"
        assert len(rep.failed) >= 1 and rep.lost == 3
        assert all("did not return" in str(f["error"]) for f in rep.failed)
        snap = pool.snapshot()
        assert snap.in_flight == 0 and snap.cancelled == 3 and snap.balanced
        assert snap.contexts_by_state()["failed"] == len(rep.failed)
        assert snap.destroy_failures == len(rep.failed)
        assert all(op.tag.outcome is Outcome.CANCELLED for op in ops)
    finally:
        # Release the device: the blocked io_destroy threads then return.
        faultfs.abort()
        deadline = time.monotonic() + 5
        while live_contexts() != before and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.close(fd)
    assert live_contexts() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("io_destroy-stuck")]
