"""The set-up script behind `make run` / `make test` (deploy/debian-deps.sh).

The real install path (root, apt-get) runs in every CI build. These tests
cover what a non-root user sees, with a stand-in dpkg-query that reports
every package missing: a unit test of the script's own logic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

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


def test_the_package_builds_without_deprecation_warnings_and_ships_its_license(
        tmp_path: Path) -> None:
    # The same isolated build `pip install -e .` runs (the build backend from PyPI).
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "deprecated" not in out.lower(), out
    (wheel,) = tmp_path.glob("aiod-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        # The compiled engine is built by the ordinary install, not left to chance.
        assert any(n.startswith("aiod/_engine.") and n.endswith(".so") for n in names), names
        licence = [n for n in names if n.endswith("/LICENSE")]
        assert licence and "Apache License" in z.read(licence[0]).decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines()


def test_deb_build_packages_are_named_for_non_root(fake_bin: Path) -> None:
    r = run_as_nobody(fake_bin, "--deb")
    assert r.returncode == 1
    for pkg in ("debhelper", "dh-python", "pybuild-plugin-pyproject", "dpkg-dev"):
        assert pkg in r.stderr
    assert "sudo apt-get install" in r.stderr
