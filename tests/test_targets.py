"""Targets: creation with real data, ownership, refusals, a really full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiod.targets import OwnedFiles, TargetError, open_fifo, open_target, target_missing


def test_missing_file_is_created_with_real_data_and_recorded_as_ours(tmp_path: Path) -> None:
    owned = OwnedFiles(tmp_path)
    t = open_target(tmp_path / "t.dat", size=1 << 20, block_size=4096, direct=True,
                    needs_write=True, allow_write=False, owned=owned)
    try:
        assert t.created and t.writable and t.size == 1 << 20
    finally:
        t.close()
    data = (tmp_path / "t.dat").read_bytes()
    assert data.count(b"\0" * 512) == 0
    # A new process (a new OwnedFiles) still knows the file is aiod's.
    again = open_target(tmp_path / "t.dat", size=1 << 20, block_size=4096, direct=True,
                        needs_write=True, allow_write=False, owned=OwnedFiles(tmp_path))
    assert not again.created and again.writable
    again.close()


def test_a_replaced_file_is_no_longer_ours(tmp_path: Path) -> None:
    owned = OwnedFiles(tmp_path)
    open_target(tmp_path / "t.dat", size=8192, block_size=4096, direct=False,
                needs_write=True, allow_write=False, owned=owned).close()
    (tmp_path / "t.dat").unlink()
    (tmp_path / "t.dat").write_bytes(b"user data" * 1000)
    with pytest.raises(TargetError) as ei:
        open_target(tmp_path / "t.dat", size=8192, block_size=4096, direct=False,
                    needs_write=True, allow_write=False, owned=OwnedFiles(tmp_path))
    assert ei.value.reason == "write_refused"


def test_allow_write_opens_a_foreign_file_for_writing(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 8192)
    t = open_target(tmp_path / "f", size=8192, block_size=4096, direct=False,
                    needs_write=True, allow_write=True, owned=OwnedFiles(tmp_path))
    assert t.writable
    t.close()


@pytest.mark.parametrize("setup,reason", [
    (lambda p: None, "missing"),
    (lambda p: p.mkdir(), "not_a_file"),
    (lambda p: p.write_bytes(b"tiny"), "too_small"),
])
def test_unusable_targets_raise_with_a_reason(tmp_path: Path, setup, reason: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / ("no/such" if reason == "missing" else "x")
    setup(path)
    with pytest.raises(TargetError) as ei:
        open_target(path, size=4096, block_size=4096, direct=False, needs_write=False,
                    allow_write=False, owned=None)
    assert ei.value.reason == reason
    assert str(path) in str(ei.value)


def test_fifo_target_is_created_and_opened(tmp_path: Path) -> None:
    t = open_fifo(tmp_path / "hold.fifo")
    try:
        assert t.created and t.fd >= 0
    finally:
        t.close()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(TargetError) as ei:
        open_fifo(tmp_path / "plain")
    assert ei.value.reason == "not_a_fifo"


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB ext4 filesystem on a loop device: fills up at once."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
        pytest.skip("needs root, mkfs.ext4 and losetup for a real full filesystem")
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_a_target_error_and_leaves_no_partial_file(tiny_fs: Path) -> None:
    with pytest.raises(TargetError) as ei:
        open_target(tiny_fs / "big.dat", size=64 << 20, block_size=4096, direct=False,
                    needs_write=False, allow_write=False, owned=None)
    assert ei.value.reason == "no_space"
    assert "No space left" in str(ei.value)
    assert not (tiny_fs / "big.dat").exists()


@pytest.mark.parametrize("path", ["/dev/aiod-no-such-disk", "/dev/shm/aiod-no-such-file",
                                  "/sys/aiod-no-such-file"])
def test_a_missing_name_under_dev_or_sys_is_an_error_never_a_file_to_create(path: str) -> None:
    for make in (lambda: target_missing(Path(path)),
                 lambda: open_target(Path(path), size=1 << 20, block_size=4096, direct=False,
                                     needs_write=False, allow_write=False, owned=None),
                 lambda: open_fifo(Path(path))):
        with pytest.raises(TargetError) as e:
            make()
        assert e.value.reason == "missing" and "is the device name right?" in str(e.value)
    assert not os.path.exists(path)
