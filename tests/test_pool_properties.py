"""Property: whatever mix of outcomes, the accounting invariant holds exactly."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiod import aio
from aiod.pool import Pool
from tests.conftest import live_contexts
from tests.engine_ops import Ops

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
    sets: list[Ops] = []
    polls: list[Ops] = []
    accepted = 0
    base = aio.aligned_buffer(8192)
    try:
        for kind, n in actions:
            ops: Ops | None = Ops(pool, kind, max(n, 1))
            assert ops is not None
            if kind == "read":
                for i in range(n):
                    ops.read(fd, (i % 64) * 4096)
            elif kind == "misaligned":
                for _ in range(n):
                    ops.read(fd, 0, buffer=base.slice(1, 4096))
            elif kind == "badfd":
                for i in range(n):
                    ops.fsync(100_000 + i)
            elif kind == "poll":
                ops.poll(r, n)
                polls.append(ops)
            else:
                ops = None
                if kind == "wake":
                    os.write(w, b"x")
                elif kind == "cancel":
                    left = n
                    for ps in polls:
                        left -= pool.cancel(ps.set, left)
                elif kind == "resize":
                    pool.resize(n)
                elif kind == "reap":
                    pool.reap(timeout=0.01)
            if ops is not None:
                res = ops.submit()
                assert res.submitted + res.rejected + res.unsubmitted == n
                accepted += res.submitted + res.rejected
                sets.append(ops)
            snap = pool.snapshot()
            assert snap.balanced, snap.totals()
        pool.close(drain_timeout=drain_timeout, destroy_timeout=5.0)
    finally:
        os.close(r)
        os.close(w)
    snap = pool.snapshot()
    assert snap.balanced and snap.in_flight == 0
    assert snap.submitted == accepted
    # Every op accepted left flight once, and came back to its set: none is lost.
    assert all(o.in_flight == 0 and o.free == o.set.size for o in sets)
    # The engine's per-(job, op) books and the lifecycle records, kept apart,
    # agree on every outcome.
    rows = pool.ledger.raw().values()
    assert all(d["in_flight"] == 0 for d in rows)
    assert snap.completed == sum(d["completed"] for d in rows)
    assert snap.cancelled == sum(d["cancelled"] for d in rows)
    assert snap.failed == sum(sum(d["failed"].values()) for d in rows)
    by_stats = sum(s.completed + s.cancelled + s.failed_total for s in snap.stats)
    assert by_stats == snap.submitted
    assert live_contexts() == before
