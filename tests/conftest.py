"""Shared fixtures: real files on a filesystem that supports O_DIRECT."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from aiod import aio


@pytest.fixture
def direct_file(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A 1 MiB file of known bytes, opened O_RDWR|O_DIRECT."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4096)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:  # pragma: no cover - depends on the test filesystem
        pytest.skip(f"O_DIRECT not supported under {tmp_path}: {e}")
    try:
        yield fd, path
    finally:
        os.close(fd)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def aio_nr() -> int:
    return aio.system_aio_usage()[0]


def live_contexts(pid: str = "self") -> int:
    """Kernel AIO contexts alive in a process: each maps its ring as /[aio].

    Unlike fs.aio-nr this is per process, so other processes on the machine
    cannot disturb a leak check.
    """
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/[aio]" in line)
