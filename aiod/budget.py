"""The host's AIO budget, as the daemon manages it: one object the I/O loop ticks.

Three things, each read from procfs on a worker thread (never on the I/O
loop: a /proc/PID/maps read waits for that process's mmap lock, which a
process stuck in a page fault holds indefinitely); the loop starts the work
and polls for its result:

- the headroom check (fs.aio-nr, every CHECK_INTERVAL) feeding the yield
  policy of aiod.headroom; the loop applies its targets through
  ``Pool.resize``, the lossless path a reload uses;
- the self-audit (aiod.selfaudit) of aiod's own rings against its records;
- the optional host scan (aiod.hostscan) of who holds the host's events,
  run and exported by aiod.host_scanner.

Its metrics come from its own collector, registered beside the daemon's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from aiod import aio
from aiod.aio_ring import PAGE, possible_cpus
from aiod.config import Config, PoolConfig
from aiod.headroom import CHECK_INTERVAL, Decision, HeadroomPolicy, room_problem
from aiod.host_scanner import HIDDEN_HINT, SCAN_DEADLINE, SCAN_STUCK, HostScanner, host_metrics
from aiod.hostscan import HostScan
from aiod.pool import Pool, PoolError
from aiod.procmaps import Ring
from aiod.selfaudit import Expected, Leak, SelfAudit, own_rings
from aiod.worker import Worker

log = logging.getLogger("aiod.budget")

AUDIT_INTERVAL = 5.0       # seconds between self-audits; a leak is confirmed by two

# Where they have always been imported from (the host scan's own module is aiod.host_scanner).
__all__ = ["AUDIT_INTERVAL", "HIDDEN_HINT", "SCAN_DEADLINE", "SCAN_STUCK", "Budget",
           "host_metrics"]


@dataclass
class _Sample:
    aio_nr: int
    aio_max_nr: int
    expected: list[Expected] | None     # None: no audit in this sample
    rings: list[Ring] | None
    # Pool sizes move between a sample's start and its result (a retirement
    # ends, a shrink or reload resizes): both are fixed when the sample starts.
    releasing: int = 0                  # events of contexts being torn down then
    epoch: int = 0                      # Budget._epoch then


class Budget:
    """See the module docstring. Every method but collect() runs on the I/O loop."""

    def __init__(self, cfg: Config, *, procfs_root: str | os.PathLike[str] = "/proc",
                 sys_root: str | os.PathLike[str] = "/sys",
                 clock: Callable[[], float] = time.monotonic,
                 audit_interval: float = AUDIT_INTERVAL) -> None:
        self.cfg = cfg
        self.audit_interval = audit_interval
        self.procfs_root = procfs_root
        self.sys_root = sys_root
        self.clock = clock
        self.policy = HeadroomPolicy(cfg)
        try:
            cpus = possible_cpus(sys_root)
        except (OSError, ValueError):
            cpus = os.cpu_count() or 1
        self.audit = SelfAudit(cpus)
        self._lock = threading.Lock()   # guards what collect() reads
        self.yields: dict[str, int] = {p.name: 0 for p in cfg.pools}
        self.last_free: int | None = None
        self.last_reserve = 0
        self.host_scanner = HostScanner(procfs_root, sys_root, clock)
        self._pools: Mapping[str, Pool] = {}
        self._all_pools: Callable[[], list[Pool]] = list
        self._sampler = Worker("aiod-headroom")
        self._next_sample = 0.0
        self._next_audit = 0.0
        self._said: set[str] = set()    # one-time messages already logged
        self._epoch = 0                 # bumped by every resize: older samples decide nothing

    # ------------------------------------------------------------ set-up
    def room_problem(self, cfg: Config | None = None) -> str | None:
        cfg = cfg or self.cfg
        try:
            _, max_nr = aio.system_aio_usage(self.procfs_root)
        except (OSError, ValueError):
            return None
        return room_problem(cfg, max_nr)

    def initial_sizes(self, aio_nr: int, aio_max_nr: int) -> dict[str, int]:
        sizes = self.policy.initial_targets(aio_nr, aio_max_nr)
        for p in self.cfg.pools:
            if sizes[p.name] < p.contexts:
                log.warning("pool %s: starting with %d of %d contexts: free AIO headroom "
                            "(fs.aio-max-nr %d - fs.aio-nr %d) leaves less than "
                            "headroom_reserve %s for other processes at full size",
                            p.name, sizes[p.name], p.contexts, aio_max_nr, aio_nr,
                            self.cfg.headroom_reserve, extra={"AIOD_POOL": p.name})
        return sizes

    def attach(self, pools: Mapping[str, Pool], all_pools: Callable[[], list[Pool]]) -> None:
        """The daemon's live pool map (by name) and all pools, retiring ones included."""
        self._pools = pools
        self._all_pools = all_pools
        if self.policy.active:
            log.info("headroom: keeping %s AIO events free for other processes; elastic "
                     "pools yield down to min_contexts (checked every %gs)",
                     self.cfg.headroom_reserve, CHECK_INTERVAL)
        if self.cfg.host_scan is not None:
            log.info("host scan: reading /proc/*/maps every %gs, top %d holders exported",
                     self.cfg.host_scan.interval, self.cfg.host_scan.top)

    def configure(self, cfg: Config) -> None:
        """After a reload committed."""
        self.cfg = cfg
        self._epoch += 1
        self.policy.configure(cfg)
        with self._lock:
            self.yields = {p.name: self.yields.get(p.name, 0) for p in cfg.pools}

    def wanted_size(self, pc: PoolConfig, cfg: Config) -> int:
        """The size a reload should give the pool: its contexts, less what is yielded."""
        if not cfg.headroom_reserve.enabled or not pc.elastic:
            return pc.contexts
        t = self.policy.targets.get(pc.name, pc.contexts)
        return max(pc.min_contexts, min(pc.contexts, t))

    # -------------------------------------------------------------- tick
    def tick(self, now: float) -> None:
        """Once per loop turn, while serving. Never blocks."""
        self._tick_sampler(now)
        if self.cfg.host_scan is not None:
            self.host_scanner.tick(now, self.cfg.host_scan.interval)

    @property
    def scan(self) -> HostScan | None:
        """The latest host scan's result (None before the first, or with host_scan off)."""
        return self.host_scanner.latest()

    @scan.setter
    def scan(self, value: HostScan | None) -> None:
        self.host_scanner.set_latest(value)

    def _tick_sampler(self, now: float) -> None:
        done, result, error = self._sampler.poll()
        if done:
            if error is not None:
                self._say_once("sample", "cannot read fs.aio-nr or /proc/self/maps: %s; "
                               "the headroom check and the leak audit are paused", error)
            elif isinstance(result, _Sample):
                self._apply_sample(result, now)
        if self._sampler.busy or now < self._next_sample:
            return
        audit = now >= self._next_audit
        pools = self._all_pools() if audit else []
        proc = self.procfs_root
        # Taken before fs.aio-nr is read: a context whose teardown ends in
        # between is credited twice (a yield one check too small), never missed
        # (a yield too large, which is what a shared aio-nr would punish).
        releasing = sum(p.retiring * p.nr_events for p in self._pools.values())
        epoch = self._epoch

        def sample() -> _Sample:
            nr, max_nr = aio.system_aio_usage(proc)
            if not audit:
                return _Sample(nr, max_nr, None, None, releasing, epoch)
            expected = [Expected(p.name, i, kid, n) for p in pools
                        for i, kid, n in p.live_contexts()]
            return _Sample(nr, max_nr, expected, own_rings(proc), releasing, epoch)

        self._sampler.start(sample, now)
        self._next_sample = now + (min(CHECK_INTERVAL, self.audit_interval)
                                   if self.policy.active else self.audit_interval)
        if audit:
            self._next_audit = now + self.audit_interval

    def _apply_sample(self, s: _Sample, now: float) -> None:
        if s.expected is not None and s.rings is not None:
            for leak in self.audit.observe(s.expected, s.rings):
                self._log_leak(leak)
        if s.epoch != self._epoch:
            return  # a resize since it started: its aio-nr predates that resize
        before = dict(self.policy.targets)
        d = self.policy.decide(s.aio_nr, s.aio_max_nr, now, s.releasing)
        with self._lock:
            self.last_free, self.last_reserve = s.aio_max_nr - s.aio_nr, d.reserve
        for name, target in d.targets.items():
            pool = self._pools.get(name)
            if pool is None or target == before.get(name):
                continue
            if name in d.shrunk:
                self._shrink(pool, target, d, s)
            else:
                self._grow(pool, target, d)

    def _shrink(self, pool: Pool, target: int, d: Decision, s: _Sample) -> None:
        have = pool.size
        if target >= have:
            return
        # The same call a reload makes: retiring contexts finish their I/O first.
        pool.resize(target, retire_timeout=self.cfg.shutdown.drain_timeout)
        self._epoch += 1
        with self._lock:
            self.yields[pool.name] = self.yields.get(pool.name, 0) + 1
        log.warning("pool %s: yielding %d contexts (%d AIO events) to other processes: free "
                    "headroom %d (fs.aio-max-nr %d - fs.aio-nr %d, %d more on their way back) "
                    "is below headroom_reserve %d; %d -> %d contexts, in-flight I/O finishes "
                    "first", pool.name, have - target, (have - target) * pool.nr_events,
                    s.aio_max_nr - s.aio_nr, s.aio_max_nr, s.aio_nr, s.releasing,
                    d.reserve, have, target, extra={"AIOD_POOL": pool.name})

    def _grow(self, pool: Pool, target: int, d: Decision) -> None:
        have = pool.size
        if target <= have:
            return
        try:
            pool.resize(target)
            self._epoch += 1
        except PoolError as e:
            # Someone took the room between the check and io_setup: try again later.
            self.policy.targets[pool.name] = pool.size
            log.warning("pool %s: cannot grow back to %d contexts yet: %s",
                        pool.name, target, e, extra={"AIOD_POOL": pool.name})
            return
        log.info("pool %s: AIO headroom is back (%d free, reserve %d): growing %d -> %d "
                 "contexts", pool.name, d.free, d.reserve,
                 have, target, extra={"AIOD_POOL": pool.name})

    def _log_leak(self, leak: Leak) -> None:
        log.error("context leak: %s", leak.describe(),
                  extra={"AIOD_POOL": leak.pool} if leak.pool else {})

    def _say_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(msg, *args)

    # ------------------------------------------------------------ reports
    def status(self) -> str | None:
        """A fragment for systemd's STATUS= line while pools are yielding."""
        n = self.policy.yielded()
        if not n:
            return None
        return (f"yielding {n} context{'s' if n != 1 else ''} to other processes "
                f"(free AIO headroom {self.last_free} < reserve {self.last_reserve})"
                if self.last_free is not None and self.last_free < self.last_reserve else
                f"yielding {n} context{'s' if n != 1 else ''} to other processes")

    def final_report(self) -> dict[str, object]:
        """After every pool is destroyed: rings still mapped are leaks. Blocking is fine here."""
        try:
            left = own_rings(self.procfs_root)
        except OSError as e:
            return {"context_leaks": len(self.audit.seen), "aio_rings_left": None,
                    "context_leak_details": [f"cannot read /proc/self/maps: {e.strerror}"]}
        at_exit = {Leak("unrecorded", r.start, r.size // PAGE) for r in left}
        for leak in sorted(at_exit - self.audit.seen, key=lambda x: x.address):
            log.error("context leak at shutdown: %s", leak.describe())
        leaks = self.audit.seen | at_exit
        return {"context_leaks": len(leaks), "aio_rings_left": len(left),
                "context_leak_details": sorted(x.describe() for x in leaks)}

    # ------------------------------------------------------------ metrics
    def collect(self) -> Iterator[Metric]:
        """prometheus_client Collector protocol; runs on the scrape thread."""
        with self._lock:
            yields = dict(self.yields)
        scan = self.scan
        yield from _budget_families(len(self.audit.current), yields, dict(self.policy.targets),
                                    self.last_reserve)
        if scan is not None and self.cfg.host_scan is not None:
            yield from host_metrics(scan, self.cfg.host_scan.top)


def _budget_families(leaks: int, yields: dict[str, int], targets: dict[str, int],
                     reserve: int) -> Iterator[Metric]:
    """The leak audit's and the yield policy's series."""
    g = GaugeMetricFamily("aiod_context_leaks", "AIO contexts whose kernel ring and "
                          "aiod's records disagree (normally 0; see the log).")
    g.add_metric([], leaks)
    yield g
    c = CounterMetricFamily("aiod_pool_yields", "Times the pool shrank to give AIO "
                            "headroom back to other processes.", labels=["pool"])
    t = GaugeMetricFamily("aiod_pool_contexts_target", "Contexts the pool should have "
                          "now: its configured contexts, less what it yields.",
                          labels=["pool"])
    for name in sorted(targets):
        c.add_metric([name], yields.get(name, 0))
        t.add_metric([name], targets[name])
    yield c
    yield t
    g = GaugeMetricFamily("aiod_headroom_reserve_events", "AIO events aiod keeps free "
                          "for other processes (headroom_reserve; 0 is off).")
    g.add_metric([], reserve)
    yield g
