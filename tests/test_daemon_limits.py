"""The daemon at its limits: config size, kernel caps, ports, many scrapers at once."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiod import config
from tests.daemon_harness import AIOD, ROOT, Aiod


def base_config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "log_level": "info",
        "shutdown": {"drain_timeout": "2s", "destroy_timeout": "10s"},
        "pools": [{"name": "default", "contexts": 1, "nr_events": 8}],
        "jobs": [{"name": "probe", "pool": "default", "type": "probe", "target": "probe.dat",
                  "size": "1MiB", "rate": "100/s"}],
    }
    cfg.update(over)
    return cfg


def start(daemons: list[Aiod], tmp: Path, cfg: dict[str, Any]) -> Aiod:
    d = Aiod(tmp, cfg)
    daemons.append(d)
    d.wait_ready()
    return d


def aiod(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(AIOD + list(args), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def oversized(path: Path, cfg: dict[str, Any]) -> None:
    """A valid configuration padded with a comment past 1 MiB."""
    path.write_text(yaml.safe_dump(cfg) + "# " + "x" * config.MAX_CONFIG_BYTES + "\n")


# --- config size ------------------------------------------------------------------

def test_check_config_and_run_refuse_a_config_over_1_mib_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    oversized(path, base_config(state_directory=str(tmp_path / "state")))
    for args in (["check-config", str(path)], ["run", "--config", str(path)]):
        r = aiod(*args)
        assert r.returncode == 78, r.stderr
        assert r.stderr.splitlines() == [
            f"{path}: the file is {path.stat().st_size} bytes; a configuration may be at "
            "most 1048576 bytes (1 MiB)"], r.stderr


def test_a_reload_of_a_config_over_1_mib_keeps_the_running_one(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    oversized(d.config_path, d.config)
    d.signal(signal.SIGHUP)
    d.wait_until(lambda: "reload failed" in d.log, what="the reload to fail")
    failed = [ln for ln in d.log.splitlines() if "reload failed" in ln]
    assert len(failed) == 1 and "at most 1048576 bytes (1 MiB)" in failed[0], failed
    d.wait_until(lambda: d.metric_sum("aiod_config_last_reload_successful") == 0)
    assert d.get("/healthz")[0] == 200
    assert d.stop() == 0


# --- nr_events above the kernel's per-context cap -----------------------------------

@pytest.mark.parametrize("nr_events", [8388608, 99999999999999999999])
def test_check_config_refuses_nr_events_above_the_kernel_cap_with_78(
        tmp_path: Path, nr_events: int) -> None:
    path = tmp_path / "cap.yaml"
    path.write_text(f"state_directory: {tmp_path}\n"
                    f"pools:\n  - {{name: p, contexts: 1, nr_events: {nr_events}}}\n")
    for args in (["check-config", str(path)], ["run", "--config", str(path)]):
        r = aiod(*args)
        assert r.returncode == 78, r.stderr
        (line,) = r.stderr.splitlines()
        assert "nr_events: expected at most 4194304, the kernel's limit per context" in line
        assert f"found {nr_events}" in line


# --- metrics.listen changed by SIGHUP -------------------------------------------------

def test_reload_from_loopback_to_every_interface_on_the_same_port(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    assert d.notify is not None
    d.config["metrics"] = {"listen": f"0.0.0.0:{d.port}"}  # overlaps 127.0.0.1:port
    d.write_config(d.config)
    n = len(d.notify.collect())
    d.signal(signal.SIGHUP)
    d.notify.wait_for("READY=1", start=n)
    assert "reload failed" not in d.log, d.log
    assert f"metrics now on http://0.0.0.0:{d.port}/metrics" in d.log
    assert d.metric_sum("aiod_config_last_reload_successful") == 1
    # and back again
    d.config["metrics"] = {"listen": f"127.0.0.1:{d.port}"}
    d.write_config(d.config)
    n = len(d.notify.collect())
    d.signal(signal.SIGHUP)
    d.notify.wait_for("READY=1", start=n)
    assert "reload failed" not in d.log, d.log
    assert d.get("/healthz")[0] == 200
    assert d.stop() == 0


def test_a_metrics_port_taken_by_another_process_keeps_the_old_listener(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        d.config["metrics"] = {"listen": f"127.0.0.1:{taken}"}
        d.write_config(d.config)
        d.signal(signal.SIGHUP)
        d.wait_until(lambda: "reload failed" in d.log, what="the reload to fail")
        assert f"cannot listen for metrics on 127.0.0.1:{taken}: Address already in use" in d.log
        assert d.get("/healthz")[0] == 200  # still on the old port
        assert d.metric_sum("aiod_config_last_reload_successful") == 0
    assert d.stop() == 0


# --- the shutdown line -----------------------------------------------------------------

def test_the_shutdown_line_says_which_aio_nr_is_which(daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    assert d.stop() == 0
    rep = d.report()
    (line,) = [ln for ln in d.log.splitlines() if "shutdown complete" in ln]
    assert line.endswith(f"; fs.aio-nr (system-wide) {rep['aio_nr_before_start']} before "
                         f"start, {rep['aio_nr_after_destroy']} after destroy"), line


# --- scrapes in parallel with a load job ------------------------------------------------

def test_twenty_scrapers_beside_a_load_job_are_all_answered_and_the_loop_keeps_going(
        daemons: list[Aiod], tmp_path: Path) -> None:
    """The IOPS ratio is benchmarks/scrape.py's figure; this proves the behaviour."""
    cfg = base_config(jobs=[{"name": "load", "pool": "default", "type": "load",
                             "target": "load.dat", "size": "16MiB", "op": "randread",
                             "iodepth": 8}])
    d = start(daemons, tmp_path, cfg)

    def completed() -> float:
        return d.metric_sum("aiod_ops_completed_total", job="load")

    d.wait_until(lambda: completed() > 0, what="the load job to complete operations")
    stop = threading.Event()
    answers: list[int] = []

    def scrape() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        try:
            while not stop.is_set():
                conn.request("GET", "/metrics")
                r = conn.getresponse()
                r.read()
                answers.append(r.status)
        finally:
            conn.close()

    threads = [threading.Thread(target=scrape) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):  # the loop keeps completing I/O and stays healthy throughout
            before = completed()
            d.wait_until(lambda: completed() > before, what="more completions while scraped")
            assert d.get("/healthz")[0] == 200
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert answers and set(answers) == {200}
    assert d.stop() == 0
    rep = d.report()
    assert rep["invariant_holds"] and rep["totals"]["failed"] == 0


def test_a_reload_shows_in_the_next_scrape_despite_shared_renderings(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    assert d.notify is not None
    assert d.metric_sum("aiod_contexts", pool="default", state="active") == 1  # rendered
    d.config["pools"][0]["contexts"] = 3
    d.write_config(d.config)
    n = len(d.notify.collect())
    d.signal(signal.SIGHUP)
    d.notify.wait_for("READY=1", start=n)
    # No waiting: the reload changed the rendering's key, so this one is fresh.
    assert d.metric_sum("aiod_contexts", pool="default", state="active") == 3
    d.config_path.write_text("pools: [\n")
    n = len(d.notify.collect())
    d.signal(signal.SIGHUP)
    d.notify.wait_for("READY=1", start=n)
    assert d.metric_sum("aiod_config_last_reload_successful") == 0
    assert d.stop() == 0
