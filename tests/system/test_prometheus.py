"""A real Prometheus scrapes a real aiod with deploy/prometheus/prometheus.yml.

aiod runs on this host from the project's virtual environment; Prometheus is
Debian's, with its own storage and port in a temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.faultfs import FaultFS, FaultFSUnavailable, mount_faultfs
from tests.system.support import REPO, aiod_yaml, ensure_tools, free_port, http_get, wait_for

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


@dataclass
class Running:
    """An aiod and the Prometheus scraping it, both ready."""

    aiod_port: int
    prom_port: int
    state: Path

    def report(self) -> dict[str, Any]:
        """aiod's shutdown report, once it has exited."""
        report: dict[str, Any] = json.loads((self.state / "shutdown-report.json").read_text())
        return report


def _ready(name: str, proc: subprocess.Popen[bytes], url: str) -> bool:
    assert proc.poll() is None, f"{name} exited {proc.returncode} before it was ready"
    got = http_get(url, timeout=2)
    return got is not None and got[0] == 200


@contextmanager
def aiod_and_prometheus(workdir: Path, aiod_config: Callable[[int, Path], str], *,
                        rules: Path | None = None) -> Iterator[Running]:
    """Run aiod (configured by ``aiod_config(port, state_directory)``) and a Prometheus
    scraping it with the shipped scrape configuration (and ``rules``, when given).

    On the way out both are stopped with SIGTERM, their logs' tails printed, and
    aiod must have exited 0.
    """
    aiod_port, prom_port = free_port(), free_port()
    while prom_port == aiod_port:
        prom_port = free_port()
    state = workdir / "state"
    state.mkdir()
    config = workdir / "aiod.yaml"
    config.write_text(aiod_config(aiod_port, state))
    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "aiod"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{aiod_port}"]}]
    if rules is not None:
        shutil.copy(rules, workdir / rules.name)
        scrape["rule_files"] = [str(workdir / rules.name)]
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
        started_aiod, started_prom = aiod, prom
        wait_for("aiod /readyz", lambda: _ready(
            "aiod", started_aiod, f"http://127.0.0.1:{aiod_port}/readyz"), 30)
        wait_for("Prometheus /-/ready", lambda: _ready(
            "prometheus", started_prom, f"http://127.0.0.1:{prom_port}/-/ready"), 60)
        yield Running(aiod_port, prom_port, state)
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


def test_promtool_accepts_the_shipped_scrape_config(prometheus_tools: None) -> None:
    r = subprocess.run(["promtool", "check", "config", str(SCRAPE_CONFIG)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert [j["job_name"] for j in jobs] == ["aiod"]


def test_prometheus_scrapes_aiod(prometheus_tools: None, workdir: Path) -> None:
    with aiod_and_prometheus(workdir, lambda port, state: aiod_yaml(
            port, contexts=CONTEXTS, iodepth=4, state_directory=str(state))) as run:
        # the exposition is lint-clean
        got = http_get(f"http://127.0.0.1:{run.aiod_port}/metrics")
        assert got is not None and got[0] == 200
        lint = subprocess.run(["promtool", "check", "metrics"], input=got[1],
                              capture_output=True, text=True, timeout=60)
        assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), lint.stdout + lint.stderr

        # Prometheus scrapes it: the target is up, counters rise, the pool is there
        wait_for("up{job=\"aiod\"} == 1",
                 lambda: scalar(run.prom_port, 'up{job="aiod"}') == 1, 30, interval=0.5)
        completed = 'sum(aiod_ops_completed_total{job="aiod"})'
        first = wait_for("a first aiod_ops_completed_total sample",
                         lambda: scalar(run.prom_port, completed), 30, interval=0.5)
        wait_for("aiod_ops_completed_total to rise between scrapes",
                 lambda: (scalar(run.prom_port, completed) or 0) > first, 30, interval=0.5)
        wait_for(f"sum(aiod_contexts{{state=\"active\"}}) == {CONTEXTS}",
                 lambda: scalar(run.prom_port, 'sum(aiod_contexts{job="aiod",state="active"})')
                 == CONTEXTS, 30, interval=0.5)
        # aiod's `job` label arrives as exported_job (see prometheus.yml)
        assert query(run.prom_port, 'aiod_ops_completed_total{job="aiod",exported_job="load"}')
        series = query(run.prom_port, 'count by (__name__) ({job="aiod",__name__=~"aiod_.*"})')
        names = {s["metric"]["__name__"] for s in series}
        for name in ("aiod_build_info", "aiod_ops_submitted_total", "aiod_ops_in_flight",
                     "aiod_op_latency_seconds_bucket", "aiod_kernel_aio_nr",
                     "aiod_config_last_reload_successful"):
            assert name in names, f"{name} not scraped; got {sorted(names)}"
    t = run.report()["totals"]
    assert t["in_flight"] == 0 and t["submitted"] == t["completed"] + t["cancelled"] + t["failed"]


# ------------------------------------------------ dashboard and alert queries
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "aiod.json"
# What Grafana puts in place of the dashboard's variables against this
# Prometheus: $__rate_interval is 4 x the 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "4s", "$job": "aiod", "$instance": ".+",
                     "$pool": ".+", "$aiod_job": ".+"}


def grafana_substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    doc = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []
    for p in doc["panels"]:
        for q in [p] + p.get("panels", []):
            found += [(q["title"], grafana_substitute(t["expr"])) for t in q.get("targets", [])]
    assert found
    return found


def dashboard_label_queries() -> list[tuple[str, str, str]]:
    """(variable, label, series selector) of every label_values() variable."""
    doc = json.loads(DASHBOARD.read_text())
    found = []
    for v in doc["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", q)
        assert m, f"variable {v['name']}: not a label_values() query: {q}"
        found.append((v["name"], m.group(2), grafana_substitute(m.group(1))))
    return found


def alert_rules() -> list[tuple[str, str]]:
    return [(r["alert"], r["expr"]) for g in yaml.safe_load(RULES.read_text())["groups"]
            for r in g["rules"] if "alert" in r]


def with_data(expr: str) -> str:
    """The alert expression in a form that returns its series whether or not
    the alert's condition holds: every comparison outside label matchers gets
    `bool` (the value becomes 0 or 1 instead of the series being dropped), and
    absent(x), which has data exactly when x has none, becomes count(x). A
    trailing top-level `unless ...`, which only ever removes series, is dropped."""
    expr = _without_trailing_unless(expr)
    out: list[str] = []
    depth, i, quote = 0, 0, ""
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = "" if c == quote and expr[i - 1] != "\\" else quote
        elif c in "\"'":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0:
            m = re.match(r"==|!=|>=|<=|>|<", expr[i:])
            if m:
                out.append(m.group(0))
                i += len(m.group(0))
                if not re.match(r"\s*bool\b", expr[i:]):
                    out.append(" bool")
                continue
        out.append(c)
        i += 1
    return re.sub(r"\babsent\(", "count(", "".join(out))


def _without_trailing_unless(expr: str) -> str:
    parens = 0
    for m in re.finditer(r"[()]|\bunless\b", expr):
        if m.group(0) == "(":
            parens += 1
        elif m.group(0) == ")":
            parens -= 1
        elif parens == 0:
            return expr[:m.start()].rstrip()
    return expr


def test_with_data_form() -> None:
    assert with_data('up{job="aiod"} == 0') == 'up{job="aiod"} == bool 0'
    assert with_data('a{x!="1"} > on (i) b') == 'a{x!="1"} > bool on (i) b'
    assert with_data("(x > 300) and on (j) y") == "(x > bool 300) and on (j) y"
    assert with_data('absent(up{job="aiod"})') == 'count(up{job="aiod"})'
    assert with_data("(x > 300) and on (j) y unless on (j) (z == 1 unless w)") == \
        "(x > bool 300) and on (j) y"
    assert with_data("x and (y unless z)") == "x and (y unless z)"


def test_every_dashboard_and_alert_query_returns_data(prometheus_tools: None,
                                                      workdir: Path) -> None:
    """A real aiod with a healthy probe, a load, a probe whose reads fail with
    EIO (FUSE) and one whose target is missing; a real Prometheus scraping it
    with rules.yml loaded. Every dashboard query, dashboard variable and alert
    expression must parse and return data; the rules evaluate without error,
    and the alerts this setup provokes do fire."""
    try:
        with mount_faultfs(workdir, max_threads=8) as fs:
            _dashboard_and_alerts_against(workdir, fs)
    except FaultFSUnavailable as e:
        pytest.skip(f"no FUSE fault injection here: {e}")


def _dashboard_and_alerts_against(workdir: Path, fs: FaultFS) -> None:
    def config(port: int, state: Path) -> str:
        return aiod_yaml(port, contexts=CONTEXTS, iodepth=4, state_directory=str(state),
                         extra=f"""\
  - {{name: failing, pool: default, type: probe, target: "{fs.path('eio.dat')}",
     op: randread, block_size: 4KiB, direct: true, rate: 20/s, timeout: 5s}}
  - {{name: gone, pool: default, type: probe, target: "{workdir}/no/such/dir/x.dat",
     op: randread, block_size: 4KiB, direct: true, rate: 20/s, timeout: 5s}}
""") + "host_scan: {interval: 1s, top: 5}\n"  # for AiodAioHolderGrowing's series

    with aiod_and_prometheus(workdir, config, rules=RULES) as run:
        def empty(queries: list[tuple[str, str]]) -> list[str]:
            return [f"{name}: {q}" for name, q in queries if not query(run.prom_port, q)]

        # Every panel's query parses (query() asserts status success) and
        # returns series, once a few scrapes fill the 4 s rate windows.
        panels = dashboard_queries()
        try:
            wait_for("every dashboard query to return data",
                     lambda: not empty(panels) or None, 60, interval=1)
        except AssertionError:
            raise AssertionError("dashboard queries without data:\n"
                                 + "\n".join(empty(panels))) from None

        # The dashboard's variables list values
        for name, label, selector in dashboard_label_queries():
            got = http_get(f"http://127.0.0.1:{run.prom_port}/api/v1/label/{label}/values?"
                           + urllib.parse.urlencode({"match[]": selector}))
            assert got is not None and got[0] == 200, got
            assert json.loads(got[1])["data"], f"variable {name}: no values for {selector}"

        # Every alert expression returns its series (in the form that keeps
        # them whatever the threshold says)
        alerts = [(name, with_data(expr)) for name, expr in alert_rules()]
        try:
            wait_for("every alert expression to return data",
                     lambda: not empty(alerts) or None, 60, interval=1)
        except AssertionError:
            raise AssertionError("alert expressions without data:\n"
                                 + "\n".join(empty(alerts))) from None

        # Prometheus evaluates the rules as written, without error
        def rules_evaluated() -> list[dict[str, Any]] | None:
            got = http_get(f"http://127.0.0.1:{run.prom_port}/api/v1/rules")
            assert got is not None and got[0] == 200, got
            rules = [r for g in json.loads(got[1])["data"]["groups"] for r in g["rules"]]
            done = all(r.get("lastEvaluation", "").startswith("20") for r in rules)
            return rules if rules and done else None
        rules = wait_for("the rules to be evaluated", rules_evaluated, 30, interval=0.5)
        assert {r["name"] for r in rules} == {name for name, _ in alert_rules()}
        for rule in rules:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))

        # The alerts this aiod provokes: reads failing with EIO fire at once
        # (the first failure counts); the probe whose target is missing has
        # never completed and is pending (a failed read is a completion: that
        # probe is failing, not stalled).
        wait_for("AiodOpsFailing{errno=EIO} firing", lambda: query(
            run.prom_port, 'ALERTS{alertname="AiodOpsFailing", alertstate="firing", '
                       'errno="EIO", exported_job="failing"}'), 30, interval=0.5)
        stalled = query(run.prom_port, 'ALERTS{alertname="AiodProbeStalled"}')
        assert {s["metric"]["exported_job"] for s in stalled} == {"gone"}
        assert not query(run.prom_port, 'ALERTS{alertname=~"AiodDown|AiodNotScraped|AiodHungIO|'
                                    'AiodReloadFailed|AiodContextDestroyFailed"}')
    assert run.report()["invariant_holds"]
