"""`aiod run`: the daemon's lifecycle in three phases.

    startup()    pools up, metrics bound, jobs started, READY=1
    main_loop()  submit what is due, wait for completions or a signal, reap
    shutdown()   drain -> cancel -> destroy -> report, exit 0

Signal handlers (aiod.signals) only record the signal and wake the loop; the
loop acts on them through a handle_<signal> table: TERM/INT shut down, a
second TERM/INT during the drain skips to cancel, HUP reloads (and is ignored
during shutdown).

A reload reads and parses the file on a worker (aiod.worker) while the loop
keeps turning; once parsed, aiod.reload.plan says what differs, every step
that can fail is prepared, and only then committed. The live pools and jobs
are kept in aiod.registry, which the metrics collector reads; the shutdown
report is aiod.report's.

The loop never waits on the kernel's teardown of a context: shrinks, pool
removals and shutdown hand contexts to their pool's teardown (aiod.teardown),
which io_destroys them on threads while the loop keeps turning.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from aiod import __version__, aio, logs
from aiod import config as config_mod
from aiod.budget import Budget
from aiod.config import Config, ConfigError, JobConfig
from aiod.exit_codes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_TEMPFAIL
from aiod.jobs import Job, JobResourceError, JobState, make_job
from aiod.metrics import JobView, MetricsServer, make_registry
from aiod.notify import Notifier
from aiod.pool import Pool, PoolCapacityError, PoolError, PoolSnapshot
from aiod.registry import Registry, RetiringPool
from aiod.reload import Plan, ReloadError
from aiod.reload import plan as reload_plan
from aiod.report import build as build_report
from aiod.report import sum_totals, totals_text
from aiod.signals import SignalInbox
from aiod.status import DaemonInfo
from aiod.status import build as build_status
from aiod.targets import OwnedFiles
from aiod.teardown import Step, TeardownCounts
from aiod.worker import Worker

log = logging.getLogger("aiod.daemon")

STATUS_INTERVAL = 5.0
MAX_WAIT = 0.5          # the loop wakes at least this often (watchdog, status, timers)
HEALTH_STALL = 10.0     # /healthz fails when the loop has not turned for this long


class Phase(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    CANCELLING = "cancelling"
    DESTROYING = "destroying"
    STOPPED = "stopped"


class StartupError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Staged:
    """What a reload has prepared, not yet committed."""

    owned: OwnedFiles | None
    created: dict[str, Pool] = field(default_factory=dict)
    grown: list[tuple[Pool, int]] = field(default_factory=list)   # and their sizes before
    jobs: dict[str, Job] = field(default_factory=dict)
    server: MetricsServer | None = None
    released: bool = False  # the running metrics server was closed to make room for server


@dataclass
class _Stopping:
    """What one shutdown has done so far, for its report."""

    before: TeardownCounts
    hurried: bool = False
    drained: int = 0
    drain_seconds: float = 0.0
    cancel_seconds: float = 0.0
    destroy_seconds: float = 0.0


@dataclass
class ShutdownResult:
    exit_code: int
    report: dict[str, object] = field(default_factory=dict)


class Daemon:
    def __init__(self, cfg: Config, *, config_path: str | None = None,
                 notifier: Notifier | None = None,
                 procfs_root: str | os.PathLike[str] = "/proc",
                 env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 signals: SignalInbox | None = None,
                 load_config: Callable[[str | None, Mapping[str, str]], Config] | None = None
                 ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        # Reading and parsing the file at reload runs on this worker (a 1 MiB
        # YAML takes seconds); the loop applies the result when it is done.
        self._load_config = load_config or (lambda path, env: config_mod.load(path, env=env))
        self._parser = Worker("aiod-reload")
        self._reload_again = False
        self.env = os.environ if env is None else env
        self.notifier = notifier or Notifier(env=self.env)
        self.procfs_root = procfs_root
        self.clock = clock
        self.wall = wall
        self.phase = Phase.STARTING
        # The live pools and jobs, for scrapes and /status (aiod.registry).
        self.live = Registry(procfs_root=procfs_root, wall=wall)
        self.pools = self.live.pools
        self.jobs = self.live.jobs
        self._retiring_pools = self.live.retiring
        self._stopping_jobs: list[Job] = []
        self._ended_pools: dict[str, PoolSnapshot] = {}  # removed pools, merged by name
        self._owned_files: OwnedFiles | None = None
        # `aiod run` installs the handlers before anything else; a Daemon made
        # some other way installs its own at startup.
        self.signals = signals if signals is not None else SignalInbox()
        self.metrics: MetricsServer | None = None
        self._registry = make_registry(self.live)
        # The host's AIO budget: headroom yields, self-audit, host scan (aiod.budget).
        self.budget = Budget(cfg, procfs_root=procfs_root, clock=clock)
        self._registry.register(self.budget)
        self._heartbeat = clock()
        self._reload_attempt_ts = 0.0
        self._reload_error: str | None = None
        self._next_status = 0.0
        self._next_watchdog = 0.0
        self.aio_nr_before = 0
        self.started_at = wall()

    # ================================================================ startup
    def startup(self) -> None:
        """Pools up, metrics bound, jobs started, then READY=1. Raises StartupError."""
        self.signals.install()
        self.aio_nr_before = aio.system_aio_usage(self.procfs_root)[0]
        problem = self.budget.room_problem()
        if problem:
            raise StartupError(problem, EXIT_CONFIG)
        sizes = self.budget.initial_sizes(*aio.system_aio_usage(self.procfs_root))
        self._prepare_state_directory(self.cfg.state_directory)
        try:
            for pc in self.cfg.pools:
                self.pools[pc.name] = self._make_pool(pc.name, sizes[pc.name], pc.nr_events)
        except PoolCapacityError as e:
            self._destroy_pools_now()
            raise StartupError(str(e), EXIT_TEMPFAIL) from e
        except PoolError as e:
            self._destroy_pools_now()
            raise StartupError(str(e), EXIT_FAILURE) from e
        try:
            self.metrics = self._bind_metrics(self.cfg)
        except OSError as e:
            self._destroy_pools_now()
            raise StartupError(f"cannot listen for metrics on {self.cfg.metrics.host}:"
                               f"{self.cfg.metrics.port}: {e.strerror}", EXIT_FAILURE) from e
        owned = self._owned_files = self._owned(self.cfg.state_directory)
        try:
            prepared = self._prepare_jobs(self.cfg.jobs, self.pools, owned)
        except StartupError:
            self.metrics.close()
            self._destroy_pools_now()
            raise
        self.metrics.start()
        self.budget.attach(self.pools, self._all_pools)
        for job in prepared.values():
            self._start_job(job)
        self.live.reload_ts = self._reload_attempt_ts = self.wall()
        self.phase = Phase.SERVING
        log.info("aiod %s serving: %s; metrics on %s", __version__, self._summary(),
                 self.metrics.url)
        self.notifier.ready(self._status_line())
        now = self.clock()
        self._next_status = now + STATUS_INTERVAL
        self._next_watchdog = now

    def _make_pool(self, name: str, contexts: int, nr_events: int) -> Pool:
        def on_setup_failure(pool: str, err: int) -> None:
            log.warning("pool %s: io_setup(%d) failed: %s", pool, nr_events, os.strerror(err),
                        extra={"AIOD_POOL": pool, "ERRNO": err})
        pool = Pool(name, contexts, nr_events, procfs_root=self.procfs_root,
                    on_setup_failure=on_setup_failure,
                    destroy_timeout=self.cfg.shutdown.destroy_timeout)
        log.info("pool %s: %d contexts x %d nr_events", name, contexts, nr_events,
                 extra={"AIOD_POOL": name})
        return pool

    def _bind_metrics(self, cfg: Config) -> MetricsServer:
        return MetricsServer(cfg.metrics.host, cfg.metrics.port, self._registry,
                             healthy=self.healthy, ready=self.ready, status=self.status_json,
                             render_key=self.reload_status)

    def _rebind_metrics(self, old: Config, new: Config) -> tuple[MetricsServer, bool]:
        """A server bound to new's address, and whether the running one was closed for it.

        The new socket is bound while the old one still listens, so a failure
        changes nothing. On the same port, though, the two addresses can
        overlap (127.0.0.1:P then 0.0.0.0:P): then the old server is closed
        first, and reopened by the caller if the new bind or the reload fails.
        """
        where = f"{new.metrics.host}:{new.metrics.port}"
        try:
            return self._bind_metrics(new), False
        except OSError as e:
            if e.errno != errno.EADDRINUSE or new.metrics.port != old.metrics.port:
                raise ReloadError(f"cannot listen for metrics on {where}: {e.strerror}") from e
        if self.metrics is not None:
            self.metrics.close()
        try:
            return self._bind_metrics(new), True
        except OSError as e:
            self._restore_metrics(old)
            raise ReloadError(f"cannot listen for metrics on {where}: {e.strerror} (also "
                              f"after closing {old.metrics.host}:{old.metrics.port}, which "
                              f"overlaps it)") from e

    def _restore_metrics(self, old: Config) -> None:
        try:
            self.metrics = self._bind_metrics(old)
            self.metrics.start()
        except OSError as e:
            log.error("cannot listen for metrics on %s:%d again: %s; /metrics is down until "
                      "a reload or restart", old.metrics.host, old.metrics.port, e.strerror)

    def _prepare_state_directory(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            log.error("cannot create the state directory %s: %s; jobs with relative targets "
                      "and the shutdown report will fail", path, e.strerror)

    def _owned(self, state_dir: Path) -> OwnedFiles | None:
        """The one record of aiod's files for state_dir.

        Kept across reloads: fills still running record their files in it from
        worker threads, and a second instance would overwrite their entries.
        """
        if not state_dir.is_dir():
            return None
        if self._owned_files is not None and self._owned_files.path.parent == state_dir:
            return self._owned_files
        return OwnedFiles(state_dir)  # kept by the caller once it commits to it

    def _prepare_jobs(self, jcs: Iterable[JobConfig], pools: Mapping[str, Pool],
                      owned: OwnedFiles | None) -> dict[str, Job]:
        """Jobs built with their buffers allocated, not yet started. Raises StartupError."""
        prepared: dict[str, Job] = {}
        for jc in jcs:
            job = make_job(jc, pools[jc.pool], owned, clock=self.clock)
            try:
                job.allocate()
            except JobResourceError as e:
                raise StartupError(str(e), EXIT_FAILURE) from None
            prepared[jc.name] = job
        return prepared

    def _start_job(self, job: Job) -> Job:
        job.start()
        with self.live.lock:
            self.jobs[job.name] = job
        return job

    # ============================================================== main loop
    def main_loop(self) -> int:
        """Serve until TERM/INT. Returns the signal that ended it."""
        while True:
            while (sig := self.signals.pop()) is not None:
                if self._serving_handlers[sig](sig):
                    return sig
            now = self.clock()
            for job in list(self.jobs.values()):
                job.pump(now)
            self._wait(self._next_deadline(now) - now)
            self._reap_all()
            self._tick()
            self.budget.tick(self.clock())

    # The loop acts on each signal the handlers recorded: handle_<signal>, in
    # one table while serving and another while shutting down.
    @property
    def _serving_handlers(self) -> dict[int, Callable[[int], bool]]:
        """True: shut down."""
        return {signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_term,
                signal.SIGHUP: self.handle_hup}

    def handle_term(self, sig: int) -> bool:
        log.info("received %s: shutting down", signal.Signals(sig).name)
        return True

    def handle_hup(self, sig: int) -> bool:
        self.request_reload()
        return False

    @property
    def _stopping_handlers(self) -> dict[int, Callable[[int, _Stopping], None]]:
        return {signal.SIGTERM: self.handle_term_stopping,
                signal.SIGINT: self.handle_term_stopping,
                signal.SIGHUP: self.handle_hup_stopping}

    def handle_term_stopping(self, sig: int, run: _Stopping) -> None:
        """A second TERM/INT during the drain skips to cancel."""
        name = signal.Signals(sig).name
        if self.phase is Phase.DRAINING and not run.hurried:
            log.warning("second %s during the drain: cancelling now", name)
            run.hurried = True
            for pool in self._all_pools():
                pool.hurry()
        else:
            log.info("%s while %s: already shutting down; ignored", name, self.phase.value)

    def handle_hup_stopping(self, sig: int, run: _Stopping) -> None:
        log.info("SIGHUP during shutdown: ignored, not reloading")

    def _next_deadline(self, now: float) -> float:
        deadline = min(now + MAX_WAIT, self._next_status)
        if self.notifier.watchdog_interval:
            deadline = min(deadline, self._next_watchdog)
        for job in self.jobs.values():
            t = job.next_wakeup()
            if t is not None:
                deadline = min(deadline, t)
        for pool in self._all_pools():
            t = pool.next_deadline()
            if t is not None:
                deadline = min(deadline, t)
        return deadline

    def _wait(self, timeout: float) -> None:
        fds: list[int] = [p.eventfd for p in self._all_pools() if p.eventfd is not None]
        wakeup = self.signals.fileno()
        if wakeup is not None:
            fds.append(wakeup)
        if timeout > 0 and not self.signals:
            select.select(fds, [], [], timeout)
        self.signals.clear_wakeup()

    def _all_pools(self) -> list[Pool]:
        return self.live.all_pools()

    def _reap_all(self) -> int:
        n = 0
        for pool in self._all_pools():
            if pool.eventfd is not None:
                try:
                    os.eventfd_read(pool.eventfd)  # reset before reaping: no lost wakeup
                except BlockingIOError:
                    pass
            if not pool.busy:
                continue
            for op in pool.reap(timeout=0):
                n += 1
                # The job travels on the op: ops a job builds on a retry are
                # routed the same as the first ones.
                owner = op.tag.owner if op.tag is not None else None
                if isinstance(owner, Job):
                    owner.complete(op)
        return n

    def _tick(self) -> None:
        """Once per loop turn: heartbeat, watchdog, status, retiring jobs and pools."""
        now = self.clock()
        self._heartbeat = now
        if self.notifier.watchdog_interval and now >= self._next_watchdog:
            # Sent from the loop itself: a stuck loop stops the pings.
            self.notifier.watchdog()
            self._next_watchdog = now + self.notifier.watchdog_interval
        if now >= self._next_status:
            self.notifier.status(self._status_line())
            self._next_status = now + STATUS_INTERVAL
        if self._stopping_jobs:
            for job in [j for j in self._stopping_jobs if j.close_if_idle()]:
                self._stopping_jobs.remove(job)
                self._forget_job(job)
        if self._retiring_pools and self.phase is Phase.SERVING:
            self._retire_pools()  # during shutdown, shutdown owns them
        if self._parser.busy and self.phase is Phase.SERVING:
            self.poll_reload()

    def _forget_job(self, job: Job) -> None:
        if job.name not in self.jobs:  # removed, not restarted under the same name
            job.pool.forget(job.name)

    def _retire_pools(self) -> None:
        """Pools removed by a reload: each drains for up to drain_timeout, then
        its teardown cancels and destroys on threads. The loop only looks."""
        for r in list(self._retiring_pools):
            pool = r.pool
            if not r.retired:
                r.retired = True
                pool.retire(self.cfg.shutdown.drain_timeout, self.cfg.shutdown.destroy_timeout)
            if not pool.torn_down or pool.stuck:
                continue  # a stuck context keeps its pool on show until io_destroy returns
            snap = pool.snapshot()
            log.info("pool %s removed: %d contexts destroyed, %d failed; %s", pool.name,
                     snap.contexts_by_state()["destroyed"], snap.contexts_by_state()["failed"],
                     totals_text(snap.totals()), extra={"AIOD_POOL": pool.name})
            with self.live.lock:
                self._retiring_pools.remove(r)
                self._end_pool(snap)

    def _end_pool(self, snap: PoolSnapshot) -> None:
        """Keep a removed pool's numbers for the report: one entry per name."""
        before = self._ended_pools.get(snap.name)
        self._ended_pools[snap.name] = snap if before is None else before.merged(snap)

    # ================================================================= reload
    def request_reload(self) -> None:
        """SIGHUP: start reading the config again on a worker; the loop keeps
        turning, and applies it once parsed (poll_reload)."""
        if self._parser.busy:
            self._reload_again = True
            log.info("SIGHUP while the configuration is still being read: it will be read "
                     "again once this reload is done")
            return
        self.notifier.reloading()
        self._reload_attempt_ts = self.wall()
        log.info("reloading configuration from %s",
                 self.config_path or "the default configuration")
        path, env = self.config_path, self.env
        self._parser.start(lambda: self._load_config(path, env), self.clock())

    def poll_reload(self) -> bool | None:
        """Apply the parsed config if the worker is done: True when the reload
        worked, False when it failed, None while the file is still being read."""
        done, new, error = self._parser.poll()
        if not done:
            return None
        try:
            if error is not None:
                raise error
            self._apply(cast(Config, new))
        except (ConfigError, ReloadError, PoolError, OSError) as e:
            ok = self._reload_failed(e)
        else:
            ok = self._reload_done()
        if self._reload_again:
            self._reload_again = False
            self.request_reload()
        return ok

    def reload(self) -> bool:
        """The whole reload, waiting for the parse; for callers outside the loop."""
        self.request_reload()
        while (ok := self.poll_reload()) is None:
            time.sleep(0.005)
        return ok

    def _reload_failed(self, e: BaseException) -> bool:
        self.live.reload_ok = False
        first = str(e).splitlines()
        self._reload_error = "; ".join(first) or type(e).__name__
        for line in first:
            log.error("reload failed, keeping the running configuration: %s", line)
        self.notifier.ready(f"reload failed ({first[0] if first else e}); "
                            f"{self._status_line()}")
        return False

    def _reload_done(self) -> bool:
        self.live.reload_ok = True
        self._reload_error = None
        self.live.reload_ts = self.wall()
        log.info("configuration reloaded: %s", self._summary())
        self.notifier.ready(self._status_line())
        return True

    def _apply(self, new: Config) -> None:
        """Prepare everything that can fail first; commit only when all of it worked."""
        problem = self.budget.room_problem(new)
        if problem:
            raise ConfigError([problem])
        change = reload_plan(self.cfg, new)
        staged = self._prepare(change, new)
        self._commit(change, new, staged)

    def _prepare(self, change: Plan, new: Config) -> _Staged:
        """Every fallible step of a reload; undone in full if any fails. Raises ReloadError."""
        old = self.cfg
        new_pools = {p.name: p for p in new.pools}
        self._prepare_state_directory(new.state_directory)
        staged = _Staged(owned=self._owned(new.state_directory))
        try:
            for name in change.create_pools:
                pc = new_pools[name]
                staged.created[name] = self._make_pool(name, pc.contexts, pc.nr_events)
            for name in change.keep_pools:
                pool, want = self.pools[name], self.budget.wanted_size(new_pools[name], new)
                if want > pool.size:
                    staged.grown.append((pool, pool.size))
                    pool.resize(want)
            # Buffers are the biggest allocation, and jobs need their pools; before
            # the metrics move, which may have to release the running socket.
            try:
                staged.jobs = self._prepare_jobs(change.start_jobs,
                                                 {**self.pools, **staged.created}, staged.owned)
            except StartupError as e:
                raise ReloadError(str(e)) from None
            if change.metrics_moved:
                staged.server, staged.released = self._rebind_metrics(old, new)
        except BaseException:
            if staged.server is not None:
                staged.server.close()
            if staged.released:
                self._restore_metrics(old)
            for pool in staged.created.values():
                pool.close()
            for pool, size in staged.grown:
                pool.resize(size)
            raise
        return staged

    def _commit(self, change: Plan, new: Config, staged: _Staged) -> None:
        """Switch to the new config; nothing here can fail for lack of resources."""
        logs.setup(new.log_level, env=self.env)
        self._owned_files = staged.owned
        if staged.server is not None:
            if not staged.released and self.metrics is not None:
                self.metrics.close()
            staged.server.start()
            self.metrics = staged.server
            log.info("metrics now on %s", staged.server.url)
        for name in change.stop_jobs:
            if name in self.jobs:
                self._stop_job(self.jobs[name])
        for name in change.retire_pools:
            with self.live.lock:
                pool = self.pools.pop(name)
                self._retiring_pools.append(RetiringPool(pool, self.clock()))
            log.info("pool %s: retiring (%s)", name, "nr_events changed"
                     if name in change.replaced_pools else "removed from the config",
                     extra={"AIOD_POOL": name})
        with self.live.lock:
            self.pools.update(staged.created)
        for pc in new.pools:
            pool = self.pools[pc.name]
            want = self.budget.wanted_size(pc, new)
            if want < pool.size:
                pool.resize(want, retire_timeout=new.shutdown.drain_timeout)
                log.info("pool %s: shrinking to %d contexts", pc.name, want,
                         extra={"AIOD_POOL": pc.name})
        self.cfg = new
        self.budget.configure(new)
        for job in self.jobs.values():
            job.check_target_soon()  # a SIGHUP also asks: is each path still the job's file?
        for job in staged.jobs.values():
            self._start_job(job)

    def _stop_job(self, job: Job) -> None:
        job.stop()
        with self.live.lock:
            del self.jobs[job.name]
        if job.state is JobState.STOPPED:
            self._forget_job(job)
        else:
            self._stopping_jobs.append(job)
        log.info("job %s: stopped", job.name, extra={"AIOD_JOB": job.name})

    # =============================================================== shutdown
    def shutdown(self, reason: str = "SIGTERM") -> ShutdownResult:
        """The whole shutdown, top to bottom. Every op ends accounted for, and
        the loop keeps turning all through it (watchdog, /healthz, reaping)."""
        run = _Stopping(before=self._teardown_counts())
        # 1. Stop submitting: jobs stop; every context of every pool starts its
        #    teardown (aiod.teardown), draining for up to drain_timeout.
        self._stop_submitting()
        # 2. Drain: in-flight I/O completes. A second TERM/INT ends the wait.
        run.drain_seconds, run.drained = self._turn_while(Step.DRAINING, Phase.DRAINING, run)
        self._log_drain(run)
        # 3. Cancel what is left. File and block I/O cannot be cancelled: it is
        #    counted and logged, not hidden.
        run.cancel_seconds, _ = self._turn_while(Step.CANCELLING, Phase.CANCELLING, run)
        # 4. Destroy every context, all pools in parallel, each within
        #    destroy_timeout; one stuck in the kernel is failed, not waited on.
        run.destroy_seconds, _ = self._turn_while(Step.DESTROYING, Phase.DESTROYING, run)
        self.phase = Phase.STOPPED
        # 5. Report: one log line of totals, and the same as JSON, atomically.
        report = self._report(reason, run)
        if self.metrics is not None:
            self.metrics.close()
        # 6. Close the targets last: close() of a file on a hung device can
        #    block (FUSE and NFS flush on close), and the report must be out first.
        self._close_targets()
        return ShutdownResult(EXIT_OK, report)

    def _stop_submitting(self) -> None:
        self.phase = Phase.DRAINING
        if self._parser.busy:
            log.info("shutting down: the reload still reading the configuration is abandoned")
        self.notifier.stopping(f"stopping: draining {self._in_flight()} operations")
        for job in list(self.jobs.values()) + self._stopping_jobs:
            job.stop()
        sd = self.cfg.shutdown
        for pool in self._all_pools():
            pool.retire(sd.drain_timeout, sd.destroy_timeout)

    def _turn_while(self, step: Step, phase: Phase, run: _Stopping) -> tuple[float, int]:
        """Turn the loop until no context is on this teardown step; returns the
        seconds it took and the ops reaped meanwhile."""
        self.phase = phase
        if step is not Step.DRAINING:
            self.notifier.status(f"stopping: {phase.value} contexts")
        t0 = last_extend = self.clock()
        reaped = 0
        while True:
            got = self._reap_all()  # also moves every teardown on
            reaped += got
            self._tick()
            self._signals_while_stopping(run)
            if not any(p.teardown_step(step) for p in self._all_pools()):
                return self.clock() - t0, reaped
            now = self.clock()
            if step is Step.DRAINING and got and now - last_extend >= 1.0:
                # Still making progress: ask systemd for more time, a few seconds at a time.
                self.notifier.extend_timeout(5.0)
                self.notifier.status(f"stopping: draining, {self._in_flight()} in flight")
                last_extend = now
            self._wait(self._next_deadline(now) - now)

    def _signals_while_stopping(self, run: _Stopping) -> None:
        handlers = self._stopping_handlers
        for sig in self.signals.take():
            handlers[sig](sig, run)

    def _log_drain(self, run: _Stopping) -> None:
        remaining = sum(p.teardown_step(Step.CANCELLING) for p in self._all_pools())
        log.info("drain: %d operations finished in %.3fs%s", run.drained, run.drain_seconds,
                 " (second signal)" if run.hurried else
                 (f"; {remaining} contexts still had I/O in flight (drain_timeout reached)"
                  if remaining else ""))

    def _teardown_counts(self) -> TeardownCounts:
        total = TeardownCounts()
        for pool in self._all_pools():
            total = total.plus(pool.teardown_counts)
        return total

    def _report(self, reason: str, run: _Stopping) -> dict[str, object]:
        done = self._teardown_counts().minus(run.before)
        if done.requested or done.uncancellable:
            log.info("cancel: %d cancelled, %d could not be cancelled (file or block I/O)",
                     done.cancelled, done.uncancellable)
        snaps = [p.snapshot() for p in self._all_pools()] + list(self._ended_pools.values())
        aio_nr_after = aio.system_aio_usage(self.procfs_root)[0]
        report = build_report(
            version=__version__, reason=reason, started_at=self.started_at,
            stopped_at=self.wall(), snaps=snaps, done=done,
            drain_timeout=self.cfg.shutdown.drain_timeout, drain_seconds=run.drain_seconds,
            hurried=run.hurried, cancel_seconds=run.cancel_seconds,
            destroy_seconds=run.destroy_seconds, aio_nr_before=self.aio_nr_before,
            aio_nr_after=aio_nr_after, budget=self.budget.final_report())
        log.info("shutdown complete: %s; drain %.3fs, cancel %.3fs, destroy %.3fs; "
                 "%d contexts failed to destroy; fs.aio-nr (system-wide) %d before start, "
                 "%d after destroy",
                 totals_text(report.totals), run.drain_seconds, run.cancel_seconds,
                 run.destroy_seconds, len(report.failed_to_destroy), self.aio_nr_before,
                 aio_nr_after)
        report.write(self.cfg.state_directory)
        return report.as_dict()

    def _close_targets(self) -> None:
        for job in list(self.jobs.values()) + self._stopping_jobs:
            job.in_flight = 0  # every op was accounted above; none will complete to the job
            job.close_if_idle()

    def _destroy_pools_now(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    # ========================================================= state for others
    def run(self) -> int:
        """startup, main_loop, shutdown; returns the exit code."""
        try:
            try:
                self.startup()
            except StartupError as e:
                log.error("%s", e)
                return e.exit_code
            sig = self.main_loop()
            return self.shutdown(signal.Signals(sig).name).exit_code
        finally:
            # Never back to the default actions: a late TERM must not kill a
            # daemon that has written its report and is exiting.
            self.signals.finish("after the shutdown had finished")

    def _in_flight(self) -> int:
        return sum(p.in_flight for p in self._all_pools())

    def healthy(self) -> bool:
        return self.phase is not Phase.STOPPED and self.clock() - self._heartbeat < HEALTH_STALL

    def ready(self) -> bool:
        return self.phase is Phase.SERVING and self.healthy()

    # aiod.metrics.Source, for /status (aiod.status): the registry answers.
    def pool_snapshots(self) -> list[PoolSnapshot]:
        return self.live.pool_snapshots()

    def job_views(self) -> list[JobView]:
        return self.live.job_views()

    def aio_usage(self) -> tuple[int, int]:
        return self.live.aio_usage()

    def reload_status(self) -> tuple[bool, float]:
        return self.live.reload_status()

    def daemon_info(self) -> DaemonInfo:
        cfg = self.cfg
        kinds: dict[str, dict[str, object]] = {
            j.name: {"type": j.type, "op": j.op, "target": str(j.target),
                     "timeout_seconds": j.timeout} for j in cfg.jobs}
        return DaemonInfo(phase=self.phase.value, serving=self.ready(), healthy=self.healthy(),
                          started_at=self.started_at, config_source=cfg.source,
                          reload_successful=self.live.reload_ok,
                          reload_success_at=self.live.reload_ts,
                          reload_attempted_at=self._reload_attempt_ts,
                          reload_error=self._reload_error, job_kinds=kinds)

    def status_json(self) -> bytes:
        """The /status document; runs on the HTTP thread, from copies like a scrape."""
        return (json.dumps(build_status(self, self.live.recent, self.wall), indent=1) + "\n").encode()

    def _summary(self) -> str:
        contexts = sum(p.size for p in self.pools.values())
        running = sum(1 for j in self.jobs.values() if j.state is JobState.RUNNING)
        preparing = sum(1 for j in self.jobs.values() if j.state is JobState.PREPARING)
        return (f"{len(self.pools)} pool{'s' if len(self.pools) != 1 else ''} "
                f"({contexts} contexts), {running}/{len(self.jobs)} jobs running"
                + (f", {preparing} preparing their targets" if preparing else ""))

    def _status_line(self) -> str:
        snaps = [p.snapshot() for p in self._all_pools()]
        t = sum_totals(snaps)
        errs = sum(sum(j.errors.values()) for j in self.jobs.values())
        line = (f"{self._summary()}; {t['submitted']} ops, {t['in_flight']} in flight, "
                f"{t['failed']} failed")
        if errs:
            line += f", {errs} job errors"
        budget = self.budget.status()
        if budget:
            line += f"; {budget}"
        return line
