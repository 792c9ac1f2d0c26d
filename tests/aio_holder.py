"""A process that holds kernel AIO contexts of known sizes until its stdin closes.

    python -m tests.aio_holder 1 63 128 [--fork] [--comm=NAME]

Prints one line of JSON once every context is set up: its pid, the context
ids, and with --fork the pid of a forked child that keeps a copy of the ring
mappings (and owns none of the contexts). Tests read that line, look at the
process from outside, then close stdin.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

from aiod import aio


def main(argv: list[str]) -> int:
    fork = "--fork" in argv
    for a in argv:
        if a.startswith("--comm="):  # prctl(PR_SET_NAME): what /proc/PID/comm shows
            name = a.split("=", 1)[1].encode()[:15]
            ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name), 0, 0, 0)
    sizes = [int(a) for a in argv if not a.startswith("--")]
    ids = [aio.io_setup(n) for n in sizes]
    child = 0
    if fork:
        child = os.fork()
        if child == 0:
            os.read(0, 1)  # the parent's stdin: ends when the test closes it
            os._exit(0)
    print(json.dumps({"pid": os.getpid(), "ids": ids, "child": child}), flush=True)
    sys.stdin.read()
    for i in ids:
        aio.io_destroy(i)
    if child:
        os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
