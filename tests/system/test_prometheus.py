"""A real Prometheus scrapes a real aiod with deploy/prometheus/prometheus.yml.

aiod runs on this host from the project's virtual environment; Prometheus is
Debian's, with its own storage and port in a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.system.support import (REPO, aiod_yaml, ensure_tools, free_port, http_get,
                                  wait_for)

pytestmark = pytest.mark.system

SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
CONTEXTS = 3


@pytest.fixture(scope="module")
def prometheus_tools() -> None:
    tools = {"prometheus": "prometheus", "promtool": "prometheus"}
    if os.geteuid() != 0 and any(shutil.which(t) is None for t in tools):
        pytest.skip("Prometheus is not installed and only root can apt-get install it")
    reason = ensure_tools(tools)
    if reason:
        pytest.skip(f"no Prometheus: {reason}")


def aiod_command() -> Path:
    for candidate in (REPO / ".venv" / "bin" / "aiod", Path(sys.executable).parent / "aiod"):
        if candidate.exists():
            return candidate
    raise AssertionError(f"no aiod console script in {REPO / '.venv'}: run `make install`")


def stop(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout`` s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


def query(port: int, promql: str) -> list[dict[str, Any]]:
    got = http_get(f"http://127.0.0.1:{port}/api/v1/query?"
                   + urllib.parse.urlencode({"query": promql}))
    assert got is not None and got[0] == 200, got
    body = json.loads(got[1])
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scalar(port: int, promql: str) -> float | None:
    result = query(port, promql)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def workdir() -> Iterator[Path]:
    # /var/tmp rather than /tmp: the jobs use O_DIRECT, which tmpfs refuses
    d = Path(tempfile.mkdtemp(prefix="aiod-prometheus-", dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_promtool_accepts_the_shipped_scrape_config(prometheus_tools: None) -> None:
    r = subprocess.run(["promtool", "check", "config", str(SCRAPE_CONFIG)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert [j["job_name"] for j in jobs] == ["aiod"]


def test_prometheus_scrapes_aiod(prometheus_tools: None, workdir: Path) -> None:
    aiod_port, prom_port = free_port(), free_port()
    while prom_port == aiod_port:
        prom_port = free_port()
    state = workdir / "state"
    state.mkdir()
    config = workdir / "aiod.yaml"
    config.write_text(aiod_yaml(aiod_port, contexts=CONTEXTS, iodepth=4,
                                state_directory=str(state)))

    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "aiod"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{aiod_port}"]}]
    prom_config = workdir / "prometheus.yml"
    prom_config.write_text(yaml.safe_dump(scrape))
    r = subprocess.run(["promtool", "check", "config", str(prom_config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    # aiod outside systemd: no notify socket, no journal, no watchdog
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID",
                        "STATE_DIRECTORY", "LISTEN_FDS", "LISTEN_PID")}
    aiod_log, prom_log = workdir / "aiod.log", workdir / "prometheus.log"
    aiod: subprocess.Popen[bytes] | None = None
    prom: subprocess.Popen[bytes] | None = None
    aiod_rc: int | None = None
    try:
        with open(aiod_log, "wb") as log:
            aiod = subprocess.Popen([str(aiod_command()), "run", "--config", str(config)],
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
        with open(prom_log, "wb") as log:
            prom = subprocess.Popen(
                ["prometheus", f"--config.file={prom_config}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)

        def ready(name: str, proc: subprocess.Popen[bytes], url: str) -> bool:
            assert proc.poll() is None, f"{name} exited {proc.returncode} before it was ready"
            got = http_get(url, timeout=2)
            return got is not None and got[0] == 200
        started_aiod, started_prom = aiod, prom
        wait_for("aiod /readyz", lambda: ready(
            "aiod", started_aiod, f"http://127.0.0.1:{aiod_port}/readyz"), 30)
        wait_for("Prometheus /-/ready", lambda: ready(
            "prometheus", started_prom, f"http://127.0.0.1:{prom_port}/-/ready"), 60)

        # the exposition is lint-clean
        got = http_get(f"http://127.0.0.1:{aiod_port}/metrics")
        assert got is not None and got[0] == 200
        lint = subprocess.run(["promtool", "check", "metrics"], input=got[1],
                              capture_output=True, text=True, timeout=60)
        assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), lint.stdout + lint.stderr

        # Prometheus scrapes it: the target is up, counters rise, the pool is there
        wait_for("up{job=\"aiod\"} == 1",
                 lambda: scalar(prom_port, 'up{job="aiod"}') == 1, 30, interval=0.5)
        completed = 'sum(aiod_ops_completed_total{job="aiod"})'
        first = wait_for("a first aiod_ops_completed_total sample",
                         lambda: scalar(prom_port, completed), 30, interval=0.5)
        wait_for("aiod_ops_completed_total to rise between scrapes",
                 lambda: (scalar(prom_port, completed) or 0) > first, 30, interval=0.5)
        wait_for(f"sum(aiod_contexts{{state=\"active\"}}) == {CONTEXTS}",
                 lambda: scalar(prom_port, 'sum(aiod_contexts{job="aiod",state="active"})')
                 == CONTEXTS, 30, interval=0.5)
        # aiod's `job` label arrives as exported_job (see prometheus.yml)
        assert query(prom_port, 'aiod_ops_completed_total{job="aiod",exported_job="load"}')
        series = query(prom_port, 'count by (__name__) ({job="aiod",__name__=~"aiod_.*"})')
        names = {s["metric"]["__name__"] for s in series}
        for name in ("aiod_build_info", "aiod_ops_submitted_total", "aiod_ops_in_flight",
                     "aiod_op_latency_seconds_bucket", "aiod_kernel_aio_nr",
                     "aiod_config_last_reload_successful"):
            assert name in names, f"{name} not scraped; got {sorted(names)}"
    finally:
        if prom is not None:
            stop(prom, 30)
        if aiod is not None:
            aiod_rc = stop(aiod, 60)
        print("--- aiod ---\n" + aiod_log.read_text(errors="replace")[-4000:]
              if aiod_log.exists() else "")
        print("--- prometheus ---\n" + prom_log.read_text(errors="replace")[-2000:]
              if prom_log.exists() else "")
    assert aiod_rc == 0, f"aiod exited {aiod_rc} on SIGTERM"
    report = json.loads((state / "shutdown-report.json").read_text())
    t = report["totals"]
    assert t["in_flight"] == 0 and t["submitted"] == t["completed"] + t["cancelled"] + t["failed"]
