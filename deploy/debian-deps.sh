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
#
# Nothing installed here is started or enabled: `prometheus` is wanted for
# its programs (the tests run their own server on loopback), not as a
# service on :9090. A policy-rc.d keeps the maintainer scripts from starting
# services during the install, and the services of the packages installed
# now are disabled afterwards.
set -eu
BUILD="libsystemd-dev pkg-config gcc python3-venv python3-dev"
DEB="debhelper dh-python pybuild-plugin-pyproject python3-all python3-all-dev python3-setuptools python3-wheel dpkg-dev"
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

POLICY=/usr/sbin/policy-rc.d
POLICY_MARK="# aiod: deploy/debian-deps.sh, for the length of one install"
before=$(mktemp)
cleanup() {
    # only our own policy-rc.d: an administrator's stays
    if [ -f "$POLICY" ] && grep -qxF "$POLICY_MARK" "$POLICY"; then rm -f "$POLICY"; fi
    rm -f "$before"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n%s\nexit 101\n' "$POLICY_MARK" >"$POLICY"
    chmod 0755 "$POLICY"
fi
dpkg-query -W -f='${binary:Package}\n' >"$before"

echo "aiod: installing Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update -qq
if ! apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $missing >/dev/null; then
    echo "aiod: apt-get install failed for:$missing" >&2
    exit $((1 - optional))
fi

# Disable the services that came with what was just installed (dependencies
# included); packages that were here before are the administrator's.
for pkg in $(dpkg-query -W -f='${binary:Package}\n' | grep -vxF -f "$before"); do
    for f in $(dpkg-query -L "$pkg" 2>/dev/null); do
        case "$f" in
            /etc/init.d/*)
                [ -x "$f" ] || continue
                update-rc.d "${f#/etc/init.d/}" disable >/dev/null 2>&1 || true ;;
            /lib/systemd/system/*.service|/usr/lib/systemd/system/*.service)
                unit=${f##*/}
                case "$unit" in *@.service) continue ;; esac
                if command -v deb-systemd-helper >/dev/null 2>&1; then
                    deb-systemd-helper disable "$unit" >/dev/null 2>&1 || true
                fi ;;
        esac
    done
done
