"""`aiod run` as a subprocess, driven the way systemd and Prometheus drive it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiod import aio
from tests.conftest import live_contexts
from tests.daemon_harness import AIOD, ROOT, Aiod, free_port


def base_config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "log_level": "info",
        "shutdown": {"drain_timeout": "5s", "destroy_timeout": "10s"},
        "pools": [{"name": "default", "contexts": 2, "nr_events": 64}],
        "jobs": [{"name": "probe", "pool": "default", "type": "probe", "target": "probe.dat",
                  "size": "4MiB", "op": "randread", "block_size": "4KiB", "direct": True,
                  "rate": "200/s", "timeout": "5s"}],
    }
    cfg.update(over)
    return cfg


def start(daemons: list[Aiod], tmp: Path, cfg: dict[str, Any], **kw: Any) -> Aiod:
    d = Aiod(tmp, cfg, **kw)
    daemons.append(d)
    d.wait_ready()
    return d


def test_ready_only_once_metrics_are_bound_and_status_is_readable(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    assert d.notify is not None
    i = d.notify.wait_for("READY=1")
    ready_msg = d.notify.messages[i]
    # Metrics answer as soon as READY=1 has been sent: the socket was bound before.
    assert d.get("/metrics")[0] == 200
    status = [ln for ln in ready_msg.split("\n") if ln.startswith("STATUS=")]
    # READY=1 does not wait for the job's target to be filled: running or preparing.
    assert status and "1 pool (2 contexts)" in status[0] and (
        "1/1 jobs running" in status[0] or "1 preparing their targets" in status[0])
    assert d.get("/healthz")[0] == 200 and d.get("/readyz")[0] == 200
    assert d.stop() == 0
    msgs = d.notify.messages
    stopping = [m for m in msgs if "STOPPING=1" in m.split("\n")]
    assert stopping, msgs


def test_metrics_counters_move_and_match_the_config(daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    assert d.metric_sum("aiod_contexts", pool="default", state="active") == 2
    first = d.metric_sum("aiod_ops_completed_total", job="probe")
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="probe") > first + 20,
                 what="completions to rise")
    assert d.metric_sum("aiod_op_latency_seconds_count", job="probe") > 0
    assert d.metric_sum("aiod_job_last_completion_timestamp_seconds", job="probe") > time.time() - 10
    assert d.metric_sum("aiod_build_info") == 1
    assert d.metric_sum("aiod_kernel_aio_nr") >= 128
    assert d.metric_sum("aiod_config_last_reload_successful") == 1


def test_sighup_with_a_good_config_resizes_the_pool(daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    assert d.notify is not None
    d.config["pools"][0]["contexts"] = 5
    d.write_config(d.config)
    n = len(d.notify.collect())
    d.signal(signal.SIGHUP)
    i = d.notify.wait_for("RELOADING=1", start=n)
    reloading = d.notify.messages[i].split("\n")
    assert any(ln.startswith("MONOTONIC_USEC=") for ln in reloading)
    d.notify.wait_for("READY=1", start=i)
    assert d.metric_sum("aiod_contexts", pool="default", state="active") == 5
    d.config["pools"][0]["contexts"] = 1
    d.write_config(d.config)
    d.signal(signal.SIGHUP)
    d.wait_until(lambda: d.metric_sum("aiod_contexts", pool="default", state="destroyed") == 4,
                 what="surplus contexts destroyed")
    assert d.metric_sum("aiod_contexts", pool="default", state="active") == 1
    assert d.stop() == 0
    rep = d.report()
    assert rep["invariant_holds"] and rep["totals"]["in_flight"] == 0


def test_sighup_with_a_broken_config_keeps_the_old_one(daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    d.config_path.write_text("pools:\n  - name: default\n    contexts: many\n")
    d.signal(signal.SIGHUP)
    d.wait_until(lambda: "reload failed" in d.log, what="reload failure logged")
    assert "contexts" in d.log
    assert d.metric_sum("aiod_config_last_reload_successful") == 0
    assert d.metric_sum("aiod_contexts", pool="default", state="active") == 2
    before = d.metric_sum("aiod_ops_completed_total", job="probe")
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="probe") > before,
                 what="the old config to keep running")
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_reload_starts_and_stops_jobs_without_losing_operations(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    d.config["jobs"].append({"name": "load", "pool": "default", "type": "load",
                             "target": "load.dat", "size": "4MiB", "op": "randrw",
                             "block_size": "4KiB", "iodepth": 8})
    d.write_config(d.config)
    d.signal(signal.SIGHUP)
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="load", op="write") > 100,
                 what="the new load job to run")
    d.config["jobs"] = d.config["jobs"][1:]  # drop the probe
    d.write_config(d.config)
    d.signal(signal.SIGHUP)
    d.wait_until(lambda: 'job="probe"' not in d.get("/metrics")[1], what="probe gone")
    assert d.stop() == 0
    rep = d.report()
    assert rep["invariant_holds"]
    t = rep["totals"]
    assert t["submitted"] == t["completed"] + t["cancelled"] + t["failed"] and t["in_flight"] == 0
    assert t["failed"] == 0


def test_sigterm_with_odirect_and_poll_io_in_flight_accounts_for_everything(
        daemons: list[Aiod], tmp_path: Path) -> None:
    cfg = base_config(jobs=[
        {"name": "load", "pool": "default", "type": "load", "target": "load.dat",
         "size": "8MiB", "op": "randread", "block_size": "64KiB", "iodepth": 32},
        {"name": "hold", "pool": "default", "type": "load", "target": "hold.fifo",
         "op": "poll", "iodepth": 16},
    ])
    d = start(daemons, tmp_path, cfg)
    d.wait_until(lambda: d.metric_sum("aiod_ops_in_flight", pool="default") >= 16,
                 what="polls in flight")
    assert live_contexts(str(d.proc.pid)) == 2  # its own, not fs.aio-nr: that is system-wide
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    rep = d.report()
    t = rep["totals"]
    assert t["in_flight"] == 0 and rep["invariant_holds"]
    assert t["submitted"] == t["completed"] + t["cancelled"] + t["failed"]
    assert t["cancelled"] >= 16  # the polls: they never complete on their own
    assert rep["cancel"]["requested"] >= 16
    assert rep["failed_to_destroy"] == []
    for pool in rep["pools"]:
        for ctx in pool["contexts"]:
            assert ctx["state"] == "destroyed"
            assert ctx["submitted"] == ctx["completed"] + ctx["cancelled"] + ctx["failed"]
    assert "shutdown complete: submitted" in d.log


def test_second_sigterm_during_the_drain_goes_straight_to_cancel(
        daemons: list[Aiod], tmp_path: Path) -> None:
    cfg = base_config(shutdown={"drain_timeout": "60s", "destroy_timeout": "10s"}, jobs=[
        {"name": "hold", "pool": "default", "type": "load", "target": "hold.fifo",
         "op": "poll", "iodepth": 8}])
    d = start(daemons, tmp_path, cfg)
    d.wait_until(lambda: d.metric_sum("aiod_ops_in_flight") == 8, what="polls in flight")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    d.wait_until(lambda: "shutting down" in d.log, what="shutdown to start")
    time.sleep(0.3)
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    assert time.monotonic() - t0 < 20
    rep = d.report()
    assert rep["drain_interrupted_by_signal"] is True
    assert rep["totals"]["cancelled"] == 8 and rep["invariant_holds"]


def test_sighup_during_shutdown_is_ignored_with_a_log_line(
        daemons: list[Aiod], tmp_path: Path) -> None:
    cfg = base_config(shutdown={"drain_timeout": "1500ms", "destroy_timeout": "10s"}, jobs=[
        {"name": "hold", "pool": "default", "type": "load", "target": "hold.fifo",
         "op": "poll", "iodepth": 2}])
    d = start(daemons, tmp_path, cfg)
    d.wait_until(lambda: d.metric_sum("aiod_ops_in_flight") == 2, what="polls in flight")
    d.signal(signal.SIGTERM)
    d.wait_until(lambda: "shutting down" in d.log, what="shutdown to start")
    d.signal(signal.SIGHUP)
    assert d.wait(30) == 0
    assert "SIGHUP during shutdown: ignored" in d.log
    assert "reloading configuration" not in d.log


def test_watchdog_pings_come_from_the_live_loop(daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config(), env={"WATCHDOG_USEC": "400000"})
    assert d.notify is not None
    # Three pings in a row (one every 0.2 s), waited for rather than slept for:
    # a loaded machine only makes them later.
    i = d.notify.wait_for("WATCHDOG=1")
    i = d.notify.wait_for("WATCHDOG=1", start=i + 1)
    d.notify.wait_for("WATCHDOG=1", start=i + 1)
    d.signal(signal.SIGSTOP)  # a frozen loop must stop pinging
    try:
        d.notify.collect(0.3)
        n = len(d.notify.messages)
        time.sleep(0.8)
        assert len(d.notify.collect()) == n
    finally:
        d.signal(signal.SIGCONT)
    d.notify.wait_for("WATCHDOG=1", start=len(d.notify.messages))


def test_missing_target_is_a_counted_job_error_and_the_daemon_keeps_serving(
        daemons: list[Aiod], tmp_path: Path) -> None:
    cfg = base_config()
    cfg["jobs"].append({"name": "gone", "pool": "default", "type": "probe",
                        "target": str(tmp_path / "no" / "such" / "dir" / "x.dat")})
    d = start(daemons, tmp_path, cfg)
    assert d.metric_sum("aiod_job_errors_total", job="gone", reason="missing") == 1
    assert d.metric_sum("aiod_job_running", job="gone") == 0
    assert "does not exist" in d.log
    before = d.metric_sum("aiod_ops_completed_total", job="probe")
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="probe") > before,
                 what="the other job to keep running")
    assert d.stop() == 0


def test_writes_to_a_file_aiod_did_not_create_are_refused(
        daemons: list[Aiod], tmp_path: Path) -> None:
    user_file = tmp_path / "users-data.bin"
    original = os.urandom(65536)
    user_file.write_bytes(original)
    cfg = base_config()
    cfg["jobs"].append({"name": "w", "pool": "default", "type": "load",
                        "target": str(user_file), "op": "randwrite", "iodepth": 4})
    d = start(daemons, tmp_path, cfg)
    assert d.metric_sum("aiod_job_errors_total", job="w", reason="write_refused") == 1
    assert "refusing to write" in d.log and "allow_write" in d.log
    assert d.stop() == 0
    assert user_file.read_bytes() == original


def test_reads_of_a_file_aiod_did_not_create_are_fine(daemons: list[Aiod], tmp_path: Path) -> None:
    user_file = tmp_path / "users-data.bin"
    original = os.urandom(1 << 20)
    user_file.write_bytes(original)
    cfg = base_config(jobs=[{"name": "r", "pool": "default", "type": "load",
                             "target": str(user_file), "op": "randread", "iodepth": 4}])
    d = start(daemons, tmp_path, cfg)
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="r") > 100)
    assert d.stop() == 0
    assert user_file.read_bytes() == original


def test_created_target_holds_real_data(daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    d.wait_until(lambda: d.metric_sum("aiod_job_running", job="probe") == 1,
                 what="the target's fill to finish")
    data = (d.state / "probe.dat").read_bytes()
    assert len(data) == 4 << 20
    assert data.count(b"\0" * 4096) == 0  # not a sparse or zero-filled file
    st = os.stat(d.state / "probe.dat")
    assert st.st_blocks * 512 >= 4 << 20  # every extent really allocated and written
    assert d.stop() == 0


def test_capacity_refusal_exits_75_and_names_aio_max_nr(tmp_path: Path) -> None:
    _, max_nr = aio.system_aio_usage()
    d = Aiod(tmp_path, base_config(pools=[{"name": "default", "contexts": 2,
                                          "nr_events": max_nr}]))
    rc = d.wait(30)
    d.stop()
    assert rc == 75
    lines = [ln for ln in d.log.splitlines() if ln.strip()]
    assert any("fs.aio-max-nr" in ln and "pool 'default'" in ln for ln in lines)
    assert "Traceback" not in d.log


@pytest.mark.parametrize("text,needle", [
    ("pools: []\n", "pools"),
    ("pools:\n  - name: p\n    contexts: 1\n    nr_events: 8\n    colour: red\n", "colour"),
    ("log_level: loud\npools:\n  - {name: p, contexts: 1, nr_events: 8}\n", "log_level"),
    ("pools: [\n", "line"),
])
def test_run_with_a_bad_config_exits_78_with_one_line_per_problem(
        tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in (["run", "--config", str(path)], ["check-config", str(path)]):
        r = subprocess.run(AIOD + cmd, capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 78, r.stderr
        assert needle in r.stderr and str(path) in r.stderr
        assert "Traceback" not in r.stderr


def test_check_config_accepts_the_shipped_config() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(AIOD + ["check-config", str(ROOT / "config" / "aiod.yaml")],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr


def test_help_documents_exit_codes() -> None:
    r = subprocess.run(AIOD + ["--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
    assert r.returncode == 0
    for code in ("75", "78", "SIGHUP", "SIGTERM"):
        assert code in r.stdout


def test_metrics_address_in_use_exits_1_with_one_line(daemons: list[Aiod], tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start(daemons, tmp_path / "a", base_config())
    cfg = base_config(metrics={"listen": f"127.0.0.1:{first.port}"})
    second = Aiod(tmp_path / "b", cfg)
    rc = second.wait(30)
    second.stop()
    assert rc == 1
    assert f"cannot listen for metrics on 127.0.0.1:{first.port}" in second.log
    assert "Address already in use" in second.log
    assert "Traceback" not in second.log


def test_missing_config_file_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(AIOD + ["run", "--config", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 78
    assert "nope.yaml" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sigterm_during_startup_still_shuts_down_cleanly(tmp_path: Path) -> None:
    # A 256 MiB target to create keeps startup busy; TERM arrives in the middle.
    cfg = base_config(jobs=[{"name": "big", "pool": "default", "type": "probe",
                             "target": "big.dat", "size": "256MiB"}])
    d = Aiod(tmp_path, cfg)
    try:
        d.wait_until(lambda: (d.state / "big.dat").exists(), timeout=30,
                     what="the target's creation to start")
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0
    finally:
        d.stop()
    rep = d.report()
    assert rep["invariant_holds"] and rep["totals"]["in_flight"] == 0
    assert rep["failed_to_destroy"] == []
    assert all(c["state"] == "destroyed" for p in rep["pools"] for c in p["contexts"])
    assert (d.state / "big.dat").stat().st_size == 256 << 20


def _wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def test_sigterm_while_the_config_is_still_being_read_is_acted_on_not_fatal(
        tmp_path: Path) -> None:
    # The config comes through a FIFO (as from `--config <(generate)`), so aiod
    # is held at its very start, reading it, when the TERM arrives.
    fifo = tmp_path / "aiod-config.fifo"
    os.mkfifo(fifo)
    (tmp_path / "state").mkdir()
    port = free_port()
    cfg = base_config(state_directory=str(tmp_path / "state"),
                      metrics={"listen": f"127.0.0.1:{port}"})
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONPATH"] = str(ROOT)
    with open(tmp_path / "aiod.log", "w") as out:
        proc = subprocess.Popen(AIOD + ["run", "--config", str(fifo)], stdout=out, stderr=out,
                                env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while _wchan(proc.pid) != "wait_for_partner":  # blocked opening the FIFO
            assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert proc.poll() is None, "SIGTERM took the default action: killed without a report"
        fifo.write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "aiod.log").read_text()
    assert "received SIGTERM: shutting down" in log and "Traceback" not in log
    rep = json.loads((tmp_path / "state" / "shutdown-report.json").read_text())
    assert rep["invariant_holds"] and rep["reason"] == "SIGTERM"


def test_sigterms_up_to_the_very_exit_are_logged_and_ignored_never_fatal(
        daemons: list[Aiod], tmp_path: Path) -> None:
    cfg = base_config(jobs=[
        {"name": "load", "pool": "default", "type": "load", "target": "load.dat",
         "size": "8MiB", "op": "randrw", "block_size": "4KiB", "direct": True, "iodepth": 64}])
    d = start(daemons, tmp_path, cfg)
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="load") > 1000,
                 what="the load to run")
    d.signal(signal.SIGTERM)
    # Then TERM after TERM, through the drain, the report and the exit itself.
    while d.proc.poll() is None:
        try:
            d.signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.002)
    assert d.wait(30) == 0
    rep = d.report()
    assert rep["invariant_holds"] and rep["totals"]["in_flight"] == 0
    assert "received SIGTERM after the shutdown had finished; ignoring it" in d.log


def test_ended_context_records_stay_bounded_across_reloads(
        daemons: list[Aiod], tmp_path: Path) -> None:
    d = start(daemons, tmp_path, base_config())
    reloads = 0

    def reload_with(**pool: Any) -> None:
        nonlocal reloads
        d.config["pools"][0].update(pool)
        d.write_config(d.config)
        d.signal(signal.SIGHUP)
        reloads += 1
        # Read the notify socket as systemd would: a full one blocks aiod's sends.
        d.wait_until(lambda: bool(d.notify and d.notify.collect() is not None)
                     and d.log.count("configuration reloaded") == reloads,
                     what=f"reload {reloads}")

    for i in range(40):  # shrink and grow: one context ends each time
        reload_with(contexts=1 if i % 2 == 0 else 2)
    d.wait_until(lambda: d.metric_sum("aiod_contexts", pool="default", state="destroyed")
                 == 20, what="20 shrunk contexts destroyed")
    for i in range(6):  # a new nr_events replaces the pool: one removed pool each time
        reload_with(nr_events=32 if i % 2 == 0 else 64)
    d.wait_until(lambda: d.log.count("pool default removed") == 6, what="6 pools removed")
    assert d.stop() == 0
    rep = d.report()
    assert rep["invariant_holds"]
    pools = [p for p in rep["pools"] if p["name"] == "default"]
    assert len(pools) == 2  # the last pool, and every removed one folded into one entry
    for p in pools:
        assert len(p["contexts"]) <= 2 + 16
        folded = p["ended_contexts_folded"]
        assert folded["contexts"] + len(p["contexts"]) == p["setups"]
        t = p["totals"]
        assert t["submitted"] == t["completed"] + t["cancelled"] + t["failed"]
    assert sum(p["setups"] for p in pools) == 2 + 20 + 6 * 2


def test_a_slow_probe_sleeps_in_the_kernel_between_completions(
        daemons: list[Aiod], tmp_path: Path) -> None:
    # A probe (iodepth 1) at 5 ops/s: between completions the loop waits on the pool's
    # eventfd (or its next deadline), never polling. A loop that spun would
    # burn a core's worth of CPU time in the window below; a sleeping one a
    # few milliseconds per op.
    cfg = base_config(jobs=[{"name": "probe", "pool": "default", "type": "probe",
                             "target": "probe.dat", "size": "1MiB", "op": "randread",
                             "block_size": "4KiB", "direct": True, "rate": "5/s",
                             "timeout": "5s"}])
    d = start(daemons, tmp_path, cfg)
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="probe") >= 3,
                 what="the probe to complete ops")
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        fields = (Path("/proc") / str(d.proc.pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    done0, cpu0, t0 = d.metric_sum("aiod_ops_completed_total", job="probe"), cpu_seconds(), \
        time.monotonic()
    time.sleep(3.0)
    cpu, wall = cpu_seconds() - cpu0, time.monotonic() - t0
    done = d.metric_sum("aiod_ops_completed_total", job="probe") - done0
    assert done >= 5  # the probe kept going meanwhile
    assert cpu < 0.2 * wall, f"{cpu:.2f}s of CPU in {wall:.1f}s for {done:.0f} ops"
    assert d.stop() == 0
