#!/bin/sh
# Install the Debian packages aiod needs to build (systemd-python compiles
# against libsystemd), or, when not root, name them and the command to run.
# Usage: deploy/debian-deps.sh [extra-package ...]
set -eu
PKGS="libsystemd-dev pkg-config gcc python3-venv python3-dev $*"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "aiod: missing build packages:$missing (not a Debian/Ubuntu system: install their equivalents)" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "aiod: missing Debian packages:$missing" >&2
    echo "aiod: run: sudo apt-get install -y$missing" >&2
    exit 1
fi
echo "aiod: installing Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $missing >/dev/null
