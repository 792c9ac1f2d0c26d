#!/bin/sh
# Build aiod's Debian package from the working tree (committed or not).
#
# Usage: deploy/build-deb.sh [OUTDIR]      default OUTDIR: dist
#
# dpkg-buildpackage wants debian/ at the top of the source tree and writes
# its results next to it, so the build runs in a scratch copy of the tree
# (everything but what .gitignore lists) with deploy/debian as debian/; only
# aiod_<version>_<arch>.deb comes back, into OUTDIR. Needs the packages
# `deploy/debian-deps.sh --deb` installs; runs as any user.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-dist}
mkdir -p "$out"
out=$(cd "$out" && pwd)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/aiod-deb.XXXXXX")
trap 'rm -rf "$scratch"' EXIT INT TERM
src=$scratch/aiod
mkdir "$src"
# The tree as it is, without what is never part of a build.
tar -C "$here" -cf - \
    --exclude=.git --exclude=.venv --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=.hypothesis --exclude=.benchmarks --exclude=.mypy_cache \
    --exclude='*.deb' . | tar -C "$src" -xf -
cp -R "$src/deploy/debian" "$src/debian"
# Debian 12's python3-setuptools (66) predates PEP 639: it reads
# project.license only as a table and knows no license-files. Newer ones
# (Debian 13 has 78) take the SPDX string as it is. Only the build copy
# changes, and the licence stays the same (debian/copyright has the text).
setuptools=$(dpkg-query -W -f='${Version}' python3-setuptools 2>/dev/null || echo 0)
if dpkg --compare-versions "$setuptools" lt 77; then
    sed -i -e 's/^license = "\([^"]*\)"$/license = { text = "\1" }/' \
        -e '/^license-files = /d' "$src/pyproject.toml"
fi
# Setuptools before 74 (Debian 12 has 66) does not read ext-modules from
# pyproject.toml: the build copy declares the compiled engine in a setup.py
# instead, with the same name, source and flags.
if dpkg --compare-versions "$setuptools" lt 74; then
    flags=$(sed -n 's/.*extra-compile-args = \(\[[^]]*\]\).*/\1/p' "$src/pyproject.toml")
    sed -i '/^ext-modules = \[/,/^\]/d' "$src/pyproject.toml"
    cat >"$src/setup.py" <<EOF
from setuptools import Extension, setup
setup(ext_modules=[Extension("aiod._engine", ["aiod/_engine.c"], py_limited_api=True,
                             extra_compile_args=${flags:-[]})])
EOF
fi
# Debian's own python3, not one earlier on PATH (pyenv, a venv): the package
# runs on /usr/bin/python3 and is built against it.
if ! (cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b >"$scratch/build.log" 2>&1); then
    tail -n 40 "$scratch/build.log" >&2
    echo "aiod: dpkg-buildpackage failed (the last 40 lines of its log are above)" >&2
    exit 1
fi
for deb in "$scratch"/aiod_*.deb; do
    cp "$deb" "$out/"
    echo "$out/$(basename "$deb")"
done
