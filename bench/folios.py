#!/usr/bin/env python3
"""How a file's cached pages are grouped into folios: why warm FUSE reads trail native ones.

    sudo .venv/bin/python bench/folios.py FILE [FILE ...]

Maps each FILE, touches every page (so all of it is in the page cache), and
reads the physical frame of each page from ``/proc/self/pagemap`` and its flags
from ``/proc/kpageflags`` (root only): a page is either the head or a tail of a
large folio, or a small (4 KiB) folio of its own. Reading a cached file costs
per folio, so a file held in small folios reads slower from the page cache than
the same bytes held in large ones.

Measured on this benchmark's machine (kernel 6.18), ``big-0.bin`` (512 MiB):
on ext4, 96-100% of the pages in large folios (369 to 4,679 of them, by how it
was read); through noatimefs and through bindfs alike, 131,072 small folios,
whatever the mount's readahead (128 KiB or 8 MiB). The kernel's FUSE page cache
uses no large folios here; that, not the daemon, is why a warm ``big_seq``
trails native in every FUSE mode.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
from collections.abc import Sequence

PAGE = mmap.PAGESIZE
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def folios(path: str) -> tuple[int, int, int]:
    """(large-folio heads, large-folio tails, small folios) of *path*'s pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
    finally:
        os.close(fd)
    heads = tails = small = 0
    try:
        for off in range(0, size, PAGE):
            ctypes.c_char.from_address(addr + off).value  # noqa: B018 - fault the page in
        with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kflags:
            for i in range(size // PAGE):
                pagemap.seek(((addr // PAGE) + i) * 8)
                (entry,) = struct.unpack("Q", pagemap.read(8))
                if not entry >> 63 & 1:
                    continue  # not present
                kflags.seek((entry & ((1 << 55) - 1)) * 8)
                (flags,) = struct.unpack("Q", kflags.read(8))
                if flags >> KPF_COMPOUND_HEAD & 1:
                    heads += 1
                elif flags >> KPF_COMPOUND_TAIL & 1:
                    tails += 1
                else:
                    small += 1
    finally:
        _libc.munmap(addr, size)
    return heads, tails, small


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    for path in argv:
        heads, tails, small = folios(path)
        pages = heads + tails + small
        share = (heads + tails) / pages if pages else 0.0
        print(
            f"{path}: {pages} pages; {heads} large folios holding {share:.0%} of them; "
            f"{small} small folios"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
