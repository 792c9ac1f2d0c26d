"""Session fixtures for tests against a real systemd, journald and Prometheus.

``container`` boots a Debian trixie container (systemd 257, which knows
Type=notify-reload) and installs aiod the Debian way: the .deb built from
this tree (deploy/build-deb.sh), with `apt-get install ./aiod_*.deb`, over a
test config put in /etc/aiod/aiod.yaml first (as configuration management
would). ``container252`` does the same on bookworm (systemd 252), where the
package adds the compat drop-in. The rootfs is debootstrapped once and
cached in /var/cache/aiod-tests (override with AIOD_TEST_CACHE); each
session boots a fresh copy of it.

Skips, with the reason, only when not root or when the tools cannot be
installed with apt-get. Everything else that goes wrong is a failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import nspawn, packages
from tests.system.support import (
    CONFIG,
    REPORT,
    AiodService,
    aiod_yaml,
    ensure_tools,
    free_port,
    install_deb,
)

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
def aiod_deb(container_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """aiod_<version>_<arch>.deb built from the tree under test, once per session."""
    return packages.build_deb(tmp_path_factory.mktemp("deb"))


def installed(c: nspawn.Container, deb: Path) -> None:
    """Install the package over the test config; leave aiod enabled but stopped.

    The package enables and starts aiod.service; stopped, each test starts
    it on its own terms. Enabled, as the package leaves it, the unit stays
    loaded when inactive, so ExecMainStatus= and Result= stay readable.
    """
    install_deb(c, deb)
    c.sh("systemctl stop aiod", timeout=90, check=True)


@pytest.fixture(scope="session")
def container(aiod_deb: Path, metrics_port: int) -> Iterator[nspawn.Container]:
    with nspawn.booted("trixie", files={CONFIG: aiod_yaml(metrics_port)}) as c:
        installed(c, aiod_deb)
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
def container252(aiod_deb: Path) -> Iterator[tuple[nspawn.Container, int]]:
    """Debian bookworm (systemd 252): the package adds the compat drop-in."""
    port = free_port()
    with nspawn.booted("bookworm", files={CONFIG: aiod_yaml(port)}) as c:
        installed(c, aiod_deb)
        yield c, port
