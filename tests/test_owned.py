"""owned-targets.json: a damaged record, a full state directory, no stray files."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from aiod.targets import (
    OWNED_FILE,
    OwnedFiles,
    TargetError,
    fill_target,
    open_target,
    partial_path,
    write_atomic,
)
from tests.test_targets import tiny_fs  # noqa: F401  (fixture)

DAMAGE: dict[str, Callable[[Path], object]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:17]),
    "garbage": lambda p: p.write_bytes(b"\x00\xffnot json at all"),
    "null": lambda p: p.write_text("null"),
    "list": lambda p: p.write_text("[]"),
    "directory": lambda p: (p.unlink(), p.mkdir()),  # type: ignore[func-returns-value]
    "huge-number": lambda p: p.write_text(
        p.read_text().replace('"dev": ', '"dev": 1e999, "was": ', 1)),
    "deep-nesting": lambda p: p.write_text("[" * 200000 + "]" * 200000),
    "wrong-types": lambda p: p.write_text('{"files": {"/x": {"dev": "a", "ino": true}}}'),
}


def fill_up(fs: Path) -> None:
    """Fill fs to the last block (smaller and smaller writes until none fits)."""
    fd = os.open(fs / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\xaa" * size)
            except OSError:
                pass
        os.fsync(fd)
    finally:
        os.close(fd)


def write_target(path: Path, owned: OwnedFiles) -> None:
    t = open_target(path, size=8192, block_size=4096, direct=False, needs_write=True,
                    allow_write=False, owned=owned)
    t.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_record_is_kept_aside_and_aiods_own_files_are_taken_back(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ours = tmp_path / "ours.dat"
    write_target(ours, OwnedFiles(state))
    foreign = tmp_path / "foreign.dat"
    foreign.write_bytes(b"user data" * 1000)
    DAMAGE[damage](state / OWNED_FILE)

    with caplog.at_level(logging.ERROR, logger="aiod.targets"):
        owned = OwnedFiles(state)  # no exception, whatever the damage
    assert any(OWNED_FILE in r.getMessage() and "kept aside" in r.getMessage()
               for r in caplog.records), caplog.text
    aside = [p for p in state.iterdir() if p.name.startswith(OWNED_FILE + ".corrupt-")]
    assert len(aside) == 1

    write_target(ours, owned)  # carries aiod's token: taken back
    with pytest.raises(TargetError) as ei:
        write_target(foreign, owned)
    assert ei.value.reason == "write_refused"
    # Taken back for good: a restart still knows it.
    write_target(ours, OwnedFiles(state))
    assert sorted(p.name for p in state.iterdir() if ".tmp-" in p.name) == []


def test_a_full_state_directory_creates_no_target_it_cannot_record(
        tmp_path: Path, tiny_fs: Path) -> None:
    fill_up(tiny_fs)
    owned = OwnedFiles(tiny_fs)
    target = tmp_path / "t.dat"
    with pytest.raises(TargetError) as ei:
        fill_target(target, 1 << 20, owned)
    assert "cannot record" in str(ei.value) and ei.value.reason == "no_space"
    assert not target.exists() and not partial_path(target).exists()
    assert [p.name for p in tiny_fs.iterdir()
            if p.name.startswith(".")] == [], "a tmp file was left in the state directory"
    # Once there is room again, the same fill works and is owned.
    os.unlink(tiny_fs / "ballast")
    fill_target(target, 1 << 20, owned)
    write_target(target, OwnedFiles(tiny_fs))


def test_write_atomic_leaves_no_tmp_file_when_it_fails(tiny_fs: Path) -> None:
    fill_up(tiny_fs)
    with pytest.raises(OSError):
        write_atomic(tiny_fs / "report.json", "x" * (1 << 20))
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["ballast", "lost+found"]
