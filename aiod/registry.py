"""The live pools and jobs: what the metrics collector and /status read.

The I/O loop is the only writer, and every change goes through this module:
pools are added, retired (a reload removed or replaced them) and ended (torn
down, their numbers kept for the report); jobs are started, stopped, and
forgotten once their last op is back. Each change happens under the
registry's lock. Scrapes and /status run on the HTTP threads and read copies
(snapshots), taken under the lock and formatted outside it, so they never see
a pool or job half added and never hold the loop up for long.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiod import aio
from aiod.jobs import Job, JobState
from aiod.metrics import JobView
from aiod.pool import Pool, PoolSnapshot
from aiod.report import sum_totals, totals_text
from aiod.status import RecentLatency

log = logging.getLogger("aiod.registry")


@dataclass
class RetiringPool:
    """A pool removed (or replaced) by a reload, draining until torn down."""

    pool: Pool
    since: float
    retired: bool = False  # Pool.retire called: no new submissions, teardown under way


class Registry:
    """See the module docstring. Implements aiod.metrics.Source."""

    def __init__(self, *, procfs_root: str | os.PathLike[str] = "/proc",
                 wall: Callable[[], float] = time.time) -> None:
        self.lock = threading.Lock()  # held by the loop while it changes the three below
        self.pools: dict[str, Pool] = {}
        self.retiring: list[RetiringPool] = []
        self.jobs: dict[str, Job] = {}
        # Loop-only: jobs stopped with ops still in flight, and removed pools'
        # numbers (merged by name) for the shutdown report.
        self.stopping_jobs: list[Job] = []
        self.ended: dict[str, PoolSnapshot] = {}
        self.recent = RecentLatency()
        self.reload_ok = True
        self.reload_ts = 0.0
        self._procfs_root = procfs_root
        self._wall = wall

    # -- the loop's view
    def all_pools(self) -> list[Pool]:
        """Serving and retiring pools. For the loop, which is the only writer."""
        return list(self.pools.values()) + [r.pool for r in self.retiring]

    def all_jobs(self) -> list[Job]:
        """Running jobs and stopped ones still waiting for their ops."""
        return list(self.jobs.values()) + self.stopping_jobs

    def in_flight(self) -> int:
        return sum(p.in_flight for p in self.all_pools())

    def summary(self) -> str:
        """`2 pools (8 contexts), 3/3 jobs running`: for logs and STATUS=."""
        contexts = sum(p.size for p in self.pools.values())
        running = sum(1 for j in self.jobs.values() if j.state is JobState.RUNNING)
        preparing = sum(1 for j in self.jobs.values() if j.state is JobState.PREPARING)
        return (f"{len(self.pools)} pool{'s' if len(self.pools) != 1 else ''} "
                f"({contexts} contexts), {running}/{len(self.jobs)} jobs running"
                + (f", {preparing} preparing their targets" if preparing else ""))

    def status_line(self, budget: str | None) -> str:
        """The summary with the op totals and the budget's state: systemd's STATUS=."""
        t = sum_totals([p.snapshot() for p in self.all_pools()])
        errs = sum(sum(j.errors.values()) for j in self.jobs.values())
        line = (f"{self.summary()}; {t['submitted']} ops, {t['in_flight']} in flight, "
                f"{t['failed']} failed")
        if errs:
            line += f", {errs} job errors"
        if budget:
            line += f"; {budget}"
        return line

    # -- the loop's changes: pools
    def add_pools(self, pools: Mapping[str, Pool]) -> None:
        with self.lock:
            self.pools.update(pools)

    def retire_pool(self, name: str, now: float, why: str) -> None:
        """Out of the serving map; it drains and is torn down (tend_retiring)."""
        with self.lock:
            pool = self.pools.pop(name)
            self.retiring.append(RetiringPool(pool, now))
        log.info("pool %s: retiring (%s)", name, why, extra={"AIOD_POOL": name})

    def tend_retiring(self, drain_timeout: float, destroy_timeout: float) -> None:
        """Pools removed by a reload: each drains for up to drain_timeout, then
        its teardown cancels and destroys on threads. The loop only looks."""
        for r in list(self.retiring):
            pool = r.pool
            if not r.retired:
                r.retired = True
                pool.retire(drain_timeout, destroy_timeout)
            if not pool.torn_down or pool.stuck:
                continue  # a stuck context keeps its pool on show until io_destroy returns
            snap = pool.snapshot()
            log.info("pool %s removed: %d contexts destroyed, %d failed; %s", pool.name,
                     snap.contexts_by_state()["destroyed"], snap.contexts_by_state()["failed"],
                     totals_text(snap.totals()), extra={"AIOD_POOL": pool.name})
            with self.lock:
                self.retiring.remove(r)
                self._end_pool(snap)

    def _end_pool(self, snap: PoolSnapshot) -> None:
        """Keep a removed pool's numbers for the report: one entry per name."""
        before = self.ended.get(snap.name)
        self.ended[snap.name] = snap if before is None else before.merged(snap)

    def destroy_now(self) -> None:
        """A startup that failed: close every pool, waiting for the kernel."""
        for pool in self.pools.values():
            pool.close()
        with self.lock:
            self.pools.clear()

    # -- the loop's changes: jobs
    def start_job(self, job: Job) -> Job:
        job.start()
        with self.lock:
            self.jobs[job.name] = job
        return job

    def stop_job(self, job: Job) -> None:
        job.stop()
        with self.lock:
            del self.jobs[job.name]
        if job.state is JobState.STOPPED:
            self._forget_job(job)
        else:
            self.stopping_jobs.append(job)
        log.info("job %s: stopped", job.name, extra={"AIOD_JOB": job.name})

    def close_idle_jobs(self) -> None:
        """Stopped jobs whose last op came back: their target closes."""
        for job in [j for j in self.stopping_jobs if j.close_if_idle()]:
            self.stopping_jobs.remove(job)
            self._forget_job(job)

    def _forget_job(self, job: Job) -> None:
        if job.name not in self.jobs:  # removed, not restarted under the same name
            job.pool.forget(job.name)

    # -- aiod.metrics.Source: any thread
    def pool_snapshots(self) -> list[PoolSnapshot]:
        with self.lock:
            pools = self.all_pools()
        snaps = [p.snapshot() for p in pools]
        self.recent.observe(self._wall(), snaps)  # scrapes keep `aiod status` latency recent
        return snaps

    def job_views(self) -> list[JobView]:
        with self.lock:
            jobs = list(self.jobs.values())
        return [JobView(name=j.name, pool=j.pool.name, state=j.state.value,
                        errors=dict(j.errors), timeouts=j.timeouts, skipped=j.skipped,
                        type=j.cfg.type, op=j.cfg.op, timeout=j.cfg.timeout)
                for j in jobs]

    def aio_usage(self) -> tuple[int, int]:
        try:
            return aio.system_aio_usage(self._procfs_root)
        except (OSError, ValueError):
            return (0, 0)

    def reload_status(self) -> tuple[bool, float]:
        return self.reload_ok, self.reload_ts
