"""Pools of real kernel AIO contexts: accounting, shutdown steps, resize."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from aiod import aio
from aiod.lifecycle import ContextState, IllegalTransition, LifecycleRecord
from aiod.pool import Pool, PoolCapacityError, PoolClosed, place
from tests.conftest import live_contexts
from tests.engine_ops import Ops


def fake_procfs(root: Path, nr: int, max_nr: int) -> Path:
    fs = root / "sys" / "fs"
    fs.mkdir(parents=True, exist_ok=True)
    (fs / "aio-nr").write_text(f"{nr}\n")
    (fs / "aio-max-nr").write_text(f"{max_nr}\n")
    return root


def reap_until(pool: Pool, n: int, timeout: float = 5.0) -> int:
    done = 0
    deadline = time.monotonic() + timeout
    while done < n and time.monotonic() < deadline:
        done += pool.reap(timeout=0.05)
    return done


def wait_retired(pool: Pool, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pool.retiring and time.monotonic() < deadline:
        pool.reap(0.05)


def test_a_thousand_create_destroy_cycles_leave_no_context_behind(aio_neighbour: None) -> None:
    # Counted in this process's own mappings: fs.aio-nr is system-wide, and the
    # neighbour (like any other process using AIO) moves it meanwhile.
    for _ in range(1000):
        p = Pool("cycle", 2, 8)
        assert live_contexts() == 2
        p.close()
        assert live_contexts() == 0


def test_pool_above_headroom_fails_with_a_clear_message_and_leaks_nothing() -> None:
    before, max_nr = aio.system_aio_usage()
    with pytest.raises(PoolCapacityError) as ei:
        Pool("huge", 4, max_nr)
    msg = str(ei.value)
    assert "pool 'huge'" in msg and f"{4 * max_nr}" in msg and "fs.aio-max-nr" in msg
    assert ei.value.needed_max_nr >= before + 4 * max_nr
    assert live_contexts() == 0


def test_creation_failing_halfway_destroys_what_it_created(tmp_path: Path) -> None:
    before, max_nr = aio.system_aio_usage()
    # The procfs fixture claims plenty of headroom; the real kernel runs out at
    # the third context, so the pool fails after creating two.
    per = (max_nr - before) // 2 - 1
    procfs = fake_procfs(tmp_path, 0, 10 * max_nr)
    seen: list[int] = []
    with pytest.raises(PoolCapacityError) as ei:
        Pool("half", 3, per, procfs_root=procfs, sleep=lambda s: None,
             on_setup_failure=lambda pool, err: seen.append(err))
    assert "EAGAIN" in str(ei.value)
    assert seen == [errno.EAGAIN] * 4  # the first try and three retries
    assert live_contexts() == 0


def test_drain_with_polls_that_never_complete_hits_deadline_then_cancel_counts_exactly(
        pipe: tuple[int, int]) -> None:
    r, _ = pipe
    before = live_contexts()
    p = Pool("poll", 2, 32)
    ops = Ops(p, "hang", 50)
    ops.poll(r, 50)
    assert ops.submit() == (50, 0, 0)
    t0 = time.monotonic()
    p.retire(drain_timeout=0.2)
    late = Ops(p, "late", 1)
    late.poll(r)
    with pytest.raises(PoolClosed):
        late.submit()
    rep = p.close()
    assert time.monotonic() - t0 >= 0.2  # the drain waited for its deadline
    assert (rep.requested, rep.cancelled, rep.uncancellable, rep.lost) == (50, 50, 0, 0)
    assert rep.destroyed == 2 and rep.failed == 0
    snap = p.snapshot()
    assert snap.totals() == {"submitted": 50, "completed": 0, "cancelled": 50,
                             "failed": 0, "in_flight": 0}
    c = ops.counts()
    assert (c["submitted"], c["cancelled"], c["in_flight"]) == (50, 50, 0)  # every op, cancelled
    assert snap.contexts_by_state()["destroyed"] == 2
    assert live_contexts() == before


def test_drain_with_odirect_reads_that_finish_counts_them_completed(
        direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    p = Pool("reads", 2, 64)
    ops = Ops(p, "r", 100)
    for i in range(100):
        ops.read(fd, (i % 256) * 4096)
    assert ops.submit() == (100, 0, 0)
    rep = p.close(drain_timeout=5.0)
    assert rep.requested == 0 and rep.uncancellable == 0 and rep.lost == 0
    snap = p.snapshot()
    assert snap.totals() == {"submitted": 100, "completed": 100, "cancelled": 0,
                             "failed": 0, "in_flight": 0}
    (st,) = snap.stats
    assert (st.job, st.op, st.completed, st.latency_count) == ("r", "read", 100, 100)
    assert sum(st.buckets) == 100


def test_ops_in_flight_at_destroy_are_counted_cancelled_and_handed_back_after_it(
        pipe: tuple[int, int]) -> None:
    r, _ = pipe
    # No wait for the cancelled polls' completions: io_destroy takes them with it.
    p = Pool("lost", 1, 16, cancel_wait=0.0)
    ops = Ops(p, "j", 5)
    ops.poll(r, 5)
    ops.submit()
    p.retire(drain_timeout=0.0)
    back = 0
    deadline = time.monotonic() + 5
    while not p.torn_down and time.monotonic() < deadline:
        back += p.reap(timeout=0.05)
    back += p.reap(0)
    assert p.torn_down
    rep = p.teardown_counts
    assert rep.lost == 5 and rep.requested == 5 and rep.cancelled == 0 and rep.destroyed == 1
    snap = p.snapshot()
    assert snap.cancelled == 5 and snap.in_flight == 0 and snap.balanced
    # Handed back once io_destroy returned: the kernel is done with their buffers.
    assert back == 5 and ops.free == 5 and ops.in_flight == 0
    assert ops.counts()["cancelled"] == 5


def test_failures_are_classified_with_their_errno(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    p = Pool("errs", 1, 16)
    base = aio.aligned_buffer(8192)
    ops = Ops(p, "e", 3)
    bad_buf = ops.read(fd, 0, buffer=base.slice(1, 4096))
    bad_fd = ops.read(9999, 0)
    good = ops.read(fd, 0)
    assert ops.submit() == (2, 1, 0)
    notes, _ = ops.set.take_notes()
    assert notes == [(bad_fd, "rejected", errno.EBADF)]  # refused by io_submit itself
    reap_until(p, 2)
    notes, _ = ops.set.take_notes()
    assert notes == [(bad_buf, "failed", errno.EINVAL)]  # good completed: no note
    assert good not in [i for i, _, _ in notes] and ops.counts()["completed"] == 1
    p.close()
    snap = p.snapshot()
    (st,) = snap.stats
    assert st.failed == {errno.EBADF: 1, errno.EINVAL: 1} and st.completed == 1
    assert snap.totals() == {"submitted": 3, "completed": 1, "cancelled": 0,
                             "failed": 2, "in_flight": 0}


def test_full_pool_hands_ops_back_instead_of_eagain(pipe: tuple[int, int]) -> None:
    r, w = pipe
    p = Pool("full", 2, 4)
    ops = Ops(p, "j", 11)
    ops.poll(r, 11)
    assert ops.submit() == (8, 0, 3)  # 3 did not fit: they stay free in the OpSet
    assert ops.free == 3 and ops.in_flight == 8
    assert [c.in_flight for c in p.contexts()] == [4, 4]
    os.write(w, b"x")
    assert reap_until(p, 8) == 8
    p.close()
    assert p.snapshot().totals()["submitted"] == 8


def test_submission_goes_to_the_context_with_least_in_flight(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    p = Pool("spread", 3, 16)
    ops = Ops(p, "a", 9)
    ops.poll(r, 9)
    ops.submit(5)
    assert sorted(c.in_flight for c in p.contexts()) == [1, 2, 2]
    ops.submit(4)
    assert [c.in_flight for c in p.contexts()] == [3, 3, 3]
    p.close()


def test_placement_fills_the_least_loaded_first_and_never_past_room() -> None:
    # One op at a time to the least loaded (ties: lowest index), without a step per op.
    assert place([0, 0, 0], [16, 16, 16], 5) == [2, 2, 1]
    assert place([2, 2, 1], [14, 14, 15], 4) == [1, 1, 2]
    assert place([0, 3], [4, 1], 10) == [4, 1]
    assert place([4, 4], [0, 0], 3) == [0, 0]
    assert place([5, 0, 2], [3, 8, 6], 6) == [0, 4, 2]


def test_resize_up_and_down_loses_no_operation(pipe: tuple[int, int]) -> None:
    r, w = pipe
    before = live_contexts()
    p = Pool("rs", 2, 8)
    ops = Ops(p, "j", 32)
    ops.poll(r, 32)
    assert ops.submit(16) == (16, 0, 0)
    p.resize(4)
    assert p.size == 4 and live_contexts() == before + 4
    assert ops.submit(16) == (16, 0, 0)
    p.resize(1)
    assert p.size == 1 and p.retiring == 3
    os.write(w, b"x")  # every poll completes; retiring contexts empty out
    done = reap_until(p, 32)
    assert done == 32 and ops.counts()["completed"] == 32
    wait_retired(p)  # their io_destroy runs on threads
    assert p.retiring == 0
    snap = p.snapshot()
    assert snap.contexts_by_state() == {**{s.value: 0 for s in ContextState},
                                        "active": 1, "destroyed": 3}
    assert snap.completed == 32 and snap.balanced
    p.close()
    assert live_contexts() == before


def test_shrinking_past_the_retire_timeout_cancels_and_counts(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    p = Pool("rs2", 2, 8)
    ops = Ops(p, "j", 4)
    ops.poll(r, 4)
    ops.submit()
    p.resize(1, retire_timeout=0.0)
    wait_retired(p)
    assert p.retiring == 0
    snap = p.snapshot()
    assert snap.cancelled == 2 and snap.in_flight == 2 and snap.balanced
    p.close()
    assert p.snapshot().in_flight == 0


def test_snapshots_from_other_threads_never_break_the_invariant(
        direct_file: tuple[int, Path], pipe: tuple[int, int]) -> None:
    fd, _ = direct_file
    r, w = pipe
    p = Pool("busy", 4, 64)
    stop = threading.Event()
    bad: list[str] = []
    seen = [0]

    def scraper() -> None:
        while not stop.is_set():
            snap = p.snapshot()
            seen[0] += 1
            if not snap.balanced:
                bad.append(str(snap.totals()))
            for rec in snap.records:
                if rec.submitted != rec.completed + rec.cancelled + rec.failed + rec.in_flight:
                    bad.append(f"record {rec.index}: {rec}")
            for st in snap.stats:
                if st.submitted < st.completed + st.cancelled + st.failed_total:
                    bad.append(f"stats {st.job}/{st.op}")

    threads = [threading.Thread(target=scraper) for _ in range(2)]
    for t in threads:
        t.start()
    load = Ops(p, "load", 128)
    for i in range(128):
        load.read(fd, (i % 256) * 4096)
    polls = Ops(p, "poll", 32)
    polls.poll(r, 32)
    polls.submit()
    # Until enough has happened on both sides (not for a fixed time: a loaded
    # machine does less per second), with a deadline only against a hang.
    end = time.monotonic() + 120
    total = 0
    while (total <= 1000 or seen[0] <= 10) and time.monotonic() < end:
        load.submit()  # every read that came back goes out again
        total += p.reap(timeout=0.01)
    stop.set()
    for t in threads:
        t.join()
    p.close(drain_timeout=5.0)  # the reads finish; only the polls are left to cancel
    assert total > 1000 and seen[0] > 10
    assert bad == []
    snap = p.snapshot()
    assert snap.in_flight == 0 and snap.balanced and snap.cancelled == 32


def test_illegal_transitions_raise() -> None:
    rec = LifecycleRecord("p", 0, 1, 1)
    with pytest.raises(IllegalTransition):
        rec.change_state(ContextState.CANCELLING)
    rec.change_state(ContextState.ACTIVE)
    with pytest.raises(IllegalTransition):
        rec.change_state(ContextState.DESTROYED)  # must drain first
    rec.change_state(ContextState.DRAINING)
    rec.change_state(ContextState.DESTROYED)
    assert rec.destroyed_at is not None
    for s in ContextState:
        with pytest.raises(IllegalTransition):
            rec.change_state(s)
    assert rec.snapshot().transitions == 3


def test_snapshot_is_a_copy() -> None:
    rec = LifecycleRecord("p", 0, 1, 1)
    snap = rec.snapshot()
    rec.add_submitted(3)
    assert snap.submitted == 0 and rec.snapshot().in_flight == 3


def test_a_mixed_batch_counts_each_op_under_its_own_series(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    p = Pool("mixed", 1, 16)
    # First and last are reads, the middle one a write: every op counts once
    # under its own (job, op) series.
    ops = Ops(p, "rw", 3)
    ops.read(fd, 0)
    ops.write(fd, b"w" * 4096, 4096)
    ops.read(fd, 8192)
    assert ops.submit() == (3, 0, 0)
    reap_until(p, 3)
    p.close()
    stats = {st.op: st for st in p.snapshot().stats}
    assert (stats["read"].submitted, stats["read"].completed) == (2, 2)
    assert (stats["write"].submitted, stats["write"].completed) == (1, 1)


def test_oldest_in_flight_follows_the_oldest_op_still_in_flight() -> None:
    # Polls on separate pipes, so each can be completed on its own, in any order.
    pipes = [os.pipe() for _ in range(3)]
    p = Pool("oldest", 1, 8)
    try:
        assert p.snapshot().oldest_in_flight_seconds == 0.0
        ops = Ops(p, "j", 3)
        first, second, third = (ops.poll(r)[0] for r, _ in pipes)
        assert ops.submit(1) == (1, 0, 0)  # the last added goes first: the third pipe's
        oldest = third  # op i polls pipes[i]
        time.sleep(0.3)
        t_younger = time.monotonic()
        assert ops.submit(2) == (2, 0, 0)
        assert p.snapshot().oldest_in_flight_seconds >= 0.3
        os.write(pipes[oldest][1], b"x")  # the oldest completes; the younger ones are left
        assert reap_until(p, 1) == 1
        assert [i for i in (first, second, third) if not ops.set.op_info(i)["in_flight"]] == [oldest]
        age = p.snapshot().oldest_in_flight_seconds
        assert 0 < age <= time.monotonic() - t_younger
        # Resubmitted, the op is the youngest now, not the oldest.
        os.read(pipes[oldest][0], 1)
        assert ops.submit(1) == (1, 0, 0)
        assert ops.set.op_info(oldest)["in_flight"]
        assert p.snapshot().oldest_in_flight_seconds <= time.monotonic() - t_younger
    finally:
        p.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_records_of_ended_contexts_stay_bounded_over_many_shrinks_and_fold_into_totals(
        pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"x")  # polls complete at once: every cycle does real I/O
    p = Pool("cycles", 2, 8)
    submitted = 0
    ops = Ops(p, "j", 4)
    ops.poll(r, 4)
    for _ in range(40):
        assert ops.submit() == (4, 0, 0)
        submitted += 4
        reap_until(p, 4)
        p.resize(1)
        wait_retired(p)
        p.resize(2)
    snap = p.snapshot()
    ended = [rec for rec in snap.records if rec.state is ContextState.DESTROYED]
    assert len(snap.records) == 2 + 16 and len(ended) == 16  # the latest 16 in full
    assert snap.folded.contexts == 24 and snap.folded.by_state == {"destroyed": 24}
    assert snap.contexts_by_state()["destroyed"] == 40 and snap.destroys == 40
    assert snap.submitted == submitted == snap.completed and snap.balanced
    p.close()
    final = p.snapshot()
    # A pool's last contexts all stay in its final report.
    assert len(final.records) == 2 + 16
    assert final.contexts_by_state()["destroyed"] == 42 and final.balanced


def test_an_o_direct_set_goes_to_the_kernel_a_few_ops_per_io_submit(
        direct_file: tuple[int, Path], tmp_path: Path) -> None:
    """The kernel holds an io_submit's I/O back from the device until the
    call returns: a load job's O_DIRECT ops go in calls of engine.DIRECT_BATCH,
    as aiod bench's do; buffered ones still go in one call."""
    from aiod import engine
    fd, _ = direct_file
    p = Pool("batched", 1, 64)
    direct = Ops(p, "d", 32)
    for i in range(32):
        direct.read(fd, i * 4096)
    (ctx,) = p.contexts()
    calls = ctx.ring.submit_calls
    assert direct.set.direct and direct.submit() == (32, 0, 0)
    assert ctx.ring.submit_calls - calls == -(-32 // engine.DIRECT_BATCH)
    assert reap_until(p, 32) == 32

    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x" * 65536)
    bfd = os.open(plain, os.O_RDONLY)
    try:
        buffered = Ops(p, "b", 16)
        for i in range(16):
            buffered.read(bfd, i * 4096)
        calls = ctx.ring.submit_calls
        assert not buffered.set.direct and buffered.submit() == (16, 0, 0)
        assert ctx.ring.submit_calls - calls == 1
        assert reap_until(p, 16) == 16
    finally:
        os.close(bfd)
    p.close()
    assert p.snapshot().totals() == {"submitted": 48, "completed": 48, "cancelled": 0,
                                     "failed": 0, "in_flight": 0}


def test_an_op_io_submit_refuses_is_tried_once_per_submit(tmp_path: Path) -> None:
    """A refused op is free again at once; in calls of a few ops it must not be
    picked, and counted failed, again within the same submit."""
    from aiod import engine
    path = tmp_path / "gone.bin"
    path.write_bytes(b"x" * 65536)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    p = Pool("refused", 1, 64)
    ops = Ops(p, "r", 8)
    for i in range(8):
        ops.read(fd, i * 4096)
    os.close(fd)  # every op is refused by io_submit itself (EBADF)
    assert ops.set.direct
    r = ops.submit()
    assert r == (0, engine.DIRECT_BATCH, 0)
    assert ops.counts()["failed"] == {errno.EBADF: engine.DIRECT_BATCH}
    assert ops.free == 8 and ops.in_flight == 0
    p.close()
    snap = p.snapshot()
    assert snap.failed == engine.DIRECT_BATCH and snap.balanced
