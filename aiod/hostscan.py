"""Who holds the host's kernel AIO events: a scan of /proc/*/maps.

Every kernel AIO context maps its completion ring into its owner's address
space; /proc/PID/maps shows it as ``/[aio]`` (``/[aio] (deleted)`` on some
kernels). The ring's size gives bounds on what io_setup asked for, and so on
what the context charges to fs.aio-nr (fs/aio.c):

    E = 2 * max(n, 4 * C) + 2         ring slots, C = possible CPUs
    P = ceil((32 + 32 * E) / 4096)    ring pages (32-byte header + events)

so a ring of P pages means ``n <= 64*P - 2``, and ``n >= 64*(P-1) - 1`` when
that is above ``4*C`` (below it, any n from 1 up gives the same ring).
Since Linux 4.12 io_setup(n) charges exactly n; before, it charged
``2 * max(n, 4*C)``.

A forked child keeps a copy of its parent's ring mapping but owns no context:
rings are counted once per (device, inode), for the oldest process mapping it.

Nothing here needs privileges: a maps file that cannot be read is counted as
unreadable, a process that exits mid-scan is skipped. Where the kernel has
PROCMAP_QUERY (6.11+) it is asked for the shared file-backed mappings only,
instead of formatting every mapping as text; only processes that hold rings
get their comm, cgroup and start time read.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PAGE = mmap.PAGESIZE
AIO_MARK = b"/[aio]"


# ------------------------------------------------------------------ the ring
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


@dataclass(frozen=True)
class Ring:
    start: int          # the mapping's address: the context id
    size: int           # bytes
    dev: str
    inode: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.dev, self.inode)


def parse_rings(maps: bytes) -> list[Ring]:
    """The AIO rings in the text of one /proc/PID/maps."""
    rings = []
    pos = maps.find(AIO_MARK)
    while pos >= 0:
        start_of_line = maps.rfind(b"\n", 0, pos) + 1
        fields = maps[start_of_line:pos].split()
        # address perms offset dev inode
        if len(fields) >= 5:
            a, _, b = fields[0].partition(b"-")
            try:
                lo, hi = int(a, 16), int(b, 16)
                rings.append(Ring(lo, hi - lo, fields[3].decode(), int(fields[4])))
            except ValueError:
                pass
        pos = maps.find(AIO_MARK, pos + len(AIO_MARK))
    return rings


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


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


# PROCMAP_QUERY (Linux 6.11+): an ioctl on an open /proc/PID/maps that returns
# one VMA at a time, filtered in the kernel. Asking only for shared,
# file-backed VMAs (AIO rings are both; a process's libraries, heap and stack
# are not) skips formatting the whole maps text, most of a scan's cost.
class _ProcmapQuery(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("query_flags", ctypes.c_uint64),
                ("query_addr", ctypes.c_uint64), ("vma_start", ctypes.c_uint64),
                ("vma_end", ctypes.c_uint64), ("vma_flags", ctypes.c_uint64),
                ("vma_page_size", ctypes.c_uint64), ("vma_offset", ctypes.c_uint64),
                ("inode", ctypes.c_uint64), ("dev_major", ctypes.c_uint32),
                ("dev_minor", ctypes.c_uint32), ("vma_name_size", ctypes.c_uint32),
                ("build_id_size", ctypes.c_uint32), ("vma_name_addr", ctypes.c_uint64),
                ("build_id_addr", ctypes.c_uint64)]


assert ctypes.sizeof(_ProcmapQuery) == 104
PROCMAP_QUERY = (3 << 30) | (ctypes.sizeof(_ProcmapQuery) << 16) | (ord("f") << 8) | 17
_QUERY_SHARED_FILE = 0x08 | 0x10 | 0x20   # VMA_SHARED | COVERING_OR_NEXT_VMA | FILE_BACKED


class _Querier:
    """Rings of one process through PROCMAP_QUERY; ``supported`` False once the
    kernel says it has no such ioctl (the caller then reads the maps text)."""

    def __init__(self) -> None:
        self.q = _ProcmapQuery()
        self.name = ctypes.create_string_buffer(4096 + 1)
        self.name_addr = ctypes.addressof(self.name)
        self.supported = True

    def rings(self, fd: int) -> list[Ring] | None:
        """None when the ioctl is not available here."""
        q, addr = self.q, 0
        out: list[Ring] = []
        while True:
            q.size = ctypes.sizeof(q)
            q.query_flags = _QUERY_SHARED_FILE
            q.query_addr = addr
            q.vma_name_size = len(self.name)
            q.vma_name_addr = self.name_addr
            q.build_id_size = 0
            q.build_id_addr = 0
            try:
                fcntl.ioctl(fd, PROCMAP_QUERY, q)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ESRCH):
                    return out      # no more VMAs, or the process is gone
                if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP) and not out \
                        and addr == 0:
                    self.supported = False
                    return None
                if e.errno == errno.ENAMETOOLONG:   # not ours: a long path name
                    addr = q.vma_end if q.vma_end > addr else addr + PAGE
                    continue
                raise
            if self.name.raw.startswith(AIO_MARK):
                out.append(Ring(q.vma_start, q.vma_end - q.vma_start,
                                f"{q.dev_major:02x}:{q.dev_minor:02x}", q.inode))
            addr = q.vma_end


def _process_rings(path: str, querier: _Querier) -> list[Ring]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if querier.supported:
            got = querier.rings(fd)
            if got is not None:
                return got
        chunks: list[bytes] = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    maps = b"".join(chunks)
    return parse_rings(maps) if AIO_MARK in maps else []


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
    pids = [int(n) for n in os.listdir(proc) if n.isdigit()]
    unreadable = scanned = unscanned = 0
    errors: dict[str, int] = {}
    found: dict[int, list[Ring]] = {}
    querier = _Querier()
    querier.supported = use_query
    for i, pid in enumerate(pids):
        if deadline is not None and (i & 31) == 0 and clock() > deadline:
            unscanned = len(pids) - i
            break
        try:
            rings = _process_rings(f"{proc}/{pid}/maps", querier)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                continue    # exited since listdir: it holds nothing now
            unreadable += 1
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            errors[name] = errors.get(name, 0) + 1
            continue
        scanned += 1
        if rings:
            found[pid] = rings

    # A ring mapped by several processes (fork) belongs to the oldest of them.
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

    holders: list[Holder] = []
    for pid, rings in found.items():
        mine = [r for r in rings if owner.get(r.key) == pid]
        if not mine:
            continue
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
        holders.append(h)
    holders.sort(key=lambda h: (-h.events_hi, -h.events_lo, h.pid))
    return HostScan(aio_nr=nr, aio_max_nr=max_nr, processes=holders, unreadable=unreadable,
                    scanned=scanned, seconds=clock() - t0, hidepid=proc_hidepid(proc),
                    unscanned=unscanned, errors=errors)


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
