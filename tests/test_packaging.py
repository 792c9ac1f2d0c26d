"""The Debian package and what ships with it: built from this tree, consistent with it.

The package's behaviour on a real system (enable, start, compat drop-in,
purge) is tested in containers: tests/system/test_debian_package.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import aiod
from aiod import exit_codes
from aiod.cli import build_parser
from aiod.config import DEFAULT_METRICS_PORT
from tests.daemon_harness import ROOT

DEBIAN = ROOT / "deploy" / "debian"
MANPAGE = ROOT / "deploy" / "man" / "aiod.8"
SYSCTL = ROOT / "config" / "sysctl.d" / "60-aiod.conf"

# PyPI name -> Debian package
DEBIAN_NAMES = {"prometheus-client": "python3-prometheus-client", "PyYAML": "python3-yaml",
                "systemd-python": "python3-systemd"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_debian_version_is_aiods_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.fullmatch(r"aiod \(([^)]+)\) \S+; urgency=\w+", first)
    assert m, first
    assert m.group(1) == aiod.__version__
    assert f'"aiod {aiod.__version__}"' in MANPAGE.read_text()


def test_package_depends_on_the_same_minimums_as_pyproject() -> None:
    control = (DEBIAN / "control").read_text()
    for req in pyproject()["project"]["dependencies"]:
        name, minimum = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([\d.]+)", req).groups()  # type: ignore[union-attr]
        assert f"{DEBIAN_NAMES[name]} (>= {minimum})" in control, req


def test_minimums_are_what_bookworm_ships() -> None:
    # Debian 12's versions; tests/system runs aiod on exactly these
    deps = {re.match(r"[A-Za-z0-9_.-]+", r).group(0): r  # type: ignore[union-attr]
            for r in pyproject()["project"]["dependencies"]}
    assert deps == {"prometheus-client": "prometheus-client>=0.16", "PyYAML": "PyYAML>=6.0",
                    "systemd-python": "systemd-python>=235"}


def test_man_page_renders_without_warnings() -> None:
    if not shutil.which("man"):
        pytest.skip("no man here to render aiod.8")
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(MANPAGE)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, MANROFFSEQ="", MANWIDTH="80"))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr


def test_man_page_covers_every_command_and_exit_code() -> None:
    text = MANPAGE.read_text().replace("\\-", "-")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in sub.choices:  # type: ignore[union-attr]
        assert re.search(rf"^\.B {re.escape(command)}\b", text, re.MULTILINE), \
            f"aiod {command} is not in the man page's COMMANDS"
    codes = {v for k, v in vars(exit_codes).items() if k.startswith("EXIT_")}
    status = text[text.index(".SH EXIT STATUS"):]
    status = status[:status.index("\n.SH ", 1)]
    assert {int(c) for c in re.findall(r"^\.B (\d+)$", status, re.MULTILINE)} == codes


def test_sysctl_example_changes_nothing_until_uncommented() -> None:
    lines = [ln.strip() for ln in SYSCTL.read_text().splitlines() if ln.strip()]
    assert all(ln.startswith("#") for ln in lines), "an active line in the example"
    (setting,) = [ln for ln in lines if re.fullmatch(r"#\s*fs\.aio-max-nr\s*=\s*\d+", ln)]
    value = int(setting.split("=")[1])
    assert Path("/proc/sys/fs/aio-max-nr").exists()
    assert value > 65536, "the example should raise the kernel default"


@pytest.fixture(scope="module")
def built_deb() -> Iterator[Path]:
    from tests.system.packages import build_deb
    if shutil.which("dpkg-buildpackage") is None and os.geteuid() != 0:
        pytest.skip("dpkg-dev is not installed and only root can install it "
                    "(deploy/debian-deps.sh --deb)")
    out = Path(tempfile.mkdtemp(prefix="aiod-deb-test-"))
    try:
        yield build_deb(out)
    finally:
        shutil.rmtree(out)


def test_deb_is_named_and_versioned_for_aiod(built_deb: Path) -> None:
    # Architecture: any, since the compiled engine is a CPython extension.
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert built_deb.name == f"aiod_{aiod.__version__}_{arch}.deb"


def test_deb_installs_the_unit_config_man_page_and_sysctl_example(built_deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(built_deb)], capture_output=True,
                             text=True, check=True).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for want in ("/usr/bin/aiod", "/lib/systemd/system/aiod.service",
                 "/etc/aiod/aiod.yaml", "/etc/sysctl.d/60-aiod.conf",
                 "/usr/share/man/man8/aiod.8.gz", "/usr/share/aiod/systemd252/compat.conf",
                 "/usr/share/aiod/host-scan/host-scan.conf",
                 "/usr/lib/python3/dist-packages/aiod/default.yaml",
                 "/usr/share/doc/aiod/examples/block-device.yaml",
                 "/usr/share/doc/aiod/examples/mixed.yaml"):
        assert want in paths, f"{want} not in the package"
    # the unit as shipped, the config as shipped
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["dpkg-deb", "-x", str(built_deb), d], check=True)
        assert (Path(d) / "lib/systemd/system/aiod.service").read_text() == \
            (ROOT / "systemd/aiod.service").read_text()
        assert (Path(d) / "etc/aiod/aiod.yaml").read_text() == \
            (ROOT / "config/aiod.yaml").read_text()
    assert f"127.0.0.1:{DEFAULT_METRICS_PORT}" in (ROOT / "config/aiod.yaml").read_text()


def test_deb_marks_the_config_files_as_conffiles(built_deb: Path) -> None:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["dpkg-deb", "-e", str(built_deb), d], check=True)
        assert set((Path(d) / "conffiles").read_text().split()) == {
            "/etc/aiod/aiod.yaml", "/etc/sysctl.d/60-aiod.conf"}


def test_deb_depends_on_debian_packages_for_everything(built_deb: Path) -> None:
    depends = subprocess.run(["dpkg-deb", "-f", str(built_deb), "Depends"],
                             capture_output=True, text=True, check=True).stdout
    for name, minimum in (("python3-prometheus-client", "0.16"), ("python3-systemd", "235"),
                          ("python3-yaml", "6.0")):
        assert f"{name} (>= {minimum})" in depends, depends
    assert re.search(r"python3(:any)? \(>= 3\.11", depends), depends


def test_deb_is_lintian_clean(built_deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (deploy/debian-deps.sh --test installs it)")
    r = subprocess.run(["lintian", "--fail-on", "error,warning", str(built_deb)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [ln for ln in r.stdout.splitlines() if ln[:2] in ("E:", "W:")], r.stdout


def test_deb_carries_the_compiled_engine(built_deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(built_deb)], capture_output=True,
                             text=True, check=True).stdout
    # The stable ABI: one build for Debian 12's Python 3.11 and 13's 3.13.
    assert re.search(r"/dist-packages/aiod/_engine\.abi3\.so$", listing, re.MULTILINE), listing
