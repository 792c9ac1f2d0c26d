"""The one teardown path (aiod/teardown.py): drain -> cancel -> destroy, polled, never blocking."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from aiod.pool import Pool
from aiod.teardown import Step
from tests.conftest import live_contexts
from tests.engine_ops import Ops
from tests.faultfs import FaultFS, faultfs  # noqa: F401


def poll_until(pools: list[Pool], done: object, timeout: float = 5.0) -> int:
    """Turn like the daemon's loop: reap every pool until done() holds.
    Returns how many ops the reaps accounted (completed, cancelled or lost)."""
    back = 0
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:  # type: ignore[operator]
        for p in pools:
            back += p.reap(0)
        time.sleep(0.01)
    assert done(), "the teardown did not get there"  # type: ignore[operator]
    return back


def test_contexts_with_nothing_in_flight_do_not_wait_for_the_drain_deadline() -> None:
    before = live_contexts()
    p = Pool("idle", 3, 8)
    p.retire(drain_timeout=60.0)
    poll_until([p], lambda: p.torn_down)
    assert p.teardown_counts.destroyed == 3 and live_contexts() == before
    assert p.snapshot().contexts_by_state()["destroyed"] == 3


def test_a_drain_ends_as_soon_as_the_ops_in_flight_complete(pipe: tuple[int, int]) -> None:
    r, w = pipe
    p = Pool("drain", 2, 8)
    ops = Ops(p, "j", 6)
    ops.poll(r, 6)
    ops.submit()
    p.retire(drain_timeout=60.0)
    p.reap(0)
    assert p.teardown_step(Step.DRAINING) == 2  # they wait for their polls
    os.write(w, b"x")
    done = poll_until([p], lambda: p.torn_down)
    assert done == 6 and ops.free == 6
    assert ops.counts()["completed"] == 6
    c = p.teardown_counts
    assert (c.requested, c.lost, c.destroyed) == (0, 0, 2)


def test_hurry_ends_the_drain_now_and_cancels_what_is_left(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    p = Pool("hurry", 2, 8)
    ops = Ops(p, "j", 5)
    ops.poll(r, 5)
    ops.submit()
    p.retire(drain_timeout=60.0)
    p.reap(0)
    assert not p.torn_down
    p.hurry()
    poll_until([p], lambda: p.torn_down)
    c = p.teardown_counts
    assert (c.requested, c.cancelled, c.uncancellable, c.lost) == (5, 5, 0, 0)
    snap = p.snapshot()
    assert snap.cancelled == 5 and snap.in_flight == 0 and snap.balanced


def test_retire_takes_over_a_shrink_and_brings_its_deadline_in(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    p = Pool("takeover", 2, 8)
    ops = Ops(p, "j", 8)
    ops.poll(r, 8)
    ops.submit()
    p.resize(1, retire_timeout=60.0)
    assert p.retiring == 1 and p.size == 1
    p.retire(drain_timeout=0.0)
    poll_until([p], lambda: p.torn_down)
    assert p.teardown_counts.requested == 8 and p.teardown_counts.destroyed == 2
    assert p.snapshot().cancelled == 8 and p.snapshot().balanced


def test_a_context_stuck_in_io_destroy_is_failed_once_and_never_waited_on(
        faultfs: FaultFS, caplog: pytest.LogCaptureFixture) -> None:
    fd = os.open(faultfs.path("hang.dat"), os.O_RDONLY | os.O_DIRECT)
    before = live_contexts()
    p = Pool("stuck", 1, 8, destroy_timeout=0.5)
    try:
        ops = Ops(p, "j", 1)
        ops.read(fd, 0)
        assert ops.submit() == (1, 0, 0)
        faultfs.wait_pending(1, "hang.dat")
        with caplog.at_level(logging.INFO, logger="aiod.teardown"):
            p.retire(drain_timeout=0.0)
            slowest = 0.0
            end = time.monotonic() + 2.0  # well past the destroy deadline
            while time.monotonic() < end:
                t0 = time.monotonic()
                p.reap(0)
                assert ops.free == 0  # the op is not handed back: the kernel holds it
                slowest = max(slowest, time.monotonic() - t0)
                time.sleep(0.01)
        assert slowest < 0.1, f"a reap waited {slowest:.3f}s on the stuck context"
        assert p.torn_down and p.stuck == 1 and p.retiring == 1
        snap = p.snapshot()
        (rec,) = snap.records
        assert rec.state.value == "failed" and "did not return within 0.5s" in str(rec.last_error)
        assert snap.destroy_failures == 1 and snap.cancelled == 1 and snap.balanced
        assert caplog.text.count("did not return within") == 1  # logged once
    finally:
        faultfs.abort()
    back = poll_until([p], lambda: not p.stuck)
    assert back == 1 and ops.free == 1 and live_contexts() == before
    snap = p.snapshot()
    assert snap.records[0].state.value == "destroyed" and snap.destroys == 1
    assert "io_destroy returned at last" in caplog.text
    try:
        os.close(fd)
    except OSError:
        pass


def test_contexts_of_different_pools_are_destroyed_in_parallel(faultfs: FaultFS) -> None:
    fd = os.open(faultfs.path("hang.dat"), os.O_RDONLY | os.O_DIRECT)
    pools = [Pool(f"par{i}", 1, 8, destroy_timeout=30.0) for i in range(3)]
    try:
        held = [Ops(p, "j", 1) for p in pools]
        for ops in held:
            ops.read(fd, 0)
            ops.submit()
        faultfs.wait_pending(3, "hang.dat")
        for p in pools:
            p.retire(drain_timeout=0.0)
        poll_until(pools, lambda: all(p.teardown_step(Step.DESTROYING) == 1 for p in pools))
        # Each pool's io_destroy is under way at once, none waiting for another's.
        names = {t.name for t in threading.enumerate() if t.name.startswith("io_destroy-par")}
        assert names == {"io_destroy-par0-0", "io_destroy-par1-0", "io_destroy-par2-0"}
    finally:
        faultfs.abort()
    poll_until(pools, lambda: all(p.torn_down and not p.retiring for p in pools))
    assert all(p.snapshot().contexts_by_state()["destroyed"] == 1 for p in pools)
    try:
        os.close(fd)
    except OSError:
        pass



def test_a_poll_after_the_destroy_threads_wake_sees_the_context_destroyed() -> None:
    """The destroy thread wakes the loop and only then exits. A poll in between
    must already see the destroy done; one that asked the thread whether it was
    still alive slept a whole loop turn (SIGTERM-to-exit went from 0.16 s to
    0.67 s in `make bench`)."""
    before = live_contexts()
    p = Pool("wake", 1, 8)
    woke = threading.Event()
    exit_thread = threading.Event()

    def wake_then_linger() -> None:  # the thread outlives its wake, as it may
        woke.set()
        exit_thread.wait(5.0)

    p._teardown._wake = wake_then_linger
    try:
        p.retire(drain_timeout=0.0)
        p.reap(0)  # starts io_destroy on its thread
        assert woke.wait(5.0)
        p.reap(0)
        assert p.torn_down and p.teardown_counts.destroyed == 1
    finally:
        exit_thread.set()
    assert live_contexts() == before
