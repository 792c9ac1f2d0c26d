"""Finding AIO rings in a process's mappings: /proc/PID/maps text, or the PROCMAP_QUERY ioctl.

A ring shows in /proc/PID/maps as ``/[aio]`` (``/[aio] (deleted)`` on some
kernels); its start address is the context id and its device and inode name
it across processes (a forked child keeps a copy of its parent's mapping).
Where the kernel has PROCMAP_QUERY (6.11+) it is asked for the shared
file-backed mappings only, instead of formatting every mapping as text.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from dataclasses import dataclass

from aiod.aio_ring import PAGE

AIO_MARK = b"/[aio]"


@dataclass(frozen=True)
class Ring:
    start: int          # the mapping's address: the context id
    size: int           # bytes
    dev: str
    inode: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.dev, self.inode)


def read_all(path: str) -> bytes:
    """The whole of a (proc) file, read without Python's buffering."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


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


# A check that raises, not an assert (``python -O`` drops those): the size is
# part of the ioctl number, and a wrong one would be a different request.
if ctypes.sizeof(_ProcmapQuery) != 104:  # pragma: no cover - a wrong struct above
    raise ImportError(f"aiod.procmaps: struct procmap_query is {ctypes.sizeof(_ProcmapQuery)} "
                      "bytes, the kernel's is 104")
PROCMAP_QUERY = (3 << 30) | (ctypes.sizeof(_ProcmapQuery) << 16) | (ord("f") << 8) | 17
_QUERY_SHARED_FILE = 0x08 | 0x10 | 0x20   # VMA_SHARED | COVERING_OR_NEXT_VMA | FILE_BACKED


class Querier:
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


def process_rings(path: str, querier: Querier) -> list[Ring]:
    """The AIO rings of the process whose maps file is path; OSError when it cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if querier.supported:
            got = querier.rings(fd)
            if got is not None:
                return got
        maps = _read_fd(fd)
    finally:
        os.close(fd)
    return parse_rings(maps) if AIO_MARK in maps else []
