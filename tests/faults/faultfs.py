"""pytest fixture: a FUSE filesystem that fails (EIO), stalls or hangs I/O.

See faultfs_server.py for the files it offers. Hung requests are released
from outside with the fusectl abort file; teardown always aborts, unmounts
and stops the server, even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

SERVER = Path(__file__).with_name("faultfs_server.py")
FUSECTL = Path("/sys/fs/fuse/connections")


class FaultFS:
    def __init__(self, mnt: Path, proc: subprocess.Popen[bytes]) -> None:
        self.mnt = mnt
        self.proc = proc
        # Found now, while the server answers: a stat of the mount point
        # needs the (single-threaded) server, which a hung request blocks.
        self.connection = FUSECTL / str(os.minor(os.stat(mnt).st_dev))

    def path(self, name: str) -> Path:
        return self.mnt / name

    def abort(self) -> None:
        """Fail every pending and future request of this mount with ENOTCONN."""
        if not os.path.ismount(FUSECTL):
            subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=False)
        try:
            (self.connection / "abort").write_text("1")
        except OSError:
            pass


def _mounted(mnt: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[FaultFS]:
    if os.geteuid() != 0:
        pytest.skip("FUSE fault injection needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        pytest.skip(f"FUSE bindings unavailable (pip mfusepy, Debian fuse3/libfuse3-3): {e}")
    mnt = tmp_path / "faultfs"
    mnt.mkdir()
    log = tmp_path / "faultfs.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(SERVER), str(mnt), "0.3"],
                                stdout=out, stderr=out)
    fs: FaultFS | None = None
    try:
        deadline = time.monotonic() + 10
        while not _mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = log.read_text(errors="replace")
                pytest.skip(f"could not mount the FUSE test filesystem: {err.strip()[:300]}")
            time.sleep(0.05)
        fs = FaultFS(mnt, proc)
        yield fs
    finally:
        if _mounted(mnt):
            if fs is not None:
                fs.abort()
            subprocess.run([shutil.which("fusermount3") or "fusermount", "-u", "-z", str(mnt)],
                           check=False, capture_output=True)
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
