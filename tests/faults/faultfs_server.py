"""A FUSE filesystem whose files fail, stall or hang I/O on purpose.

Run as its own process (a hung request must never be able to block the test
process): ``python faultfs_server.py MOUNTPOINT DELAY_SECONDS``. Files, each
FILE_SIZE bytes, opened with direct_io so O_DIRECT works on them:

- ok.dat    reads return deterministic bytes; writes are accepted
- eio.dat   reads and writes fail with EIO
- slow.dat  like ok.dat, after DELAY_SECONDS (requests are served one at a time)
- hang.dat  reads and writes never return (until the connection is aborted)
"""

from __future__ import annotations

import errno
import stat
import sys
import threading
import time

from mfusepy import FUSE, FuseOSError, Operations

FILE_SIZE = 1 << 20
FILES = ("ok.dat", "eio.dat", "slow.dat", "hang.dat")


def pattern(offset: int, size: int) -> bytes:
    """The bytes of ok.dat/slow.dat at offset: byte i is (i // 512) % 251."""
    return bytes(((offset + i) // 512) % 251 for i in range(size))


class FaultFS(Operations):  # type: ignore[misc]
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.forever = threading.Event()
        self.now = time.time()

    def getattr(self, path: str, fh: object = None) -> dict[str, float]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2,
                    "st_mtime": self.now, "st_ctime": self.now, "st_atime": self.now}
        if path.lstrip("/") in FILES:
            return {"st_mode": stat.S_IFREG | 0o666, "st_nlink": 1, "st_size": FILE_SIZE,
                    "st_mtime": self.now, "st_ctime": self.now, "st_atime": self.now}
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: object) -> list[str]:
        return [".", "..", *FILES]

    def open(self, path: str, fi: object) -> int:
        if path.lstrip("/") not in FILES:
            raise FuseOSError(errno.ENOENT)
        fi.direct_io = 1  # type: ignore[attr-defined]
        return 0

    def _behave(self, path: str) -> None:
        name = path.lstrip("/")
        if name == "eio.dat":
            raise FuseOSError(errno.EIO)
        if name == "slow.dat":
            time.sleep(self.delay)
        if name == "hang.dat":
            self.forever.wait()

    def read(self, path: str, size: int, offset: int, fh: object) -> bytes:
        self._behave(path)
        size = max(0, min(size, FILE_SIZE - offset))
        return pattern(offset, size)

    def write(self, path: str, data: bytes, offset: int, fh: object) -> int:
        self._behave(path)
        return len(data)

    def truncate(self, path: str, length: int, fh: object = None) -> int:
        return 0


if __name__ == "__main__":
    # Single-threaded on purpose: requests are served one at a time, so N slow
    # reads finish one after another over N x DELAY (a drain that keeps
    # making progress), and a hang blocks the whole device, as a dead disk does.
    FUSE(FaultFS(float(sys.argv[2])), sys.argv[1], foreground=True, raw_fi=True, nothreads=True)
