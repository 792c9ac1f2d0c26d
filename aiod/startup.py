"""What aiod builds from its configuration, at startup and again at a reload:
the state directory, pools, and jobs with their buffers allocated.

Nothing built here is live yet: the caller puts it in the registry once
everything it needs has been built, and closes what was built if anything
failed. A startup that cannot finish raises :class:`StartupError` with its
exit code.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from aiod.config import Config, JobConfig
from aiod.exit_codes import EXIT_FAILURE, EXIT_TEMPFAIL
from aiod.jobs import Job, make_job
from aiod.owned import OwnedFiles
from aiod.pool import Pool, PoolCapacityError, PoolError

log = logging.getLogger("aiod.startup")


class StartupError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Builder:
    """See the module docstring. Keeps the one record of aiod's files (``owned``)."""

    def __init__(self, *, procfs_root: str | os.PathLike[str] = "/proc",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.procfs_root = procfs_root
        self.clock = clock
        # Kept across reloads: fills still running record their files in it
        # from worker threads, and a second instance would overwrite their entries.
        self.owned: OwnedFiles | None = None

    def state_directory(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            log.error("cannot create the state directory %s: %s; jobs with relative targets "
                      "and the shutdown report will fail", path, e.strerror)

    def owned_for(self, state_dir: Path) -> OwnedFiles | None:
        """The one record of aiod's files for state_dir: the one kept, when it is
        for the same directory. The caller keeps a new one once it commits to it."""
        if not state_dir.is_dir():
            return None
        if self.owned is not None and self.owned.path.parent == state_dir:
            return self.owned
        return OwnedFiles(state_dir)

    def pool(self, name: str, contexts: int, nr_events: int, destroy_timeout: float) -> Pool:
        """One pool, its contexts set up; raises PoolError."""
        def on_setup_failure(pool: str, err: int) -> None:
            log.warning("pool %s: io_setup(%d) failed: %s", pool, nr_events, os.strerror(err),
                        extra={"AIOD_POOL": pool, "ERRNO": err})
        pool = Pool(name, contexts, nr_events, procfs_root=self.procfs_root,
                    on_setup_failure=on_setup_failure, destroy_timeout=destroy_timeout)
        log.info("pool %s: %d contexts x %d nr_events", name, contexts, nr_events,
                 extra={"AIOD_POOL": name})
        return pool

    def pools(self, cfg: Config, sizes: Mapping[str, int]) -> dict[str, Pool]:
        """Every pool of cfg at its starting size, or none: raises StartupError."""
        built: dict[str, Pool] = {}
        try:
            for pc in cfg.pools:
                built[pc.name] = self.pool(pc.name, sizes[pc.name], pc.nr_events,
                                           cfg.shutdown.destroy_timeout)
        except PoolError as e:
            for pool in built.values():
                pool.close()
            code = EXIT_TEMPFAIL if isinstance(e, PoolCapacityError) else EXIT_FAILURE
            raise StartupError(str(e), code) from e
        return built

    def jobs(self, jcs: Iterable[JobConfig], pools: Mapping[str, Pool],
             owned: OwnedFiles | None) -> dict[str, Job]:
        """Jobs built with their buffers allocated, not yet started.
        Raises JobResourceError."""
        prepared: dict[str, Job] = {}
        for jc in jcs:
            job = make_job(jc, pools[jc.pool], owned, clock=self.clock)
            job.allocate()
            prepared[jc.name] = job
        return prepared
