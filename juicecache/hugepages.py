"""Large buffers in transparent huge pages: filling one takes 512 times fewer page faults.

A process writing to memory it has not used yet takes a page fault per 4 KiB page: ~3 µs each
on the benchmark's machine, 0.2 s for 256 MiB, four times what reading those bytes from the
page cache costs. Linux maps 2 MiB pages instead where a mapping asks for them (`MADV_HUGEPAGE`,
honoured when /sys/kernel/mm/transparent_hugepage/enabled is `madvise` or `always`): 256 MiB
are then filled in ~0.05 s. A large hit fills the buffer it reads its file into, then what
`pickle` builds from it; a bytes result, only the object it returns (`new_bytes`). A large write
fills one, the pickle (none for a bytes result, see `bytespickle`). Without the advice (not
Linux, or THP off) they are plain memory.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

HUGE_PAGE = 1 << 21
# Content this large is read into memory of its own (`allocate`); a smaller one, into a bytearray.
OWN_BUFFER_BYTES = 1 << 22
# Memory that malloc gave out is advised only from this size up: glibc serves it from a mapping of
# its own, unmapped when freed (its mmap threshold never exceeds 32 MiB), so the advice never
# outlives the buffer on memory the allocator hands out again.
MALLOC_BYTES = 1 << 25
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)


class HugeBuffer(mmap.mmap):
    """Private anonymous memory, unmapped once nothing refers to it (nor an array unpickled
    from it). Bytes-like, and it decodes as bytes do: Prefect's JSON serializer decodes the
    payload it is given."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return str(self, encoding, errors)


def allocate(size: int) -> HugeBuffer:
    """`size` writable bytes (at least one), in huge pages where the system gives them."""
    if _ADVICE is None:
        return HugeBuffer(-1, size)
    # Mapped as a whole number of huge pages, recent Linux (6.18 here) places it on a huge page
    # boundary, where the first one can start; then shrunk to `size` in place.
    whole = -(-size // HUGE_PAGE) * HUGE_PAGE
    buffer = HugeBuffer(-1, whole, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(_ADVICE)
    if whole != size:
        buffer.resize(size)
    return buffer


def advise(memory: memoryview) -> None:
    """Ask for huge pages under the 2 MiB pages that `memory` covers whole: memory malloc gave
    out, not touched yet (a bytes object `pickle` is about to fill), from `MALLOC_BYTES` up."""
    if _ADVICE is None or memory.nbytes < MALLOC_BYTES:
        return
    start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    skip = -start % HUGE_PAGE
    _libc().madvise(ctypes.c_void_p(start + skip), ctypes.c_size_t((memory.nbytes - skip) // HUGE_PAGE * HUGE_PAGE), _ADVICE)


def new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new bytes object of `size` bytes, not filled yet, and a writable view of them, to fill
    before anything else sees the object; its memory is advised into huge pages (`advise`).

    Python has no way to fill a bytes object in place, so this asks the C API for one as C code
    does (`PyBytes_FromStringAndSize(NULL, size)`, then writes: how `os.read` builds its own). A
    large hit reads its file straight into the object it returns (see `bytespickle`), where
    reading into a buffer and copying would cost ~100 ms more for 256 MiB.
    """
    value = _new_bytes(None, size)
    # A bytes object's data starts at `ob_sval`, its last field: the object's size less the NUL after the data.
    view = _memory_at(id(value) + bytes.__basicsize__ - 1, size, _WRITABLE)
    advise(view)
    return value, view


def extend(array: bytearray, data: memoryview) -> None:
    """`array += data` (bytes), the new memory advised (`advise`) before the copy touches it: a
    bytearray grows in place (`PyByteArray_Resize`), where `+=` would grow and copy at once.

    It grows by a huge page more than `data`, then shrinks back (keeping the memory): small
    writes that follow fit, where growing again would move it (30 ms for 64 MiB here)."""
    end = len(array)
    for size in (end + data.nbytes + HUGE_PAGE, end + data.nbytes):
        ctypes.pythonapi.PyByteArray_Resize(ctypes.py_object(array), ctypes.c_ssize_t(size))
    with memoryview(array) as view:
        advise(view[end:])
        view[end:] = data


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes, _new_bytes.restype = [ctypes.c_char_p, ctypes.c_ssize_t], ctypes.py_object
_memory_at = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_at.argtypes, _memory_at.restype = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int], ctypes.py_object
_WRITABLE = 0x200  # PyBUF_WRITE


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)
