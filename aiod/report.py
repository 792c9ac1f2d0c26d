"""The shutdown report: what every operation and context came to, as one record.

Built once, at the end of the shutdown, from the pools' snapshots; logged as
one line of totals and written as JSON (``shutdown-report.json`` in the state
directory) atomically. The JSON keys are an interface: operators and the
system tests read them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiod.lifecycle import ContextState
from aiod.metrics import errno_name
from aiod.pool import PoolSnapshot
from aiod.targets import write_atomic
from aiod.teardown import TeardownCounts

log = logging.getLogger("aiod.report")

REPORT_FILE = "shutdown-report.json"
TOTAL_KEYS = ("submitted", "completed", "cancelled", "failed", "in_flight")


@dataclass
class ShutdownReport:
    version: str
    reason: str
    started_at: float
    stopped_at: float
    totals: dict[str, int]
    invariant_holds: bool
    drain_timeout: float
    drain_seconds: float
    drain_interrupted_by_signal: bool
    cancel_seconds: float
    destroy_seconds: float
    cancel: dict[str, int]
    lost_at_destroy: int
    failed_to_destroy: list[dict[str, object]]
    aio_nr_before_start: int
    aio_nr_after_destroy: int
    pools: list[dict[str, object]]
    # The AIO budget's own keys (aiod.budget), at the top level of the JSON.
    budget: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "budget"}
        out.update(self.budget)
        return out

    def write(self, state_directory: Path) -> None:
        path = state_directory / REPORT_FILE
        try:
            write_atomic(path, json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n")
        except OSError as e:
            log.error("cannot write the shutdown report %s: %s", path, e.strerror)


def build(*, version: str, reason: str, started_at: float, stopped_at: float,
          snaps: list[PoolSnapshot], done: TeardownCounts, drain_timeout: float,
          drain_seconds: float, hurried: bool, cancel_seconds: float, destroy_seconds: float,
          aio_nr_before: int, aio_nr_after: int,
          budget: Mapping[str, object]) -> ShutdownReport:
    totals = sum_totals(snaps)
    return ShutdownReport(
        version=version, reason=reason, started_at=started_at, stopped_at=stopped_at,
        totals=totals,
        invariant_holds=totals["submitted"] == totals["completed"] + totals["cancelled"]
        + totals["failed"] + totals["in_flight"] and totals["in_flight"] == 0,
        drain_timeout=drain_timeout,
        drain_seconds=round(drain_seconds, 6),
        drain_interrupted_by_signal=hurried,
        cancel_seconds=round(cancel_seconds, 6),
        destroy_seconds=round(destroy_seconds, 6),
        cancel={"requested": done.requested, "cancelled": done.cancelled,
                "uncancellable": done.uncancellable},
        lost_at_destroy=done.lost,
        failed_to_destroy=[{"pool": r.pool, "index": r.index, "kernel_id": r.kernel_id,
                            "error": r.last_error}
                           for s in snaps for r in s.records if r.state is ContextState.FAILED],
        aio_nr_before_start=aio_nr_before,
        aio_nr_after_destroy=aio_nr_after,
        pools=[pool_report(s) for s in snaps],
        budget=dict(budget),
    )


def sum_totals(snaps: list[PoolSnapshot]) -> dict[str, int]:
    return {k: sum(s.totals()[k] for s in snaps) for k in TOTAL_KEYS}


def totals_text(t: Mapping[str, int]) -> str:
    return (f"submitted {t['submitted']} = completed {t['completed']} + cancelled "
            f"{t['cancelled']} + failed {t['failed']} + in flight {t['in_flight']}")


def pool_report(s: PoolSnapshot) -> dict[str, object]:
    return {
        "name": s.name,
        "nr_events": s.nr_events,
        "totals": s.totals(),
        "contexts": [r.as_dict() for r in s.records],
        # Older ended contexts, no longer listed one by one (see lifecycle.KEEP_ENDED).
        "ended_contexts_folded": s.folded.as_dict(),
        "ops": [{"job": st.job, "op": st.op, "submitted": st.submitted,
                 "completed": st.completed, "cancelled": st.cancelled,
                 "failed": {errno_name(e): n for e, n in sorted(st.failed.items())}}
                for st in s.stats],
        "setups": s.setups,
        "destroys": s.destroys,
        "destroy_failures": s.destroy_failures,
    }
