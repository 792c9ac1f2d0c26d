"""The shutdown sequence: stop submitting, drain, cancel, destroy, report.

:meth:`Shutdown.run` names the steps, top to bottom. Every op ends accounted
for (submitted = completed + cancelled + failed), and the loop keeps turning
all through it: WATCHDOG=1, /healthz and reaping go on while contexts drain
and their teardown (aiod.teardown) cancels and destroys them on threads.
Signals during the shutdown have their own handle_<signal> table: a second
TERM/INT during the drain skips to cancel; HUP is ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiod import __version__, aio
from aiod.budget import Budget
from aiod.config import Config
from aiod.exit_codes import EXIT_OK
from aiod.health import Health, Phase
from aiod.listener import Listener
from aiod.loop import Wakeups
from aiod.notify import Notifier
from aiod.registry import Registry
from aiod.report import build as build_report
from aiod.report import totals_text
from aiod.signals import SignalInbox
from aiod.teardown import Step, TeardownCounts

log = logging.getLogger("aiod.shutdown")


@dataclass
class ShutdownResult:
    exit_code: int
    report: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Started:
    """What the report needs from aiod's start."""

    at: float
    aio_nr_before: int


class Shutdown:
    """One shutdown and what it has done so far, for its report."""

    def __init__(self, cfg: Config, *, live: Registry, health: Health, wakeups: Wakeups,
                 listener: Listener, budget: Budget, notifier: Notifier,
                 signals: SignalInbox, started: Started, reading_config: bool = False,
                 procfs_root: str | os.PathLike[str] = "/proc",
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.live = live
        self.health = health
        self.wakeups = wakeups
        self.listener = listener
        self.budget = budget
        self.notifier = notifier
        self.signals = signals
        self.started = started
        self.reading_config = reading_config
        self.procfs_root = procfs_root
        self.clock = clock
        self.wall = wall
        self.before = self._teardown_counts()
        self.hurried = False
        self.drained = 0
        self.drain_seconds = self.cancel_seconds = self.destroy_seconds = 0.0

    def run(self, reason: str) -> ShutdownResult:
        """The whole shutdown, top to bottom."""
        # 1. Stop submitting: jobs stop; every context of every pool starts its
        #    teardown (aiod.teardown), draining for up to drain_timeout.
        self.stop_submitting()
        # 2. Drain: in-flight I/O completes. A second TERM/INT ends the wait.
        self.drain_seconds, self.drained = self.turn_while(Step.DRAINING, Phase.DRAINING)
        self.log_drain()
        # 3. Cancel what is left. File and block I/O cannot be cancelled: it is
        #    counted and logged, not hidden.
        self.cancel_seconds, _ = self.turn_while(Step.CANCELLING, Phase.CANCELLING)
        # 4. Destroy every context, all pools in parallel, each within
        #    destroy_timeout; one stuck in the kernel is failed, not waited on.
        self.destroy_seconds, _ = self.turn_while(Step.DESTROYING, Phase.DESTROYING)
        self.health.enter(Phase.STOPPED)
        # 5. Report: one log line of totals, and the same as JSON, atomically.
        report = self.report(reason)
        self.listener.close()
        # 6. Close the targets last: close() of a file on a hung device can
        #    block (FUSE and NFS flush on close), and the report must be out first.
        self.close_targets()
        return ShutdownResult(EXIT_OK, report)

    # ------------------------------------------------------------- the steps
    def stop_submitting(self) -> None:
        self.health.enter(Phase.DRAINING)
        if self.reading_config:
            log.info("shutting down: the reload still reading the configuration is abandoned")
        self.notifier.stopping(f"stopping: draining {self.live.in_flight()} operations")
        for job in self.live.all_jobs():
            job.stop()
        sd = self.cfg.shutdown
        for pool in self.live.all_pools():
            pool.retire(sd.drain_timeout, sd.destroy_timeout)

    def turn_while(self, step: Step, phase: Phase) -> tuple[float, int]:
        """Turn the loop until no context is on this teardown step; returns the
        seconds it took and the ops reaped meanwhile."""
        self.health.enter(phase)
        if step is not Step.DRAINING:
            self.notifier.status(f"stopping: {phase.value} contexts")
        t0 = last_extend = self.clock()
        reaped = 0
        while True:
            got = self.wakeups.reap()  # also moves every teardown on
            reaped += got
            self.health.beat()
            self.live.close_idle_jobs()
            for sig in self.signals.take():
                self.handlers[sig](sig)
            if not any(p.teardown_step(step) for p in self.live.all_pools()):
                return self.clock() - t0, reaped
            now = self.clock()
            if step is Step.DRAINING and got and now - last_extend >= 1.0:
                # Still making progress: ask systemd for more time, a few seconds at a time.
                self.notifier.extend_timeout(5.0)
                self.notifier.status(f"stopping: draining, {self.live.in_flight()} in flight")
                last_extend = now
            self.wakeups.wait(self.wakeups.next_deadline(now, self.health.next_due()) - now)

    def log_drain(self) -> None:
        remaining = sum(p.teardown_step(Step.CANCELLING) for p in self.live.all_pools())
        log.info("drain: %d operations finished in %.3fs%s", self.drained, self.drain_seconds,
                 " (second signal)" if self.hurried else
                 (f"; {remaining} contexts still had I/O in flight (drain_timeout reached)"
                  if remaining else ""))

    def report(self, reason: str) -> dict[str, object]:
        done = self._teardown_counts().minus(self.before)
        if done.requested or done.uncancellable:
            log.info("cancel: %d cancelled, %d could not be cancelled (file or block I/O)",
                     done.cancelled, done.uncancellable)
        snaps = [p.snapshot() for p in self.live.all_pools()] + list(self.live.ended.values())
        aio_nr_before = self.started.aio_nr_before
        aio_nr_after = aio.system_aio_usage(self.procfs_root)[0]
        report = build_report(
            version=__version__, reason=reason, started_at=self.started.at,
            stopped_at=self.wall(), snaps=snaps, done=done,
            drain_timeout=self.cfg.shutdown.drain_timeout, drain_seconds=self.drain_seconds,
            hurried=self.hurried, cancel_seconds=self.cancel_seconds,
            destroy_seconds=self.destroy_seconds, aio_nr_before=aio_nr_before,
            aio_nr_after=aio_nr_after, budget=self.budget.final_report())
        log.info("shutdown complete: %s; drain %.3fs, cancel %.3fs, destroy %.3fs; "
                 "%d contexts failed to destroy; fs.aio-nr (system-wide) %d before start, "
                 "%d after destroy",
                 totals_text(report.totals), self.drain_seconds, self.cancel_seconds,
                 self.destroy_seconds, len(report.failed_to_destroy), aio_nr_before,
                 aio_nr_after)
        report.write(self.cfg.state_directory)
        return report.as_dict()

    def close_targets(self) -> None:
        for job in self.live.all_jobs():
            job.abandon()  # every op was accounted above; none will complete to the job
            job.close_if_idle()

    def _teardown_counts(self) -> TeardownCounts:
        total = TeardownCounts()
        for pool in self.live.all_pools():
            total = total.plus(pool.teardown_counts)
        return total

    # ---------------------------------------- signals during the shutdown
    @property
    def handlers(self) -> dict[int, Callable[[int], None]]:
        return {signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_term,
                signal.SIGHUP: self.handle_hup}

    def handle_term(self, sig: int) -> None:
        """A second TERM/INT during the drain skips to cancel."""
        name = signal.Signals(sig).name
        if self.health.phase is Phase.DRAINING and not self.hurried:
            log.warning("second %s during the drain: cancelling now", name)
            self.hurried = True
            for pool in self.live.all_pools():
                pool.hurry()
        else:
            log.info("%s while %s: already shutting down; ignored", name,
                     self.health.phase.value)

    def handle_hup(self, sig: int) -> None:
        log.info("SIGHUP during shutdown: ignored, not reloading")
