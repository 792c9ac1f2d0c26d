"""Memory the kernel reads from and writes into: page-aligned buffers and slabs.

A buffer is an anonymous mmap, so it is page-aligned and fit for O_DIRECT,
and it stays mapped for as long as anything (an op, a slice) refers to it:
the kernel may write into it until the op completes.
"""

from __future__ import annotations

import ctypes
import mmap

PAGE_SIZE = mmap.PAGESIZE

# O_DIRECT's smallest alignment. A size that is a multiple of the page size
# keeps every buffer of a slab page-aligned; any other size can only work on
# a device with 512-byte logical blocks, which is what 512 gives.
SLAB_ALIGNMENT = 512


class Buffer:
    """Memory the kernel reads from or writes into, kept alive by its owner.

    Backed by an anonymous mmap, so it is page-aligned and fit for O_DIRECT.
    ``slice`` gives a view at an offset (used to make a deliberately
    misaligned buffer) that keeps the parent mapping alive.
    """

    __slots__ = ("_map", "_parent", "address", "size", "view")

    def __init__(self, size: int, *, _parent: Buffer | None = None, _offset: int = 0) -> None:
        if size <= 0:
            raise ValueError("buffer size must be positive")
        self._parent = _parent
        if _parent is None:
            self._map: mmap.mmap | None = mmap.mmap(-1, size)
            base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            self.view = memoryview(self._map)
            self.address = base
        else:
            self._map = None
            self.view = _parent.view[_offset:_offset + size]
            self.address = _parent.address + _offset
        self.size = size

    def slice(self, offset: int, size: int) -> Buffer:
        if offset < 0 or offset + size > self.size:
            raise ValueError("slice outside the buffer")
        return Buffer(size, _parent=self, _offset=offset)

    def bytes(self) -> bytes:
        return self.view.tobytes()


def aligned_buffer(size: int, alignment: int = PAGE_SIZE) -> Buffer:
    """A buffer of at least size bytes aligned for O_DIRECT (page-aligned)."""
    if alignment > PAGE_SIZE or PAGE_SIZE % alignment:
        raise ValueError(f"alignment must divide the page size ({PAGE_SIZE})")
    return Buffer(size)


def aligned_buffers(count: int, size: int) -> list[Buffer]:
    """count buffers of size bytes carved from one mapping (a slab), each aligned for O_DIRECT.

    One mapping per buffer runs into vm.max_map_count (65530 by default): a
    randrw job at iodepth 33000 needs 66000 buffers. A slab is one mapping
    however many buffers it holds. Raises MemoryError when the memory cannot
    be mapped.
    """
    if count <= 0:
        return []
    stride = -(-size // SLAB_ALIGNMENT) * SLAB_ALIGNMENT
    try:
        slab = Buffer(stride * count)
    except OSError as e:
        raise MemoryError(f"cannot map {count} buffers of {size} bytes "
                          f"({stride * count} bytes): {e.strerror}") from None
    return [slab.slice(i * stride, size) for i in range(count)]
