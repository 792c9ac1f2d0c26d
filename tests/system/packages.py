"""Build what the containers install from the tree under test: the .deb and the wheel.

Both are built from the working tree as it is (committed or not), never in
place: deploy/build-deb.sh copies the tree for dpkg-buildpackage, and the
wheel is built from a copy too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 600


def version() -> str:
    """aiod's version, as the tree under test says (aiod/__init__.py)."""
    for line in (REPO / "aiod" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise AssertionError("no __version__ in aiod/__init__.py")


def build_deb(out: Path) -> Path:
    """aiod_<version>_<arch>.deb, built by deploy/build-deb.sh into ``out``.

    Installs the Debian build packages first when they are missing (root
    only; `make test` has installed them already).
    """
    deps = subprocess.run(["sh", str(REPO / "deploy" / "debian-deps.sh"), "--deb"],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if deps.returncode != 0:
        raise RuntimeError(f"deploy/debian-deps.sh --deb failed:\n{deps.stderr[-2000:]}")
    r = subprocess.run(["sh", str(REPO / "deploy" / "build-deb.sh"), str(out)],
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if r.returncode != 0:
        raise RuntimeError(f"deploy/build-deb.sh failed ({r.returncode}):\n"
                           f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    (deb,) = out.glob("aiod_*.deb")
    return deb


def build_wheel(out: Path, python: str) -> Path:
    """The aiod wheel, built with ``python -m pip wheel`` from a copy of the tree."""
    tree = out / "src"
    shutil.copytree(REPO, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", ".benchmarks", ".mypy_cache", "*.deb"))
    wheels = out / "wheel"
    r = subprocess.run([python, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                        "--no-deps", "-w", str(wheels), str(tree)],
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if r.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    (whl,) = wheels.glob("aiod-*.whl")
    return whl
