"""The host scan inside the daemon: on a worker thread the loop only polls, and
the metrics it exports, with a bounded number of series."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from aiod import config, host_scanner, hostscan
from aiod.budget import Budget, host_metrics
from aiod.daemon import Daemon
from aiod.notify import Notifier
from tests.daemon_harness import Aiod
from tests.test_hostscan import Holder, holders  # noqa: F401 - fixture


def test_series_stay_bounded_whatever_the_host_runs() -> None:
    procs = [hostscan.Holder(pid, f"p{pid % 50}", f"u{pid % 7}.service", 1, 4096, 1, 62)
             for pid in range(1, 5001)]
    scan = hostscan.HostScan(aio_nr=9000, aio_max_nr=65536, processes=procs, unreadable=3,
                             scanned=5000, seconds=0.1)
    fams = {f.name: f for f in host_metrics(scan, top=10)}
    ev = fams["aiod_host_aio_events"].samples
    assert len(ev) == 2 * (10 + 1)
    other = {s.labels["bound"]: s.value for s in ev if s.labels["comm"] == "other"}
    named = sum(s.value for s in ev if s.labels["comm"] != "other" and s.labels["bound"] == "lo")
    assert named + other["lo"] == 5000 and other["hi"] == 62 * 5000 - 62 * named
    assert sum(len(f.samples) for f in fams.values()) == 2 * (10 + 1) + 5
    assert [s.value for s in fams["aiod_host_aio_unattributed_events"].samples] == [0, 4000]  # 9000 - 5000 at most


def fixture_proc(tmp: Path) -> Path:
    """/proc with one process whose maps file blocks the reader (a FIFO), as the
    maps of a process stuck in a page fault do; the rest is the real /proc."""
    proc = tmp / "proc"
    (proc / "sys/fs").mkdir(parents=True)
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "sys/fs/aio-nr").write_text("0\n")
    (proc / "sys/fs/aio-max-nr").write_text("65536\n")
    (proc / "sys/kernel/osrelease").write_text("6.1.0\n")
    os.symlink(f"/proc/{os.getpid()}", proc / "self")
    (proc / "4242").mkdir()
    os.mkfifo(proc / "4242/maps")
    (proc / "4242/comm").write_text("stuck\n")
    (proc / "4242/cgroup").write_text("0::/system.slice/stuck.service\n")
    return proc


def test_a_stuck_scan_never_holds_up_the_loop(tmp_path: Path) -> None:
    proc = fixture_proc(tmp_path)
    cfg = config.parse("host_scan: {interval: 1s, top: 5}\nmetrics: {listen: '127.0.0.1:0'}\n"
                       f"state_directory: {tmp_path}\n"
                       "pools:\n  - {name: default, contexts: 1, nr_events: 8}\n", "t", env={})
    b = Budget(cfg, procfs_root=proc)
    b.attach({}, list)
    t0 = time.monotonic()
    b.tick(t0)
    assert b.host_scanner.busy
    slowest = 0.0
    for _ in range(20):             # the loop turns while the scan waits on the FIFO
        t = time.monotonic()
        b.tick(t)
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.01)
    assert b.host_scanner.busy and b.scan is None and slowest < 0.05
    ring = "7f0000000000-7f0000003000 rw-s 00000000 00:13 99   /[aio] (deleted)\n"
    fd = os.open(proc / "4242/maps", os.O_WRONLY)   # the process answers at last
    os.write(fd, ring.encode())
    os.close(fd)
    deadline = time.monotonic() + 10
    while b.scan is None:
        assert time.monotonic() < deadline
        b.tick(time.monotonic())
        time.sleep(0.01)
    fams = {f.name: f for f in b.collect()}
    stuck = {s.labels["bound"]: s.value for s in fams["aiod_host_aio_events"].samples
             if s.labels["comm"] == "stuck"}
    assert stuck == {"lo": 127, "hi": 190}
    (unit,) = {s.labels["unit"] for s in fams["aiod_host_aio_events"].samples
               if s.labels["comm"] == "stuck"}
    assert unit == "stuck.service"


def test_a_scan_stuck_for_long_is_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    proc = fixture_proc(tmp_path)
    monkeypatch.setattr(host_scanner, "SCAN_STUCK", 0.2)
    cfg = config.parse("host_scan: {interval: 1s}\nstate_directory: /tmp\n"
                       "pools:\n  - {name: default, contexts: 1, nr_events: 8}\n", "t", env={})
    b = Budget(cfg, procfs_root=proc)
    b.attach({}, list)
    try:
        for _ in range(40):
            b.tick(time.monotonic())
            time.sleep(0.02)
        stuck = [r for r in caplog.records if "still running" in r.getMessage()]
        assert len(stuck) == 1 and "/proc/PID/maps" in stuck[0].getMessage()
    finally:
        fd = os.open(proc / "4242/maps", os.O_WRONLY)
        os.close(fd)


def test_daemon_exports_the_holders(holders: list[Holder], tmp_path: Path) -> None:
    holders.append(Holder("1000", "1000", "--comm=aiotest-big"))
    holders.append(Holder("64", "--fork", "--comm=aiotest-small"))
    d = Aiod(tmp_path, {"host_scan": {"interval": "1s", "top": 100},
                        "pools": [{"name": "default", "contexts": 2, "nr_events": 32}],
                        "jobs": []})
    try:
        d.wait_ready()

        def rows(comm: str) -> dict[str, float]:
            return {b: d.metric_sum("aiod_host_aio_events", comm=comm, bound=b)
                    for b in ("lo", "hi")}
        d.wait_until(lambda: rows("aiotest-big")["lo"] > 0, what="the first host scan")
        assert rows("aiotest-big") == {"lo": 1918, "hi": 2044}
        assert rows("aiotest-small") == {"lo": 63, "hi": 126}   # forked child not counted
        assert d.metric_sum("aiod_host_aio_processes") >= 3       # the two, and aiod
        assert d.metric_sum("aiod_host_scan_duration_seconds") > 0
        assert "aiod_host_aio_unattributed_events" in d.get("/metrics")[1]
        assert d.metric_sum("aiod_context_leaks") == 0
        assert "host scan: reading /proc/*/maps every 1s" in d.log
    finally:
        assert d.stop() == 0
    assert d.report()["context_leaks"] == 0


def test_workers_do_not_outlive_a_clean_shutdown(tmp_path: Path) -> None:
    cfg = config.parse("host_scan: {interval: 1s}\nmetrics: {listen: '127.0.0.1:0'}\n"
                       f"state_directory: {tmp_path}\n"
                       "pools:\n  - {name: default, contexts: 1, nr_events: 8}\n", "t", env={})
    d = Daemon(cfg, notifier=Notifier(env={}))
    d.startup()
    d.budget.tick(time.monotonic())
    d.shutdown("test")
    d.signals.restore()  # in-process: give pytest its handlers back
    deadline = time.monotonic() + 10
    while any(t.name.startswith("aiod-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.01)


def test_promtool_check_metrics_is_clean_for_the_budget_series() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make test installs it)")
    cfg = config.parse("headroom_reserve: 5%\nhost_scan: {top: 2}\nstate_directory: /tmp\n"
                       "pools:\n  - {name: default, contexts: 4, min_contexts: 1, "
                       "nr_events: 8}\n", "t", env={})
    b = Budget(cfg)
    b.scan = hostscan.scan()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(b)
    text = generate_latest(registry)
    for name in (b"aiod_context_leaks", b"aiod_pool_yields_total", b"aiod_pool_contexts_target",
                 b"aiod_host_aio_events", b"aiod_host_aio_unattributed_events",
                 b"aiod_host_aio_processes", b"aiod_host_scan_duration_seconds"):
        assert b"\n" + name in text, name
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == b"" and r.stderr.strip() == b"", \
        (r.stdout + r.stderr).decode()
