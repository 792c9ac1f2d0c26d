"""The Prometheus exposition: names, zeros for known series, promtool lint."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from aiod import aio
from aiod.metrics import JobView, make_registry
from aiod.pool import Pool, PoolSnapshot
from tests.engine_ops import Ops


class FakeSource:
    """Unit-test source around a real pool (the real daemon is in test_daemon.py)."""

    def __init__(self, pools: list[Pool], jobs: list[JobView]) -> None:
        self.pools, self.jobs = pools, jobs

    def pool_snapshots(self) -> list[PoolSnapshot]:
        return [p.snapshot() for p in self.pools]

    def job_views(self) -> list[JobView]:
        return self.jobs

    def aio_usage(self) -> tuple[int, int]:
        return aio.system_aio_usage()

    def reload_status(self) -> tuple[bool, float]:
        return True, 1700000000.0


@pytest.fixture
def exposition(direct_file: tuple[int, Path]) -> bytes:
    fd, _ = direct_file
    pool = Pool("default", 2, 16)
    pool.register("probe", ["read"])
    pool.register("idle", ["write"])
    ops = Ops(pool, "probe", 5)
    ops.fsync(99999)
    for i in range(4):
        ops.read(fd, i * 4096)
    ops.submit()
    pool.close(drain_timeout=5)
    src = FakeSource([pool], [JobView("probe", "default", "running", {"missing": 1}, 0, 2,
                                      type="probe", op="randread", timeout=5.0),
                              JobView("idle", "default", "error", type="load", op="write",
                                      timeout=2.5)])
    return generate_latest(make_registry(src))


def test_every_required_family_is_exposed(exposition: bytes) -> None:
    text = exposition.decode()
    for name in ["aiod_contexts", "aiod_ops_submitted_total", "aiod_ops_completed_total",
                 "aiod_ops_cancelled_total", "aiod_ops_failed_total", "aiod_ops_in_flight",
                 "aiod_op_latency_seconds_bucket", "aiod_context_setups_total",
                 "aiod_context_destroys_total", "aiod_context_destroy_failures_total",
                 "aiod_kernel_aio_nr", "aiod_kernel_aio_max_nr",
                 "aiod_config_last_reload_successful",
                 "aiod_config_last_reload_success_timestamp_seconds", "aiod_build_info",
                 "aiod_ops_oldest_in_flight_seconds",
                 "aiod_job_last_completion_timestamp_seconds"]:
        assert f"\n{name}" in text, name
    assert 'aiod_ops_failed_total{errno="EBADF",job="probe",op="fsync",pool="default"} 1.0' in text
    assert 'aiod_ops_completed_total{job="probe",op="read",pool="default"} 4.0' in text
    # Known in advance, so exported at zero before anything happens:
    assert 'aiod_ops_submitted_total{job="idle",op="write",pool="default"} 0.0' in text
    assert 'aiod_contexts{pool="default",state="failed"} 0.0' in text
    assert 'aiod_job_last_completion_timestamp_seconds{job="idle"} 0.0' in text
    assert 'aiod_job_errors_total{job="probe",reason="missing"} 1.0' in text


def test_failure_counters_have_a_companion_that_exists_at_zero(exposition: bytes) -> None:
    """The errno/reason-labelled series appear with their first failure, which
    increase() cannot see; each has a companion without that label, exported
    at zero before anything fails, so an alert sees the first step 0 -> 1."""
    text = exposition.decode()
    # no failure yet: present, at zero
    assert 'aiod_ops_failed_any_total{job="idle",op="write",pool="default"} 0.0' in text
    assert 'aiod_ops_failed_any_total{job="probe",op="read",pool="default"} 0.0' in text
    assert 'aiod_job_errors_any_total{job="idle"} 0.0' in text
    assert 'aiod_context_setup_failures_any_total{pool="default"} 0.0' in text
    # ...while the errno-labelled counter has no series for them at all
    assert not [line for line in text.splitlines()
                if line.startswith("aiod_ops_failed_total{") and 'job="idle"' in line]
    # the failure that happened: the companion carries it too
    assert 'aiod_ops_failed_any_total{job="probe",op="fsync",pool="default"} 1.0' in text
    assert 'aiod_job_errors_any_total{job="probe"} 1.0' in text


def test_job_configuration_is_exported_for_the_alert_rules(exposition: bytes) -> None:
    text = exposition.decode()
    assert 'aiod_job_info{job="probe",op="randread",pool="default",type="probe"} 1.0' in text
    assert 'aiod_job_timeout_seconds{job="probe",pool="default"} 5.0' in text
    assert 'aiod_job_timeout_seconds{job="idle",pool="default"} 2.5' in text


def test_promtool_check_metrics_is_clean(exposition: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make test installs it)")
    r = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert r.stdout.strip() == b"" and r.stderr.strip() == b""
