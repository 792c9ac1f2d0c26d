"""What an AIO context's ring size says: its pages, and bounds on what it asked for and costs.

Every kernel AIO context maps its completion ring into its owner's address
space. The ring's size gives bounds on what io_setup asked for, and so on
what the context charges to fs.aio-nr (fs/aio.c):

    E = 2 * max(n, 4 * C) + 2         ring slots, C = possible CPUs
    P = ceil((32 + 32 * E) / 4096)    ring pages (32-byte header + events)

so a ring of P pages means ``n <= 64*P - 2``, and ``n >= 64*(P-1) - 1`` when
that is above ``4*C`` (below it, any n from 1 up gives the same ring).
Since Linux 4.12 io_setup(n) charges exactly n; before, it charged
``2 * max(n, 4*C)``.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

PAGE = mmap.PAGESIZE


def ring_pages(nr_events: int, possible_cpus: int, page: int = PAGE) -> int:
    """Pages of the ring the kernel maps for io_setup(nr_events)."""
    slots = 2 * max(nr_events, 4 * possible_cpus) + 2
    return -(-(32 + 32 * slots) // page)


def request_bounds(pages: int, possible_cpus: int, page: int = PAGE) -> tuple[int, int]:
    """(lo, hi) of the n given to io_setup(n) for a ring of ``pages`` pages."""
    per_page = page // 32                       # io_event slots per page
    hi = (per_page * pages - 1) // 2 - 1        # 2n + 2 + 1 <= per_page * P
    lo_slots = (per_page * (pages - 1)) // 2 - 1
    lo = lo_slots if lo_slots > 4 * possible_cpus else 1
    return max(lo, 1), max(hi, 1)


def charge_bounds(pages: int, possible_cpus: int, legacy: bool = False,
                  page: int = PAGE) -> tuple[int, int]:
    """(lo, hi) of the events a ring of ``pages`` pages charges to fs.aio-nr."""
    lo, hi = request_bounds(pages, possible_cpus, page)
    if not legacy:
        return lo, hi
    floor = 4 * possible_cpus
    return 2 * max(lo, floor), 2 * max(hi, floor)


def possible_cpus(sys_root: str | os.PathLike[str] = "/sys") -> int:
    """CPUs the kernel sizes per-CPU structures for ("0-3,8-11" -> 8)."""
    text = (Path(sys_root) / "devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        n += (int(b) - int(a) + 1) if b else 1
    return n


def legacy_charge(osrelease: str) -> bool:
    """True for kernels that charged 2*max(n, 4*C) per context (before 4.12)."""
    m = re.match(r"(\d+)\.(\d+)", osrelease)
    if m is None:
        return False
    return (int(m.group(1)), int(m.group(2))) < (4, 12)
