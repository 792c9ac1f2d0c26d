"""The daemon against I/O that fails, stalls and hangs (FUSE fault injection)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import live_contexts
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


def test_a_pool_whose_reads_hang_is_shrunk_and_removed_while_the_loop_keeps_turning(
        faultfs: FaultFS, tmp_path: Path, daemon_box: list[Aiod]) -> None:
    cfg: dict[str, Any] = {
        "shutdown": {"drain_timeout": "1s", "destroy_timeout": "8s"},
        "pools": [{"name": "main", "contexts": 1, "nr_events": 8},
                  {"name": "hung", "contexts": 2, "nr_events": 8}],
        "jobs": [
            {"name": "probe", "pool": "main", "type": "probe", "target": "probe.dat",
             "size": "4MiB", "op": "randread", "block_size": "4KiB", "direct": True,
             "rate": "50/s"},
            # Buffered reads of a file whose reads never answer.
            {"name": "stuck", "pool": "hung", "type": "load", "op": "randread",
             "target": str(faultfs.path("hang.dat")), "block_size": "4KiB", "direct": False,
             "iodepth": 8, "timeout": "120s"},
        ],
    }
    d = Aiod(tmp_path, cfg, env={"WATCHDOG_USEC": "1000000"})  # a ping every 0.5 s
    daemon_box.append(d)
    d.wait_ready()
    assert d.notify is not None
    d.wait_until(lambda: d.metric_sum("aiod_ops_in_flight", pool="hung") == 8,
                 what="8 hung reads in flight")
    # READY=1 does not wait for the probe's target to be filled: measure gaps
    # from its first completion on.
    d.wait_until(lambda: d.metric_sum("aiod_job_last_completion_timestamp_seconds",
                                      job="probe") > 0, what="the probe's first completion")

    worst_gap = worst_ping_gap = 0.0
    health: set[int] = set()
    last_ping = time.monotonic()
    t0 = time.monotonic()
    shrunk = removed = False
    while (now := time.monotonic()) - t0 < 40:
        if not shrunk and now - t0 >= 3:
            cfg["pools"][1]["contexts"] = 1
            d.write_config(cfg)
            d.signal(signal.SIGHUP)
            shrunk = True
        if not removed and now - t0 >= 15:
            cfg["pools"] = cfg["pools"][:1]
            cfg["jobs"] = cfg["jobs"][:1]
            d.write_config(cfg)
            d.signal(signal.SIGHUP)
            removed = True
        m = d.metrics()
        last = m['aiod_job_last_completion_timestamp_seconds{job="probe"}']
        worst_gap = max(worst_gap, time.time() - last)
        health.add(d.get("/healthz")[0])
        n = len(d.notify.messages)
        if "WATCHDOG=1" in d.notify.collect()[n:]:
            last_ping = time.monotonic()
        worst_ping_gap = max(worst_ping_gap, time.monotonic() - last_ping)
        time.sleep(0.25)
    assert worst_gap < 1.0, f"the probe went {worst_gap:.2f}s without a completion"
    assert health == {200}
    assert worst_ping_gap < 1.5, f"no watchdog ping for {worst_ping_gap:.2f}s"
    # Both of the hung pool's contexts were given up on (once each), not waited on.
    assert d.metric_sum("aiod_context_destroy_failures_total", pool="hung") == 2
    assert d.metric_sum("aiod_contexts", pool="hung", state="failed") == 2
    assert d.log.count("did not return within 8s") == 2
    assert "pool hung removed" not in d.log

    # Release the device: the stuck io_destroy calls return, the contexts are
    # destroyed after all, and the removed pool is gone.
    faultfs.set_mode("hang.dat", "ok")
    faultfs.release("hang.dat")
    d.wait_until(lambda: "pool hung removed" in d.log, timeout=20,
                 what="the removed pool's contexts to be destroyed")
    assert live_contexts(str(d.proc.pid)) == 1  # main's only
    assert d.log.count("io_destroy returned at last") == 2
    assert d.stop() == 0
    rep = d.report()
    assert rep["invariant_holds"] and rep["totals"]["in_flight"] == 0
    (hung,) = [p for p in rep["pools"] if p["name"] == "hung"]
    assert [c["state"] for c in hung["contexts"]] == ["destroyed", "destroyed"]
    assert hung["destroy_failures"] == 2 and rep["failed_to_destroy"] == []
    t = hung["totals"]
    assert t["submitted"] == t["completed"] + t["cancelled"] + t["failed"] and t["submitted"] >= 8
