"""`aiod run`: the daemon's lifecycle in three phases, and what joins them.

    startup()    pools up, metrics bound, jobs started, READY=1
    main_loop()  submit what is due, wait for completions or a signal, reap
    shutdown()   drain -> cancel -> destroy -> report, exit 0 (aiod.shutdown)

The Daemon builds its parts and hands each one what it needs (registry,
clock, notifier, ...); the state they change lives in them, not here:

    aiod.registry   the live pools and jobs (the only place they change)
    aiod.health     the phase (the only place it changes) and the heartbeat:
                    WATCHDOG=1, STATUS=, /healthz, /readyz
    aiod.loop       the loop's wake-ups and reaping
    aiod.startup    pools and jobs built from the configuration; StartupError
    aiod.listener   the metrics HTTP listener, across reloads
    aiod.reloader   SIGHUP to the new configuration (the running one is its)
    aiod.shutdown   the shutdown sequence and its report
    aiod.budget     the host's AIO budget: headroom, self-audit, host scan

Signal handlers (aiod.signals) only record the signal and wake the loop; the
loop acts on them through a handle_<signal> table: TERM/INT shut down, HUP
reloads. During the shutdown, aiod.shutdown has its own table.

The loop never waits on the kernel's teardown of a context: shrinks, pool
removals and shutdown hand contexts to their pool's teardown (aiod.teardown),
which io_destroys them on threads while the loop keeps turning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping

from aiod import __version__, aio
from aiod.budget import Budget
from aiod.config import Config
from aiod.exit_codes import EXIT_CONFIG, EXIT_FAILURE
from aiod.health import Health, Phase
from aiod.jobs import Job, JobResourceError
from aiod.listener import Listener
from aiod.loop import MAX_WAIT, Wakeups
from aiod.metrics import JobView, make_registry
from aiod.metrics_server import MetricsServer
from aiod.notify import Notifier
from aiod.pool import Pool, PoolSnapshot
from aiod.registry import Registry
from aiod.reloader import Loader, Reloader
from aiod.shutdown import Shutdown, ShutdownResult, Started
from aiod.signals import SignalInbox
from aiod.startup import Builder, StartupError
from aiod.status import DaemonInfo
from aiod.status import build as build_status

__all__ = ["MAX_WAIT", "Daemon", "Phase", "ShutdownResult", "StartupError"]

log = logging.getLogger("aiod.daemon")


class Daemon:
    def __init__(self, cfg: Config, *, config_path: str | None = None,
                 notifier: Notifier | None = None,
                 procfs_root: str | os.PathLike[str] = "/proc",
                 env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 signals: SignalInbox | None = None,
                 load_config: Loader | None = None) -> None:
        self.config_path = config_path
        self.env = os.environ if env is None else env
        self.notifier = notifier or Notifier(env=self.env)
        self.procfs_root = procfs_root
        self.clock = clock
        self.wall = wall
        # `aiod run` installs the handlers before anything else; a Daemon made
        # some other way installs its own at startup.
        self.signals = signals if signals is not None else SignalInbox()
        self.live = Registry(procfs_root=procfs_root, wall=wall)
        self.metrics_registry = make_registry(self.live)
        self.budget = Budget(cfg, procfs_root=procfs_root, clock=clock)
        self.metrics_registry.register(self.budget)
        self.health = Health(self.notifier, self._status_line, clock=clock)
        self.wakeups = Wakeups(self.live, self.signals)
        self.builder = Builder(procfs_root=procfs_root, clock=clock)
        self.listener = Listener(self._metrics_server)
        self.reloader = Reloader(cfg, live=self.live, builder=self.builder,
                                 listener=self.listener, budget=self.budget,
                                 notifier=self.notifier, status_line=self._status_line,
                                 config_path=config_path, env=self.env,
                                 load_config=load_config, clock=clock, wall=wall)
        self.started = Started(at=wall(), aio_nr_before=0)

    @property
    def cfg(self) -> Config:
        """The running configuration: the last one a reload committed."""
        return self.reloader.cfg

    @property
    def phase(self) -> Phase:
        return self.health.phase

    @property
    def pools(self) -> dict[str, Pool]:
        return self.live.pools

    @property
    def jobs(self) -> dict[str, Job]:
        return self.live.jobs

    # ================================================================ startup
    def startup(self) -> None:
        """Pools up, metrics bound, jobs started, then READY=1. Raises StartupError."""
        self.signals.install()
        cfg = self.cfg
        self.started = dataclasses.replace(
            self.started, aio_nr_before=aio.system_aio_usage(self.procfs_root)[0])
        problem = self.budget.room_problem()
        if problem:
            raise StartupError(problem, EXIT_CONFIG)
        sizes = self.budget.initial_sizes(*aio.system_aio_usage(self.procfs_root))
        self.builder.state_directory(cfg.state_directory)
        self.live.add_pools(self.builder.pools(cfg, sizes))
        try:
            server = self.listener.bind(cfg)
        except OSError as e:
            self.live.destroy_now()
            raise StartupError(f"cannot listen for metrics on {cfg.metrics.host}:"
                               f"{cfg.metrics.port}: {e.strerror}", EXIT_FAILURE) from e
        owned = self.builder.owned = self.builder.owned_for(cfg.state_directory)
        try:
            prepared = self.builder.jobs(cfg.jobs, self.live.pools, owned)
        except JobResourceError as e:
            server.close()
            self.live.destroy_now()
            raise StartupError(str(e), EXIT_FAILURE) from None
        self.listener.serve(server)
        self.budget.attach(self.live.pools, self.live.all_pools)
        for job in prepared.values():
            self.live.start_job(job)
        self.live.reload_ts = self.reloader.attempted_at = self.wall()
        self.health.enter(Phase.SERVING)
        log.info("aiod %s serving: %s; metrics on %s", __version__, self.live.summary(),
                 server.url)
        self.notifier.ready(self._status_line())

    def _metrics_server(self, host: str, port: int) -> MetricsServer:
        return MetricsServer(host, port, self.metrics_registry, healthy=self.health.healthy,
                             ready=self.health.ready, status=self.status_json,
                             render_key=self.live.reload_status)

    # ============================================================== main loop
    def main_loop(self) -> int:
        """Serve until TERM/INT. Returns the signal that ended it."""
        while True:
            while (sig := self.signals.pop()) is not None:
                if self.handlers[sig](sig):
                    return sig
            self.turn()
            self.budget.tick(self.clock())

    def turn(self, max_wait: float = MAX_WAIT) -> None:
        """One turn while serving: submit what is due, sleep until there is
        more to do (at most max_wait), reap, then the once-a-turn chores."""
        now = self.clock()
        self.wakeups.pump(now)
        self.wakeups.wait(self.wakeups.next_deadline(now, self.health.next_due(), max_wait)
                          - now)
        self.wakeups.reap()
        self.health.beat()
        self.live.close_idle_jobs()
        if self.live.retiring:
            sd = self.cfg.shutdown
            self.live.tend_retiring(sd.drain_timeout, sd.destroy_timeout)
        if self.reloader.busy:
            self.reloader.poll()

    # The loop acts on each signal the handlers recorded: handle_<signal>.
    # During the shutdown, aiod.shutdown's table does.
    @property
    def handlers(self) -> dict[int, Callable[[int], bool]]:
        """True: shut down."""
        return {signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_term,
                signal.SIGHUP: self.handle_hup}

    def handle_term(self, sig: int) -> bool:
        log.info("received %s: shutting down", signal.Signals(sig).name)
        return True

    def handle_hup(self, sig: int) -> bool:
        self.reloader.request()
        return False

    # ================================================================= reload
    def request_reload(self) -> None:
        """SIGHUP: the reload starts; the loop applies it once the file is read."""
        self.reloader.request()

    def poll_reload(self) -> bool | None:
        """True when the reload worked, False when it failed, None while reading."""
        return self.reloader.poll()

    def reload(self) -> bool:
        """The whole reload, waiting for the parse; for callers outside the loop."""
        return self.reloader.wait()

    # =============================================================== shutdown
    def shutdown(self, reason: str = "SIGTERM") -> ShutdownResult:
        """Drain, cancel, destroy, report: aiod.shutdown.Shutdown.run names the steps."""
        return Shutdown(self.cfg, live=self.live, health=self.health, wakeups=self.wakeups,
                        listener=self.listener, budget=self.budget, notifier=self.notifier,
                        signals=self.signals, started=self.started,
                        reading_config=self.reloader.busy, procfs_root=self.procfs_root,
                        clock=self.clock, wall=self.wall).run(reason)

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

    # ========================================================= state for others
    def healthy(self) -> bool:
        return self.health.healthy()

    def ready(self) -> bool:
        return self.health.ready()

    # aiod.status.Source, for /status: the registry answers, with daemon_info.
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
                          started_at=self.started.at, config_source=cfg.source,
                          reload_successful=self.live.reload_ok,
                          reload_success_at=self.live.reload_ts,
                          reload_attempted_at=self.reloader.attempted_at,
                          reload_error=self.reloader.error, job_kinds=kinds)

    def status_json(self) -> bytes:
        """The /status document; runs on the HTTP thread, from copies like a scrape."""
        return (json.dumps(build_status(self, self.live.recent, self.wall), indent=1)
                + "\n").encode()

    def _status_line(self) -> str:
        return self.live.status_line(self.budget.status())
