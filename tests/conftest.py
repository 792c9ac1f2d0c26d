"""Shared fixtures: real files on a filesystem that supports O_DIRECT."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiod import aio
from tests.daemon_harness import Aiod


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


_NEIGHBOUR = """
import random, sys, time
from aiod import aio
from tests.daemon_harness import Aiod
held = []
print("up", flush=True)
while True:
    # Contexts of varying sizes come and go every millisecond or so.
    held.append(aio.Context(random.randint(1, 16)))
    if len(held) > 4 or random.random() < 0.5:
        held.pop(0).destroy()
    time.sleep(0.001)
"""


@pytest.fixture
def aio_neighbour() -> Iterator[None]:
    """Another process using kernel AIO all the time, as a database server on the
    host would: fs.aio-nr (system-wide) moves under the test's feet. A test that
    uses this must count its own process's contexts, not fs.aio-nr."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(root)))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        yield
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def daemons() -> Iterator[list[Aiod]]:
    """Daemons a test starts (append them); each is stopped afterwards."""
    started: list[Aiod] = []
    yield started
    for d in started:
        d.stop()
