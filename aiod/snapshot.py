"""What a pool looks like at one instant: the copy every other thread reads.

Metrics, the status document and the shutdown report all read a
:class:`PoolSnapshot`; the pool builds one under its locks, so its totals hold
submitted = completed + cancelled + failed + in_flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiod.accounting import OpStats
from aiod.lifecycle import KEEP_ENDED, ContextState, FoldedRecords, RecordSnapshot, fold


@dataclass
class PoolSnapshot:
    name: str
    state: str
    nr_events: int
    records: list[RecordSnapshot]
    stats: list[OpStats]
    setups: int
    destroys: int
    destroy_failures: int
    setup_failures: dict[int, int]
    oldest_in_flight_seconds: float
    folded: FoldedRecords = field(default_factory=FoldedRecords)  # ended records not kept
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    in_flight: int = 0

    def __post_init__(self) -> None:
        f = self.folded
        self.submitted += f.submitted
        self.completed += f.completed
        self.cancelled += f.cancelled
        self.failed += f.failed
        for r in self.records:
            self.submitted += r.submitted
            self.completed += r.completed
            self.cancelled += r.cancelled
            self.failed += r.failed
            self.in_flight += r.in_flight

    @property
    def balanced(self) -> bool:
        return self.submitted == self.completed + self.cancelled + self.failed + self.in_flight

    def totals(self) -> dict[str, int]:
        return {"submitted": self.submitted, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed, "in_flight": self.in_flight}

    def contexts_by_state(self) -> dict[str, int]:
        out = {s.value: 0 for s in ContextState}
        for r in self.records:
            out[r.state.value] += 1
        for state, n in self.folded.by_state.items():
            out[state] += n
        return out

    def merged(self, later: PoolSnapshot) -> PoolSnapshot:
        """This ended pool and a later one of the same name as one, for reports:
        counters add up; the later pool's records stay in full, and of the
        earlier ones only the last KEEP_ENDED, as within a pool."""
        older = self.records
        folded = self.folded.plus(later.folded)
        if len(older) > KEEP_ENDED:
            folded = folded.plus(fold(older[:-KEEP_ENDED]))
            older = older[-KEEP_ENDED:]
        records = older + later.records
        stats = {(st.job, st.op): st.copy() for st in self.stats}
        for st in later.stats:
            mine = stats.get((st.job, st.op))
            if mine is None:
                stats[(st.job, st.op)] = st.copy()
            else:
                mine.add(st)
        failures = dict(self.setup_failures)
        for err, n in later.setup_failures.items():
            failures[err] = failures.get(err, 0) + n
        return PoolSnapshot(
            name=later.name, state=later.state, nr_events=later.nr_events, records=records,
            stats=list(stats.values()), setups=self.setups + later.setups,
            destroys=self.destroys + later.destroys,
            destroy_failures=self.destroy_failures + later.destroy_failures,
            setup_failures=failures, oldest_in_flight_seconds=later.oldest_in_flight_seconds,
            folded=folded)
