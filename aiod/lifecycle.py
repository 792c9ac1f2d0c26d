"""The lifecycle record of one kernel AIO context.

A record is the operator's view of a context: where it is in its life and
what passed through it. The I/O loop writes it; metrics scrapes on other
threads read it. Every write happens under the record's lock, and readers only
ever get a copy taken under that lock, so the invariant

    submitted == completed + cancelled + failed + in_flight

holds in every snapshot anyone can see.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class ContextState(str, enum.Enum):
    CREATED = "created"
    ACTIVE = "active"
    DRAINING = "draining"
    CANCELLING = "cancelling"
    DESTROYED = "destroyed"
    FAILED = "failed"


S = ContextState
# Allowed transitions. DESTROYED is terminal. A context is destroyed only once
# nothing new can reach it: from CREATED (a pool whose creation failed
# halfway), or after DRAINING/CANCELLING. FAILED is terminal but for one way
# out: a context whose io_destroy missed its deadline (I/O stuck in a device)
# is failed while the kernel holds it, and destroyed if io_destroy returns later.
TRANSITIONS: dict[ContextState, frozenset[ContextState]] = {
    S.CREATED: frozenset({S.ACTIVE, S.DESTROYED, S.FAILED}),
    S.ACTIVE: frozenset({S.DRAINING, S.FAILED}),
    S.DRAINING: frozenset({S.CANCELLING, S.DESTROYED, S.FAILED}),
    S.CANCELLING: frozenset({S.DESTROYED, S.FAILED}),
    S.DESTROYED: frozenset(),
    S.FAILED: frozenset({S.DESTROYED}),
}


class IllegalTransition(RuntimeError):
    """A state change the lifecycle does not allow: a bug in aiod, not user error."""


@dataclass(frozen=True)
class RecordSnapshot:
    """A copy of a record, taken under its lock."""

    pool: str
    index: int
    kernel_id: int
    nr_events: int
    state: ContextState
    created_at: float
    destroyed_at: float | None
    submitted: int
    completed: int
    cancelled: int
    failed: int
    in_flight: int
    last_error: str | None
    transitions: int

    def as_dict(self) -> dict[str, object]:
        return {
            "pool": self.pool, "index": self.index, "kernel_id": self.kernel_id,
            "nr_events": self.nr_events, "state": self.state.value,
            "created_at": self.created_at, "destroyed_at": self.destroyed_at,
            "submitted": self.submitted, "completed": self.completed,
            "cancelled": self.cancelled, "failed": self.failed,
            "in_flight": self.in_flight, "last_error": self.last_error,
        }


class LifecycleRecord:
    """State, timestamps and counters of one context, guarded by ``lock``."""

    def __init__(self, pool: str, index: int, kernel_id: int, nr_events: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.Lock()
        self._clock = clock
        self.pool = pool
        self.index = index
        self.kernel_id = kernel_id
        self.nr_events = nr_events
        self.state = ContextState.CREATED
        self.created_at = clock()
        self.destroyed_at: float | None = None
        self.submitted = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.in_flight = 0
        self.last_error: str | None = None
        self.transitions = 0

    def change_state(self, new: ContextState, error: str | None = None) -> ContextState:
        """The one place a context's state changes. Returns the old state."""
        with self.lock:
            old = self.state
            if new not in TRANSITIONS[old]:
                raise IllegalTransition(
                    f"context {self.pool}[{self.index}]: {old.value} -> {new.value} is not allowed")
            self.state = new
            self.transitions += 1
            if new in (ContextState.DESTROYED, ContextState.FAILED):
                self.destroyed_at = self._clock()
            if error is not None:
                self.last_error = error
            return old

    # Counter updates: one lock hold per batch keeps every snapshot consistent.
    def add_submitted(self, n: int) -> None:
        with self.lock:
            self.submitted += n
            self.in_flight += n

    def add_outcomes(self, completed: int, cancelled: int, failed: int,
                     last_error: str | None = None) -> None:
        """Ops that were in flight finished with these outcomes."""
        with self.lock:
            self.completed += completed
            self.cancelled += cancelled
            self.failed += failed
            self.in_flight -= completed + cancelled + failed
            if last_error is not None:
                self.last_error = last_error

    def add_cycle(self, submitted: int, rejected: int, completed: int, cancelled: int,
                  failed: int, last_error: str | None = None) -> None:
        """One engine cycle's sums in one lock hold: ops that finished with
        these outcomes, ops that went in flight, and ops the kernel refused at
        io_submit (submitted and failed at once)."""
        with self.lock:
            self.submitted += submitted + rejected
            self.completed += completed
            self.cancelled += cancelled
            self.failed += failed + rejected
            self.in_flight += submitted - completed - cancelled - failed
            if last_error is not None:
                self.last_error = last_error

    def add_rejected(self, n: int, last_error: str) -> None:
        """Ops the kernel refused at io_submit: submitted and failed at once."""
        with self.lock:
            self.submitted += n
            self.failed += n
            self.last_error = last_error

    def snapshot(self) -> RecordSnapshot:
        with self.lock:
            return RecordSnapshot(
                pool=self.pool, index=self.index, kernel_id=self.kernel_id,
                nr_events=self.nr_events, state=self.state, created_at=self.created_at,
                destroyed_at=self.destroyed_at, submitted=self.submitted,
                completed=self.completed, cancelled=self.cancelled, failed=self.failed,
                in_flight=self.in_flight, last_error=self.last_error,
                transitions=self.transitions)


# How many ended (destroyed or failed) records a pool keeps in full. Older ones
# are folded into per-pool totals, so a daemon that shrinks a pool on every
# reload keeps a bounded history, and its metrics and report stay small.
KEEP_ENDED = 16


@dataclass(frozen=True)
class FoldedRecords:
    """Totals of ended records no longer kept one by one."""

    contexts: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0

    def plus(self, other: FoldedRecords) -> FoldedRecords:
        states = dict(self.by_state)
        for k, n in other.by_state.items():
            states[k] = states.get(k, 0) + n
        return FoldedRecords(self.contexts + other.contexts, states,
                             self.submitted + other.submitted, self.completed + other.completed,
                             self.cancelled + other.cancelled, self.failed + other.failed)

    def as_dict(self) -> dict[str, object]:
        return {"contexts": self.contexts, "by_state": dict(self.by_state),
                "submitted": self.submitted, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed}


def fold(records: list[RecordSnapshot]) -> FoldedRecords:
    states: dict[str, int] = {}
    for r in records:
        states[r.state.value] = states.get(r.state.value, 0) + 1
    return FoldedRecords(len(records), states, sum(r.submitted for r in records),
                         sum(r.completed for r in records), sum(r.cancelled for r in records),
                         sum(r.failed for r in records))


class EndedRecords:
    """The records of a pool's ended contexts: the latest in full, the rest folded.

    Only final records are added (destroyed, or failed for good), so a folded
    one can never change again. Written by the I/O loop, read by scrapes.
    """

    def __init__(self, keep: int = KEEP_ENDED) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self._recent: deque[LifecycleRecord] = deque()
        self._folded = FoldedRecords()

    def make_room(self, n: int) -> None:
        """Keep n more in full: a pool's last contexts all belong in its final report."""
        with self._lock:
            self._keep += n

    def add(self, record: LifecycleRecord) -> None:
        with self._lock:
            self._recent.append(record)
            if len(self._recent) > self._keep:
                old = [self._recent.popleft().snapshot()
                       for _ in range(len(self._recent) - self._keep)]
                self._folded = self._folded.plus(fold(old))

    def snapshot(self) -> tuple[list[RecordSnapshot], FoldedRecords]:
        with self._lock:
            recent = list(self._recent)
            folded = self._folded
        return [r.snapshot() for r in recent], folded
