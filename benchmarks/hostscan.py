"""CPU cost of one host scan (`aiod aio-usage`) with 1,000 processes running.

    .venv/bin/python benchmarks/hostscan.py                 # 1000 processes
    .venv/bin/python benchmarks/hostscan.py --processes 2000 --holders 200

Forks N children of this (Python) process, so each has a realistic maps file
of a hundred-odd lines; every tenth sets up one AIO context of 128 events
after the fork (so it owns it) and the first holder forks a grandchild that
keeps a copy of its ring. Then it times aiod.hostscan.scan() in this
process: CPU (user + system, time.process_time) and wall time per scan, over
several rounds. The whole scan is measured, kernel time included. Both ways
of reading a process's mappings are measured: PROCMAP_QUERY (Linux 6.11+,
what aiod uses where it exists) and the /proc/PID/maps text (older kernels).
The target: under 100 ms of CPU for 1,000 processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiod import aio, hostscan


def spawn(n: int, holders: int) -> tuple[list[int], int]:
    """n children that wait on a pipe; every (n // holders)-th holds a context."""
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    every = max(1, n // holders) if holders else 0
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            if every and i % every == 0:
                aio.io_setup(128)
                if i == 0 and os.fork() == 0:   # a forked copy of the ring
                    os.write(ready_w, b"x")
                    os.read(r, 1)
                    os._exit(0)
            os.write(ready_w, b"x")
            os.read(r, 1)
            os._exit(0)
        pids.append(pid)
    os.close(r)
    expected = n + (1 if holders else 0)
    got = 0
    while got < expected:
        got += len(os.read(ready_r, expected - got))
    os.close(ready_r)
    os.close(ready_w)
    return pids, w


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=1000)
    ap.add_argument("--holders", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    before = len([p for p in os.listdir("/proc") if p.isdigit()])
    pids, release = spawn(args.processes, args.holders)
    results = {}
    try:
        hostscan.scan()     # warm: imports, dentries
        for label, query in (("PROCMAP_QUERY", True), ("maps text", False)):
            cpu, wall = [], []
            for _ in range(args.rounds):
                c0, w0 = time.process_time(), time.perf_counter()
                s = hostscan.scan(use_query=query)
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            mine = [h for h in s.processes if h.pid in set(pids)]
            results[label] = (cpu, wall, s.scanned, len(mine))
        total = len([p for p in os.listdir("/proc") if p.isdigit()])
    finally:
        os.close(release)
        for pid in pids:
            os.waitpid(pid, 0)
    print(f"host scan: {total} processes on the host ({before} before the benchmark's "
          f"{args.processes} Python children, ~100 mappings each); {args.rounds} rounds")
    for label, (cpu, wall, seen, found) in results.items():
        print(f"{label:>13}: CPU per scan median {statistics.median(cpu) * 1e3:.1f} ms "
              f"(min {min(cpu) * 1e3:.1f}, max {max(cpu) * 1e3:.1f}; user + system), "
              f"wall median {statistics.median(wall) * 1e3:.1f} ms; "
              f"{statistics.median(cpu) / total * 1e6:.1f} ms CPU per 1,000 processes; "
              f"{seen} read, {found}/{args.holders} holders found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
