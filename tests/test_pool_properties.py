"""Property: whatever mix of outcomes, the accounting invariant holds exactly."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiod import aio
from aiod.accounting import Outcome
from aiod.pool import Pool
from tests.conftest import live_contexts

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(1, 8)),
        st.tuples(st.just("misaligned"), st.integers(1, 3)),
        st.tuples(st.just("badfd"), st.integers(1, 3)),
        st.tuples(st.just("poll"), st.integers(1, 6)),
        st.tuples(st.just("wake"), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(1, 4)),
        st.tuples(st.just("resize"), st.integers(1, 4)),
        st.tuples(st.just("reap"), st.just(0)),
    ),
    min_size=1, max_size=25)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=ACTIONS, drain_timeout=st.sampled_from([0.0, 0.05]))
def test_random_mixes_keep_the_invariant(direct_file: tuple[int, Path],
                                         actions: list[tuple[str, int]],
                                         drain_timeout: float) -> None:
    fd, _ = direct_file
    r, w = os.pipe()
    before = live_contexts()
    pool = Pool("prop", 2, 16)
    all_ops: list[aio.Op] = []
    polls: list[aio.Op] = []
    refused: list[aio.Op] = []
    base = aio.aligned_buffer(8192)
    try:
        for kind, n in actions:
            ops: list[aio.Op] = []
            if kind == "read":
                ops = [aio.read(fd, 4096, (i % 64) * 4096) for i in range(n)]
            elif kind == "misaligned":
                ops = [aio.read(fd, base.slice(1, 4096), 0) for _ in range(n)]
            elif kind == "badfd":
                ops = [aio.fsync(100_000 + i) for i in range(n)]
            elif kind == "poll":
                ops = [aio.poll(r) for _ in range(n)]
                polls += ops
            elif kind == "wake":
                os.write(w, b"x")
            elif kind == "cancel":
                pool.cancel_ops([p for p in polls if p.tag is not None and p.tag.outcome is None][:n])
            elif kind == "resize":
                pool.resize(n)
            elif kind == "reap":
                pool.reap(timeout=0.01)
            if ops:
                back = pool.submit(ops, job=kind)
                refused += back
                all_ops += [op for op in ops if op not in back]
            snap = pool.snapshot()
            assert snap.balanced, snap.totals()
        pool.close(drain_timeout=drain_timeout, destroy_timeout=5.0)
    finally:
        os.close(r)
        os.close(w)
    snap = pool.snapshot()
    assert snap.balanced and snap.in_flight == 0
    assert snap.submitted == len(all_ops)
    outcomes = [op.tag.outcome for op in all_ops]
    assert None not in outcomes
    assert snap.completed == outcomes.count(Outcome.COMPLETED)
    assert snap.cancelled == outcomes.count(Outcome.CANCELLED)
    assert snap.failed == outcomes.count(Outcome.FAILED)
    by_stats = sum(s.completed + s.cancelled + s.failed_total for s in snap.stats)
    assert by_stats == snap.submitted
    assert live_contexts() == before
