"""`aiod bench`: a one-shot, fio-like run on the daemon's own engine.

The I/O goes through an :class:`aiod.pool.Pool` with its full accounting on
(lifecycle counters, per-op classification, the Prometheus latency
histogram), exactly as in the daemon; on top of that the bench keeps a fine
log-linear latency histogram (1/64 of an octave, about 1.6 %) so that its
percentiles can be put beside fio's. Like fio, it reports completion latency
(clat: from io_submit's return to the reap) and total latency (lat: from
before io_submit). They differ most for buffered I/O, which the kernel does
inside io_submit itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiod import aio
from aiod.config import parse_duration, parse_size
from aiod.pool import Outcome, Pool
from aiod.targets import TargetError, create_filled

EXIT_USAGE = 2
RW_MODES = ("read", "write", "randread", "randwrite", "randrw")
_SUB = 64  # histogram sub-buckets per power of two


class BenchError(Exception):
    """A user mistake or an unusable target: one line, exit 2."""


def hist_index(ns: int) -> int:
    """Log-linear bucket of a latency in ns: exact below 128, then 64 per octave."""
    if ns < 128:
        return ns if ns > 0 else 0
    shift = ns.bit_length() - 7
    return (shift << 6) + (ns >> shift)


def hist_value(idx: int) -> float:
    """The middle of a bucket, in ns."""
    if idx < 128:
        return float(idx)
    shift = (idx >> 6) - 1
    m = idx - (shift << 6)
    return ((m << shift) + ((m + 1) << shift) - 1) / 2


def percentiles(hist: dict[int, int], points: tuple[float, ...]) -> dict[float, float]:
    total = sum(hist.values())
    out: dict[float, float] = {}
    if total == 0:
        return {p: 0.0 for p in points}
    items = sorted(hist.items())
    for p in points:
        want = p / 100 * total
        acc = 0
        for idx, n in items:
            acc += n
            if acc >= want:
                out[p] = hist_value(idx)
                break
    return out


@dataclass
class Settings:
    target: Path
    rw: str
    bs: int
    iodepth: int
    runtime: float
    size: int
    direct: bool
    allow_overwrite: bool
    json: bool
    contexts: int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="a one-shot fio-like benchmark on aiod's engine",
                       description="Run a fio-like job through an aiod pool (full accounting on) "
                                   "and print IOPS, bandwidth, completion latency percentiles "
                                   "and CPU time.")
    p.add_argument("--target", required=True, help="file or block device (a missing file is "
                   "created, filled with random data)")
    p.add_argument("--rw", choices=RW_MODES, default="randread")
    p.add_argument("--bs", default="4k", help="block size (default 4k)")
    p.add_argument("--iodepth", type=int, default=1, help="operations in flight (default 1)")
    p.add_argument("--runtime", default="10s", help="how long (default 10s)")
    p.add_argument("--size", default="1G", help="size of the file created when missing, and "
                   "the span of offsets used (default 1G)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--direct", dest="direct", action="store_true", default=True,
                      help="O_DIRECT (default)")
    mode.add_argument("--buffered", dest="direct", action="store_false",
                      help="through the page cache")
    p.add_argument("--allow-overwrite", action="store_true",
                   help="allow writes to an existing file or device (its data is destroyed)")
    p.add_argument("--contexts", type=int, default=1, help="kernel contexts in the pool")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _settings(args: argparse.Namespace) -> Settings:
    try:
        bs = parse_size(args.bs)
        size = parse_size(args.size)
        runtime = parse_duration(args.runtime)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if bs <= 0 or (args.direct and bs % 512):
        raise BenchError(f"--bs {args.bs}: must be positive, and a multiple of 512 with --direct")
    if args.iodepth < 1 or args.iodepth > 65536:
        raise BenchError(f"--iodepth {args.iodepth}: must be between 1 and 65536")
    if args.contexts < 1 or args.contexts > args.iodepth:
        raise BenchError(f"--contexts {args.contexts}: must be between 1 and --iodepth")
    if runtime <= 0:
        raise BenchError(f"--runtime {args.runtime}: must be positive")
    if size < bs:
        raise BenchError(f"--size {args.size}: smaller than one block of {bs} bytes")
    return Settings(target=Path(args.target).absolute(), rw=args.rw, bs=bs, iodepth=args.iodepth,
                    runtime=runtime, size=size, direct=args.direct,
                    allow_overwrite=args.allow_overwrite, json=args.json,
                    contexts=args.contexts)


def _open(s: Settings) -> tuple[int, int]:
    """Open (creating when missing) the target; returns (fd, usable size)."""
    writes = s.rw in ("write", "randwrite", "randrw")
    try:
        st = os.stat(s.target)
    except FileNotFoundError:
        if not s.target.parent.is_dir():
            raise BenchError(f"cannot create {s.target}: directory {s.target.parent} "
                             "does not exist") from None
        try:
            create_filled(s.target, s.size)
        except TargetError as e:
            raise BenchError(str(e)) from None
        st = os.stat(s.target)
    else:
        if writes and not s.allow_overwrite:
            raise BenchError(f"refusing to write to existing {s.target}: its data would be "
                             "destroyed (pass --allow-overwrite)")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BenchError(f"{s.target} is neither a regular file nor a block device")
    flags = (os.O_RDWR if writes else os.O_RDONLY) | os.O_CLOEXEC
    if s.direct:
        flags |= os.O_DIRECT
    try:
        fd = os.open(s.target, flags)
    except OSError as e:
        raise BenchError(f"cannot open {s.target}: {e.strerror}") from None
    real = os.lseek(fd, 0, os.SEEK_END)
    usable = min(real, s.size)
    if usable < s.bs:
        os.close(fd)
        raise BenchError(f"{s.target} holds {real} bytes, less than one block of {s.bs}")
    return fd, usable


def run_bench(s: Settings, progress: bool = False) -> dict[str, Any]:
    fd, usable = _open(s)
    try:
        return _run(s, fd, usable, progress)
    finally:
        os.close(fd)


def _run(s: Settings, fd: int, usable: int, progress: bool) -> dict[str, Any]:
    nblocks = usable // s.bs
    per_ctx = -(-s.iodepth // s.contexts)
    pool = Pool("bench", s.contexts, per_ctx, use_eventfd=False)
    job = "bench"
    rng = random.Random(0x5EED)
    # A fixed table of random block numbers, walked in order: a random draw
    # per op would cost more than the rest of the per-op work.
    table = [rng.randrange(nblocks) * s.bs for _ in range(min(1 << 16, max(nblocks, 1) * 4))]
    tmask = len(table)
    seq = 0

    reads = [aio.read(fd, aio.aligned_buffer(s.bs), 0) for _ in range(s.iodepth)]
    writes: list[aio.Op] = []
    if s.rw in ("write", "randwrite", "randrw"):
        for _ in range(s.iodepth):
            buf = aio.aligned_buffer(s.bs)
            buf.view[:] = rng.randbytes(s.bs)
            writes.append(aio.write(fd, buf, 0))
    if s.rw in ("write", "randwrite"):
        slots = writes
    else:
        slots = reads
    mixed = s.rw == "randrw"
    sequential = s.rw in ("read", "write")
    pool.register(job, ["write"] if s.rw in ("write", "randwrite") else
                  (["read", "write"] if mixed else ["read"]))

    hist: dict[int, int] = {}   # clat
    hget = hist.get
    lhist: dict[int, int] = {}  # lat
    lget = lhist.get
    ios = 0
    nbytes = 0
    errors = 0
    ti = 0

    def arm(ops: list[aio.Op]) -> list[aio.Op]:
        nonlocal ti, seq
        out = ops
        if mixed:
            out = []
            for op in ops:
                i = reads.index(op) if op.opcode == aio.IOCB_CMD_PREAD else writes.index(op)
                out.append(reads[i] if rng.random() < 0.5 else writes[i])
        for op in out:
            if sequential:
                op.set_offset(seq)
                seq += s.bs
                if seq + s.bs > usable:
                    seq = 0
            else:
                op.set_offset(table[ti])
                ti += 1
                if ti == tmask:
                    ti = 0
        return out

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    end = t0 + s.runtime
    next_progress = t0 + 1.0
    pending = pool.submit(arm(list(slots)), job)
    now = t0
    while True:
        done = pool.reap(timeout=1.0, min_nr=1)
        for op in done:
            tag = op.tag
            if tag.outcome is Outcome.COMPLETED:
                lat = tag.latency_ns
                idx = hist_index(lat - (tag.issued_ns - tag.submitted_ns))
                hist[idx] = hget(idx, 0) + 1
                idx = hist_index(lat)
                lhist[idx] = lget(idx, 0) + 1
                nbytes += op.res
            else:
                errors += 1
        ios += len(done)
        now = time.perf_counter()
        if now >= end:
            break
        if progress and now >= next_progress:
            el = now - t0
            sys.stdout.write(f"\r[{el:4.0f}s/{s.runtime:.0f}s] {ios / el:10.0f} IOPS "
                             f"{nbytes / el / 2**20:9.1f} MiB/s")
            sys.stdout.flush()
            next_progress = now + 1.0
        if pending:
            done = pending + done
        pending = pool.submit(arm(done), job)
    elapsed = now - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if progress:
        sys.stdout.write("\r" + " " * 60 + "\r")
    # Shutdown through the same steps as the daemon: nothing is left out.
    pool.drain(30.0)
    pool.cancel()
    pool.destroy(30.0)
    snap = pool.snapshot()
    pct = percentiles(hist, (50.0, 90.0, 99.0, 99.9))
    lpct = percentiles(lhist, (50.0, 99.0))
    ok = sum(hist.values())
    return {
        "target": str(s.target), "rw": s.rw, "bs": s.bs, "iodepth": s.iodepth,
        "direct": s.direct, "runtime_seconds": round(elapsed, 6),
        "ios": ok, "errors": errors,
        "iops": ok / elapsed if elapsed > 0 else 0.0,
        "bw_bytes": nbytes / elapsed if elapsed > 0 else 0.0,
        "cpu_seconds": round(cpu, 6),
        "latency_ns": {"p50": pct[50.0], "p90": pct[90.0], "p99": pct[99.0],
                       "p99_9": pct[99.9]},
        "total_latency_ns": {"p50": lpct[50.0], "p99": lpct[99.0]},
        "accounting": {**snap.totals(), "balanced": snap.balanced},
    }


def _human(r: dict[str, Any]) -> str:
    lat = r["latency_ns"]

    def us(ns: float) -> str:
        return f"{ns / 1000:.1f}us" if ns < 1e7 else f"{ns / 1e6:.2f}ms"

    acct = r["accounting"]
    return (f"aiod bench: {r['rw']} bs={r['bs']} iodepth={r['iodepth']} "
            f"{'direct' if r['direct'] else 'buffered'} on {r['target']}\n"
            f"  IOPS={r['iops']:.0f}, BW={r['bw_bytes'] / 2**20:.1f}MiB/s "
            f"({r['ios']} ios in {r['runtime_seconds']:.2f}s, {r['errors']} errors)\n"
            f"  clat percentiles: p50={us(lat['p50'])} p90={us(lat['p90'])} "
            f"p99={us(lat['p99'])} p99.9={us(lat['p99_9'])}\n"
            f"  lat (incl. io_submit): p50={us(r['total_latency_ns']['p50'])} "
            f"p99={us(r['total_latency_ns']['p99'])}\n"
            f"  cpu={r['cpu_seconds']:.2f}s ({100 * r['cpu_seconds'] / max(r['runtime_seconds'], 1e-9):.0f}% of one core)\n"
            f"  accounting: submitted {acct['submitted']} = completed {acct['completed']} + "
            f"cancelled {acct['cancelled']} + failed {acct['failed']} + in flight "
            f"{acct['in_flight']}")


def run(args: argparse.Namespace) -> int:
    try:
        s = _settings(args)
        result = run_bench(s, progress=not args.json and sys.stdout.isatty())
    except BenchError as e:
        print(f"aiod bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    except aio.AioError as e:
        print(f"aiod bench: {e}", file=sys.stderr)
        return 75 if e.errno == 11 else 1
    if args.json:
        print(json.dumps(result))
    else:
        print(_human(result))
    return 0 if result["errors"] == 0 else 1
