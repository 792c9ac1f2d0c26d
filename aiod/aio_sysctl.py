"""The host's kernel AIO usage: fs.aio-nr and fs.aio-max-nr, read from procfs.

fs.aio-max-nr is one limit for the whole machine, and fs.aio-nr is what every
process's contexts hold of it; the procfs root is passed in so tests can use
a fixture.
"""

from __future__ import annotations

import os
from pathlib import Path


def system_aio_usage(procfs_root: str | os.PathLike[str] = "/proc") -> tuple[int, int]:
    """(aio-nr, aio-max-nr) from procfs_root/sys/fs."""
    base = Path(procfs_root) / "sys" / "fs"
    return (int((base / "aio-nr").read_text().strip()),
            int((base / "aio-max-nr").read_text().strip()))
