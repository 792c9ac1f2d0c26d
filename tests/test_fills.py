"""Targets created and filled off the I/O loop, and fills cut short."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aiod.fill import Fill
from aiod.targets import FILL_XATTR, OwnedFiles, TargetError, fill_target, open_target, partial_path
from tests.daemon_harness import Aiod

BIG = 768 << 20  # seconds of writing here: long enough to reload and to kill mid-way


# ------------------------------------------------------------ fill_target itself
def test_a_fill_appears_under_its_name_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "t.dat"
    seen: list[tuple[int, bool]] = []

    def progress(n: int) -> None:
        seen.append((n, target.exists()))

    fill_target(target, 4 << 20, OwnedFiles(tmp_path), progress=progress)
    assert seen and all(not exists for _, exists in seen[:-1])
    assert seen[-1][0] == 4 << 20
    assert target.stat().st_size == 4 << 20
    assert not partial_path(target).exists()
    t = open_target(target, size=4 << 20, block_size=4096, direct=False, needs_write=True,
                    allow_write=False, owned=OwnedFiles(tmp_path))
    t.close()


def test_a_partial_file_left_by_a_crash_is_redone(tmp_path: Path) -> None:
    target = tmp_path / "t.dat"
    partial = partial_path(target)
    partial.write_bytes(b"x" * 12345)
    os.setxattr(partial, FILL_XATTR, b"1")
    fill_target(target, 1 << 20, OwnedFiles(tmp_path))
    assert target.stat().st_size == 1 << 20 and b"x" * 64 not in target.read_bytes()
    assert not partial.exists()


def test_a_partial_file_aiod_did_not_make_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "t.dat"
    partial = partial_path(target)
    partial.mkdir()
    with pytest.raises(TargetError) as ei:
        fill_target(target, 1 << 20, None)
    assert str(partial) in str(ei.value) and partial.is_dir() and not target.exists()


def test_a_cancelled_fill_removes_its_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "t.dat"
    half = threading.Event()

    def slow(path: Path, size: int, owned: OwnedFiles | None, **kw: Any) -> None:
        def progress(n: int) -> None:
            kw["progress"](n)
            if n >= 2 << 20:
                half.set()
                while not kw["cancelled"]():
                    time.sleep(0.01)
        fill_target(path, size, owned, progress=progress, cancelled=kw["cancelled"])

    f = Fill(target, 8 << 20, None, name="t", fill=slow).start()
    assert half.wait(10)
    f.cancel()
    assert f.wait(10) and f.cancelled and f.error is None
    assert not target.exists() and not partial_path(target).exists()


# ------------------------------------------------------------ inside the daemon
def config(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"log_level": "info",
            "shutdown": {"drain_timeout": "2s", "destroy_timeout": "10s"},
            "pools": [{"name": "main", "contexts": 1, "nr_events": 16},
                      {"name": "big", "contexts": 1, "nr_events": 16}],
            "jobs": jobs}


PROBE = {"name": "probe", "pool": "main", "type": "probe", "target": "probe.dat",
         "size": "1MiB", "op": "randread", "block_size": "4KiB", "direct": False,
         "rate": "50/s", "timeout": "5s"}
BIG_JOB = {"name": "big", "pool": "big", "type": "load", "target": "big.dat",
           "size": BIG, "op": "randwrite", "block_size": "4KiB", "direct": False,
           "iodepth": 4}


def test_a_reload_adding_a_large_target_does_not_stall_the_other_probe(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = Aiod(tmp_path, config([PROBE]))
    daemons.append(d)
    d.wait_ready()
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="probe") > 10)
    assert d.notify is not None
    mark = len(d.notify.collect())
    d.config["jobs"] = [PROBE, BIG_JOB]
    d.write_config(d.config)
    d.signal(signal.SIGHUP)
    # The reload answers while the fill has hardly begun.
    d.notify.wait_for("READY=1", start=mark + 1, timeout=10)
    assert not (d.state / "big.dat").exists()
    assert d.metric_sum("aiod_job_state", job="big", state="preparing") == 1
    # Sample the probe's own completion times (aiod's clock, not ours) until
    # the fill is done and the job runs.
    stamps: list[float] = []
    deadline = time.monotonic() + 120
    while d.metric_sum("aiod_job_running", job="big") != 1:
        assert time.monotonic() < deadline, f"the fill never finished; log:\n{d.log}"
        stamps.append(d.metric_sum("aiod_job_last_completion_timestamp_seconds", job="probe"))
        time.sleep(0.1)
    distinct = sorted(set(stamps))
    gaps = [b - a for a, b in zip(distinct, distinct[1:])]
    assert len(distinct) > 10, "the fill finished before the probe could be watched"
    assert max(gaps) < 1.0, f"the probe stalled for {max(gaps):.2f}s during the fill"
    assert "filling" in d.log and "created" in d.log
    assert (d.state / "big.dat").stat().st_size == BIG
    assert d.stop() == 0


def test_sigkill_during_a_fill_then_a_restart_completes_it_and_owns_the_file(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = Aiod(tmp_path, config([PROBE, BIG_JOB]))
    daemons.append(d)
    d.wait_ready()
    partial = partial_path(d.state / "big.dat")
    d.wait_until(lambda: partial.exists() and partial.stat().st_size > 16 << 20,
                 what="the fill to be under way")
    d.proc.kill()
    d.wait()
    d.stop()
    assert not (d.state / "big.dat").exists(), "a short file was left under the target's name"
    (tmp_path / "second").mkdir()
    again = Aiod(tmp_path / "second", dict(config([PROBE, BIG_JOB]),
                                           state_directory=str(d.state)))
    daemons.append(again)
    again.wait_ready()
    again.wait_until(lambda: again.metric_sum("aiod_ops_completed_total", job="big") > 100,
                     timeout=120, what="the write job to run on the refilled target")
    assert again.metric_sum("aiod_job_errors_total", job="big") == 0
    assert (d.state / "big.dat").stat().st_size == BIG
    assert not partial.exists()
    assert again.stop() == 0
