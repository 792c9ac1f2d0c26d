"""A reload, from SIGHUP to the new configuration in service, or the old kept.

The file is read and parsed on a worker (aiod.worker) while the loop keeps
turning; the loop polls for the result. Then the apply step: aiod.reload.plan
says what differs, :meth:`Reloader.prepare` does every step that can fail
(new and grown pools, job buffers, the metrics socket) and undoes all of
them if one fails, and only then :meth:`Reloader.commit` switches over,
which cannot fail for lack of resources. The running configuration is held
here, and a committed reload is the only thing that changes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from aiod import config as config_mod
from aiod import logs
from aiod.budget import Budget
from aiod.config import Config, ConfigError
from aiod.jobs import Job, JobResourceError
from aiod.listener import Listener
from aiod.metrics_server import MetricsServer
from aiod.notify import Notifier
from aiod.owned import OwnedFiles
from aiod.pool import Pool, PoolError
from aiod.registry import Registry
from aiod.reload import Plan, ReloadError, plan
from aiod.startup import Builder
from aiod.worker import Worker

log = logging.getLogger("aiod.reloader")

Loader = Callable[[str | None, Mapping[str, str]], Config]


@dataclass
class Staged:
    """What a reload has prepared, not yet committed."""

    owned: OwnedFiles | None
    created: dict[str, Pool] = field(default_factory=dict)
    grown: list[tuple[Pool, int]] = field(default_factory=list)   # and their sizes before
    jobs: dict[str, Job] = field(default_factory=dict)
    server: MetricsServer | None = None
    released: bool = False  # the running metrics server was closed to make room for server


class Reloader:
    """See the module docstring. ``status_line`` makes the STATUS= text."""

    def __init__(self, cfg: Config, *, live: Registry, builder: Builder, listener: Listener,
                 budget: Budget, notifier: Notifier, status_line: Callable[[], str],
                 config_path: str | None, env: Mapping[str, str],
                 load_config: Loader | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.live = live
        self.builder = builder
        self.listener = listener
        self.budget = budget
        self.notifier = notifier
        self.status_line = status_line
        self.config_path = config_path
        self.env = env
        # Reading and parsing the file runs on this worker (a 1 MiB YAML
        # takes seconds); the loop applies the result when it is done.
        self._load = load_config or (lambda path, env: config_mod.load(path, env=env))
        self._parser = Worker("aiod-reload")
        self._again = False
        self.clock = clock
        self.wall = wall
        self.attempted_at = 0.0
        self.error: str | None = None

    @property
    def busy(self) -> bool:
        """The file is still being read."""
        return self._parser.busy

    # ------------------------------------------------------------ the driver
    def request(self) -> None:
        """SIGHUP: start reading the config again on a worker; the loop keeps
        turning, and applies it once parsed (poll)."""
        if self._parser.busy:
            self._again = True
            log.info("SIGHUP while the configuration is still being read: it will be read "
                     "again once this reload is done")
            return
        self.notifier.reloading()
        self.attempted_at = self.wall()
        log.info("reloading configuration from %s",
                 self.config_path or "the default configuration")
        path, env, load = self.config_path, self.env, self._load
        self._parser.start(lambda: load(path, env), self.clock())

    def poll(self) -> bool | None:
        """Apply the parsed config if the worker is done: True when the reload
        worked, False when it failed, None while the file is still being read."""
        done, new, error = self._parser.poll()
        if not done:
            return None
        try:
            if error is not None:
                raise error
            self.apply(cast(Config, new))
        except (ConfigError, ReloadError, PoolError, OSError) as e:
            ok = self._failed(e)
        else:
            ok = self._done()
        if self._again:
            self._again = False
            self.request()
        return ok

    def wait(self) -> bool:
        """The whole reload, waiting for the parse; for callers outside the loop."""
        self.request()
        while (ok := self.poll()) is None:
            time.sleep(0.005)
        return ok

    def _failed(self, e: BaseException) -> bool:
        self.live.reload_ok = False
        first = str(e).splitlines()
        self.error = "; ".join(first) or type(e).__name__
        for line in first:
            log.error("reload failed, keeping the running configuration: %s", line)
        self.notifier.ready(f"reload failed ({first[0] if first else e}); "
                            f"{self.status_line()}")
        return False

    def _done(self) -> bool:
        self.live.reload_ok = True
        self.error = None
        self.live.reload_ts = self.wall()
        log.info("configuration reloaded: %s", self.live.summary())
        self.notifier.ready(self.status_line())
        return True

    # ------------------------------------------------------------- the apply
    def apply(self, new: Config) -> None:
        """Prepare everything that can fail first; commit only when all of it worked."""
        problem = self.budget.room_problem(new)
        if problem:
            raise ConfigError([problem])
        change = plan(self.cfg, new)
        staged = self.prepare(change, new)
        self.commit(change, new, staged)

    def prepare(self, change: Plan, new: Config) -> Staged:
        """Every fallible step of a reload; undone in full if any fails. Raises ReloadError."""
        old = self.cfg
        new_pools = {p.name: p for p in new.pools}
        self.builder.state_directory(new.state_directory)
        staged = Staged(owned=self.builder.owned_for(new.state_directory))
        try:
            for name in change.create_pools:
                pc = new_pools[name]
                staged.created[name] = self.builder.pool(
                    name, pc.contexts, pc.nr_events, old.shutdown.destroy_timeout)
            for name in change.keep_pools:
                pool, want = self.live.pools[name], self.budget.wanted_size(new_pools[name], new)
                if want > pool.size:
                    staged.grown.append((pool, pool.size))
                    pool.resize(want)
            # Buffers are the biggest allocation, and jobs need their pools; before
            # the metrics move, which may have to release the running socket.
            try:
                staged.jobs = self.builder.jobs(change.start_jobs,
                                                {**self.live.pools, **staged.created},
                                                staged.owned)
            except JobResourceError as e:
                raise ReloadError(str(e)) from None
            if change.metrics_moved:
                staged.server, staged.released = self.listener.rebind(old, new)
        except BaseException:
            self._undo(staged, old)
            raise
        return staged

    def _undo(self, staged: Staged, old: Config) -> None:
        if staged.server is not None:
            staged.server.close()
        if staged.released:
            self.listener.restore(old)
        for pool in staged.created.values():
            pool.close()
        for pool, size in staged.grown:
            pool.resize(size)

    def commit(self, change: Plan, new: Config, staged: Staged) -> None:
        """Switch to the new config; nothing here can fail for lack of resources."""
        logs.setup(new.log_level, env=self.env)
        self.builder.owned = staged.owned
        if staged.server is not None:
            self.listener.serve(staged.server)
            log.info("metrics now on %s", staged.server.url)
        for name in change.stop_jobs:
            if name in self.live.jobs:
                self.live.stop_job(self.live.jobs[name])
        for name in change.retire_pools:
            self.live.retire_pool(name, self.clock(), "nr_events changed"
                                  if name in change.replaced_pools
                                  else "removed from the config")
        self.live.add_pools(staged.created)
        for pc in new.pools:
            pool = self.live.pools[pc.name]
            want = self.budget.wanted_size(pc, new)
            if want < pool.size:
                pool.resize(want, retire_timeout=new.shutdown.drain_timeout)
                log.info("pool %s: shrinking to %d contexts", pc.name, want,
                         extra={"AIOD_POOL": pc.name})
        self.cfg = new
        self.budget.configure(new)
        for job in self.live.jobs.values():
            job.check_target_soon()  # a SIGHUP also asks: is each path still the job's file?
        for job in staged.jobs.values():
            self.live.start_job(job)
