"""Jobs inside a real Daemon, driven turn by turn in this process.

The daemon's clock is injected, so a 10 s retry is a jump of the clock, not a
10 s wait; the I/O is real kernel AIO on real files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiod import config as config_mod
from aiod import logs
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
def daemon_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[Callable[..., tuple[Daemon, Clock]]]:
    made: list[Daemon] = []
    # A reload sets up aiod's own log handler (and stops propagation); here the
    # records must keep reaching pytest's capture.
    monkeypatch.setattr(logs, "setup", lambda *a, **kw: logging.getLogger("aiod"))

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
        d.signals.restore()  # in-process: give pytest its handlers back


def turn(d: Daemon, n: int = 1) -> None:
    """n turns of the main loop, without its signal handling."""
    for _ in range(n):
        d.turn(max_wait=0.01)


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
    assert d.live.in_flight() <= 8


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
    turn_until(d, lambda: not d.live.stopping_jobs, timeout=5.0)
    assert all(st.job != "late" for s in d.pool_snapshots() for st in s.stats)
    assert "late" not in [v.name for v in d.job_views()]
    assert open_fds_to(target) == 0


def probe_job(target: Path, rate: str) -> dict[str, Any]:
    return {"name": "probe", "pool": "p", "type": "probe", "target": str(target),
            "size": "1MiB", "op": "randread", "block_size": "4KiB", "direct": False,
            "rate": rate}


def huge_job(tmp: Path) -> dict[str, Any]:
    """A job needing 4 GiB of buffers, on a sparse file: within this machine's
    memory (check-config accepts it), beyond what the process may map when its
    address space is limited (memory_limited)."""
    sparse = tmp / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(8 << 30)
    return {"name": "huge", "pool": "p", "type": "probe", "target": str(sparse),
            "size": "8GiB", "op": "randread", "block_size": "4GiB", "direct": False,
            "rate": "1/s"}


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


@contextlib.contextmanager
def memory_limited(extra: int = 1 << 30) -> Iterator[None]:
    """RLIMIT_AS at what the process maps now plus extra: a real ENOMEM for
    anything bigger, the way a memory-starved machine answers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_reload_that_cannot_allocate_a_job_changes_nothing(
        daemon_at: Callable[..., tuple[Daemon, Clock]], tmp_path: Path) -> None:
    (tmp_path / "p.dat").write_bytes(os.urandom(1 << 20))
    d, _ = daemon_at([probe_job(tmp_path / "p.dat", "20/s")])
    old_cfg, old_probe = d.cfg, d.jobs["probe"]
    turn_until(d, lambda: completed(d, "probe") > 2)
    write_config(tmp_path, [probe_job(tmp_path / "p.dat", "40/s"), huge_job(tmp_path)])
    with memory_limited():
        assert not d.reload()
    assert d.cfg is old_cfg
    assert d.jobs["probe"] is old_probe and old_probe.cfg.rate == 20.0
    assert old_probe.state is JobState.RUNNING
    assert "huge" not in d.jobs
    assert all(st.job != "huge" for s in d.pool_snapshots() for st in s.stats)
    assert d.reload_status()[0] is False
    before = completed(d, "probe")
    turn_until(d, lambda: completed(d, "probe") > before)  # still running


def test_a_job_that_cannot_be_allocated_at_startup_is_one_line_and_exit_1(
        tmp_path: Path) -> None:
    import subprocess

    from tests.daemon_harness import AIOD, ROOT
    path = write_config(tmp_path, [huge_job(tmp_path)])
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    limit = 2 << 30  # room for Python and aiod, not for 4 GiB of buffers
    r = subprocess.run(AIOD + ["run", "--config", str(path)], capture_output=True, text=True,
                       env=env, timeout=60, preexec_fn=lambda: resource.setrlimit(
                           resource.RLIMIT_AS, (limit, limit)))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "huge" in ln and "buffer" in ln]
    assert len(errors) == 1, r.stderr


def test_a_damaged_ownership_record_neither_crashes_startup_nor_refuses_aiods_files(
        daemon_at: Callable[..., tuple[Daemon, Clock]], tmp_path: Path) -> None:
    from aiod.targets import OWNED_FILE, OwnedFiles, fill_target
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "w.dat"
    fill_target(target, 1 << 20, OwnedFiles(state))
    record = state / OWNED_FILE
    record.write_text(record.read_text().replace('"dev": ', '"dev": 1e999, "x": ', 1))
    d, _ = daemon_at([load_job(target, name="w", op="randwrite", size="1MiB")])
    turn_until(d, lambda: completed(d, "w") > 20)
    assert d.jobs["w"].errors == {}
    assert any(p.name.startswith(OWNED_FILE + ".corrupt-") for p in state.iterdir())
    assert d.reload()


def test_a_flood_of_hung_io_warnings_is_rate_limited_and_counted(
        daemon_at: Callable[..., tuple[Daemon, Clock]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re
    fifo = tmp_path / "hold.fifo"
    d, clock = daemon_at([{"name": "hold", "pool": "p", "type": "load", "target": str(fifo),
                           "op": "poll", "iodepth": 32, "timeout": "100us"}])
    job = d.jobs["hold"]
    with caplog.at_level(logging.WARNING, logger="aiod.jobs"):
        turn_until(d, lambda: job.timeouts >= 32)
        warned = [r for r in caplog.records if "hung I/O" in r.getMessage()]
        assert 1 <= len(warned) <= 3, "one line per hung op: a flood"
        clock.offset += 60
        turn(d, 2)
    summaries = [m for m in (r.getMessage() for r in caplog.records) if "suppressed" in m]
    assert len(summaries) == 1, caplog.text
    m = re.search(r"(\d+) more", summaries[0])
    assert m and int(m.group(1)) == job.timeouts - len(warned)
    assert "hold" in summaries[0]


# ------------------------------------------------- targets changed under a job
def deleted_fds_to(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"{path} (deleted)":
                n += 1
        except OSError:
            pass
    return n


def test_a_deleted_write_target_is_noticed_and_recreated(
        daemon_at: Callable[..., tuple[Daemon, Clock]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "w.dat"
    d, clock = daemon_at([load_job(target, name="w", op="randwrite", size="1MiB")])
    turn_until(d, lambda: completed(d, "w") > 20)
    target.unlink()
    clock.offset += 30  # past the periodic identity check
    turn_until(d, lambda: target.exists() and d.jobs["w"].state is JobState.RUNNING)
    assert target.stat().st_size == 1 << 20  # a new, whole target
    assert deleted_fds_to(target) == 0, "still writing through the deleted file's fd"
    assert "was deleted" in caplog.text
    before = completed(d, "w")
    turn_until(d, lambda: completed(d, "w") > before + 20)


def test_a_target_replaced_by_a_symlink_is_noticed_on_sighup_and_refused(
        daemon_at: Callable[..., tuple[Daemon, Clock]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "w.dat"
    users = tmp_path / "users.dat"
    original = os.urandom(1 << 20)
    users.write_bytes(original)
    d, _ = daemon_at([load_job(target, name="w", op="randwrite", size="1MiB")])
    turn_until(d, lambda: completed(d, "w") > 20)
    target.unlink()
    target.symlink_to(users)
    assert d.reload()  # SIGHUP: the same config, and every target is checked again
    turn_until(d, lambda: d.jobs["w"].state is JobState.ERROR)
    assert d.jobs["w"].errors.get("write_refused") == 1
    assert deleted_fds_to(target) == 0 and open_fds_to(users) == 0
    assert "was replaced" in caplog.text
    assert users.read_bytes() == original


def test_reads_of_a_truncated_target_are_counted_errors_not_fast_completions(
        daemon_at: Callable[..., tuple[Daemon, Clock]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "r.dat"
    target.write_bytes(os.urandom(1 << 20))
    d, clock = daemon_at([load_job(target, name="r", size="1MiB", iodepth=4)])
    turn_until(d, lambda: completed(d, "r") > 20)
    os.truncate(target, 0)
    turn_until(d, lambda: d.jobs["r"].errors.get("short_read", 0) > 0)
    assert "short" in caplog.text
    clock.offset += 30
    # The job notices the new size and stops reading past the end: it cannot
    # use a file smaller than one block.
    turn_until(d, lambda: d.jobs["r"].state is JobState.ERROR)
    assert d.jobs["r"].errors.get("too_small") == 1
    assert "shrank" in caplog.text
