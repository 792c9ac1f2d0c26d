"""deploy/prometheus/rules.yml: promtool checks it and runs its unit tests.

Every alert has a summary, a description and a runbook section, and the unit
tests make each alert both fire and stay quiet.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
RUNBOOK = DEPLOY / "RUNBOOK.md"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus; "
                    "deploy/debian-deps.sh --test installs it)")
    return path


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_promtool_check_rules() -> None:
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout


def test_promtool_test_rules() -> None:
    r = subprocess.run([promtool(), "test", "rules", str(RULES_TEST)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the level-2 headings."""
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^## (.+)$", markdown, re.MULTILINE)}


def test_every_alert_has_summary_description_and_a_runbook_section() -> None:
    sections = anchors(RUNBOOK.read_text())
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    for a in alerts():
        ann = a.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), a["alert"]
        assert ann.get("runbook") == f"deploy/RUNBOOK.md#{a['alert'].lower()}", a["alert"]
        assert a["alert"].lower() in sections, f"no '## {a['alert']}' in {RUNBOOK}"
    # and no stale section for an alert that is gone
    assert sections == {n.lower() for n in names}


def test_the_issue_s_alerts_are_all_there() -> None:
    exprs = {a["alert"]: a["expr"] for a in alerts()}
    for needle in ("up{", "absent(up", "aiod_ops_oldest_in_flight_seconds",
                   "aiod_job_last_completion_timestamp_seconds", "aiod_ops_failed_any_total",
                   "histogram_quantile(0.99", "aiod_config_last_reload_successful",
                   "aiod_context_destroy_failures_total", "aiod_kernel_aio_max_nr",
                   "predict_linear(aiod_kernel_aio_nr", "aiod_context_leaks",
                   "aiod_host_aio_events"):
        assert any(needle in e for e in exprs.values()), needle


def test_each_alert_both_fires_and_stays_quiet_in_the_unit_tests() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fires == set(), "alerts never fired in rules_test.yml"
    assert names - quiet == set(), "alerts never shown quiet in rules_test.yml"
