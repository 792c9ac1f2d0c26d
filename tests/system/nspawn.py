"""A throwaway Debian container with a real systemd, booted with systemd-nspawn.

The debootstrapped root filesystem is cached outside the repository (one per
Debian suite, built atomically: debootstrap into a temporary directory, then
rename). Each test session boots a fresh copy of it, so tests never change
the cache.

The recipe, by hand (as root; what the code below does):

    apt-get install -y systemd-container debootstrap
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,curl \
        bookworm "$ROOT" "$MIRROR"        # MIRROR: the URIs line of apt's debian.sources
    chroot "$ROOT" apt-get install -y --download-only python3 ...   # PRELOAD, cached only
    mount -t tmpfs tmpfs /run/systemd/nspawn   # unless it is a mount point already
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D "$ROOT" -b \
        --register=no --keep-unit --console=pipe &
    LEADER=$(pgrep -P $! -x systemd)       # the container's PID 1, seen from the host
    nsenter -t "$LEADER" -a systemctl is-system-running --wait
    nsenter -t "$LEADER" -a systemctl poweroff

- ``--keep-unit`` is required where the host has no system bus (nspawn dies
  with "Parent died too early" without it), and nspawn wants
  /run/systemd/nspawn on a tmpfs.
- The container shares the host's network: a service in it listening on
  127.0.0.1 is reachable from the host. With ``--private-network`` it has
  only a loopback of its own (and apt only the preloaded cache).
- aiod itself is installed by the tests (tests/system/conftest.py): its
  Debian package, `apt-get install ./aiod_*.deb`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("AIOD_TEST_CACHE", "/var/cache/aiod-tests"))
# A fresh server: systemd and little else. No Python: aiod's package brings
# what it needs, and the tests check that it does.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "curl")
# Downloaded into the rootfs's apt cache, not installed: what
# `apt-get install ./aiod_*.deb` (and the wheel route) pull in, so that a
# container installs them from the cache, without the network (containers
# with a private network have none).
PRELOAD = ("python3", "python3-systemd", "python3-prometheus-client", "python3-yaml",
           "python3-venv")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_RUN = Path("/run/systemd/nspawn")

DEBOOTSTRAP_TIMEOUT = 900
BOOT_TIMEOUT = 120
POWEROFF_TIMEOUT = 30


def debian_mirror() -> str:
    """The Debian mirror apt already uses here, else deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+main", legacy.read_text(), re.MULTILINE)
        if m and "security" not in m.group(1):
            return m.group(1)
    return "http://deb.debian.org/debian"


def cached_rootfs(suite: str) -> Path:
    """The cached root filesystem of Debian ``suite``, debootstrapped when missing.

    The directory name carries a hash of the package lists, so changing
    PACKAGES or PRELOAD builds a new one. A lock serialises concurrent test
    sessions.
    """
    digest = hashlib.sha256(" ".join(PACKAGES + ("+",) + PRELOAD).encode()).hexdigest()[:8]
    final = CACHE / f"rootfs-{suite}-{digest}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "usr/lib/systemd/systemd").exists():
            return final
        for stale in CACHE.glob(f".rootfs-{suite}-*"):  # an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".rootfs-{suite}-", dir=CACHE))
        tmp.chmod(0o755)  # it becomes the container's /: mkdtemp made it 0700
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
        keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
        if keyring.exists():
            cmd.append(f"--keyring={keyring}")
        cmd += [suite, str(tmp), debian_mirror()]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT)
            if r.returncode != 0:
                raise RuntimeError(f"debootstrap {suite} failed ({r.returncode}):\n"
                                   f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            _preload(tmp)
            # Quieter, faster boots: nothing in the container needs these.
            for unit in ("systemd-networkd.service", "systemd-resolved.service",
                         "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                         "fstrim.timer", "dpkg-db-backup.timer"):
                (tmp / "etc/systemd/system" / unit).unlink(missing_ok=True)
                os.symlink("/dev/null", tmp / "etc/systemd/system" / unit)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


def _preload(root: Path) -> None:
    """Fill root's apt cache with PRELOAD and its dependencies, and nothing else."""
    env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "clean"],  # debootstrap's own downloads: only slower copies
                ["apt-get", "install", "-y", "-q", "--download-only", *PRELOAD]):
        r = subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True,
                           env=env, timeout=DEBOOTSTRAP_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in the new rootfs failed ({r.returncode}):\n"
                               f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _nspawn_run_on_tmpfs() -> None:
    """nspawn wants /run/systemd/nspawn on tmpfs (a systemd host has /run on tmpfs)."""
    NSPAWN_RUN.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", str(NSPAWN_RUN)]).returncode != 0:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(NSPAWN_RUN)], check=True, timeout=30)


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of the direct children of ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            out.append((int(entry.name), comm))
    return out


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4]
        if mnt.startswith(prefix) or mnt == str(path):
            mounts.append(mnt)
    return sorted(mounts, key=len, reverse=True)


@dataclass
class Container:
    """A booted container: run commands in it, put files in it."""

    name: str
    root: Path
    leader: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def sh(self, cmd: str, *, timeout: float = 60, check: bool = False,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` with /bin/sh inside the container (all its namespaces)."""
        argv = ["nsenter", "-t", str(self.leader), "-a", "--",
                "env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0", "/bin/sh", "-c", cmd]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"in container: {cmd!r} exited {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def put(self, src: Path, directory: str = "/root") -> str:
        """Copy the host file ``src`` into ``directory``; its path in the container."""
        dest = self.root / directory.lstrip("/") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        return f"{directory.rstrip('/')}/{src.name}"

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write ``text`` to ``path`` (absolute, inside the container)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, target)

    def read_file(self, path: str) -> str:
        """``path`` as the container sees it (symlinks resolved inside it)."""
        return self.sh(f"cat {path}", check=True).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        r = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props), check=True)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal_json(self, args: str) -> list[dict[str, object]]:
        r = self.sh(f"journalctl --no-pager -o json {args}", check=True)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def booted(suite: str, *, files: dict[str, str] | None = None,
           private_network: bool = False) -> Iterator[Container]:
    """Boot a fresh copy of the ``suite`` rootfs; installing aiod is the caller's.

    ``files`` (container path -> text) are written before boot. The
    container shares the host's network unless ``private_network`` (then it
    has only its own loopback: ports cannot clash with the host's, and apt
    installs from the preloaded cache alone). On exit the container is
    powered off (killed if it does not stop) and its copy removed.
    """
    base = cached_rootfs(suite)
    work = Path(tempfile.mkdtemp(prefix=f"aiod-system-{suite}-", dir="/var/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    leader = 0
    try:
        root = work / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)],
                       check=True, timeout=300)
        root.chmod(0o755)  # the container's /, which unprivileged services must traverse
        name = f"aiod-test-{os.getpid()}-{suite}"
        log = work / "nspawn.log"
        c = Container(name=name, root=root, leader=0, log=log)
        for path, text in (files or {}).items():
            c.write_file(path, text)

        _nspawn_run_on_tmpfs()
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(root), "-b", "-M", name,
                 "--register=no", "--keep-unit", "--console=pipe",
                 *(["--private-network"] if private_network else [])],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)

        deadline = time.monotonic() + BOOT_TIMEOUT
        while not leader:
            if proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {proc.returncode}:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the container's systemd did not appear")
            leader = next((p for p, comm in _children(proc.pid) if comm == "systemd"), 0)
            time.sleep(0.1)
        c.leader = leader

        # The leader appears before it listens on its private bus; until then
        # systemctl answers "Failed to connect to ... bus": ask again.
        while True:
            left = max(5.0, deadline - time.monotonic())
            r = c.sh("systemctl is-system-running --wait", timeout=left)
            if ("Failed to connect" not in r.stderr or time.monotonic() > deadline):
                break
            time.sleep(0.2)
        if r.stdout.strip() not in ("running", "degraded"):
            raise RuntimeError(f"container did not boot: {r.stdout}{r.stderr}\n"
                               + c.sh("systemctl --failed --no-legend").stdout)
        yield c
    finally:
        if proc is not None:
            if leader and proc.poll() is None:
                with contextlib.suppress(Exception):
                    Container("", Path("/"), leader, Path("/")).sh(
                        "systemctl poweroff --no-block", timeout=10)
            try:
                proc.wait(timeout=POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)  # takes its PID namespace with it
                proc.wait(timeout=30)
        for mnt in _mounts_under(work):  # none expected: nspawn mounts in its own namespace
            subprocess.run(["umount", "-l", mnt], check=False)
        shutil.rmtree(work, ignore_errors=True)
        # The tmpfs on /run/systemd/nspawn stays: another session's container
        # may be using it, and it is harmless (and what a systemd host has).
