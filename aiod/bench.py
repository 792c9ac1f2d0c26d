"""`aiod bench`: a one-shot, fio-like run on the daemon's own engine.

The I/O goes through an :class:`aiod.pool.Pool` with its full accounting on
(lifecycle counters, per-op classification, the Prometheus latency
histogram), exactly as in the daemon; on top of that the bench keeps a fine
log-linear latency histogram (1/64 of an octave, about 1.6 %) so that its
percentiles can be put beside fio's. Like fio, it reports completion latency
(clat: from io_submit's return to the reap) and total latency (lat: from
before io_submit). They differ most for buffered I/O, which the kernel does
inside io_submit itself.

Per completion the loop does no Python-level work of its own: it counts the
op's (submitted_ns, issued_ns, latency_ns) in a Counter from C (ops submitted
in one batch and reaped in one batch share a key) and folds those keys into
the histograms every 65,536 distinct keys and at the end.

Exit status: 0, or 1 when some operations failed; 2 for a usage problem (bad
argument, missing directory, a target it may not write to) with one line on
stderr; 75 when the kernel refuses the AIO contexts (fs.aio-max-nr).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

from aiod import aio
from aiod.config import parse_duration, parse_size, physical_memory
from aiod.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_TEMPFAIL, EXIT_USAGE
from aiod.pool import Outcome, Pool, PoolCapacityError, PoolError
from aiod.targets import TargetError, create_filled

RW_MODES = ("read", "write", "randread", "randwrite", "randrw")


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
    iodepth_batch: int = 0


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
    p.add_argument("--iodepth-batch", type=int, default=0, metavar="N",
                   help="submit at most N operations per io_submit, like fio's "
                        "iodepth_batch_submit (default: all that are ready)")
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
    if args.iodepth_batch < 0 or args.iodepth_batch > args.iodepth:
        raise BenchError(f"--iodepth-batch {args.iodepth_batch}: must be between 0 (all) "
                         "and --iodepth")
    if runtime <= 0:
        raise BenchError(f"--runtime {args.runtime}: must be positive")
    kinds = 2 if args.rw == "randrw" else 1
    need, have = kinds * args.iodepth * bs, physical_memory()
    if need > have:
        raise BenchError(f"--iodepth {args.iodepth} x --bs {args.bs}"
                         f"{' x 2 (reads and writes)' if kinds == 2 else ''} needs {need} bytes "
                         f"of I/O buffers, more than this machine's {have} bytes of memory")
    if size < bs:
        raise BenchError(f"--size {args.size}: smaller than one block of {bs} bytes")
    return Settings(target=Path(args.target).absolute(), rw=args.rw, bs=bs, iodepth=args.iodepth,
                    runtime=runtime, size=size, direct=args.direct,
                    allow_overwrite=args.allow_overwrite, json=args.json,
                    contexts=args.contexts, iodepth_batch=args.iodepth_batch)


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


def _fold(raw: Counter[tuple[int, int, int]], hist: dict[int, int],
          lhist: dict[int, int]) -> None:
    """Move (submitted_ns, issued_ns, latency_ns) counts into the clat and lat histograms."""
    for (sub, iss, lat), n in raw.items():
        i = hist_index(lat - (iss - sub))
        hist[i] = hist.get(i, 0) + n
        i = hist_index(lat)
        lhist[i] = lhist.get(i, 0) + n
    raw.clear()


_FOLD_AT = 1 << 16  # distinct raw keys kept before folding into the histograms
_times_of = attrgetter("tag.submitted_ns", "tag.issued_ns", "tag.latency_ns")
_outcome_of = attrgetter("tag.outcome")
_res_of = attrgetter("res")


def _run(s: Settings, fd: int, usable: int, progress: bool) -> dict[str, Any]:
    nblocks = usable // s.bs
    per_ctx = -(-s.iodepth // s.contexts)
    job = "bench"
    rng = random.Random(0x5EED)
    # A fixed table of random offsets, walked in order: a random draw per op
    # would cost more than the rest of the per-op work.
    table = [rng.randrange(nblocks) * s.bs for _ in range(min(1 << 16, max(nblocks, 1) * 4))]
    tlen = len(table)
    seq = 0
    bs = s.bs

    # Slabs: one mapping per kind, not per buffer (vm.max_map_count).
    reads = [aio.read(fd, buf, 0) for buf in aio.aligned_buffers(s.iodepth, bs)]
    writes: list[aio.Op] = []
    if s.rw in ("write", "randwrite", "randrw"):
        for buf in aio.aligned_buffers(s.iodepth, bs):
            buf.view[:] = rng.randbytes(bs)
            writes.append(aio.write(fd, buf, 0))
    # After the buffers: a failure to map them must not leave contexts behind.
    pool = Pool("bench", s.contexts, per_ctx, use_eventfd=s.contexts > 1)
    slots = writes if s.rw in ("write", "randwrite") else reads
    mixed = s.rw == "randrw"
    sequential = s.rw in ("read", "write")
    slot_of = {id(op): i for i, op in enumerate(reads)}
    slot_of.update({id(op): i for i, op in enumerate(writes)})
    pool.register(job, ["write"] if s.rw in ("write", "randwrite") else
                  (["read", "write"] if mixed else ["read"]))

    # Per completion the loop only counts (submitted_ns, issued_ns, latency_ns)
    # keys in a Counter, in C: ops submitted together and reaped together share
    # one key. Keys are folded into the log-linear histograms now and then.
    raw: Counter[tuple[int, int, int]] = Counter()
    count = raw.update
    hist: dict[int, int] = {}   # clat
    lhist: dict[int, int] = {}  # lat
    ios = nbytes = errors = 0
    ti = 0
    COMPLETED = Outcome.COMPLETED
    chunk = s.iodepth_batch or s.iodepth

    def arm(ops: list[aio.Op]) -> list[aio.Op]:
        nonlocal ti, seq
        if mixed:
            ops = [reads[i] if rng.random() < 0.5 else writes[i]
                   for i in map(slot_of.__getitem__, map(id, ops))]
        if sequential:
            for op in ops:
                op.iocb.aio_offset = seq
                seq += bs
                if seq + bs > usable:
                    seq = 0
        else:
            j = ti + len(ops)
            if j <= tlen:
                offs = table[ti:j]
            else:
                j -= tlen
                offs = table[ti:] + table[:j]
            ti = j
            for op, off in zip(ops, offs):
                op.iocb.aio_offset = off
        return ops

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    end = t0 + s.runtime
    next_progress = t0 + 1.0
    refused: list[aio.Op] = []
    now = t0
    try:
        pending = pool.submit(arm(list(slots)), job)
        while True:
            done = pool.reap(timeout=1.0, min_nr=1)
            if done:
                outcomes = list(map(_outcome_of, done))
                if outcomes.count(COMPLETED) == len(done):
                    nbytes += sum(map(_res_of, done))
                    count(map(_times_of, done))
                else:
                    for op, outcome in zip(done, outcomes):
                        if outcome is COMPLETED:
                            nbytes += op.res or 0
                            count((_times_of(op),))
                        else:
                            errors += 1
                ios += len(done)
                if len(raw) > _FOLD_AT:
                    _fold(raw, hist, lhist)
            now = time.perf_counter()
            if now >= end:
                break
            if progress and now >= next_progress:
                el = now - t0
                sys.stdout.write(f"\r[{el:4.0f}s/{s.runtime:g}s] {ios / el:10.0f} IOPS "
                                 f"{nbytes / el / 2**20:9.1f} MiB/s")
                sys.stdout.flush()
                next_progress = now + 1.0
            if pending:
                done = pending + done
            if done:
                batch = arm(done)
                if len(batch) <= chunk:
                    pending = pool.submit(batch, job)
                else:
                    # --iodepth-batch: small io_submit calls reach the device
                    # sooner (like fio's iodepth_batch_submit).
                    pending = []
                    for i in range(0, len(batch), chunk):
                        pending += pool.submit(batch[i:i + chunk], job)
                if Outcome.FAILED in map(_outcome_of, batch):
                    # Refused by io_submit itself: counted by the pool; the
                    # bench counts it and goes on with one op fewer.
                    bad = [op for op in batch if op.tag.outcome is Outcome.FAILED]
                    errors += len(bad)
                    refused.extend(bad)
                    if len(refused) == len(slots):
                        raise BenchError(f"every operation on {s.target} was refused: "
                                         f"{os.strerror(bad[0].tag.errno)}")
    except KeyboardInterrupt:
        now = time.perf_counter()  # Ctrl-C ends the run early; results still print
    elapsed = now - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if progress:
        sys.stdout.write("\r" + " " * 60 + "\r")
    # Shutdown through the same steps as the daemon: nothing is left out.
    pool.close(drain_timeout=30.0, destroy_timeout=30.0)
    snap = pool.snapshot()
    _fold(raw, hist, lhist)
    pct = percentiles(hist, (50.0, 90.0, 99.0, 99.9))
    lpct = percentiles(lhist, (50.0, 90.0, 99.0, 99.9))
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
        "total_latency_ns": {"p50": lpct[50.0], "p90": lpct[90.0], "p99": lpct[99.0],
                             "p99_9": lpct[99.9]},
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
    except PoolCapacityError as e:
        print(f"aiod bench: {e}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except MemoryError as e:
        print(f"aiod bench: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except (aio.AioError, PoolError) as e:
        print(f"aiod bench: {e}", file=sys.stderr)
        return EXIT_TEMPFAIL if getattr(e, "errno", None) == errno.EAGAIN else EXIT_FAILURE
    if args.json:
        print(json.dumps(result))
    else:
        print(_human(result))
    return EXIT_OK if result["errors"] == 0 else EXIT_FAILURE
