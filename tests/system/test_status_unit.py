"""`aiod status` on a host where aiod runs as the systemd unit: it finds the
daemon from /etc/aiod/aiod.yaml alone, and says clearly when it is stopped."""

from __future__ import annotations

import json
import re

import pytest

from aiod.exit_codes import EXIT_UNREACHABLE
from tests.system.support import AiodService, wait_for

pytestmark = pytest.mark.system


def aiod_executable(svc: AiodService) -> str:
    """The aiod the unit runs, however it was installed (venv or package)."""
    exec_start = svc.prop("ExecStart")
    m = re.search(r"path=(\S+)", exec_start)
    assert m, exec_start
    return m.group(1)


def test_status_finds_the_unit_from_its_config_and_reports_it_stopped(
        aiod: AiodService) -> None:
    exe = aiod_executable(aiod)
    wait_for("a probe completion", lambda: any(
        name == "aiod_ops_completed_total" and labels.get("job") == "root-latency" and v > 0
        for name, labels, v in aiod.scrape()), 30)

    r = aiod.c.sh(f"{exe} status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ": serving" in r.stdout.splitlines()[0]
    assert "config: /etc/aiod/aiod.yaml; last load ok" in r.stdout

    r = aiod.c.sh(f"{exe} status --json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["phase"] == "serving" and doc["config"]["source"] == "/etc/aiod/aiod.yaml"
    jobs = {j["name"]: j for j in doc["jobs"]}
    assert jobs["root-latency"]["state"] == "running"
    assert jobs["root-latency"]["seconds_since_last_completion"] is not None
    (pool,) = doc["pools"]
    assert pool["contexts_by_state"]["active"] == len(pool["contexts"]) > 0

    assert aiod.systemctl("stop").returncode == 0
    r = aiod.c.sh(f"{exe} status")
    assert r.returncode == EXIT_UNREACHABLE and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0] == (f"aiod status: no aiod answering at http://127.0.0.1:{aiod.port}"
                        "/status: Connection refused")
