"""A quick smoke of `aiod bench` (the benchmarks themselves are in benchmarks/)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from aiod import aio
from aiod import bench as bench_mod
from aiod.benchresult import hist_index, hist_value, percentiles
from tests.daemon_harness import AIOD, ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(AIOD + ["bench", *args], capture_output=True, text=True, env=ENV,
                          timeout=60)


def test_bench_creates_the_target_with_data_and_reports_json(tmp_path: Path) -> None:
    target = tmp_path / "b.dat"
    r = bench(f"--target={target}", "--size=8M", "--runtime=1s", "--iodepth=8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["iops"] > 0 and out["bw_bytes"] == pytest.approx(out["iops"] * 4096, rel=0.01)
    assert out["cpu_seconds"] > 0
    lat = out["latency_ns"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"]
    acct = out["accounting"]
    assert acct["balanced"] and acct["in_flight"] == 0 and acct["failed"] == 0
    assert acct["completed"] >= out["ios"]
    data = target.read_bytes()
    assert len(data) == 8 << 20 and data.count(b"\0" * 4096) == 0


def test_bench_refuses_to_overwrite_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "users.dat"
    original = os.urandom(1 << 20)
    target.write_bytes(original)
    r = bench(f"--target={target}", "--rw=randwrite", "--size=1M", "--runtime=1s")
    assert r.returncode == 2
    assert "--allow-overwrite" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert target.read_bytes() == original
    r = bench(f"--target={target}", "--rw=randwrite", "--size=1M", "--runtime=1s",
              "--allow-overwrite", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ios"] > 0 and target.read_bytes() != original


@pytest.mark.parametrize("args,needle", [
    (["--bs=1000"], "multiple of 512"),
    (["--iodepth=0"], "--iodepth"),
    (["--runtime=soon"], "soon"),
    (["--iodepth=4", "--iodepth-batch=8"], "--iodepth-batch"),
])
def test_bench_bad_arguments_give_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    r = bench(f"--target={tmp_path / 'x.dat'}", "--size=1M", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_bench_missing_directory_is_one_line(tmp_path: Path) -> None:
    r = bench(f"--target={tmp_path / 'no' / 'x.dat'}", "--size=1M", "--runtime=1s")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_histogram_buckets_are_within_two_percent() -> None:
    for ns in [1, 50, 127, 128, 1000, 25_000, 123_456, 10**9, 7 * 10**10]:
        v = hist_value(hist_index(ns))
        assert abs(v - ns) <= max(1.0, ns * 0.016), (ns, v)
    hist: dict[int, int] = {}
    for ns in range(1000, 101000, 1000):  # 1..100 us, uniform
        hist[hist_index(ns)] = hist.get(hist_index(ns), 0) + 1
    p = percentiles(hist, (50.0, 99.0))
    assert p[50.0] == pytest.approx(50_000, rel=0.02)
    assert p[99.0] == pytest.approx(99_000, rel=0.02)


def test_bench_in_process_randrw_buffered_with_small_submits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="aiod")
    bench_mod.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", f"--target={tmp_path / 'rw.dat'}", "--rw=randrw",
                              "--size=4M", "--runtime=300ms", "--iodepth=8",
                              "--iodepth-batch=2", "--buffered", "--json"])
    assert bench_mod.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ios"] > 0 and out["errors"] == 0 and not out["direct"]
    assert out["accounting"]["balanced"] and out["accounting"]["completed"] >= out["ios"]
    for key in ("latency_ns", "total_latency_ns"):
        assert set(out[key]) == {"p50", "p90", "p99", "p99_9"}
    # clat starts after io_submit returns, lat before it: clat <= lat.
    assert out["latency_ns"]["p50"] <= out["total_latency_ns"]["p50"] * 1.02


def test_engine_puts_each_op_in_its_clat_and_lat_bucket(tmp_path: Path) -> None:
    """The bench's histograms come from the engine: per op, lat from before
    io_submit, clat from its return; both buckets as hist_index."""
    from aiod.engine import EngineContext, Ledger, require
    eng = require()
    path = tmp_path / "d.bin"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    ledger = Ledger()
    row = ledger.row("bench", "read", fine=True)
    bufs = aio.aligned_buffers(4, 4096)
    opset = eng.OpSet(ledger.acct, 4, pattern="rand", nblocks=256, block_size=4096)
    for b in bufs:
        opset.add(aio.IOCB_CMD_PREAD, fd, b.address, 4096, row, owner=b)
    ec = EngineContext("bench", 0, 4)
    try:
        ec.submit(opset, 4)
        n, _, _, _, detail = ec.ring.reap(4, 5.0, detail=True)
        ec.record.add_outcomes(n, 0, 0)
    finally:
        ec.destroy(5.0)
        os.close(fd)
    assert n == 4
    clat, lat = ledger.fine("bench", "read")
    assert lat == dict(Counter(hist_index(d[4]) for d in detail))
    assert sum(clat.values()) == 4 and all(min(lat) >= i - 1 or i <= max(lat) for i in clat)
    # clat <= lat for every op: the bucket sums agree in order
    assert sum(i * c for i, c in clat.items()) <= sum(i * c for i, c in lat.items())


def test_bench_refuses_buffers_larger_than_memory_in_one_line(tmp_path: Path) -> None:
    r = bench(f"--target={tmp_path / 'x.dat'}", "--size=1M", "--iodepth=65536", "--bs=1G",
              "--rw=randrw")
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("aiod bench: --iodepth 65536 x --bs 1G x 2 (reads and writes) needs "
                           f"{2 * 65536 << 30} bytes of I/O buffers, more than this machine's")
    assert not (tmp_path / "x.dat").exists()


def test_too_little_aio_headroom_is_one_line_naming_the_sysctl(tmp_path: Path) -> None:
    """With fs.aio-max-nr nearly used up, the bench says which sysctl to raise
    and to what, in one line, and exits 75; it creates no context."""
    held: list[aio.Context] = []
    try:
        while True:  # take the host's AIO events until the kernel says no
            try:
                held.append(aio.Context(4096))
            except aio.AioError:
                break
        nr, max_nr = aio.system_aio_usage()
        depth = max(max_nr - nr, 0) + 1024  # more than is left
        r = bench(f"--target={tmp_path / 'b.dat'}", "--size=8M", "--runtime=1s",
                  f"--iodepth={depth}")
    finally:
        for ctx in held:
            ctx.destroy()
    assert r.returncode == 75, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiod bench: "), r.stderr
    assert "raise fs.aio-max-nr to at least" in lines[0], lines[0]
