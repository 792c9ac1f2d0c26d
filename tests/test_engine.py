"""The compiled engine (aiod._engine) against a slow, obvious reference model.

Real kernel AIO throughout: reads of a real O_DIRECT file (some past its end:
short), misaligned O_DIRECT reads (EINVAL at completion), reads of a FUSE
file that fails with EIO, fsyncs of a closed fd (refused by io_submit, in the
middle of a batch: a short submit), POLLs of a pipe (woken, or cancelled).
The model predicts every op's outcome from what the op is, and recomputes
every counter and histogram bucket in plain Python from the latencies the
engine reports per op; the engine's C counters must match it exactly.
"""

from __future__ import annotations

import array
import bisect
import errno
import os
import select
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiod import aio
from aiod.accounting import LATENCY_BUCKETS
from aiod.benchresult import hist_index
from aiod.engine import CANCELLED, COMPLETED, FAILED, EngineContext, Ledger, require
from tests.conftest import live_contexts
from tests.daemon_harness import ROOT
from tests.faultfs import FaultFS, faultfs  # noqa: F401

eng = require()
# The AddressSanitizer run below points this at the sanitized build it made.
if os.environ.get("AIOD_EXPECT_ENGINE"):
    assert eng.__file__ == os.environ["AIOD_EXPECT_ENGINE"], eng.__file__
BOUNDS_NS = [round(b * 1e9) for b in LATENCY_BUCKETS]
BS = 4096
FILE_SIZE = 1 << 20
KINDS = ("read", "misaligned", "eio", "badfd", "poll")
EXAMPLES = int(os.environ.get("AIOD_ENGINE_EXAMPLES", "40"))


class Model:
    """What every counter must be, computed the slow, obvious way."""

    def __init__(self, ledger: Ledger) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.ledger = ledger

    def row(self, kind: str) -> dict[str, Any]:
        return self.rows.setdefault(kind, {
            "submitted": 0, "completed": 0, "cancelled": 0, "failed": {}, "short": 0,
            "in_flight": 0, "bytes": 0, "buckets": [0] * (len(BOUNDS_NS) + 1),
            "latency_sum_ns": 0, "latency_count": 0})

    def submitted(self, kind: str) -> None:
        r = self.row(kind)
        r["submitted"] += 1
        r["in_flight"] += 1

    def rejected(self, kind: str, err: int) -> None:
        r = self.row(kind)
        r["submitted"] += 1
        r["failed"][err] = r["failed"].get(err, 0) + 1

    def finished(self, kind: str, outcome: int, res: int, lat: int, nbytes: int) -> None:
        r = self.row(kind)
        r["in_flight"] -= 1
        if outcome == CANCELLED:
            r["cancelled"] += 1
            return
        r["buckets"][bisect.bisect_left(BOUNDS_NS, lat)] += 1
        r["latency_sum_ns"] += lat
        r["latency_count"] += 1
        if res < 0:
            r["failed"][-res] = r["failed"].get(-res, 0) + 1
        else:
            r["completed"] += 1
            r["bytes"] += res
            if kind in ("read", "misaligned", "eio") and res < nbytes:
                r["short"] += 1

    def lost(self, kind: str) -> None:
        r = self.row(kind)
        r["in_flight"] -= 1
        r["cancelled"] += 1

    def check(self) -> None:
        got = self.ledger.raw()
        for kind, want in self.rows.items():
            have = dict(got[("prop", kind)])
            have.pop("last_completion")
            have["buckets"] = list(have["buckets"])
            assert have == want, (kind, have, want)
            assert have["submitted"] == (have["completed"] + have["cancelled"]
                                         + sum(have["failed"].values()) + have["in_flight"])


class Rig:
    """One OpSet holding every kind of op, on two kernel contexts."""

    def __init__(self, good_fd: int, eio_fd: int, pipe_r: int, per_kind: int = 6,
                 kinds: tuple[str, ...] = KINDS) -> None:
        self.ledger = Ledger()
        self.model = Model(self.ledger)
        self.rows = {k: self.ledger.row("prop", k) for k in kinds}
        self.bufs = aio.aligned_buffers(per_kind * 3, BS)
        self.mis = aio.aligned_buffer(2 * BS)
        self.set = eng.OpSet(self.ledger.acct, per_kind * len(kinds))
        self.kind_of: dict[int, str] = {}
        bad_fd = os.open("/dev/null", os.O_RDONLY)
        os.close(bad_fd)  # a closed fd: io_submit refuses it with EBADF
        b = iter(self.bufs)
        for kind in kinds:
            for _ in range(per_kind):
                if kind == "read":
                    buf = next(b)
                    i = self.set.add(aio.IOCB_CMD_PREAD, good_fd, buf.address, BS, self.rows[kind], owner=buf)
                elif kind == "misaligned":
                    i = self.set.add(aio.IOCB_CMD_PREAD, good_fd, self.mis.address + 1, BS,
                                     self.rows[kind], owner=self.mis)
                elif kind == "eio":
                    buf = next(b)
                    i = self.set.add(aio.IOCB_CMD_PREAD, eio_fd, buf.address, BS, self.rows[kind], owner=buf)
                elif kind == "badfd":
                    i = self.set.add(aio.IOCB_CMD_FSYNC, bad_fd, 0, 0, self.rows[kind])
                else:
                    i = self.set.add(aio.IOCB_CMD_POLL, pipe_r, select.POLLIN, 0, self.rows[kind])
                self.kind_of[i] = kind
        self.free = set(self.kind_of)
        self.where: dict[int, int] = {}    # op index -> context it is in flight on
        self.cancelled: set[int] = set()
        self.ctxs = [EngineContext("prop", n, 16) for n in range(2)]

    def submit(self, c: int, picks: list[tuple[str, int]]) -> None:
        idx: list[int] = []
        offs = array.array("q")
        for kind, block in picks:
            cand = sorted(i for i in self.free if self.kind_of.get(i) == kind and i not in idx)
            if not cand:
                continue
            idx.append(cand[0])
            offs.append(block * BS)  # blocks past FILE_SIZE read short (0 bytes)
        if not idx:
            return
        ok, rejected, unsubmitted, err = self.ctxs[c].submit(self.set, len(idx), offs, indices=idx)
        bad = [i for i in idx if self.kind_of[i] == "badfd"]
        assert (ok, rejected, unsubmitted) == (len(idx) - len(bad), len(bad), 0)
        if bad:
            assert err == errno.EBADF
        for i in idx:
            if self.kind_of[i] == "badfd":
                self.model.rejected("badfd", errno.EBADF)
            else:
                self.model.submitted(self.kind_of[i])
                self.free.discard(i)
                self.where[i] = c
        notes, dropped = self.set.take_notes()
        assert dropped == 0
        assert sorted(i for i, k, v in notes if k == "rejected" and v == errno.EBADF) == sorted(bad)

    def reap(self, c: int, min_nr: int = 0, timeout: float = 0.0) -> int:
        ec = self.ctxs[c]
        completed, cancelled, failed, _err, detail = ec.ring.reap(min_nr, timeout, detail=True)
        ec.record.add_outcomes(completed, cancelled, failed)
        self.finished(c, detail)
        self.set.take_notes()
        return len(detail)

    def cycle(self, c: int, batch: int | None) -> None:
        """One Ring.cycle: reap what is there, then try every free op, batch per io_submit."""
        ec = self.ctxs[c]
        calls = ec.ring.submit_calls
        (completed, cancelled, failed, _rerr, ok, rejected, unsubmitted, err,
         detail) = ec.ring.cycle(self.set, 0, 0.0, batch, detail=True)
        ec.record.add_outcomes(completed, cancelled, failed)
        if ok:
            ec.record.add_submitted(ok)
        if rejected:
            ec.record.add_rejected(rejected, "io_submit refused it")
        self.finished(c, detail)
        tried = set(self.free)
        went = sorted(i for i in tried if self.set.op_info(i)["in_flight"])
        notes, dropped = self.set.take_notes()
        assert dropped == 0
        refused = [i for i, k, v in notes if k == "rejected"]
        # A refused op is held aside: tried once per cycle, however small the batches.
        assert len(refused) == len(set(refused)) == rejected
        assert all(self.kind_of[i] == "badfd" for i in refused) and (not refused or err == errno.EBADF)
        assert len(went) == ok
        if not unsubmitted:  # nothing handed back (EAGAIN): every free op was tried
            assert set(went) | set(refused) == tried
            per_call = batch if batch is not None else (eng.DIRECT_BATCH if self.set.direct else 0)
            assert ec.ring.submit_calls - calls >= (-(-len(tried) // per_call) if per_call else bool(tried))
        for _ in refused:
            self.model.rejected("badfd", errno.EBADF)
        for i in went:
            self.model.submitted(self.kind_of[i])
            self.free.discard(i)
            self.where[i] = c

    def rounds(self, c: int, batch: int | None, rounds: int, min_nr: int, until: str) -> None:
        """Ring.cycle with several rounds in one call, through EngineContext's
        record update. Which op went how often follows from what was reaped
        and what is in flight at the end: an op reaped while the model has it
        free went in during this call, and so did each one in flight now that
        the model has free."""
        ec = self.ctxs[c]
        until_ns = {"none": None, "past": time.monotonic_ns() - 1,
                    "soon": time.monotonic_ns() + 5_000_000}[until]
        rounds_before = ec.ring.cycle_rounds
        (completed, cancelled, failed, rerr, ok, rejected, _unsubmitted, err,
         detail) = ec.ring.cycle(self.set, min_nr, 0.01, batch, True, rounds, until_ns)
        ran = ec.ring.cycle_rounds - rounds_before
        ec.record.add_cycle(ok, rejected, completed, cancelled, failed,
                            "io_submit refused it" if rejected else None)
        assert ran >= 1 and (rounds == 0 or ran <= rounds)
        if until == "past" or not detail:
            assert ran == 1  # a deadline gone, or a round that reaped nothing, ends the call
        assert (completed, cancelled, failed) == tuple(
            sum(1 for d in detail if d[2] == k) for k in (COMPLETED, CANCELLED, FAILED))
        went = 0
        for d in detail:
            i = d[1]
            if i not in self.where:  # submitted in an earlier round of this call
                assert i in self.free and self.kind_of[i] != "badfd"
                self.model.submitted(self.kind_of[i])
                self.free.discard(i)
                self.where[i] = c
                went += 1
            self.finished(c, [d])
        for i in sorted(self.free):
            if self.set.op_info(i)["in_flight"]:
                self.model.submitted(self.kind_of[i])
                self.free.discard(i)
                self.where[i] = c
                went += 1
        assert went == ok
        notes, dropped = self.set.take_notes()
        assert dropped == 0
        refused = [i for i, k, v in notes if k == "rejected"]
        assert len(refused) == rejected and all(self.kind_of[i] == "badfd" for i in refused)
        assert not refused or err == errno.EBADF
        assert not failed or rerr in (errno.EINVAL, errno.EIO)
        for _ in refused:
            self.model.rejected("badfd", errno.EBADF)

    def finished(self, c: int, detail: list[Any]) -> None:
        """Check each reaped op against what it is, and give it to the model."""
        for opset, i, outcome, res, lat in detail:
            assert opset is self.set and self.where.pop(i) == c
            kind = self.kind_of[i]
            info = self.set.op_info(i)
            # The prediction from what the op is:
            if i in self.cancelled:
                want = CANCELLED
            elif kind == "read":
                want = COMPLETED
                assert res == (BS if info["offset"] + BS <= FILE_SIZE else 0)
            elif kind == "misaligned" and info["offset"] >= FILE_SIZE:
                want = COMPLETED  # at or past the end: 0 bytes, before any alignment check
                assert res == 0
            elif kind == "misaligned":
                want = FAILED
                assert res == -errno.EINVAL
            elif kind == "eio" and info["offset"] >= FILE_SIZE:
                want = COMPLETED  # past the end: 0 bytes, never asked of the server
                assert res == 0
            elif kind == "eio":
                want = FAILED
                assert res == -errno.EIO
            else:
                want = COMPLETED
                assert res & select.POLLIN
            assert outcome == want, (kind, outcome, res)
            assert lat > 0
            self.model.finished(kind, outcome, res, lat, BS)
            self.cancelled.discard(i)
            self.free.add(i)

    def cancel_polls(self, n: int) -> None:
        for i in sorted(self.where):
            if n == 0:
                break
            if self.kind_of[i] == "poll" and i not in self.cancelled:
                n -= 1
                if self.ctxs[self.where[i]].ring.cancel(self.set, i):
                    self.cancelled.add(i)

    def close(self, pipe_w: int) -> None:
        self.cancel_polls(len(self.kind_of))
        for ec in self.ctxs:
            requested, _ = ec.cancel(0.0)
            assert requested == 0  # every POLL was asked already; reads cannot be cancelled
        os.write(pipe_w, b"x")
        deadline = time.monotonic() + 10
        while self.where and time.monotonic() < deadline:
            for c in range(len(self.ctxs)):
                self.reap(c, 0, 0.0)
            time.sleep(0.001)
        for c, ec in enumerate(self.ctxs):
            left = [i for i, cc in self.where.items() if cc == c]
            assert ec.destroy(5.0) == len(left)
            for i in left:
                self.model.lost(self.kind_of[i])
                del self.where[i]
        assert self.set.in_flight == 0


def _drain_pipe(r: int) -> None:
    while select.select([r], [], [], 0)[0]:
        os.read(r, 4096)


# Ring.cycle with several rounds: (batch, rounds, min_nr, deadline); rounds 0
# runs until the deadline. Waiting for a completion (min_nr 1) and no
# deadline yet are likelier, so that calls do run more than one round.
ROUNDS = st.tuples(
    st.just("rounds"), st.integers(0, 1),
    st.one_of(st.tuples(st.sampled_from([None, 0, 1, 2]), st.sampled_from([2, 3, 8]),
                        st.sampled_from([0, 1, 1]), st.sampled_from(["none", "none", "soon", "past"])),
              st.tuples(st.sampled_from([None, 1]), st.just(0), st.sampled_from([0, 1, 1]),
                        st.sampled_from(["soon", "soon", "past"]))))

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 1),
                  st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 2 * FILE_SIZE // BS - 1)),
                           min_size=1, max_size=8)),
        st.tuples(st.just("reap"), st.integers(0, 1), st.just([])),
        st.tuples(st.just("cycle"), st.integers(0, 1), st.sampled_from([None, 0, 1, 2, 3])),
        *[ROUNDS] * 2,  # twice the weight: calls of several rounds are the newer path
        st.tuples(st.just("wait"), st.integers(0, 1), st.just([])),
        st.tuples(st.just("wake"), st.just(0), st.just([])),
        st.tuples(st.just("quiet"), st.just(0), st.just([])),
        st.tuples(st.just("cancel"), st.integers(1, 4), st.just([])),
        st.tuples(st.just("check"), st.just(0), st.just([])),
    ),
    min_size=1, max_size=30)


@pytest.fixture
def files(tmp_path: Path, faultfs: FaultFS) -> Any:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(FILE_SIZE))
    try:
        good = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:  # pragma: no cover - depends on the test filesystem
        pytest.skip(f"O_DIRECT not supported under {tmp_path}: {e}")
    bad = os.open(faultfs.path("eio.dat"), os.O_RDONLY | os.O_DIRECT)
    r, w = os.pipe()
    try:
        yield good, bad, r, w
    finally:
        for fd in (good, bad, r, w):
            os.close(fd)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(actions=ACTIONS, left_out=st.sets(st.sampled_from(["misaligned", "eio", "badfd"])))
def test_compiled_accounting_matches_the_reference_model(files: Any, actions: list[Any],
                                                         left_out: set[str]) -> None:
    """Some examples leave out the kinds of op that fail or are refused: either
    ends a call of several rounds, so without them such calls run more rounds."""
    good, bad, r, w = files
    _drain_pipe(r)
    before = live_contexts()
    rig = Rig(good, bad, r, kinds=tuple(k for k in KINDS if k not in left_out))
    try:
        for what, n, picks in actions:
            if what == "submit":
                rig.submit(n, picks)
            elif what == "reap":
                rig.reap(n)
            elif what == "cycle":
                rig.cycle(n, picks)
            elif what == "rounds":
                rig.rounds(n, *picks)
            elif what == "wait" and rig.ctxs[n].in_flight:
                rig.reap(n, 1, 0.01)
            elif what == "wake":
                os.write(w, b"x")
            elif what == "quiet":
                _drain_pipe(r)
            elif what == "cancel":
                rig.cancel_polls(n)
            rig.model.check()
            for ec in rig.ctxs:
                rec = ec.record.snapshot()
                assert rec.in_flight == ec.in_flight
                assert rec.submitted == rec.completed + rec.cancelled + rec.failed + rec.in_flight
    finally:
        rig.close(w)
    rig.model.check()
    for kind in rig.rows:
        assert rig.ledger.raw()[("prop", kind)]["in_flight"] == 0
    assert live_contexts() == before


def test_rounds_in_one_call_match_the_reference_model(files: Any) -> None:
    """Reads that always complete: a call of 8 rounds runs all 8 (a POLL of a
    quiet pipe in flight does not stop them), one until a deadline runs until
    it, and every counter matches the model, as for one round per call."""
    good, bad, r, w = files
    _drain_pipe(r)
    rig = Rig(good, bad, r, per_kind=3, kinds=("read", "poll"))
    try:
        rig.submit(0, [("poll", 0), ("read", 1), ("read", 2), ("read", 3)])
        ec = rig.ctxs[0]
        for rounds, until in ((8, "none"), (0, "soon"), (3, "none"), (8, "past")):
            before = ec.ring.cycle_rounds
            rig.rounds(0, None, rounds, 1, until)
            ran = ec.ring.cycle_rounds - before
            assert ran == {"none": rounds, "soon": ran, "past": 1}[until]
            if until == "soon":
                assert ran > 1
            rig.model.check()
            rec = ec.record.snapshot()
            assert rec.in_flight == ec.in_flight
            assert rec.submitted == rec.completed + rec.cancelled + rec.failed + rec.in_flight
        assert rig.ledger.raw()[("prop", "read")]["completed"] >= 8 + 3 + 1
    finally:
        rig.close(w)
    rig.model.check()


def _one_op_set(ledger: Ledger, opcode: int, fd: int, buf: int, nbytes: int, kind: str,
                owner: Any = None) -> Any:
    opset = eng.OpSet(ledger.acct, 1, depth=1)
    opset.add(opcode, fd, buf, nbytes, ledger.row("r", kind), owner=owner)
    return opset


def test_rounds_stop_at_the_deadline_and_a_past_one_runs_one(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    ledger = Ledger()
    buf = aio.aligned_buffer(BS)
    opset = _one_op_set(ledger, aio.IOCB_CMD_PREAD, fd, buf.address, BS, "read", buf)
    ec = EngineContext("r", 0, 4)
    try:
        with pytest.raises(ValueError, match="until_ns"):
            ec.cycle(opset, 1, 1.0, rounds=0)
        # Nothing in flight yet: the first round only submits, and reaped nothing.
        assert ec.cycle(opset, 1, 1.0, rounds=0, until_ns=time.monotonic_ns() + 10**9) == (
            0, 0, 0, 0, 1, 0, 0, 0)
        before = ec.ring.cycle_rounds
        r = ec.cycle(opset, 1, 1.0, rounds=0, until_ns=time.monotonic_ns() - 1)
        assert r == (1, 0, 0, 0, 1, 0, 0, 0) and ec.ring.cycle_rounds - before == 1
        before = ec.ring.cycle_rounds
        until = time.monotonic_ns() + 50_000_000
        r = ec.cycle(opset, 1, 1.0, rounds=0, until_ns=until)
        ran = ec.ring.cycle_rounds - before
        # Reads of a good file never end it early: only the clock does.
        assert time.monotonic_ns() >= until and ran > 1
        assert r == (ran, 0, 0, 0, ran, 0, 0, 0)
        before = ec.ring.cycle_rounds
        r = ec.cycle(opset, 1, 1.0, rounds=5)
        assert r == (5, 0, 0, 0, 5, 0, 0, 0) and ec.ring.cycle_rounds - before == 5
    finally:
        ec.drain(time.monotonic() + 5)
        ec.destroy(5.0)
    d = ledger.raw()[("r", "read")]
    rec = ec.record.snapshot()
    assert d["submitted"] == d["completed"] == rec.submitted == rec.completed == 1 + 1 + ran + 5
    assert d["in_flight"] == rec.in_flight == 0


def test_rounds_on_a_poll_that_never_completes_do_not_spin(pipe: tuple[int, int]) -> None:
    """A POLL of a pipe nobody writes: a call of many rounds, or until a far
    deadline, waits its timeout once and returns; it neither spins nor waits
    for the deadline."""
    r, _w = pipe
    ledger = Ledger()
    opset = _one_op_set(ledger, aio.IOCB_CMD_POLL, r, select.POLLIN, 0, "poll")
    ec = EngineContext("r", 0, 4)
    try:
        assert ec.submit(opset, 1)[0] == 1
        for rounds, until in ((1000, None), (0, time.monotonic_ns() + 30 * 10**9)):
            before = ec.ring.cycle_rounds
            t0, c0 = time.monotonic(), time.thread_time()
            res = ec.cycle(opset, 1, 0.05, rounds=rounds, until_ns=until)
            took, cpu = time.monotonic() - t0, time.thread_time() - c0
            assert res == (0, 0, 0, 0, 0, 0, 0, 0)
            assert ec.ring.cycle_rounds - before == 1
            assert 0.04 <= took < 10, took
            assert cpu < 0.03, f"the wait burnt {cpu:.3f}s of CPU"
    finally:
        assert ec.destroy(5.0) == 1


def test_something_the_caller_must_see_ends_a_call_of_rounds(direct_file: tuple[int, Path]) -> None:
    """A failed completion, a refusal by io_submit: the call returns after
    the round that saw it, whatever rounds and until_ns allow."""
    fd, _ = direct_file
    ledger = Ledger()
    mis = aio.aligned_buffer(2 * BS)
    failing = _one_op_set(ledger, aio.IOCB_CMD_PREAD, fd, mis.address + 1, BS, "misaligned", mis)
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    refused = _one_op_set(ledger, aio.IOCB_CMD_FSYNC, closed, 0, 0, "badfd")
    ec = EngineContext("r", 0, 4)
    far = time.monotonic_ns() + 30 * 10**9
    try:
        ec.cycle(failing, 1, 1.0, rounds=100)
        before = ec.ring.cycle_rounds
        r = ec.cycle(failing, 1, 1.0, rounds=0, until_ns=far)
        assert r == (0, 0, 1, errno.EINVAL, 1, 0, 0, 0) and ec.ring.cycle_rounds - before == 1
        before = ec.ring.cycle_rounds
        r = ec.cycle(refused, 1, 1.0, rounds=0, until_ns=far)
        assert r[:3] == (0, 0, 1) and r[4:] == (0, 1, 0, errno.EBADF)
        assert ec.ring.cycle_rounds - before == 1
    finally:
        ec.drain(time.monotonic() + 5)
        ec.destroy(5.0)
    rec = ec.record.snapshot()
    assert rec.failed == 3 and rec.submitted == 3 and rec.last_error == f"io_submit: {os.strerror(errno.EBADF)}"


def test_fine_index_is_the_bench_histogram_index() -> None:
    for ns in [0, 1, 127, 128, 129, 255, 256, 1000, 4095, 123_456, 10**9, 7 * 10**10, 2**62]:
        assert eng.fine_index(ns) == hist_index(ns), ns


def test_eagain_hands_the_rest_back_and_counts_nothing_for_it(pipe: tuple[int, int]) -> None:
    r, w = pipe
    ledger = Ledger()
    row = ledger.row("flood", "poll")
    opset = eng.OpSet(ledger.acct, 400)
    for _ in range(400):
        opset.add(aio.IOCB_CMD_POLL, r, select.POLLIN, 0, row)
    # io_setup(1) gives a ring of about 127 events: 400 POLLs cannot all go in.
    ec = EngineContext("flood", 0, 1)
    try:
        ok, rejected, unsubmitted, _ = ec.submit(opset, 400)
        assert rejected == 0 and ok + unsubmitted == 400 and 0 < ok < 400
        assert opset.in_flight == ok and opset.free == 400 - ok
        d = ledger.raw()[("flood", "poll")]
        assert d["submitted"] == ok == d["in_flight"]
    finally:
        lost = ec.destroy(5.0)
    d = ledger.raw()[("flood", "poll")]
    assert lost == ok and d["cancelled"] == ok and d["in_flight"] == 0
    rec = ec.record.snapshot()
    assert (rec.submitted, rec.cancelled, rec.in_flight, rec.state.value) == (ok, ok, 0, "destroyed")


def test_a_probe_sleeps_in_the_kernel_between_completions(pipe: tuple[int, int]) -> None:
    """iodepth 1 at a probe's pace: a reap that waits costs no CPU while it waits."""
    r, w = pipe
    ledger = Ledger()
    opset = eng.OpSet(ledger.acct, 1, depth=1)
    opset.add(aio.IOCB_CMD_POLL, r, select.POLLIN, 0, ledger.row("probe", "poll"))
    ec = EngineContext("probe", 0, 1)
    try:
        ec.submit(opset, 1)
        timer = threading.Timer(0.5, os.write, (w, b"x"))
        t0, c0 = time.monotonic(), time.thread_time()
        timer.start()
        done = ec.reap(1, 5.0)
        took, cpu = time.monotonic() - t0, time.thread_time() - c0
        timer.join()
    finally:
        ec.destroy(5.0)
    assert done[0] == 1 and took >= 0.45
    assert cpu < 0.05, f"the wait burnt {cpu:.3f}s of CPU in {took:.3f}s"


@pytest.mark.parametrize("rounds", [1, 0], ids=["one-round-per-call", "rounds-until-a-deadline"])
def test_snapshots_from_another_thread_always_balance(direct_file: tuple[int, Path],
                                                      rounds: int) -> None:
    """rounds 0: each call goes on for 20 ms of rounds; the scrapes land
    between and inside them (the GIL is free around every syscall)."""
    fd, _ = direct_file
    ledger = Ledger()
    row = ledger.row("load", "read")
    bufs = aio.aligned_buffers(16, BS)
    opset = eng.OpSet(ledger.acct, 16, pattern="rand", nblocks=FILE_SIZE // BS, block_size=BS, depth=16)
    for b in bufs:
        opset.add(aio.IOCB_CMD_PREAD, fd, b.address, BS, row, owner=b)
    ec = EngineContext("load", 0, 16)
    stop = threading.Event()
    seen: list[int] = []
    bad: list[dict[str, Any]] = []

    def scrape() -> None:
        while not stop.is_set():
            d = ledger.acct.snapshot()[row]
            if d["submitted"] != d["completed"] + d["cancelled"] + sum(d["failed"].values()) + d["in_flight"]:
                bad.append(d)
            seen.append(d["submitted"])

    th = threading.Thread(target=scrape)
    th.start()
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            if rounds:
                ec.cycle(opset, 1, 1.0)
            else:
                ec.cycle(opset, 1, 1.0, rounds=0, until_ns=time.monotonic_ns() + 20_000_000)
            rec = ec.record.snapshot()
            assert rec.submitted == rec.completed + rec.cancelled + rec.failed + rec.in_flight
    finally:
        stop.set()
        th.join()
        ec.drain(time.monotonic() + 5)
        ec.destroy(5.0)
    assert not bad, bad[:3]
    assert len(set(seen)) > 10  # the scrapes really interleaved with the loop
    d = ledger.raw()[("load", "read")]
    assert d["in_flight"] == 0 and d["completed"] == d["submitted"] > 0
    assert d["bytes"] == d["completed"] * BS


def test_misuse_is_refused_with_a_clear_error(pipe: tuple[int, int]) -> None:
    ledger = Ledger()
    row = ledger.row("j", "poll")
    opset = eng.OpSet(ledger.acct, 3)
    opset.add(aio.IOCB_CMD_POLL, pipe[0], select.POLLIN, 0, row)
    opset.add(aio.IOCB_CMD_POLL, pipe[0], select.POLLIN, 0, row)
    with pytest.raises(ValueError, match="pattern"):
        eng.OpSet(ledger.acct, 1, pattern="zigzag")
    with pytest.raises(IndexError):
        opset.add(aio.IOCB_CMD_POLL, pipe[0], 1, 0, row + 7)
    ec = EngineContext("j", 0, 4)
    try:
        ec.submit(opset, 1, indices=[0])
        with pytest.raises(ValueError, match="in flight"):
            ledger.forget("j")
        with pytest.raises(ValueError, match="not free"):
            ec.ring.submit(opset, 1, None, [0])
    finally:
        assert ec.destroy(5.0) == 1
    assert opset.in_flight == 0 and opset.free == 2
    with pytest.raises(ValueError, match="gone"):
        ec.ring.reap()


def test_ops_kept_past_a_stuck_destroy_come_back_only_when_released(
        pipe: tuple[int, int]) -> None:
    ledger = Ledger()
    row = ledger.row("k", "poll")
    opset = eng.OpSet(ledger.acct, 3)
    for _ in range(3):
        opset.add(aio.IOCB_CMD_POLL, pipe[0], select.POLLIN, 0, row)
    ec = EngineContext("k", 0, 4)
    assert ec.submit(opset, 1, indices=[2]) == (1, 0, 0, 0)
    ec.submit(opset, 1, indices=[0])
    assert ec.ring.inflight_ops() == [(opset, 2), (opset, 0)]  # oldest first
    refs = sys.getrefcount(opset)
    # io_destroy did not return: counted cancelled now, but never reused.
    assert ec.account_lost(keep_alive=True) == 2
    assert ec.ring.inflight_ops() == [] and opset.in_flight == 0 and opset.free == 1
    assert sorted(i for _, i in ec.kept) == [0, 2]
    d = ledger.raw()[("k", "poll")]
    assert (d["submitted"], d["cancelled"], d["in_flight"]) == (2, 2, 0)
    assert ec.record.snapshot().cancelled == 2
    with pytest.raises(ValueError, match="free already"):
        opset.release(1)
    assert ec.release_kept() == 2  # io_destroy returned after all
    assert opset.free == 3 and ec.kept == []
    assert sys.getrefcount(opset) == refs - 2  # the references the two kept ops held
    ec.ctx.destroy()


def test_user_space_reaping_checks_the_ring_and_reaps_the_same(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    ledger = Ledger()
    row = ledger.row("u", "read")
    bufs = aio.aligned_buffers(8, BS)
    opset = eng.OpSet(ledger.acct, 8, pattern="seq", nblocks=FILE_SIZE // BS, block_size=BS)
    for b in bufs:
        opset.add(aio.IOCB_CMD_PREAD, fd, b.address, BS, row, owner=b)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ec = EngineContext("u", 0, 8, eventfd=efd, user_reap=True)
    try:
        assert ec.ring.user_reap  # the kernel's ring header carried the magic
        for _ in range(50):
            ec.cycle(opset, 0, 0.0)
            # The eventfd fires after the event is in the ring: the next
            # cycle finds it there without a syscall.
            assert select.select([efd], [], [], 5.0)[0]
            os.eventfd_read(efd)
    finally:
        ec.drain(time.monotonic() + 5)
        ec.destroy(5.0)
        os.close(efd)
    from_ring, from_syscall = ec.ring.reaped
    assert from_ring > 0
    d = ledger.raw()[("u", "read")]
    assert d["completed"] == d["submitted"] == from_ring + from_syscall
    rec = ec.record.snapshot()
    assert rec.completed == d["completed"] and rec.in_flight == 0


def _read_set(ledger: Ledger, fd: int, n: int, room: int = 0) -> Any:
    """n O_DIRECT-able random reads of fd, with room for more ops."""
    row = ledger.row("c", "read")
    opset = eng.OpSet(ledger.acct, n + room, pattern="rand", nblocks=FILE_SIZE // BS, block_size=BS)
    for b in aio.aligned_buffers(n, BS):
        opset.add(aio.IOCB_CMD_PREAD, fd, b.address, BS, row, owner=b)
    return opset


def test_cycle_submits_an_o_direct_set_a_few_ops_per_io_submit(direct_file: tuple[int, Path]) -> None:
    """The kernel holds back every op of a larger io_submit until the call
    returns (its plug): by default an O_DIRECT set goes DIRECT_BATCH at a time;
    a buffered set, whose ops run inside io_submit, all at once."""
    fd, path = direct_file
    assert 1 <= eng.DIRECT_BATCH <= 4
    ledger = Ledger()
    direct = _read_set(ledger, fd, 8)
    bfd = os.open(path, os.O_RDONLY)
    ec = EngineContext("c", 0, 16)
    try:
        buffered = _read_set(ledger, bfd, 8)
        assert direct.direct and not buffered.direct
        for opset, batch, calls in ((direct, None, -(-8 // eng.DIRECT_BATCH)), (direct, 0, 1), (direct, 3, 3),
                                    (buffered, None, 1), (buffered, 2, 4)):
            before = ec.ring.submit_calls
            r = ec.cycle(opset, 0, 0.0, batch)
            assert r[4:] == (8, 0, 0, 0)
            assert ec.ring.submit_calls - before == calls, (opset.direct, batch)
            ec.drain(time.monotonic() + 5)
    finally:
        ec.destroy(5.0)
        os.close(bfd)
    d = ledger.raw()[("c", "read")]
    assert d["submitted"] == d["completed"] == 40 and d["in_flight"] == 0
    rec = ec.record.snapshot()
    assert rec.submitted == rec.completed == 40


def test_a_refused_op_is_tried_once_per_cycle_and_does_not_stop_it(direct_file: tuple[int, Path]) -> None:
    """Submitting a few at a time, an op io_submit refuses is set aside until
    the cycle ends: the ops behind it still go, and it is counted once."""
    fd, _ = direct_file
    ledger = Ledger()
    opset = _read_set(ledger, fd, 6, room=1)
    bad_row = ledger.row("c", "fsync")
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    bad = opset.add(aio.IOCB_CMD_FSYNC, closed, 0, 0, bad_row)  # added last: tried first
    ec = EngineContext("c", 0, 16)
    try:
        for batch in (1, 2, None, 0):
            r = ec.cycle(opset, 0, 0.0, batch)
            assert r[4:] == (6, 1, 0, errno.EBADF), batch
            notes, _ = opset.take_notes()
            assert [(i, k) for i, k, _v in notes if k == "rejected"] == [(bad, "rejected")]
            assert opset.free == 1  # the refused op is free again for the next cycle
            ec.drain(time.monotonic() + 5)
    finally:
        ec.destroy(5.0)
    raw = ledger.raw()
    assert raw[("c", "fsync")]["submitted"] == 4 and raw[("c", "fsync")]["failed"] == {errno.EBADF: 4}
    assert raw[("c", "read")]["submitted"] == raw[("c", "read")]["completed"] == 24
    rec = ec.record.snapshot()
    assert rec.submitted == 28 and rec.failed == 4 and rec.completed == 24


def test_aiod_refuses_to_start_without_the_engine(tmp_path: Path) -> None:
    """A copy of the package without the compiled module: one line, exit 1."""
    pkg = tmp_path / "aiod"
    pkg.mkdir()
    for f in (ROOT / "aiod").glob("*.py"):
        (pkg / f.name).write_bytes(f.read_bytes())
    (pkg / "default.yaml").write_bytes((ROOT / "aiod" / "default.yaml").read_bytes())
    # Without the development install's import hook, which would find the
    # module in the checkout: as on a host where the build never happened.
    bare = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in repr(f).lower()]; from aiod.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    conf = tmp_path / "aiod.yaml"
    conf.write_bytes((ROOT / "aiod" / "default.yaml").read_bytes())
    for cmd in (["run"], ["check-config", str(conf)],
                ["bench", "--target", str(tmp_path / "x.dat")]):
        r = subprocess.run([sys.executable, "-c", bare, *cmd], capture_output=True,
                           text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                           timeout=60)
        assert r.returncode == 1, r.stderr
        (line,) = r.stderr.splitlines()
        assert line.startswith("aiod: the compiled engine aiod._engine is not built")
        assert "make install" in line and "python3-dev" in line
    assert not (tmp_path / "x.dat").exists()


def test_the_engine_runs_clean_under_addresssanitizer(tmp_path: Path) -> None:
    """Build a sanitized aiod._engine and run this file's workloads and a bench on it."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip()
    if not libasan or not os.path.exists(libasan):
        pytest.skip("gcc has no libasan here")
    pkg = tmp_path / "aiod"
    pkg.mkdir()
    for f in (ROOT / "aiod").iterdir():
        if f.suffix in (".py", ".yaml"):
            (pkg / f.name).write_bytes(f.read_bytes())
    so = pkg / ("_engine" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fsanitize=address",
                    "-fno-omit-frame-pointer", f"-I{sysconfig.get_paths()['include']}",
                    str(ROOT / "aiod" / "_engine.c"), "-o", str(so)], check=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{ROOT}", LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", AIOD_ENGINE_EXAMPLES="15",
               AIOD_EXPECT_ENGINE=str(so))
    probe = subprocess.run([sys.executable, "-c", "import aiod._engine as e; print(e.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert probe.stdout.strip() == str(so), probe.stderr
    # --import-mode=append: the checkout goes after PYTHONPATH, so the tests
    # import the sanitized aiod._engine (the module-level check above makes sure).
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "--import-mode=append", "--rootdir", str(ROOT),
                        str(ROOT / "tests" / "test_engine.py"), "-k",
                        "not addresssanitizer and not refuses_to_start"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0 and "AddressSanitizer" not in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    target = tmp_path / "b.dat"
    # iodepth 1 and 4 on one context: the engine's calls of several rounds.
    for args in (["--rw=randrw", "--buffered", "--iodepth=16", "--contexts=2"],
                 ["--rw=read", "--iodepth=4", "--iodepth-batch=1", "--userspace-reap"],
                 ["--rw=randread", "--iodepth=1"]):
        b = subprocess.run([sys.executable, "-m", "aiod.cli", "bench", f"--target={target}",
                            "--size=4M", "--runtime=300ms", "--json", "--allow-overwrite", *args],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert b.returncode == 0 and "AddressSanitizer" not in b.stderr, b.stderr[-3000:]
