"""Prometheus exposition of aiod's state: the collector over pool and job snapshots.

The collector owns no counters. At scrape time it asks the daemon for
snapshots (copied under the pools' locks) and formats them outside any lock,
so a scrape never slows the I/O loop by more than the copy.

The HTTP endpoint that serves it is :mod:`aiod.metrics_server` (what scrapes
may cost is bounded in :mod:`aiod.scrape_pacing`); their names are
re-exported here, where the daemon and tests have always imported them from.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from aiod import __version__
from aiod.accounting import LATENCY_BUCKETS
from aiod.metrics_server import (
    IDLE_TIMEOUT,
    LISTEN_BACKLOG,
    MAX_CONNECTIONS,
    MAX_REQUEST_RATE,
    REQUEST_BURST,
    TEXT,
    MetricsServer,
    Response,
    Route,
)
from aiod.pool import PoolSnapshot
from aiod.scrape_pacing import RequestPacer, SharedRender

__all__ = [
    "IDLE_TIMEOUT",
    "JOB_STATES",
    "LISTEN_BACKLOG",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_RATE",
    "REQUEST_BURST",
    "TEXT",
    "AiodCollector",
    "JobView",
    "MetricsServer",
    "RequestPacer",
    "Response",
    "Route",
    "SharedRender",
    "Source",
    "errno_name",
    "make_registry",
]

# The states aiod_job_state shows (jobs.JobState's values; listed here so the
# collector does not depend on the jobs module).
JOB_STATES = ("starting", "preparing", "running", "reopening", "error", "stopping",
              "stopped")


@dataclass
class JobView:
    """What the collector needs of a job, copied by the I/O loop's owner."""

    name: str
    pool: str
    state: str
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    skipped: int = 0
    type: str = ""          # probe or load
    op: str = ""            # the configured op (randread, write, ...)
    timeout: float = 0.0    # seconds an op may be in flight before it counts as hung


class Source(Protocol):
    """What the daemon exposes to the collector (all thread-safe)."""

    def pool_snapshots(self) -> list[PoolSnapshot]: ...
    def job_views(self) -> list[JobView]: ...
    def aio_usage(self) -> tuple[int, int]: ...
    def reload_status(self) -> tuple[bool, float]: ...


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, str(err))


class AiodCollector:
    """Reads the daemon's state at scrape time (prometheus_client Collector protocol)."""

    def __init__(self, source: Source) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        src = self._source
        # Both read before anything is yielded: one moment's view of pools and jobs.
        pools = src.pool_snapshots()
        jobs = src.job_views()
        info = GaugeMetricFamily("aiod_build_info", "aiod build information; always 1.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from _context_families(pools)
        families, last_completion = _op_families(pools)
        yield from families
        yield from _job_families(jobs, last_completion)
        yield from _kernel_and_reload_families(src)


def _context_families(pools: list[PoolSnapshot]) -> list[Metric]:
    """Each pool's contexts: their states, setups and destroys, its ops in flight."""
    contexts = GaugeMetricFamily("aiod_contexts", "Kernel AIO contexts by lifecycle state.",
                                 labels=["pool", "state"])
    in_flight = GaugeMetricFamily("aiod_ops_in_flight",
                                  "Operations submitted to the kernel and not yet finished.",
                                  labels=["pool"])
    oldest = GaugeMetricFamily("aiod_ops_oldest_in_flight_seconds",
                               "Age of the oldest operation still in flight (0 when none): "
                               "hung I/O shows here.", labels=["pool"])
    setups = CounterMetricFamily("aiod_context_setups", "Successful io_setup calls.",
                                 labels=["pool"])
    destroys = CounterMetricFamily("aiod_context_destroys", "Successful io_destroy calls.",
                                   labels=["pool"])
    destroy_fail = CounterMetricFamily("aiod_context_destroy_failures",
                                       "Contexts whose io_destroy failed or did not return "
                                       "in time.", labels=["pool"])
    setup_fail = CounterMetricFamily("aiod_context_setup_failures",
                                     "io_setup calls that failed, by errno.",
                                     labels=["pool", "errno"])
    setup_fail_any = CounterMetricFamily("aiod_context_setup_failures_any",
                                         "io_setup calls that failed, any errno (exported "
                                         "at zero).", labels=["pool"])
    for p in pools:
        for ctx_state, n in p.contexts_by_state().items():
            contexts.add_metric([p.name, ctx_state], n)
        in_flight.add_metric([p.name], p.in_flight)
        oldest.add_metric([p.name], p.oldest_in_flight_seconds)
        setups.add_metric([p.name], p.setups)
        destroys.add_metric([p.name], p.destroys)
        destroy_fail.add_metric([p.name], p.destroy_failures)
        for err, n in sorted(p.setup_failures.items()):
            setup_fail.add_metric([p.name, errno_name(err)], n)
        setup_fail_any.add_metric([p.name], sum(p.setup_failures.values()))
    return [contexts, in_flight, oldest, setups, destroys, destroy_fail, setup_fail,
            setup_fail_any]


def _op_families(pools: list[PoolSnapshot]) -> tuple[list[Metric], dict[str, float]]:
    """Every (pool, job, op) series: outcomes and latency; and each job's last completion."""
    submitted = CounterMetricFamily("aiod_ops_submitted", "Operations submitted.",
                                    labels=["pool", "job", "op"])
    completed = CounterMetricFamily("aiod_ops_completed",
                                    "Operations that completed successfully.",
                                    labels=["pool", "job", "op"])
    cancelled = CounterMetricFamily("aiod_ops_cancelled",
                                    "Operations cancelled (including those in flight when "
                                    "their context was destroyed).",
                                    labels=["pool", "job", "op"])
    failed = CounterMetricFamily("aiod_ops_failed", "Operations that failed, by errno.",
                                 labels=["pool", "job", "op", "errno"])
    # The errno-labelled series above appear only with their first failure,
    # and increase() cannot see that first step. These have no label known
    # only at failure time, so they exist at zero from the start.
    failed_any = CounterMetricFamily("aiod_ops_failed_any",
                                     "Operations that failed, any errno (aiod_ops_failed_total "
                                     "summed over errno, exported at zero).",
                                     labels=["pool", "job", "op"])
    latency = HistogramMetricFamily("aiod_op_latency_seconds",
                                    "Operation latency from submit to completion.",
                                    labels=["pool", "job", "op"], unit="")
    last_completion: dict[str, float] = {}
    for p in pools:
        for st in p.stats:
            labels = [p.name, st.job, st.op]
            submitted.add_metric(labels, st.submitted)
            completed.add_metric(labels, st.completed)
            cancelled.add_metric(labels, st.cancelled)
            for err, n in sorted(st.failed.items()):
                failed.add_metric(labels + [errno_name(err)], n)
            failed_any.add_metric(labels, sum(st.failed.values()))
            latency.add_metric(labels, _latency_buckets(st.buckets), st.latency_sum_ns / 1e9)
            if st.last_completion is not None:
                last_completion[st.job] = max(last_completion.get(st.job, 0.0),
                                              st.last_completion)
    return [submitted, completed, cancelled, failed, failed_any, latency], last_completion


def _latency_buckets(counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one past every bound) as cumulative Prometheus buckets."""
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip(LATENCY_BUCKETS, counts):
        cumulative += n
        buckets.append((_fmt(bound), cumulative))
    buckets.append(("+Inf", cumulative + counts[-1]))
    return buckets


def _job_families(jobs: list[JobView], last_completion: dict[str, float]) -> list[Metric]:
    """Each job's state, configuration and the errors that are not an op's outcome."""
    last = GaugeMetricFamily("aiod_job_last_completion_timestamp_seconds",
                             "Unix time of the job's last completed operation "
                             "(0 before the first).", labels=["job"])
    up = GaugeMetricFamily("aiod_job_running", "1 when the job is doing I/O, 0 when its "
                           "target is unusable, being prepared, or it is stopping.",
                           labels=["job", "pool"])
    state = GaugeMetricFamily("aiod_job_state", "1 for the state the job is in: preparing "
                              "(its target is being created and filled), running, reopening (its target "
                              "changed under it), error "
                              "(target unusable, retried), stopping.",
                              labels=["job", "state"])
    errors = CounterMetricFamily("aiod_job_errors", "Job errors that are not an operation's "
                                 "own outcome (target missing, permission, full disk, "
                                 "refused write), by reason.", labels=["job", "reason"])
    errors_any = CounterMetricFamily("aiod_job_errors_any", "Job errors, any reason "
                                     "(exported at zero).", labels=["job"])
    job_info = GaugeMetricFamily("aiod_job_info", "The job's configuration; always 1.",
                             labels=["job", "pool", "type", "op"])
    timeout = GaugeMetricFamily("aiod_job_timeout_seconds", "How long an operation of the "
                                "job may be in flight before it counts as hung.",
                                labels=["job", "pool"])
    timeouts = CounterMetricFamily("aiod_job_op_timeouts", "Operations still in flight past "
                                   "the job's timeout (hung I/O).", labels=["job"])
    skipped = CounterMetricFamily("aiod_job_skipped_ops", "Operations not issued because "
                                  "the job's iodepth or the pool was full.", labels=["job"])
    for j in jobs:
        last.add_metric([j.name], last_completion.get(j.name, 0.0))
        up.add_metric([j.name, j.pool], 1 if j.state == "running" else 0)
        for st_name in JOB_STATES:
            state.add_metric([j.name, st_name], 1 if j.state == st_name else 0)
        for reason, n in sorted(j.errors.items()):
            errors.add_metric([j.name, reason], n)
        errors_any.add_metric([j.name], sum(j.errors.values()))
        job_info.add_metric([j.name, j.pool, j.type, j.op], 1)
        timeout.add_metric([j.name, j.pool], j.timeout)
        timeouts.add_metric([j.name], j.timeouts)
        skipped.add_metric([j.name], j.skipped)
    return [last, up, state, errors, errors_any, job_info, timeout, timeouts, skipped]


def _kernel_and_reload_families(src: Source) -> Iterator[Metric]:
    """The host's AIO usage and whether the last configuration load succeeded."""
    nr, max_nr = src.aio_usage()
    g = GaugeMetricFamily("aiod_kernel_aio_nr", "fs.aio-nr: AIO events allocated system-wide.")
    g.add_metric([], nr)
    yield g
    g = GaugeMetricFamily("aiod_kernel_aio_max_nr", "fs.aio-max-nr: the system-wide limit.")
    g.add_metric([], max_nr)
    yield g
    ok, ts = src.reload_status()
    g = GaugeMetricFamily("aiod_config_last_reload_successful",
                          "1 when the last configuration load succeeded.")
    g.add_metric([], 1 if ok else 0)
    yield g
    g = GaugeMetricFamily("aiod_config_last_reload_success_timestamp_seconds",
                          "Unix time of the last successful configuration load.")
    g.add_metric([], ts)
    yield g


def _fmt(bound: float) -> str:
    return repr(float(bound))


def make_registry(source: Source) -> CollectorRegistry:
    """Our own registry: never the global one (tests would collide)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AiodCollector(source))
    return registry
