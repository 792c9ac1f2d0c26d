"""The `aiod` command line."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from aiod import __version__, aio

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the kernel refused the AIO resources asked for
EXIT_CONFIG = 78    # EX_CONFIG: the configuration is invalid


def smoke() -> int:
    """Write and read back one block through a real kernel context."""
    before, max_nr = aio.system_aio_usage()
    with tempfile.TemporaryDirectory(prefix="aiod-smoke-", dir="/var/tmp") as d:
        path = os.path.join(d, "smoke.dat")
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
        try:
            payload = os.urandom(4096)
            with aio.Context(8) as ctx:
                t0 = time.perf_counter()
                ctx.submit([aio.write(fd, payload, 0)])
                (w,) = ctx.reap(1, timeout=5)
                ctx.submit([aio.read(fd, 4096, 0)])
                (r,) = ctx.reap(1, timeout=5)
                took = time.perf_counter() - t0
            ok = w.res == 4096 and r.res == 4096 and r.buffers[0].bytes() == payload
        finally:
            os.close(fd)
    after, _ = aio.system_aio_usage()
    print(f"aiod smoke: O_DIRECT write+read of 4 KiB {'ok' if ok else 'FAILED'} "
          f"in {took * 1e6:.0f} us; aio-nr {before} -> {after} (max {max_nr})")
    return EXIT_OK if ok else EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aiod",
        description="Own pools of Linux kernel AIO contexts and measure I/O through them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 clean, 1 failure, 75 the kernel refused the AIO "
               "resources asked for (raise fs.aio-max-nr), 78 configuration error",
    )
    p.add_argument("--version", action="version", version=f"aiod {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("smoke", help="one O_DIRECT write and read through a kernel context")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "smoke":
            return smoke()
    except aio.AioError as e:
        print(f"aiod: {e}", file=sys.stderr)
        return EXIT_TEMPFAIL if e.errno == 11 else EXIT_FAILURE
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
