"""The host scan under the shipped unit, in a real systemd container: what it
sees without the host-scan drop-in (only aiod, said once) and with it (a
process holding contexts shows up in the metrics under its unit)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.system import nspawn
from tests.system.support import (
    REPO,
    AiodService,
    Sample,
    aiod_yaml,
    http_get,
    metric_sum,
    parse_metrics,
    wait_for,
)

pytestmark = pytest.mark.system

DROPIN = REPO / "systemd" / "aiod.service.d-host-scan" / "host-scan.conf"
DROPIN_PATH = "/etc/systemd/system/aiod.service.d/host-scan.conf"
HOLDER = "/usr/local/bin/aioholder.py"
# Two contexts of 1000 events each in a process named aioholder, as root.
HOLDER_PY = """\
import ctypes, platform, signal
NR_IO_SETUP = {"x86_64": 206, "aarch64": 0}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, ctypes.c_char_p(b"aioholder"), 0, 0, 0)
for _ in range(2):
    ctx = ctypes.c_ulong(0)
    assert libc.syscall(NR_IO_SETUP, 1000, ctypes.byref(ctx)) == 0, ctypes.get_errno()
signal.pause()
"""
SCAN = "host_scan: {interval: 1s, top: 10}\n"
HIDDEN = "sees only aiod's own processes"


@pytest.fixture
def holder(container: nspawn.Container) -> Iterator[None]:
    container.write_file(HOLDER, HOLDER_PY)
    container.sh("systemctl reset-failed aioholder 2>/dev/null; "
                 f"systemd-run --unit=aioholder -p Type=exec python3 {HOLDER}", check=True)
    try:
        yield
    finally:
        container.sh("systemctl stop aioholder")


def samples(svc: AiodService) -> list[Sample]:
    got = http_get(svc.url("/metrics"))
    return parse_metrics(got[1]) if got and got[0] == 200 else []


def scanned(svc: AiodService, times: int) -> None:
    """Wait until aiod has finished ``times`` more scans (1 s apart)."""
    wait_for("a host scan", lambda: metric_sum(samples(svc), "aiod_host_aio_processes") or None,
             30)
    time.sleep(times + 1)   # scans run every second: at least `times` more by then


def test_scan_without_the_dropin_says_once_why_it_sees_only_aiod(
        aiod: AiodService, holder: None) -> None:
    cursor = aiod.cursor()
    aiod.write_config(aiod_yaml(aiod.port, extra=SCAN))
    assert aiod.systemctl("restart", timeout=60).returncode == 0
    scanned(aiod, 3)
    m = samples(aiod)
    assert metric_sum(m, "aiod_host_aio_events", comm="aioholder") == 0
    assert metric_sum(m, "aiod_host_aio_processes") == 1          # aiod itself
    assert metric_sum(m, "aiod_host_aio_unattributed_events", bound="hi") >= 2000
    said = [str(e.get("MESSAGE")) for e in aiod.journal(after=cursor)
            if HIDDEN in str(e.get("MESSAGE"))]
    assert len(said) == 1, said
    assert "hidepid=invisible" in said[0] and "host-scan.conf" in said[0]


def test_scan_with_the_dropin_sees_a_holder_under_its_unit(
        aiod: AiodService, holder: None, container: nspawn.Container) -> None:
    container.write_file(DROPIN_PATH, DROPIN.read_text())
    try:
        container.sh("systemctl daemon-reload", check=True)
        # the unit where the package installs it; --man=no as in test_systemd.py
        r = container.sh("systemd-analyze verify --man=no /lib/systemd/system/aiod.service")
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        cursor = aiod.cursor()
        aiod.write_config(aiod_yaml(aiod.port, extra=SCAN))
        assert aiod.systemctl("restart", timeout=60).returncode == 0
        assert aiod.prop("ProtectProc") == "default"

        def seen() -> list[Sample] | None:
            m = samples(aiod)
            return m if metric_sum(m, "aiod_host_aio_events", comm="aioholder") else None
        m = wait_for("aioholder in aiod_host_aio_events", seen, 30)
        # 2 x io_setup(1000): rings of 17 pages, 959..1022 events each
        lo = metric_sum(m, "aiod_host_aio_events", comm="aioholder", unit="aioholder.service",
                        bound="lo")
        hi = metric_sum(m, "aiod_host_aio_events", comm="aioholder", unit="aioholder.service",
                        bound="hi")
        assert (lo, hi) == (2 * 959, 2 * 1022)
        assert metric_sum(m, "aiod_host_aio_processes") >= 2
        msgs = [str(e.get("MESSAGE")) for e in aiod.journal(after=cursor)]
        assert not [x for x in msgs if HIDDEN in x or "CAP_SYS_PTRACE" in x], msgs
    finally:
        container.sh(f"rm -f {DROPIN_PATH} && systemctl daemon-reload", check=True)
