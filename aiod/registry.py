"""The live pools and jobs: what the metrics collector and /status read.

The I/O loop is the only writer: it adds and removes pools and jobs under
the registry's lock. Scrapes and /status run on the HTTP threads and read
copies (snapshots), taken under the lock and formatted outside it, so they
never see a pool or job half added and never hold the loop up for long.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiod import aio
from aiod.jobs import Job
from aiod.metrics import JobView
from aiod.pool import Pool, PoolSnapshot
from aiod.status import RecentLatency


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
        self.recent = RecentLatency()
        self.reload_ok = True
        self.reload_ts = 0.0
        self._procfs_root = procfs_root
        self._wall = wall

    def all_pools(self) -> list[Pool]:
        """Serving and retiring pools. For the loop, which is the only writer."""
        return list(self.pools.values()) + [r.pool for r in self.retiring]

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
