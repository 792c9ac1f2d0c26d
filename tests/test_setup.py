"""The set-up script behind `make run` / `make test` (deploy/debian-deps.sh).

The real install path (root, apt-get) runs in every CI build. These tests
cover what a non-root user sees, with a stand-in dpkg-query that reports
every package missing: a unit test of the script's own logic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.daemon_harness import ROOT

SCRIPT = ROOT / "deploy" / "debian-deps.sh"


@pytest.fixture
def fake_bin() -> Iterator[Path]:
    """A dpkg-query that finds nothing, where user nobody can run it
    (pytest's tmp_path lives under a directory only root may enter)."""
    d = Path(tempfile.mkdtemp(prefix="aiod-fake-bin-"))
    try:
        d.chmod(0o755)
        (d / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
        (d / "dpkg-query").chmod(0o755)
        # A copy of the script too: the checkout may sit where nobody cannot read.
        shutil.copy(SCRIPT, d / "debian-deps.sh")
        (d / "debian-deps.sh").chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d)


def run_as_nobody(fake: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the script as another user")
    env = {"PATH": f"{fake}:/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "sh", str(fake / "debian-deps.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=30)


def test_non_root_gets_the_missing_packages_and_the_command(fake_bin: Path) -> None:
    r = run_as_nobody(fake_bin)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("aiod: missing Debian packages:")
    for pkg in ("libsystemd-dev", "pkg-config", "python3-venv"):
        assert pkg in lines[0]
    assert lines[1].startswith("aiod: run: sudo apt-get install -y ")
    assert "libsystemd-dev" in lines[1]


def test_test_packages_are_optional_for_non_root(fake_bin: Path) -> None:
    r = run_as_nobody(fake_bin, "--test")
    assert r.returncode == 0
    assert "fio" in r.stderr and "sudo apt-get install" in r.stderr
