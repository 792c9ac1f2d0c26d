"""The daemon against I/O that fails, stalls and hangs (FUSE fault injection)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.daemon_harness import Aiod
from tests.faultfs import FaultFS, FaultFSUnavailable, mount_faultfs


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[FaultFS]:
    """One request at a time, like a single disk: slow reads finish one after
    another (a drain that keeps making progress)."""
    try:
        with mount_faultfs(tmp_path, max_threads=1) as fs:
            yield fs
    except FaultFSUnavailable as e:
        pytest.skip(str(e))


def config(job: dict[str, Any], **shutdown: str) -> dict[str, Any]:
    return {
        "shutdown": {"drain_timeout": shutdown.get("drain", "5s"),
                     "destroy_timeout": shutdown.get("destroy", "10s")},
        "pools": [{"name": "default", "contexts": 2, "nr_events": 32}],
        "jobs": [dict({"pool": "default", "block_size": "4KiB", "direct": True}, **job)],
    }


@pytest.fixture
def daemon_box(faultfs: FaultFS) -> Iterator[list[Aiod]]:
    box: list[Aiod] = []
    yield box
    # A process with I/O stuck in the device cannot exit (the kernel waits for
    # it in exit_aio), so release the device before stopping the daemons.
    faultfs.abort()
    for d in box:
        d.stop()


def test_io_errors_are_counted_by_errno_and_the_daemon_keeps_serving(
        faultfs: FaultFS, tmp_path: Path, daemon_box: list[Aiod]) -> None:
    d = Aiod(tmp_path, config({"name": "bad", "type": "load", "op": "randread",
                               "target": str(faultfs.path("eio.dat")), "iodepth": 4}))
    daemon_box.append(d)
    d.wait_ready()
    d.wait_until(lambda: d.metric_sum("aiod_ops_failed_total", job="bad", errno="EIO") >= 4,
                 what="EIO failures counted")
    assert d.get("/healthz")[0] == 200
    # The failing load job backs off instead of spinning on errors.
    n1 = d.metric_sum("aiod_ops_failed_total", job="bad")
    time.sleep(1.0)
    n2 = d.metric_sum("aiod_ops_failed_total", job="bad")
    assert n2 - n1 < 200
    assert "Input/output error" in d.log
    assert d.stop() == 0
    rep = d.report()
    assert rep["invariant_holds"] and rep["totals"]["failed"] == rep["totals"]["submitted"]


def test_hung_io_shows_as_timeouts_and_oldest_in_flight_and_shutdown_does_not_hang(
        faultfs: FaultFS, tmp_path: Path, daemon_box: list[Aiod]) -> None:
    d = Aiod(tmp_path, config({"name": "hung", "type": "probe", "op": "randread",
                               "target": str(faultfs.path("hang.dat")), "rate": "20/s",
                               "timeout": "300ms"}, drain="300ms", destroy="1s"))
    daemon_box.append(d)
    d.wait_ready()
    d.wait_until(lambda: d.metric_sum("aiod_job_op_timeouts_total", job="hung") >= 1,
                 what="the hung op to be flagged")
    assert d.metric_sum("aiod_ops_oldest_in_flight_seconds", pool="default") > 0.3
    assert d.metric_sum("aiod_ops_in_flight", pool="default") == 1  # probe iodepth 1
    assert d.metric_sum("aiod_job_skipped_ops_total", job="hung") > 0
    assert "hung I/O" in d.log
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    report = d.state / "shutdown-report.json"
    d.wait_until(report.exists, timeout=15, what="the shutdown report")
    assert time.monotonic() - t0 < 10
    rep = d.report()
    assert len(rep["failed_to_destroy"]) == 1
    assert "did not return" in rep["failed_to_destroy"][0]["error"]
    assert rep["cancel"]["uncancellable"] == 1
    assert rep["totals"]["in_flight"] == 0 and rep["invariant_holds"]
    assert rep["totals"]["cancelled"] == 1
    states = [c["state"] for p in rep["pools"] for c in p["contexts"]]
    assert sorted(states) == ["destroyed", "failed"]
    # The kernel keeps the process until the device answers: release it.
    faultfs.abort()
    assert d.wait(15) == 0


def test_a_long_drain_that_makes_progress_extends_the_stop_timeout(
        faultfs: FaultFS, tmp_path: Path, daemon_box: list[Aiod]) -> None:
    # slow.dat answers one request at a time, 0.3 s each: 8 in flight take ~2.4 s.
    d = Aiod(tmp_path, config({"name": "slow", "type": "load", "op": "randread",
                               "target": str(faultfs.path("slow.dat")), "iodepth": 8,
                               "timeout": "30s"}, drain="20s"))
    daemon_box.append(d)
    d.wait_ready()
    d.wait_until(lambda: d.metric_sum("aiod_ops_in_flight") == 8, what="8 in flight")
    assert d.notify is not None
    n = len(d.notify.collect())
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    msgs = d.notify.collect()[n:]
    stopping = [i for i, m in enumerate(msgs) if "STOPPING=1" in m.split("\n")]
    extends = [i for i, m in enumerate(msgs) if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert stopping and extends and extends[0] > stopping[0], msgs
    rep = d.report()
    assert rep["drain_seconds"] >= 1.0 and rep["cancel"]["uncancellable"] == 0
    assert rep["totals"]["completed"] == rep["totals"]["submitted"]
