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
from dataclasses import dataclass
from typing import Callable


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
