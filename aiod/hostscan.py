"""Who holds the host's kernel AIO events: a scan of every process's rings.

Each process's AIO rings are found in its /proc/PID/maps
(:mod:`aiod.procmaps`) and their sizes turned into bounds on the events they
charge to fs.aio-nr (:mod:`aiod.aio_ring`).

A forked child keeps a copy of its parent's ring mapping but owns no context:
rings are counted once per (device, inode), for the oldest process mapping it.

Nothing here needs privileges: a maps file that cannot be read is counted as
unreadable, a process that exits mid-scan is skipped. Only processes that
hold rings get their comm, cgroup and start time read. The ring arithmetic
and the maps readers are re-exported here, where callers have always found
them.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiod.aio_ring import (
    PAGE,
    charge_bounds,
    legacy_charge,
    possible_cpus,
    request_bounds,
    ring_pages,
)
from aiod.procmaps import AIO_MARK, PROCMAP_QUERY, Querier, Ring, parse_rings, process_rings
from aiod.procmaps import read_all as _read

__all__ = [
    "AIO_MARK",
    "PAGE",
    "PROCMAP_QUERY",
    "Holder",
    "HostScan",
    "Querier",
    "Ring",
    "charge_bounds",
    "format_table",
    "has_cap_sys_ptrace",
    "legacy_charge",
    "parse_rings",
    "possible_cpus",
    "proc_hidepid",
    "request_bounds",
    "ring_pages",
    "scan",
    "unit_of",
    "why_incomplete",
]


# --------------------------------------------------------------- per process
def unit_of(cgroup: str) -> str | None:
    """The systemd unit a process runs in, from the text of /proc/PID/cgroup.

    The innermost ``.service`` or ``.scope`` of the cgroup v2 path (the v1
    name=systemd hierarchy when there is no v2 line); None outside any unit.
    """
    path = None
    for line in cgroup.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, p = rest.partition(":")
        if hid == "0" and controllers == "":
            path = p
            break
        if controllers == "name=systemd":
            path = p
    if not path:
        return None
    for part in reversed(path.strip().split("/")):
        if part.endswith((".service", ".scope")):
            return part
    return None


@dataclass
class Holder:
    """One process and the rings it is charged for."""

    pid: int
    comm: str
    unit: str | None
    rings: int = 0
    bytes: int = 0
    events_lo: int = 0
    events_hi: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "comm": self.comm, "unit": self.unit, "rings": self.rings,
                "bytes": self.bytes, "events_lo": self.events_lo, "events_hi": self.events_hi}


@dataclass
class HostScan:
    """One scan's result; ``processes`` largest first."""

    aio_nr: int
    aio_max_nr: int
    processes: list[Holder]
    unreadable: int              # processes whose maps could not be read
    scanned: int                 # processes whose maps were read
    seconds: float
    hidepid: str | None = None   # the /proc mount's hidepid= option, when set
    unscanned: int = 0           # left out because the deadline passed
    errors: dict[str, int] = field(default_factory=dict)  # errno name -> processes

    @property
    def attributed_lo(self) -> int:
        return sum(h.events_lo for h in self.processes)

    @property
    def attributed_hi(self) -> int:
        return sum(h.events_hi for h in self.processes)

    @property
    def unattributed_lo(self) -> int:
        return max(0, self.aio_nr - self.attributed_hi)

    @property
    def unattributed_hi(self) -> int:
        return max(0, self.aio_nr - self.attributed_lo)

    def as_json(self) -> dict[str, object]:
        """The shape `aiod aio-usage --json` promises; other tools read it."""
        return {"aio_nr": self.aio_nr, "aio_max_nr": self.aio_max_nr,
                "unattributed_lo": self.unattributed_lo,
                "unattributed_hi": self.unattributed_hi,
                "unreadable": self.unreadable,
                "processes": [h.as_dict() for h in self.processes]}


def _start_time(proc: str, pid: int) -> int:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    stat = _read(f"{proc}/{pid}/stat")
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def proc_hidepid(procfs_root: str | os.PathLike[str] = "/proc") -> str | None:
    """The hidepid= option of the procfs mounted at procfs_root, if any.

    systemd's ProtectProc=invisible mounts /proc with hidepid=invisible
    (hidepid=2 on older kernels): other users' processes vanish from it.
    """
    root = os.path.realpath(procfs_root)
    try:
        text = _read(f"{procfs_root}/self/mountinfo").decode(errors="replace")
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3 or rparts[0] != "proc" or parts[4] != root:
            continue
        found = None
        for opt in rparts[2].split(","):
            if opt.startswith("hidepid="):
                value = opt.split("=", 1)[1]
                found = None if value in ("0", "off") else value
    return found


# ------------------------------------------------------------------ the scan
@dataclass
class _MapsRead:
    """What reading every process's maps found, before owners are decided."""

    found: dict[int, list[Ring]] = field(default_factory=dict)   # pid -> its rings
    scanned: int = 0
    unreadable: int = 0
    unscanned: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def _read_all_maps(proc: str, deadline: float | None, clock: Callable[[], float],
                   use_query: bool) -> _MapsRead:
    """Every process's rings, until the deadline; a process gone meanwhile is skipped."""
    pids = [int(n) for n in os.listdir(proc) if n.isdigit()]
    out = _MapsRead()
    querier = Querier()
    querier.supported = use_query
    for i, pid in enumerate(pids):
        if deadline is not None and (i & 31) == 0 and clock() > deadline:
            out.unscanned = len(pids) - i
            break
        try:
            rings = process_rings(f"{proc}/{pid}/maps", querier)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                continue    # exited since listdir: it holds nothing now
            out.unreadable += 1
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            out.errors[name] = out.errors.get(name, 0) + 1
            continue
        out.scanned += 1
        if rings:
            out.found[pid] = rings
    return out


def _owners(proc: str, found: dict[int, list[Ring]]) -> dict[tuple[str, int], int]:
    """Each ring's owner: of the processes mapping it (fork), the oldest."""
    owner: dict[tuple[str, int], int] = {}
    starts: dict[int, tuple[int, int]] = {}
    for pid, rings in found.items():
        for r in rings:
            other = owner.get(r.key)
            if other is None:
                owner[r.key] = pid
                continue
            for p in (pid, other):
                if p not in starts:
                    try:
                        starts[p] = (_start_time(proc, p), p)
                    except (OSError, ValueError, IndexError):
                        starts[p] = (1 << 62, p)    # gone: cannot be the owner
            if starts[pid] < starts[other]:
                owner[r.key] = pid
    return owner


def _holder(proc: str, pid: int, mine: list[Ring], cpus: int, legacy: bool) -> Holder:
    """The process pid, charged for the rings it owns (each counted once)."""
    try:
        comm = _read(f"{proc}/{pid}/comm").decode(errors="replace").strip()
    except OSError:
        comm = "?"
    try:
        unit = unit_of(_read(f"{proc}/{pid}/cgroup").decode(errors="replace"))
    except OSError:
        unit = None
    h = Holder(pid, comm, unit)
    seen: set[tuple[str, int]] = set()
    for r in mine:
        if r.key in seen:
            continue
        seen.add(r.key)
        lo, hi = charge_bounds(r.size // PAGE, cpus, legacy)
        h.rings += 1
        h.bytes += r.size
        h.events_lo += lo
        h.events_hi += hi
    return h


def scan(procfs_root: str | os.PathLike[str] = "/proc",
         sys_root: str | os.PathLike[str] = "/sys", *,
         deadline: float | None = None,
         clock: Callable[[], float] = time.monotonic,
         use_query: bool = True) -> HostScan:
    """Scan every process under procfs_root. Never raises for a process's sake.

    ``deadline`` (a ``clock()`` time) stops the scan early; the processes not
    reached are counted in ``unscanned``. ``use_query=False`` reads the maps
    text even where PROCMAP_QUERY exists (benchmarks of older kernels' path).
    """
    t0 = clock()
    proc = os.fspath(procfs_root)
    cpus = possible_cpus(sys_root)
    try:
        legacy = legacy_charge(_read(f"{proc}/sys/kernel/osrelease").decode())
    except OSError:
        legacy = False
    nr = int(_read(f"{proc}/sys/fs/aio-nr"))
    max_nr = int(_read(f"{proc}/sys/fs/aio-max-nr"))
    read = _read_all_maps(proc, deadline, clock, use_query)
    owner = _owners(proc, read.found)
    holders: list[Holder] = []
    for pid, rings in read.found.items():
        mine = [r for r in rings if owner.get(r.key) == pid]
        if mine:
            holders.append(_holder(proc, pid, mine, cpus, legacy))
    holders.sort(key=lambda h: (-h.events_hi, -h.events_lo, h.pid))
    return HostScan(aio_nr=nr, aio_max_nr=max_nr, processes=holders,
                    unreadable=read.unreadable, scanned=read.scanned, seconds=clock() - t0,
                    hidepid=proc_hidepid(proc), unscanned=read.unscanned, errors=read.errors)


# -------------------------------------------------------------- the command
def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def format_table(s: HostScan) -> str:
    rows = [("PID", "COMMAND", "UNIT", "RINGS", "BYTES", "EVENTS")]
    for h in s.processes:
        rows.append((str(h.pid), h.comm, h.unit or "-", str(h.rings), _human(h.bytes),
                     f"{h.events_lo}..{h.events_hi}"))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    right = {0, 3, 4, 5}
    lines = ["  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                       for i, c in enumerate(r)).rstrip() for r in rows]
    if not s.processes:
        lines.append("(no process holds an AIO context)")
    lines.append(f"fs.aio-nr {s.aio_nr} of fs.aio-max-nr {s.aio_max_nr}; "
                 f"unattributed {s.unattributed_lo}..{s.unattributed_hi} events; "
                 f"{_count(s.unreadable, 'process', 'processes')} unreadable")
    return "\n".join(lines)


def has_cap_sys_ptrace(procfs_root: str | os.PathLike[str] = "/proc") -> bool:
    """Whether this process may read any process's maps (CAP_SYS_PTRACE effective)."""
    try:
        for line in _read(f"{os.fspath(procfs_root)}/self/status").decode().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 19))
    except (OSError, ValueError):
        pass
    return False


def why_incomplete(s: HostScan, ptrace: bool | None = None) -> list[str]:
    """Sentences saying what the scan could not see, and how to see it."""
    ptrace = has_cap_sys_ptrace() if ptrace is None else ptrace
    out = []
    if s.hidepid:
        out.append(f"/proc is mounted with hidepid={s.hidepid}, which hides other users' "
                   "processes (systemd: ProtectProc=); only this user's processes were scanned")
    if s.unreadable:
        how = ("the kernel refused even with CAP_SYS_PTRACE (another user namespace or a "
               "security module)" if ptrace else
               "run it as root (or with CAP_SYS_PTRACE) to see who they are")
        detail = ", ".join(f"{n} {e}" for e, n in sorted(s.errors.items()))
        out.append(f"could not read the memory maps of "
                   f"{_count(s.unreadable, 'process', 'processes')} ({detail}); "
                   f"{how}")
    if s.unscanned:
        out.append(f"{s.unscanned} processes were not scanned: the scan ran out of time")
    return out
