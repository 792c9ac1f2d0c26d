"""Jobs inside a real Daemon, driven turn by turn in this process.

The daemon's clock is injected, so a 10 s retry is a jump of the clock, not a
10 s wait; the I/O is real kernel AIO on real files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from aiod import config as config_mod
from aiod.daemon import Daemon
from aiod.jobs import RETRY_INTERVAL, JobState
from aiod.notify import Notifier
from tests.daemon_harness import free_port


class Clock:
    """time.monotonic, plus whatever the test has skipped ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def write_config(tmp: Path, jobs: list[dict[str, Any]], **over: Any) -> Path:
    cfg: dict[str, Any] = {
        "log_level": "info",
        "state_directory": str(tmp / "state"),
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "shutdown": {"drain_timeout": "2s", "destroy_timeout": "5s"},
        "pools": [{"name": "p", "contexts": 1, "nr_events": 64}],
        "jobs": jobs,
    }
    cfg.update(over)
    path = tmp / "aiod.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def daemon_at(tmp_path: Path) -> Iterator[Callable[..., tuple[Daemon, Clock]]]:
    made: list[Daemon] = []

    def make(jobs: list[dict[str, Any]], **over: Any) -> tuple[Daemon, Clock]:
        path = write_config(tmp_path, jobs, **over)
        clock = Clock()
        d = Daemon(config_mod.load(path, env={}), config_path=str(path),
                   notifier=Notifier(send=lambda s: None, env={}), env={}, clock=clock)
        d.startup()
        made.append(d)
        return d, clock

    yield make
    for d in made:
        if d.phase.value != "stopped":
            d.shutdown("test")


def turn(d: Daemon, n: int = 1) -> None:
    """n turns of the main loop, without its signal handling."""
    for _ in range(n):
        now = d.clock()
        for job in list(d.jobs.values()):
            job.pump(now)
        d._wait(min(0.01, max(0.0, d._next_deadline(now) - now)))
        d._reap_all()
        d._tick()


def turn_until(d: Daemon, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        turn(d)


def completed(d: Daemon, job: str) -> int:
    return sum(st.completed for s in d.pool_snapshots() for st in s.stats if st.job == job)


def load_job(target: Path, **over: Any) -> dict[str, Any]:
    job = {"name": "late", "pool": "p", "type": "load", "target": str(target),
           "size": "64KiB", "op": "randread", "block_size": "4KiB", "direct": False,
           "iodepth": 8}
    job.update(over)
    return job


def open_fds_to(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                n += 1
        except OSError:
            pass
    return n


def test_a_job_that_recovers_through_the_retry_keeps_completing(
        daemon_at: Callable[..., tuple[Daemon, Clock]], tmp_path: Path) -> None:
    target = tmp_path / "later" / "t.dat"
    d, clock = daemon_at([load_job(target)])
    job = d.jobs["late"]
    assert job.state is JobState.ERROR
    target.parent.mkdir()
    clock.offset += RETRY_INTERVAL + 1
    turn_until(d, lambda: d.jobs["late"].state is JobState.RUNNING)
    # Far more than the first iodepth's worth: completions reach the job again.
    turn_until(d, lambda: completed(d, "late") > 200)
    assert d._in_flight() <= 8


def test_removing_a_recovered_job_drops_its_series_and_closes_its_target(
        daemon_at: Callable[..., tuple[Daemon, Clock]], tmp_path: Path) -> None:
    target = tmp_path / "later" / "t.dat"
    d, clock = daemon_at([load_job(target)])
    target.parent.mkdir()
    clock.offset += RETRY_INTERVAL + 1
    turn_until(d, lambda: completed(d, "late") > 50)
    assert open_fds_to(target) == 1
    write_config(tmp_path, [])
    assert d.reload()
    turn_until(d, lambda: not d._stopping_jobs, timeout=5.0)
    assert all(st.job != "late" for s in d.pool_snapshots() for st in s.stats)
    assert "late" not in [v.name for v in d.job_views()]
    assert open_fds_to(target) == 0
