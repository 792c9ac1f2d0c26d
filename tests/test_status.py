"""`aiod status` and /status: against a running daemon, a stopping one, and none."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiod.accounting import LATENCY_BUCKETS
from aiod.exit_codes import EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_SERVING, EXIT_UNREACHABLE
from aiod.status import RecentLatency, quantile, status_url
from tests.daemon_harness import AIOD, ROOT, Aiod, free_port
from tests.test_daemon import base_config, start

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def status(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(AIOD + ["status", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def one_line_no_traceback(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_status_of_a_running_daemon(daemons: list[Aiod], tmp_path: Path) -> None:
    cfg = base_config()
    cfg["jobs"].append({"name": "gone", "pool": "default", "type": "probe",
                        "target": str(tmp_path / "no" / "such" / "dir" / "x.dat")})
    d = start(daemons, tmp_path, cfg)
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="probe") >= 20,
                 what="probe completions")

    # found through the config's metrics.listen, human-readable
    r = status("--config", str(d.config_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("aiod ") and ": serving" in out.splitlines()[0]
    assert f"config: {d.config_path}; last load ok" in out
    assert "fs.aio-nr " in out and "fs.aio-max-nr" in out
    assert "pool default (open, nr_events 64): contexts active 2" in out
    job_lines = {line.split()[0]: line for line in out.splitlines()
                 if line.split() and line.split()[0] in ("probe", "gone")}
    assert "running" in job_lines["probe"] and "never" in job_lines["gone"]
    assert "missing 1" in job_lines["gone"]

    # found through --url, as JSON; the numbers are the daemon's own
    r = status("--url", f"127.0.0.1:{d.port}", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["phase"] == "serving" and doc["serving"] is True and doc["healthy"] is True
    nr, max_nr = doc["aio"]["nr"], doc["aio"]["max_nr"]
    assert max_nr > 0 and nr >= 2 * 64
    (pool,) = doc["pools"]
    assert pool["contexts_by_state"]["active"] == 2 and len(pool["contexts"]) == 2
    for c in pool["contexts"]:
        assert c["state"] == "active" and c["age_seconds"] > 0
        assert c["submitted"] == c["completed"] + c["cancelled"] + c["failed"] + c["in_flight"]
    t = pool["totals"]
    assert t["submitted"] == t["completed"] + t["cancelled"] + t["failed"] + t["in_flight"]
    assert pool["oldest_in_flight_seconds"] >= 0
    jobs = {j["name"]: j for j in doc["jobs"]}
    probe = jobs["probe"]
    assert probe["state"] == "running" and probe["type"] == "probe"
    assert probe["seconds_since_last_completion"] is not None
    assert probe["seconds_since_last_completion"] < 5
    lat = probe["latency"]
    assert lat["ops"] > 0 and 0 < lat["p50_seconds"] <= lat["p99_seconds"] <= 10
    assert jobs["gone"]["state"] == "error" and jobs["gone"]["errors"] == {"missing": 1}
    assert jobs["gone"]["seconds_since_last_completion"] is None
    assert doc["config"]["last_reload"]["successful"] is True

    # a failed reload shows, with its reason and time; the daemon still serves
    d.config_path.write_text("pools:\n  - name: default\n    contexts: many\n")
    d.signal(signal.SIGHUP)
    d.wait_until(lambda: "reload failed" in d.log, what="reload failure logged")
    r = status("--url", f"http://127.0.0.1:{d.port}/", "--json")
    assert r.returncode == 0, r.stderr
    reload = json.loads(r.stdout)["config"]["last_reload"]
    assert reload["successful"] is False and "contexts" in reload["error"]
    assert reload["attempted_at"] > reload["succeeded_at"]
    r = status("--url", f"127.0.0.1:{d.port}")
    assert "last load FAILED: " in r.stdout and r.returncode == 0
    assert d.stop() == 0


def test_status_while_draining_is_exit_3(daemons: list[Aiod], tmp_path: Path) -> None:
    cfg = base_config(shutdown={"drain_timeout": "60s", "destroy_timeout": "10s"}, jobs=[
        {"name": "hold", "pool": "default", "type": "load", "target": "hold.fifo",
         "op": "poll", "iodepth": 4}])
    d = start(daemons, tmp_path, cfg)
    d.wait_until(lambda: d.metric_sum("aiod_ops_in_flight") == 4, what="polls in flight")
    d.signal(signal.SIGTERM)
    d.wait_until(lambda: "shutting down" in d.log, what="shutdown to start")
    r = status("--url", f"127.0.0.1:{d.port}", "--json")
    assert r.returncode == EXIT_NOT_SERVING, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["phase"] == "draining" and doc["serving"] is False
    assert doc["pools"][0]["in_flight"] == 4
    assert doc["pools"][0]["oldest_in_flight_seconds"] > 0
    d.signal(signal.SIGTERM)  # skip the rest of the drain
    assert d.wait(30) == 0


def test_status_with_no_daemon_is_exit_69_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    r = status("--url", f"127.0.0.1:{port}")
    assert r.returncode == EXIT_UNREACHABLE and r.stdout == ""
    line = one_line_no_traceback(r.stderr)
    assert line == (f"aiod status: no aiod answering at http://127.0.0.1:{port}/status: "
                    "Connection refused")

    # the address comes from the config when there is no --url
    config = tmp_path / "aiod.yaml"
    config.write_text(f"metrics: {{listen: '0.0.0.0:{port}'}}\n"
                      "pools: [{name: p, contexts: 1, nr_events: 8}]\n")
    r = status("--config", str(config))
    assert r.returncode == EXIT_UNREACHABLE
    assert f"http://127.0.0.1:{port}/status" in one_line_no_traceback(r.stderr)


def test_status_with_a_bad_config_is_exit_78(tmp_path: Path) -> None:
    config = tmp_path / "aiod.yaml"
    config.write_text("metrics: {listen: 'nowhere'}\npools: []\n")
    r = status("--config", str(config))
    assert r.returncode == EXIT_CONFIG and "Traceback" not in r.stderr
    assert str(config) in r.stderr


@pytest.fixture
def other_http_server() -> Iterator[int]:
    """Something that is not aiod, answering on a port."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>hello</html>" if self.path == "/status" else b"nope"
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_status_from_something_that_is_not_aiod_is_exit_1(other_http_server: int) -> None:
    r = status("--url", f"127.0.0.1:{other_http_server}")
    assert r.returncode == EXIT_FAILURE
    assert "not with JSON" in one_line_no_traceback(r.stderr)
    r = status("--url", f"http://127.0.0.1:{other_http_server}/elsewhere")
    assert r.returncode == EXIT_FAILURE
    assert "HTTP 404" in one_line_no_traceback(r.stderr)


def test_help_documents_the_status_exit_codes() -> None:
    r = status("--help")
    assert r.returncode == 0
    for code in ("69  nothing answered", "3   the daemon answered but is not serving"):
        assert code in r.stdout


# ---------------------------------------------------------------- unit tests
def test_status_url() -> None:
    assert status_url(None, "127.0.0.1", 9740) == "http://127.0.0.1:9740/status"
    assert status_url(None, "0.0.0.0", 9740) == "http://127.0.0.1:9740/status"
    assert status_url(None, "::", 9740) == "http://[::1]:9740/status"
    assert status_url(None, "fe80::1", 1) == "http://[fe80::1]:1/status"
    assert status_url("10.0.0.1:9740", "", 0) == "http://10.0.0.1:9740/status"
    assert status_url("http://h:1/", "", 0) == "http://h:1/status"
    assert status_url("http://h:1/custom", "", 0) == "http://h:1/custom"


def _counts(pairs: dict[int, int]) -> list[int]:
    out = [0] * (len(LATENCY_BUCKETS) + 1)
    for i, n in pairs.items():
        out[i] = n
    return out


def test_quantile_interpolates_like_histogram_quantile() -> None:
    assert quantile(0.5, _counts({})) is None
    # 100 ops, all in the (0.5ms, 1ms] bucket: the median is in the middle of it
    i = LATENCY_BUCKETS.index(1e-3)
    assert quantile(0.5, _counts({i: 100})) == pytest.approx(0.75e-3)
    # 90 fast, 10 slow: p50 among the fast, p99 among the slow
    j = LATENCY_BUCKETS.index(1.0)
    assert quantile(0.5, _counts({0: 90, j: 10})) == pytest.approx(10e-6 * 50 / 90)
    assert quantile(0.99, _counts({0: 90, j: 10})) == pytest.approx(0.5 + 0.5 * 9 / 10)
    # past the top bound: the top bound, as histogram_quantile does
    assert quantile(0.99, _counts({len(LATENCY_BUCKETS): 5})) == LATENCY_BUCKETS[-1]


def test_recent_latency_picks_a_sample_about_a_window_old() -> None:
    from aiod.accounting import OpStats
    from aiod.pool import PoolSnapshot
    def snaps(n: int) -> list[PoolSnapshot]:
        st = OpStats("j", "read")
        st.buckets[0] = n
        return [PoolSnapshot("p", "open", 8, [], [st], 0, 0, 0, {}, 0.0)]
    r = RecentLatency(window=60, spacing=5, keep=600)
    assert r.baseline(100.0) == (None, {})
    r.observe(100.0, snaps(1))
    assert r.baseline(102.0) == (None, {})  # younger than the spacing: no window yet
    r.observe(102.0, snaps(2))              # too close to the last one: not kept
    r.observe(130.0, snaps(3))
    r.observe(170.0, snaps(4))
    assert r.baseline(110.0)[0] == 100.0    # nothing a window old: the oldest
    assert r.baseline(175.0)[0] == 100.0    # 100 is the newest at least 60 s old
    assert r.baseline(195.0)[0] == 130.0
    assert r.baseline(195.0)[1] == {"j": _counts({0: 3})}
    r.observe(800.0, snaps(5))              # samples older than `keep` go
    assert r.baseline(860.0)[0] == 800.0
