"""What a reload changes: the plan, computed from two configs alone.

A reload is all or nothing. aiod.reloader reads and parses the file on a
worker (aiod.worker), then calls :func:`plan` to learn what differs, prepares
every step that can fail (new pools, grown pools, job buffers, the metrics
socket), and commits only when all of them worked. Nothing here touches the
kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiod.config import Config, JobConfig


class ReloadError(Exception):
    """A reload could not be prepared; the running configuration is kept.

    The message is one operator-facing line (or several, one per problem).
    """


@dataclass(frozen=True)
class Plan:
    """The difference between the running config and the new one.

    A pool whose nr_events changed cannot be resized in place: it is replaced,
    a new pool under the same name, while the old one retires (drains, then
    is destroyed). Its jobs restart on the new pool.
    """

    create_pools: tuple[str, ...]   # new names, and the replaced ones
    keep_pools: tuple[str, ...]     # same name and nr_events: resized to the new size
    retire_pools: tuple[str, ...]   # removed from the config, and the replaced ones
    replaced_pools: frozenset[str]  # nr_events changed
    start_jobs: tuple[JobConfig, ...]
    stop_jobs: tuple[str, ...]      # removed, changed, or on a replaced pool
    metrics_moved: bool             # listen address changed

    @property
    def empty(self) -> bool:
        return not (self.create_pools or self.retire_pools or self.start_jobs
                    or self.stop_jobs or self.metrics_moved)


def plan(old: Config, new: Config) -> Plan:
    """What to add, resize, retire, start and stop to go from old to new."""
    old_pools = {p.name: p for p in old.pools}
    new_pools = {p.name: p for p in new.pools}
    replaced = frozenset(n for n, pc in new_pools.items()
                         if n in old_pools and pc.nr_events != old_pools[n].nr_events)
    old_jobs = {j.name: j for j in old.jobs}
    new_jobs = {j.name: j for j in new.jobs}

    def restarts(jc: JobConfig) -> bool:
        return jc.name not in old_jobs or jc != old_jobs[jc.name] or jc.pool in replaced

    return Plan(
        create_pools=tuple(n for n in new_pools if n not in old_pools or n in replaced),
        keep_pools=tuple(n for n in new_pools if n in old_pools and n not in replaced),
        retire_pools=tuple(n for n in old_pools if n not in new_pools or n in replaced),
        replaced_pools=replaced,
        start_jobs=tuple(jc for jc in new.jobs if restarts(jc)),
        stop_jobs=tuple(n for n, jc in old_jobs.items()
                        if n not in new_jobs or restarts(new_jobs[n])
                        or new_jobs[n].pool not in new_pools),
        metrics_moved=(new.metrics.host, new.metrics.port)
        != (old.metrics.host, old.metrics.port),
    )
