"""The compiled engine (aiod._engine), and the thin Python layer over it.

The per-op work of aiod (filling iocbs, stamping times, io_submit with its
short submits, reaping, classifying each completion and counting it in the
per-(job, op) counters and latency histograms) runs in C, one call per
batch. Python sees batches: how many completed, were cancelled, failed, and
the counters at snapshot time.

- :data:`MISSING` is None when the engine imported, else the one line aiod
  prints before refusing to start (there is no slow pure-Python fallback).
- :class:`Ledger` is the table of (job, op) rows and its snapshots as
  :class:`aiod.pool.OpStats`.
- :class:`EngineContext` is one kernel context: its ctypes
  :class:`aiod.aio.Context` (setup and destroy, the rare paths), its engine
  :class:`Ring` (the hot path) and its :class:`LifecycleRecord`, kept in
  step once per batch.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from aiod import aio
from aiod.accounting import LATENCY_BUCKETS, OpStats
from aiod.lifecycle import ContextState, LifecycleRecord

_engine: ModuleType | None
try:
    _engine = importlib.import_module("aiod._engine")
    MISSING: str | None = None
except ImportError as _e:  # the build failed or was skipped
    _engine = None
    MISSING = (f"the compiled engine aiod._engine is not built ({_e}); install gcc and "
               "python3-dev (sh deploy/debian-deps.sh) and run 'make install' again")

# Ops per io_submit for an O_DIRECT set (the engine's choice; nothing submits without it).
DIRECT_BATCH: int = int(_engine.DIRECT_BATCH) if _engine is not None else 0

# Kinds of completion in Ring.reap(detail=True).
COMPLETED, CANCELLED, FAILED = 0, 1, 2


class EngineMissing(RuntimeError):
    """aiod._engine cannot be imported; str() is the line for the operator."""


def require() -> ModuleType:
    """The engine module, or EngineMissing saying what is missing."""
    if _engine is None:
        raise EngineMissing(MISSING or "the compiled engine aiod._engine is missing")
    return _engine


class Ledger:
    """Per-(job, op) counters and histograms, kept by the engine in C arrays.

    Written only by the thread that drives the engine; :meth:`stats` may be
    called from any thread and copies every row at one instant.
    """

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.acct: Any = require().Accounting([round(b * 1e9) for b in bounds])
        self._rows: dict[tuple[str, str], int] = {}
        self._keys: dict[int, tuple[str, str]] = {}
        # Rows come and go on the loop while a scrape names them: a row number
        # is reused after drop_row, so the copy and its names are taken together.
        self._lock = threading.Lock()

    def row(self, job: str, op: str, *, fine: bool = False) -> int:
        """The row of (job, op), created at zero when new."""
        r = self._rows.get((job, op))
        if r is None:
            with self._lock:
                r = self.acct.add_row(fine=fine)
                self._rows[(job, op)] = r
                self._keys[r] = (job, op)
        return r

    def forget(self, job: str) -> None:
        """Drop a job's rows (none of its ops may be in flight)."""
        with self._lock:
            for key in [k for k in self._rows if k[0] == job]:
                r = self._rows.pop(key)
                del self._keys[r]
                self.acct.drop_row(r)

    def raw(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every row's counters, as the engine reports them."""
        with self._lock:
            snap = self.acct.snapshot()
            keys = dict(self._keys)
        return {keys[r]: d for r, d in snap.items() if r in keys}

    def stats(self) -> list[OpStats]:
        """The rows as OpStats (the shape metrics and reports already read)."""
        out = []
        for (job, op), d in self.raw().items():
            st = OpStats(job, op)
            st.submitted, st.completed, st.cancelled = d["submitted"], d["completed"], d["cancelled"]
            st.failed = dict(d["failed"])
            st.buckets = list(d["buckets"])
            st.latency_sum_ns, st.latency_count = d["latency_sum_ns"], d["latency_count"]
            st.last_completion = d["last_completion"]
            out.append(st)
        return out

    def fine(self, job: str, op: str) -> tuple[dict[int, int], dict[int, int]]:
        """(clat, lat) log-linear histograms of a row made with fine=True."""
        clat, lat = self.acct.fine(self._rows[(job, op)])
        return dict(clat), dict(lat)


class EngineContext:
    """One kernel context on the engine, with its lifecycle record.

    Every method that moves ops updates the record once, from the counts the
    engine returns, so the record's invariant holds in every snapshot.
    """

    def __init__(self, pool: str, index: int, nr_events: int, *, eventfd: int | None = None,
                 user_reap: bool = False, wall_clock: Callable[[], float] = time.time,
                 ctx: aio.Context | None = None, active: bool = True) -> None:
        """ctx: a context already set up (the pool's, made with its retries);
        else one is made here. active=False leaves the record created (the
        pool activates its new contexts together, once all were made)."""
        eng = require()
        if ctx is None:
            ctx = aio.Context(nr_events, eventfd=eventfd if eventfd is not None else False)
        self.ctx = ctx
        # Ops account_lost(keep_alive=True) kept while io_destroy had not returned.
        self.kept: list[tuple[Any, int]] = []
        try:
            self.ring: Any = eng.Ring(self.ctx.id, nr_events,
                                      eventfd=-1 if eventfd is None else eventfd,
                                      user_reap=user_reap)
        except BaseException:
            self.ctx.destroy()
            raise
        self.record = LifecycleRecord(pool, index, self.ctx.id, nr_events, clock=wall_clock)
        if active:
            self.record.change_state(ContextState.ACTIVE)

    @property
    def in_flight(self) -> int:
        return int(self.ring.in_flight)

    def _outcomes(self, completed: int, cancelled: int, failed: int, err: int) -> None:
        if completed or cancelled or failed:
            self.record.add_outcomes(completed, cancelled, failed,
                                     os.strerror(err) if failed and err else None)

    def _submitted(self, ok: int, rejected: int, err: int) -> None:
        if ok:
            self.record.add_submitted(ok)
        if rejected:
            self.record.add_rejected(rejected, f"io_submit: {os.strerror(err)}")

    def submit(self, opset: Any, n: int, offsets: Any = None,
               indices: list[int] | None = None, batch: int = 0) -> tuple[int, int, int, int]:
        """(submitted, rejected, unsubmitted, last_errno); see Ring.submit.

        batch > 0: at most that many iocbs per io_submit. The kernel holds an
        io_submit's I/O back from the device until the call returns (it plugs
        the queue for more than two), so O_DIRECT ops reach the device sooner
        in small calls; see Ring.cycle, which does the same. After a call that
        refused an op, the rest wait for the next submit: the refused op is
        free again and would be picked, and refused, once more.
        """
        if batch <= 0 or n <= batch or offsets is not None or indices is not None:
            r = self.ring.submit(opset, n, offsets, indices)
            self._submitted(r[0], r[1], r[3])
            return r  # type: ignore[no-any-return]
        ok = rejected = unsubmitted = err = 0
        left = n
        while left > 0:
            k = min(batch, left)
            got, refused, back, e = self.ring.submit(opset, k)
            ok, rejected, left = ok + got, rejected + refused, left - k
            err = e or err
            if back:  # the ring is full (EAGAIN): the rest would come back too
                unsubmitted += back + left
                break
            if refused:
                break
        self._submitted(ok, rejected, err)
        return ok, rejected, unsubmitted, err

    def reap(self, min_nr: int = 0, timeout: float | None = 0.0) -> tuple[int, int, int, int]:
        """(completed, cancelled, failed, last_errno); see Ring.reap."""
        r = self.ring.reap(min_nr, timeout)
        self._outcomes(*r)
        return r  # type: ignore[no-any-return]

    def cycle(self, opset: Any, min_nr: int = 1, timeout: float | None = None,
              batch: int | None = None, rounds: int = 1,
              until_ns: int | None = None) -> tuple[int, ...]:
        """Reap, then resubmit opset's ready ops: one engine call. See Ring.cycle.

        batch: ops per io_submit; 0 all at once; None lets the engine choose
        (small io_submits for an O_DIRECT set, one for a buffered one).
        rounds, until_ns: repeat reap and resubmit inside the call (rounds 0:
        no limit) while nothing noteworthy happens and time.monotonic_ns() is
        before until_ns. The record takes the call's sums in one update."""
        r = self.ring.cycle(opset, min_nr, timeout, batch, False, rounds, until_ns)
        completed, cancelled, failed, reap_err, ok, rejected, _unsubmitted, submit_err = r
        if completed or cancelled or failed or ok or rejected:
            # The errno of a refusal wins over that of a failed completion, as before.
            err = (f"io_submit: {os.strerror(submit_err)}" if rejected
                   else os.strerror(reap_err) if failed and reap_err else None)
            self.record.add_cycle(ok, rejected, completed, cancelled, failed, err)
        return r  # type: ignore[no-any-return]

    # -- the rare paths: shutdown of this context
    def drain(self, deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
        if self.record.state is ContextState.ACTIVE:
            self.record.change_state(ContextState.DRAINING)
        while self.ring.in_flight:
            left = deadline - clock()
            if left <= 0:
                break
            self.reap(1, min(left, 0.1))

    def cancel(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> tuple[int, int]:
        """io_cancel what is in flight; wait up to timeout for those completions."""
        if self.record.state in (ContextState.ACTIVE, ContextState.DRAINING):
            if self.record.state is ContextState.ACTIVE:
                self.record.change_state(ContextState.DRAINING)
            self.record.change_state(ContextState.CANCELLING)
        requested, uncancellable = self.ring.cancel_all()
        deadline = clock() + timeout
        while requested and self.ring.in_flight:
            left = deadline - clock()
            if left <= 0:
                break
            self.reap(1, min(left, 0.05))
        return int(requested), int(uncancellable)

    def destroy(self, timeout: float) -> int:
        """io_destroy on a thread (it waits for uncancellable I/O), then count
        what never completed as cancelled. Returns that count."""
        if self.record.state is ContextState.ACTIVE:
            self.record.change_state(ContextState.DRAINING)
        errs: list[BaseException] = []

        def run() -> None:
            try:
                self.ctx.destroy()
            except BaseException as e:  # noqa: BLE001 - reported below, never raised in a thread
                errs.append(e)

        th = threading.Thread(target=run, name=f"io_destroy-{self.record.pool}-"
                              f"{self.record.index}", daemon=True)
        th.start()
        th.join(timeout)
        if th.is_alive() or errs:
            # The kernel may still use the buffers: the ring keeps its ops (and
            # so their buffers) alive; they are counted cancelled all the same.
            why = (f"io_destroy did not return within {timeout:g}s" if th.is_alive()
                   else f"io_destroy failed: {errs[0]}")
            lost = self._lost(keep_alive=True)
            self.record.change_state(ContextState.FAILED, error=why)
            return lost
        lost = self._lost()
        self.record.change_state(ContextState.DESTROYED)
        return lost

    def cancel_all(self) -> tuple[int, int]:
        """io_cancel every op in flight: (accepted, uncancellable). The accepted
        ones come back through reap, counted cancelled."""
        requested, uncancellable = self.ring.cancel_all()
        return int(requested), int(uncancellable)

    def account_lost(self, keep_alive: bool = False) -> int:
        """After io_destroy (or when it is stuck, keep_alive): count what is
        still in flight cancelled. Ops kept alive are remembered for
        :meth:`release_kept`. Returns the count."""
        return self._lost(keep_alive)

    def release_kept(self) -> int:
        """io_destroy returned at last: the ops kept alive go back to their sets."""
        kept, self.kept = self.kept, []
        for opset, index in kept:
            opset.release(index)
        return len(kept)

    def _lost(self, keep_alive: bool = False) -> int:
        if keep_alive:
            self.kept.extend(self.ring.inflight_ops())
        n = int(self.ring.account_lost(keep_alive=keep_alive))
        if n:
            self.record.add_outcomes(0, n, 0)
        return n
