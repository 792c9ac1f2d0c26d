"""Jobs on a real pool: what counts as hung, and what as skipped."""

from __future__ import annotations

import os
import time
from pathlib import Path

from aiod import aio
from aiod.config import JobConfig
from aiod.jobs import Job
from aiod.pool import Pool


def probe(target: Path, timeout: float) -> JobConfig:
    return JobConfig(name="p", pool="p", type="probe", target=target, size=1 << 20,
                     op="randread", block_size=4096, direct=False, rate=1000.0, iodepth=1,
                     timeout=timeout, allow_write=False)


def test_an_op_the_full_pool_refused_is_skipped_not_hung(tmp_path: Path,
                                                        pipe: tuple[int, int]) -> None:
    r, _ = pipe
    pool = Pool("p", 1, 1)
    try:
        assert pool.submit([aio.poll(r)], job="holder") == []  # the only slot, forever
        job = Job(probe(tmp_path / "t.dat", timeout=0.01), pool, owned=None)
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
    job = Job(cfg, pool, owned=None)
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
