"""Jobs on a real pool: what counts as hung, and what as skipped."""

from __future__ import annotations

import os
import time
from pathlib import Path

from aiod.config import JobConfig
from aiod.jobs import LoadJob, ProbeJob, make_job
from aiod.pool import Pool
from tests.engine_ops import Ops


def probe(target: Path, timeout: float) -> JobConfig:
    return JobConfig(name="p", pool="p", type="probe", target=target, size=1 << 20,
                     op="randread", block_size=4096, direct=False, rate=1000.0, iodepth=1,
                     timeout=timeout, allow_write=False)


def test_an_op_the_full_pool_refused_is_skipped_not_hung(tmp_path: Path,
                                                        pipe: tuple[int, int]) -> None:
    r, _ = pipe
    pool = Pool("p", 1, 1)
    (tmp_path / "t.dat").write_bytes(os.urandom(1 << 20))
    try:
        holder = Ops(pool, "holder", 1)
        holder.poll(r)
        assert holder.submit() == (1, 0, 0)  # the only slot, forever
        job = make_job(probe(tmp_path / "t.dat", timeout=0.01), pool, owned=None)
        assert isinstance(job, ProbeJob)
        assert job.start()
        job.pump(time.monotonic())
        assert job.skipped == 1 and job.in_flight == 0
        time.sleep(0.05)
        job.pump(time.monotonic() + 1.0)  # past the timeout, and a timeout check is due
        assert job.timeouts == 0
    finally:
        pool.close()


def test_an_op_in_flight_past_its_timeout_is_flagged_once(tmp_path: Path) -> None:
    fifo = tmp_path / "hold.fifo"
    pool = Pool("p", 1, 4)
    cfg = JobConfig(name="h", pool="p", type="load", target=fifo, size=0, op="poll",
                    block_size=4096, direct=False, rate=1.0, iodepth=1, timeout=0.01,
                    allow_write=False)
    job = make_job(cfg, pool, owned=None)
    assert isinstance(job, LoadJob)
    try:
        assert job.start()
        job.pump(time.monotonic())
        assert job.in_flight == 1
        time.sleep(0.05)
        job.pump(time.monotonic() + 1.0)
        job.pump(time.monotonic() + 2.0)
        assert job.timeouts == 1
    finally:
        pool.close()
        if job.target is not None:
            job.target.close()
        os.unlink(fifo)


def _mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_a_job_deeper_than_vm_max_map_count_maps_its_buffers_in_slabs(tmp_path: Path) -> None:
    # 70,000 buffers: one mapping each is past vm.max_map_count (65530 by default),
    # which failed with ENOMEM (and then SIGABRT in the daemon).
    cfg = JobConfig(name="deep", pool="p", type="load", target=tmp_path / "deep.dat",
                    size=1 << 20, op="randread", block_size=4096, direct=True, rate=1.0,
                    iodepth=70_000, timeout=5.0, allow_write=False)
    (tmp_path / "deep.dat").write_bytes(os.urandom(1 << 20))  # start() fills missing ones later
    pool = Pool("p", 1, 1)
    job = make_job(cfg, pool, owned=None)
    before = _mappings()
    try:
        assert job.start()
        assert job.opset.size == 70_000
        assert _mappings() - before <= 4
        # Each buffer is its own page-aligned 4 KiB, fit for O_DIRECT.
        addrs = sorted(job.opset.op_info(i)["buf"] for i in range(70_000))
        assert all(a % 4096 == 0 for a in addrs)
        assert all(b - a >= 4096 for a, b in zip(addrs, addrs[1:]))
        job.pump(time.monotonic())  # and they work: a real O_DIRECT read into the slab
        done = 0
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            done = pool.reap(timeout=0.1)
        assert done == 1
        (row,) = [d for (j, _), d in pool.ledger.raw().items() if j == "deep"]
        assert (row["completed"], row["bytes"], row["short"]) == (1, 4096, 0)
    finally:
        pool.close()
        if job.target is not None:
            job.target.close()
