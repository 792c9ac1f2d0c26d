"""Session fixtures for tests against a real systemd, journald and Prometheus.

``container`` boots a Debian trixie container (systemd 257, which knows
Type=notify-reload) with aiod installed the operator way: the wheel built
from this tree into /opt/aiod, systemd/aiod.service, a test config. The
rootfs is debootstrapped once and cached in /var/cache/aiod-tests (override
with AIOD_TEST_CACHE); each session boots a fresh copy of it.

Skips, with the reason, only when not root or when the tools cannot be
installed with apt-get. Everything else that goes wrong is a failure.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterator

import pytest

from tests.system import nspawn
from tests.system.support import (CONFIG, REPORT, REPO, AiodService, aiod_yaml, ensure_tools,
                                  free_port)

UNIT = REPO / "systemd" / "aiod.service"
COMPAT_DROPIN = REPO / "systemd" / "aiod.service.d-systemd252" / "compat.conf"

CONTAINER_TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap",
                   "nsenter": "util-linux", "mountpoint": "util-linux"}


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("system tests boot containers and install packages: run them as root")


@pytest.fixture(scope="session")
def container_tools() -> None:
    require_root()
    reason = ensure_tools(CONTAINER_TOOLS)
    if reason:
        pytest.skip(f"cannot boot a systemd container: {reason}")


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """aiod's port in the container. The container shares the host network,
    so a port free on the host right now, not a fixed one, avoids clashes."""
    return free_port()


@pytest.fixture(scope="session")
def container(container_tools: None, metrics_port: int) -> Iterator[nspawn.Container]:
    files = {"/etc/systemd/system/aiod.service": UNIT.read_text(),
             CONFIG: aiod_yaml(metrics_port)}
    with nspawn.booted("trixie", src=REPO, python=sys.executable, files=files) as c:
        # enabled, as an operator would: that also keeps the unit loaded when
        # inactive, so ExecMainStatus= and Result= of the last run stay readable
        c.sh("systemctl enable aiod", check=True)
        yield c


@pytest.fixture
def aiod(container: nspawn.Container, metrics_port: int) -> Iterator[AiodService]:
    """aiod.service started on the test config; stopped again afterwards."""
    svc = AiodService(container, metrics_port)
    svc.write_config(aiod_yaml(metrics_port))
    container.sh(f"systemctl reset-failed aiod; rm -f {REPORT}")
    started = time.monotonic()
    r = svc.systemctl("start", timeout=60)
    try:
        assert r.returncode == 0, f"systemctl start aiod: {r.stderr}"
        yield svc
    finally:
        print(f"--- aiod journal (started {time.monotonic() - started:.1f}s ago) ---")
        print(container.sh("journalctl -u aiod -n 40 --no-pager -o short-monotonic").stdout)
        svc.systemctl("stop", timeout=90)
        container.sh("systemctl reset-failed aiod")


@pytest.fixture(scope="session")
def container252(container_tools: None) -> Iterator[tuple[nspawn.Container, int]]:
    """Debian bookworm (systemd 252) with the unit plus the compat drop-in."""
    port = free_port()
    files = {"/etc/systemd/system/aiod.service": UNIT.read_text(),
             "/etc/systemd/system/aiod.service.d/compat.conf": COMPAT_DROPIN.read_text(),
             CONFIG: aiod_yaml(port)}
    with nspawn.booted("bookworm", src=REPO, python=sys.executable, files=files) as c:
        c.sh("systemctl enable aiod", check=True)
        yield c, port
