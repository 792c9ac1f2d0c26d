"""aiod as a systemd service: readiness, journal, reload, stop, watchdog, hardening.

Against a real systemd 257 and journald in a Debian trixie container, with
aiod installed from its Debian package (the unit file as shipped:
systemd/aiod.service), and against systemd 252 (Debian bookworm), where the
package adds the compat drop-in.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.system import nspawn
from tests.system.support import (
    CONFIG,
    REPORT,
    STATE,
    AiodService,
    aiod_yaml,
    http_get,
    metric_sum,
    systemd_seconds,
    wait_for,
)

pytestmark = pytest.mark.system

UNIT_PATH = "/lib/systemd/system/aiod.service"  # where the package puts it


def active_contexts(svc: AiodService) -> float:
    return metric_sum(svc.scrape(), "aiod_contexts", pool="default", state="active")


def messages(entries: list[dict[str, object]]) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in entries]


def check_report_accounting(report: dict[str, Any]) -> None:
    """Every operation submitted is accounted for, in total, per pool, per context."""
    keys = {"submitted", "completed", "cancelled", "failed", "in_flight"}
    t = report["totals"]
    assert keys <= set(t), t
    assert t["in_flight"] == 0, t
    assert t["submitted"] == t["completed"] + t["cancelled"] + t["failed"], t
    for pool in report["pools"]:
        pt = pool["totals"]
        assert pt["in_flight"] == 0, pool["name"]
        assert pt["submitted"] == pt["completed"] + pt["cancelled"] + pt["failed"], pt
        for ctx in pool["contexts"]:
            assert ctx["in_flight"] == 0, ctx
            assert ctx["submitted"] == ctx["completed"] + ctx["cancelled"] + ctx["failed"], ctx
    assert report["failed_to_destroy"] == []
    for k in ("drain_seconds", "cancel_seconds", "destroy_seconds",
              "aio_nr_before_start", "aio_nr_after_destroy"):
        assert k in report, k


def test_unit_file_verifies_clean_under_systemd_257(container: nspawn.Container) -> None:
    assert container.sh("systemctl --version", check=True).stdout.startswith("systemd 25")
    # --man=no: Documentation=man:aiod(8) is checked by running man, which a
    # minimal server (this container) does not have; the page itself ships
    # in the package (tests/system/test_debian_package.py)
    r = container.sh(f"systemd-analyze verify --man=no {UNIT_PATH}")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert container.show("aiod", "Type")["Type"] == "notify-reload"


def test_unit_allows_the_five_aio_syscalls(container: nspawn.Container) -> None:
    listed = container.sh("systemd-analyze syscall-filter @system-service", check=True).stdout
    assert re.search(r"^\s+@aio$", listed, re.MULTILINE), "@system-service no longer includes @aio"
    aio = container.sh("systemd-analyze syscall-filter @aio", check=True).stdout.split()
    for call in ("io_setup", "io_submit", "io_getevents", "io_cancel", "io_destroy"):
        assert call in aio
    denied = container.sh("systemd-analyze syscall-filter @privileged @resources",
                          check=True).stdout.split()
    assert not {"io_setup", "io_submit", "io_getevents", "io_cancel", "io_destroy"} & set(denied)


def test_start_returns_once_ready_with_metrics_bound_and_status_shown(
        aiod: AiodService) -> None:
    # Type=notify-reload: `systemctl start` returned only on READY=1, and
    # aiod sends READY=1 only once its pools are up and /metrics is bound,
    # so all of this holds at once, with no retry.
    p = aiod.c.show("aiod", "ActiveState", "SubState", "Type", "StatusText")
    assert (p["ActiveState"], p["SubState"], p["Type"]) == ("active", "running", "notify-reload")
    for path in ("/readyz", "/healthz"):
        got = http_get(aiod.url(path))
        assert got is not None and got[0] == 200, (path, got)
    assert active_contexts(aiod) == 2
    assert p["StatusText"], "aiod sent no STATUS= line"
    status = aiod.c.sh("systemctl status aiod --no-pager --lines=0").stdout
    m = re.search(r'^\s*Status: "(.+)"$', status, re.MULTILINE)
    assert m, status
    assert "pool" in m.group(1), m.group(1)


def test_journal_carries_structured_fields(aiod: AiodService) -> None:
    # a start that has to create the jobs' target files logs per job
    assert aiod.systemctl("stop").returncode == 0
    aiod.c.sh(f"rm -f {STATE}/probe.dat {STATE}/load.dat", check=True)
    assert aiod.systemctl("start", timeout=60).returncode == 0
    pid = aiod.main_pid()
    entries = [e for e in aiod.journal() if e.get("_PID") == str(pid)]
    assert entries, "nothing in the journal from aiod's main process"
    by_pool = [e for e in entries if e.get("AIOD_POOL") == "default"]
    by_job = [e for e in entries if e.get("AIOD_JOB") in ("root-latency", "load")]
    assert by_pool and by_job, messages(entries)
    for e in by_pool + by_job:
        assert e["_TRANSPORT"] == "journal", e  # native journal protocol, not stdout
        assert e.get("SYSLOG_IDENTIFIER") == "aiod", e
        assert e.get("PRIORITY") in {str(n) for n in range(8)}, e
    r = aiod.c.sh(f"journalctl -u aiod _PID={pid} AIOD_POOL=default -o cat --no-pager",
                  check=True)
    assert r.stdout.strip(), "journalctl AIOD_POOL=default matched nothing"


def test_reload_applies_a_new_pool_size(aiod: AiodService) -> None:
    assert active_contexts(aiod) == 2
    pid, restarts = aiod.main_pid(), aiod.prop("NRestarts")
    aiod.write_config(aiod_yaml(aiod.port, contexts=3))
    r = aiod.systemctl("reload", timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for("3 active contexts after reload", lambda: active_contexts(aiod) == 3, 15)
    samples = aiod.scrape()
    assert metric_sum(samples, "aiod_config_last_reload_successful") == 1
    assert aiod.main_pid() == pid, "reload restarted aiod"
    assert aiod.prop("NRestarts") == restarts
    assert aiod.prop("ActiveState") == "active"


def test_broken_config_on_reload_keeps_the_old_one_and_says_why(aiod: AiodService) -> None:
    pid = aiod.main_pid()
    cursor = aiod.cursor()
    aiod.write_config(aiod_yaml(aiod.port, contexts=0))  # contexts must be >= 1
    aiod.systemctl("reload", timeout=60)  # systemd calls the reload done either way

    def said_why() -> list[str] | None:
        failed = [m for m in messages(aiod.journal(after=cursor)) if "reload failed" in m]
        return failed or None
    failed = wait_for("'reload failed' in the journal", said_why, 15)
    assert any("contexts" in m for m in failed), failed
    p = aiod.c.show("aiod", "ActiveState", "SubState", "MainPID")
    assert (p["ActiveState"], p["SubState"], int(p["MainPID"])) == ("active", "running", pid)
    samples = aiod.scrape()
    assert metric_sum(samples, "aiod_contexts", pool="default", state="active") == 2
    assert metric_sum(samples, "aiod_config_last_reload_successful") == 0

    # and a good config afterwards is taken again
    aiod.write_config(aiod_yaml(aiod.port, contexts=3))
    assert aiod.systemctl("reload", timeout=60).returncode == 0
    wait_for("3 active contexts after the fixed reload", lambda: active_contexts(aiod) == 3, 15)
    assert metric_sum(aiod.scrape(), "aiod_config_last_reload_successful") == 1


def test_stop_with_io_in_flight_exits_cleanly_and_accounts_for_every_op(
        aiod: AiodService) -> None:
    wait_for("operations in flight",
             lambda: metric_sum(aiod.scrape(), "aiod_ops_in_flight", pool="default") > 0, 15,
             interval=0.05)
    limit = systemd_seconds(aiod.prop("TimeoutStopUSec"))
    cursor = aiod.cursor()
    t0 = time.monotonic()
    r = aiod.systemctl("stop", timeout=limit + 30)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took < limit, f"stop took {took:.1f}s, TimeoutStopSec is {limit:.0f}s"
    p = aiod.c.show("aiod", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert p == {"ActiveState": "inactive", "Result": "success",
                 "ExecMainCode": "1", "ExecMainStatus": "0"}, p  # 1: CLD_EXITED
    said = "\n".join(messages(aiod.journal(after=cursor)))
    assert "Deactivated successfully" in said, said
    assert "SIGKILL" not in said and "timed out" not in said.lower(), said
    assert "Main process exited" not in said, said  # systemd says so only for a failure

    report = json.loads(aiod.c.read_file(REPORT))
    assert report["totals"]["submitted"] > 0
    check_report_accounting(report)


def test_watchdog_restarts_a_hung_daemon(aiod: AiodService) -> None:
    watchdog = systemd_seconds(aiod.prop("WatchdogUSec"))
    assert 0 < watchdog <= 30
    pid, restarts = aiod.main_pid(), int(aiod.prop("NRestarts"))
    cursor = aiod.cursor()
    aiod.c.sh(f"kill -STOP {pid}", check=True)
    t0 = time.monotonic()

    def restarted() -> bool:
        p = aiod.c.show("aiod", "NRestarts", "MainPID", "ActiveState")
        return (int(p["NRestarts"]) > restarts and p["ActiveState"] == "active"
                and int(p["MainPID"]) not in (0, pid))
    wait_for("systemd to restart the stopped aiod", restarted, watchdog + 40, interval=0.5)
    took = time.monotonic() - t0
    assert took >= watchdog * 0.9, f"restarted after {took:.1f}s, before the watchdog fired"
    said = "\n".join(messages(aiod.journal(after=cursor)))
    assert "Watchdog timeout" in said, said
    samples = aiod.scrape_when_up(30)
    assert metric_sum(samples, "aiod_contexts", pool="default", state="active") == 2


def test_hardening_leaves_probes_and_the_state_directory_working(aiod: AiodService) -> None:
    p = aiod.c.show("aiod", "DynamicUser", "ProtectSystem", "ProtectHome", "NoNewPrivileges",
                    "PrivateTmp", "PrivateDevices", "MemoryDenyWriteExecute",
                    "ProtectKernelTunables", "ProtectControlGroups", "LockPersonality",
                    "RestrictRealtime", "SupplementaryGroups", "RestrictAddressFamilies")
    assert p["DynamicUser"] == "yes" and p["ProtectSystem"] == "strict"
    assert p["ProtectHome"] == "yes" and p["PrivateTmp"] == "yes"
    assert p["PrivateDevices"] == "no", "PrivateDevices would hide block devices from probes"
    for k in ("NoNewPrivileges", "MemoryDenyWriteExecute", "ProtectKernelTunables",
              "ProtectControlGroups", "LockPersonality", "RestrictRealtime"):
        assert p[k] == "yes", k
    assert p["SupplementaryGroups"] == "disk"

    pid = aiod.main_pid()
    status = dict(line.split(":", 1) for line in
                  aiod.c.read_file(f"/proc/{pid}/status").splitlines() if ":" in line)
    uid = status["Uid"].split()[0]
    assert uid != "0", "aiod runs as root"
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    assert int(status["CapEff"], 16) == 0
    disk_gid = aiod.c.sh("getent group disk | cut -d: -f3", check=True).stdout.strip()
    assert disk_gid in status["Groups"].split()

    # the probe runs: its counters rise and nothing fails (an EPERM from the
    # syscall filter or EACCES from the sandbox would show as failures)
    def probe_done() -> float:
        return metric_sum(aiod.scrape(), "aiod_ops_completed_total", job="root-latency")
    first = wait_for("probe completions", probe_done, 10)
    wait_for("probe completions to rise", lambda: probe_done() > first, 10)
    assert metric_sum(aiod.scrape(), "aiod_ops_failed_total") == 0

    # the state directory holds the probe's file, owned by the service's user
    # as the service sees it (systemd >= 256 id-maps DynamicUser's state
    # directory: on disk, seen from outside, it belongs to nobody)
    owner = aiod.c.sh(f"nsenter -t {pid} -m stat -L -c %u {STATE}/probe.dat",
                      check=True).stdout.strip()
    assert owner == uid
    assert aiod.systemctl("stop").returncode == 0
    assert aiod.c.sh(f"test -s {REPORT}").returncode == 0, "no shutdown report in /var/lib/aiod"
    check_report_accounting(json.loads(aiod.c.read_file(REPORT)))


def test_systemd_252_runs_the_unit_with_the_compat_dropin(
        container252: tuple[nspawn.Container, int]) -> None:
    c, port = container252
    assert c.sh("systemctl --version", check=True).stdout.startswith("systemd 252")
    assert c.show("aiod", "Type")["Type"] == "notify"
    svc = AiodService(c, port)
    try:
        assert svc.systemctl("start", timeout=60).returncode == 0
        assert svc.prop("ActiveState") == "active"
        assert active_contexts(svc) == 2
        svc.write_config(aiod_yaml(port, contexts=3))
        assert svc.systemctl("reload", timeout=60).returncode == 0  # ExecReload: kill -HUP
        wait_for("3 active contexts after reload", lambda: active_contexts(svc) == 3, 15)
        assert svc.systemctl("stop", timeout=90).returncode == 0
        p = c.show("aiod", "Result", "ExecMainStatus")
        assert p == {"Result": "success", "ExecMainStatus": "0"}, p
        check_report_accounting(json.loads(c.read_file(REPORT)))
    finally:
        print(c.sh("journalctl -u aiod -n 40 --no-pager").stdout)
        svc.systemctl("stop", timeout=90)
        c.write_file(CONFIG, aiod_yaml(port))

