"""The shipped example configurations: valid, and the device probes work on a real device.

config/examples/block-device.yaml and mixed.yaml pass `aiod check-config`
as shipped. Then each runs as written, with only its device and directory
paths pointed at a loop device and a scratch directory: the probes complete,
nothing fails, the device is opened read-only with O_DIRECT and its data
is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_harness import ROOT, Aiod

EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))
SHIPPED = [ROOT / "config" / "aiod.yaml", *EXAMPLES]


def test_there_are_device_and_mixed_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"block-device.yaml", "mixed.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_passes_check_config(path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "aiod.cli", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), STATE_DIRECTORY="/var/lib/aiod"))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout.startswith(f"{path}: ok")


def device_targets(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return [j for j in cfg["jobs"] if str(j["target"]).startswith("/dev/")]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_device_jobs_are_read_only_and_leave_size_out(path: Path) -> None:
    # `size` only sizes a file aiod creates; on a device it would mislead
    for job in device_targets(yaml.safe_load(path.read_text())):
        assert job.get("op", "randread") in ("read", "randread"), job
        assert not job.get("allow_write", False), job
        assert "size" not in job, job


@pytest.fixture
def loop_device() -> Iterator[tuple[str, Path]]:
    """A 64 MiB loop device full of random data: (device, backing file)."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup for a real block device")
    work = Path(tempfile.mkdtemp(prefix="aiod-loopdev-", dir="/var/tmp"))
    img = work / "disk.img"
    with open(img, "wb") as f:
        f.writelines(os.urandom(1 << 20) for _ in range(64))
    r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(work)
        pytest.skip(f"cannot attach a loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev, img
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(work, ignore_errors=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_flags(pid: int, target: str) -> int | None:
    """The open flags of ``pid``'s descriptor on ``target``, from /proc."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                    if line.startswith("flags:"):
                        return int(line.split()[1], 8)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("name", ["block-device.yaml", "mixed.yaml"])
def test_example_probes_a_loop_device_read_only(name: str, loop_device: tuple[str, Path],
                                                tmp_path: Path) -> None:
    dev, img = loop_device
    before = sha256(img)
    cfg = yaml.safe_load((ROOT / "config" / "examples" / name).read_text())
    # the example as shipped, with its paths pointed at what exists here
    scratch = Path(tempfile.mkdtemp(prefix="aiod-example-", dir="/var/tmp"))  # O_DIRECT: not tmpfs
    for job in cfg["jobs"]:
        target = str(job["target"])
        if target.startswith("/dev/"):
            job["target"] = dev
        elif target.startswith("/"):
            job["target"] = str(scratch / Path(target).name)
    del cfg["metrics"]  # the harness picks a free port
    cfg["state_directory"] = str(scratch / "state")
    probes = [j["name"] for j in cfg["jobs"]]
    d = Aiod(tmp_path, cfg)
    try:
        d.wait_ready()
        for job in probes:
            d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job=job) >= 5,
                         timeout=30, what=f"5 completions of {job}")
        assert d.metric_sum("aiod_ops_failed_total") == 0, d.log
        assert d.metric_sum("aiod_job_errors_total") == 0, d.log
        flags = open_flags(d.proc.pid, dev)
        assert flags is not None, f"aiod has no descriptor open on {dev}"
        assert flags & os.O_ACCMODE == os.O_RDONLY, oct(flags)
        assert flags & os.O_DIRECT, oct(flags)
        rc = d.stop()
        assert rc == 0, d.log
        report = json.loads((scratch / "state" / "shutdown-report.json").read_text())
    finally:
        d.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    t = report["totals"]
    assert t["in_flight"] == 0 and t["submitted"] == t["completed"] + t["cancelled"] + t["failed"]
    assert sha256(img) == before, "the device's data changed"
