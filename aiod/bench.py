"""`aiod bench`: a one-shot, fio-like run on the daemon's own engine.

The I/O goes through the daemon's engine (aiod._engine: one C call per
batch fills, submits, reaps and classifies) with its full accounting on:
lifecycle records per context, the per-(job, op) counters and the
Prometheus latency histogram, exactly as the daemon keeps them. On top of
that the engine keeps, for the bench's rows, a fine log-linear latency
histogram (1/64 of an octave, about 1.6 %) so that its percentiles can be
put beside fio's. Like fio, it reports completion latency (clat: from
io_submit's return to the reap) and total latency (lat: from before
io_submit). They differ most for buffered I/O, which the kernel does inside
io_submit itself.

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
import select
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiod import aio, benchresult
from aiod.config import parse_duration, parse_size, physical_memory
from aiod.engine import EngineContext, Ledger, require
from aiod.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_TEMPFAIL, EXIT_USAGE
from aiod.lifecycle import ContextState
from aiod.opkind import JobOp, OpKind
from aiod.pool import PoolCapacityError, PoolError, PoolSnapshot
from aiod.poolsetup import ContextSetup
from aiod.targets import TargetError, open_target

RW_MODES = tuple(m.value for m in JobOp if m.moves_data)


class BenchError(Exception):
    """A user mistake or an unusable target: one line, exit 2."""


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
    iodepth_batch: int | None = None   # None: the engine's choice
    userspace_reap: bool = False


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
    p.add_argument("--iodepth-batch", type=int, default=None, metavar="N",
                   help="submit at most N operations per io_submit, like fio's "
                        "iodepth_batch_submit; 0: all that are ready (default: the "
                        "engine's choice, 4 with --direct, all with --buffered)")
    p.add_argument("--userspace-reap", action="store_true",
                   help="reap completions from the context's mapped ring without a syscall "
                        "when they are there (like fio's userspace_reap); io_getevents "
                        "still waits when none are")
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
    if args.iodepth_batch is not None and not 0 <= args.iodepth_batch <= args.iodepth:
        raise BenchError(f"--iodepth-batch {args.iodepth_batch}: must be between 0 (all) "
                         "and --iodepth")
    if runtime <= 0:
        raise BenchError(f"--runtime {args.runtime}: must be positive")
    kinds = len(JobOp(args.rw).buffered_kinds)
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
                    contexts=args.contexts, iodepth_batch=args.iodepth_batch,
                    userspace_reap=args.userspace_reap)


def run_bench(s: Settings, progress: bool = False) -> dict[str, Any]:
    """Open (creating and filling when missing) the target the way a job does, and run."""
    try:
        target = open_target(s.target, size=s.size, block_size=s.bs, direct=s.direct,
                             needs_write=JobOp(s.rw).writes, allow_write=s.allow_overwrite,
                             owned=None)
    except TargetError as e:
        raise BenchError(_target_message(s, e)) from None
    try:
        return _run(s, target.fd, min(target.size, s.size), progress)
    finally:
        target.close()


def _target_message(s: Settings, e: TargetError) -> str:
    """The target's error in the words of this command's flags, not a job's keys."""
    if e.reason == "write_refused":
        return (f"refusing to write to existing {s.target}: its data would be destroyed "
                "(pass --allow-overwrite)")
    if e.reason == "direct_unsupported":
        return (f"cannot open {s.target} with O_DIRECT: the filesystem does not support it "
                "(pass --buffered)")
    return str(e)


def _run(s: Settings, fd: int, usable: int, progress: bool) -> dict[str, Any]:
    nblocks = usable // s.bs
    per_ctx = -(-s.iodepth // s.contexts)
    job = "bench"
    rng = random.Random(0x5EED)
    mode = JobOp(s.rw)
    writes_too = mode.writes
    kinds = [k.value for k in mode.buffered_kinds]
    eng = require()
    ledger = Ledger()
    rows = {k: ledger.row(job, k, fine=True) for k in kinds}
    # Slabs: one mapping per kind, not per buffer (vm.max_map_count).
    bufs = {k: aio.aligned_buffers(s.iodepth, s.bs) for k in kinds}
    if writes_too:
        for buf in bufs["write"]:
            buf.view[:] = rng.randbytes(s.bs)
    # After the buffers: a failure to map them must not leave contexts behind.
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if s.contexts > 1 else None
    ctxs: list[EngineContext] = []
    opsets = []
    try:
        # The pool's own setup: the headroom check and io_setup's retries, whose
        # errors name fs.aio-max-nr and the value it needs.
        setup = ContextSetup("bench", per_ctx)
        setup.check_headroom(s.contexts)
        for c in range(s.contexts):
            ctxs.append(EngineContext("bench", c, per_ctx, eventfd=efd,
                                      user_reap=s.userspace_reap, ctx=setup.make(efd)))
        # Each context gets its share of the iodepth, and for randrw a read and
        # a write op per slot, of which the engine picks one at random.
        left = s.iodepth
        for c in range(s.contexts):
            depth = min(per_ctx, left)
            left -= depth
            first = c * per_ctx
            opset = eng.OpSet(ledger.acct, depth * len(kinds),
                                  pattern="seq" if mode.sequential else "rand",
                                  nblocks=nblocks, block_size=s.bs, seed=0x5EED + c,
                                  mix=0.5 if len(kinds) == 2 else 0.0, depth=depth)
            for cls, k in enumerate(kinds):
                code = OpKind(k).opcode
                for b in bufs[k][first:first + depth]:
                    opset.add(code, fd, b.address, b.size, rows[k], cls=cls, owner=b)
            opsets.append(opset)
        return _loop(s, ledger, rows, ctxs, opsets, efd, progress)
    finally:
        for ec in ctxs:
            if ec.record.state not in (ContextState.DESTROYED, ContextState.FAILED):
                ec.destroy(30.0)
        if efd is not None:
            os.close(efd)


def _loop(s: Settings, ledger: Ledger, rows: dict[str, int], ctxs: list[EngineContext],
          opsets: list[Any], efd: int | None, progress: bool) -> dict[str, Any]:
    """Submit and reap through the engine until the runtime is up, then shut
    down through the same steps as the daemon: drain, cancel, destroy."""
    elapsed, cpu = _drive(s, ctxs, opsets, efd, progress)
    # Completions after the clock stopped are accounted, not counted in IOPS:
    # the histograms and bytes are read now, before the drain.
    nbytes = sum(d["bytes"] for d in ledger.raw().values())
    clat, lat = benchresult.fine_histograms(ledger, rows)
    snap = _shut_down(ledger, ctxs)
    return benchresult.result(s, elapsed, cpu, nbytes, clat, lat, snap, ledger)


# How long one engine call may go on reaping and resubmitting (one context, at
# most ROUNDS_DEPTH in flight). At iodepth 1 a call per op cost 1.2x fio's CPU
# per op, most of the difference the Python around each call; every 10 ms the
# loop still sees the clock, Ctrl-C and progress. At iodepth 32 one call covers
# many ops already: rounds there measured within the noise (an in-process A/B,
# 3 x 5 s alternating, O_DIRECT randread / randwrite: median IOPS 0.99x / 0.92x,
# CPU per op 0.97x / 0.94x; single runs vary 10-15 %), so deeper runs keep one
# round per call, as measured before.
STEP_NS = 10_000_000
ROUNDS_DEPTH = 4


def _drive(s: Settings, ctxs: list[EngineContext], opsets: list[Any], efd: int | None,
           progress: bool) -> tuple[float, float]:
    """The timed part: cycles until the runtime is up (or Ctrl-C). -> (elapsed, CPU seconds)."""
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    # time.monotonic_ns: the engine's clock (CLOCK_MONOTONIC), for until_ns.
    t0 = now = time.monotonic_ns()
    end = t0 + round(s.runtime * 1e9)
    next_progress = t0 + 1_000_000_000
    ios = 0
    try:
        while True:
            done, refused = _step(s, ctxs, opsets, efd, min(end, now + STEP_NS))
            ios += done
            if refused and not any(ec.in_flight for ec in ctxs):
                _all_refused(s, opsets[0])
            now = time.monotonic_ns()
            if now >= end:
                break
            if progress and now >= next_progress:
                _show_progress(s, ios, (now - t0) / 1e9)
                next_progress = now + 1_000_000_000
    except KeyboardInterrupt:
        now = time.monotonic_ns()  # Ctrl-C ends the run early; results still print
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if progress:
        sys.stdout.write("\r" + " " * 60 + "\r")
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return (now - t0) / 1e9, cpu


def _step(s: Settings, ctxs: list[EngineContext], opsets: list[Any],
          efd: int | None, until_ns: int) -> tuple[int, int]:
    """Engine cycles, one call per context. -> (completed, refused by io_submit)."""
    if len(ctxs) == 1:
        # One context: wait in the kernel for the first completion; at low
        # depth go on reaping and resubmitting inside the engine until until_ns
        # (or something the loop must see: a failure, a refusal, a wait that timed out).
        if s.iodepth <= ROUNDS_DEPTH:
            r = ctxs[0].cycle(opsets[0], 1, 1.0, s.iodepth_batch, rounds=0, until_ns=until_ns)
        else:
            r = ctxs[0].cycle(opsets[0], 1, 1.0, s.iodepth_batch)
        return r[0], r[5]
    done = refused = 0
    for ec, opset in zip(ctxs, opsets):
        r = ec.cycle(opset, 0, 0.0, s.iodepth_batch)
        done += r[0]
        refused += r[5]
    if not done and efd is not None:
        # Several contexts: their completions all signal one eventfd.
        select.select([efd], [], [], 1.0)
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            pass
    return done, refused


def _all_refused(s: Settings, opset: Any) -> None:
    notes, _ = opset.take_notes()
    err = next((v for _, kind, v in notes if kind == "rejected"), 0)
    raise BenchError(f"every operation on {s.target} was refused: "
                     f"{os.strerror(err) if err else 'io_submit failed'}")


def _show_progress(s: Settings, ios: int, elapsed: float) -> None:
    sys.stdout.write(f"\r[{elapsed:4.0f}s/{s.runtime:g}s] {ios / elapsed:10.0f} IOPS "
                     f"{ios * s.bs / elapsed / 2**20:9.1f} MiB/s")
    sys.stdout.flush()


def _shut_down(ledger: Ledger, ctxs: list[EngineContext]) -> PoolSnapshot:
    """Drain, cancel and destroy as the daemon does; the pool's final snapshot."""
    deadline = time.monotonic() + 30.0
    for ec in ctxs:
        ec.drain(deadline)
    for ec in ctxs:
        ec.cancel(1.0)
    for ec in ctxs:
        ec.destroy(30.0)
    records = [ec.record.snapshot() for ec in ctxs]
    return PoolSnapshot(name="bench", state="closed", nr_events=ctxs[0].record.nr_events,
                        records=records, stats=ledger.stats(), setups=len(ctxs),
                        destroys=sum(r.state is ContextState.DESTROYED for r in records),
                        destroy_failures=sum(r.state is ContextState.FAILED for r in records),
                        setup_failures={}, oldest_in_flight_seconds=0.0)


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
        print(benchresult.human(result))
    return EXIT_OK if result["errors"] == 0 else EXIT_FAILURE
