#!/bin/sh
# Install the Debian packages aiod needs to build (systemd-python compiles
# against libsystemd), or, when not root, name them and the command to run.
#
# Usage: deploy/debian-deps.sh              the build packages; missing = error
#        deploy/debian-deps.sh --deb        what `make deb` needs (debhelper,
#                                           dh-python/pybuild); missing = error
#        deploy/debian-deps.sh --test       the packages the tests drive for real
#                                           (fio, promtool, FUSE, a container
#                                           systemd, the .deb build, lintian);
#                                           missing and not root = a note, and
#                                           the tests that need them skip
set -eu
BUILD="libsystemd-dev pkg-config gcc python3-venv python3-dev"
DEB="debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel dpkg-dev"
TEST="fio prometheus fuse3 libfuse3-3 systemd-container debootstrap e2fsprogs util-linux lintian $DEB"
optional=0
case "${1:-}" in
    --test) PKGS="$TEST"; optional=1 ;;
    --deb) PKGS="$DEB" ;;
    *) PKGS="$BUILD" ;;
esac
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "aiod: missing packages:$missing (not a Debian/Ubuntu system: install their equivalents)" >&2
    exit $((1 - optional))
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "aiod: missing Debian packages:$missing" >&2
    echo "aiod: run: sudo apt-get install -y$missing" >&2
    exit $((1 - optional))
fi
echo "aiod: installing Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! apt-get install -y -qq --no-install-recommends $missing >/dev/null; then
    echo "aiod: apt-get install failed for:$missing" >&2
    exit $((1 - optional))
fi
