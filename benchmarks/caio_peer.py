"""The Python peer: the same randread loop on caio's linux_aio backend.

caio is the established Python binding to kernel AIO (aiofile builds on it).
This drives its raw backend (Context/Operation, eventfd, process_events), the
fastest way to use it, with no accounting. Prints one JSON object like
`aiod bench --json` (iops, bw_bytes, cpu_seconds, errors).

Usage: caio_peer.py PATH BS IODEPTH RUNTIME_SECONDS SIZE {direct|buffered}
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import sys
import time


def main() -> int:
    path, bs, depth, runtime, size, mode = sys.argv[1:7]
    bs_i, depth_i, size_i = int(bs), int(depth), int(size)
    from caio.linux_aio import Context, Operation  # type: ignore[import-not-found]
    flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags)
    nblocks = min(size_i, os.lseek(fd, 0, os.SEEK_END)) // bs_i
    rng = random.Random(0x5EED)
    table = [rng.randrange(nblocks) * bs_i for _ in range(1 << 16)]
    ti = 0
    ctx = Context(depth_i)
    done: list[int] = []
    errors = 0
    ios = 0

    def make() -> object:
        nonlocal ti
        op = Operation.read(bs_i, fd, table[ti])
        ti = (ti + 1) & 0xFFFF
        op.set_callback(done.append)
        return op

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    end = t0 + float(runtime)
    ctx.submit(*[make() for _ in range(depth_i)])
    now = t0
    while now < end:
        select.select([ctx.fileno], [], [], 1.0)
        try:
            ctx.poll()
        except BlockingIOError:
            pass
        ctx.process_events()
        n = len(done)
        if n:
            errors += sum(1 for r in done if r != bs_i)
            ios += n
            done.clear()
            ctx.submit(*[make() for _ in range(n)])
        now = time.perf_counter()
    elapsed = now - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    ok = ios - errors
    print(json.dumps({"iops": ok / elapsed, "bw_bytes": ok * bs_i / elapsed,
                      "cpu_seconds": cpu, "errors": errors, "ios": ios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
