"""An inotify watch on SOURCE's top level, where a store's paths come and go.

A store's contents do not change once a path is registered; what changes is
the set of top-level entries (paths added, moved into place, collected). The
kernel may cache entries and attributes for a long time, so the daemon watches
the top level and tells the kernel to forget a name the moment it is deleted,
moved away or replaced. New names need nothing in the kernel: the daemon never
lets it cache a negative entry. The daemon's own top-level listing
(:mod:`noatimefs.toplevel`) is kept right by every event that names an entry:
created, deleted, moved in or out, attributes or data changed.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

IN_MODIFY = 0x002
IN_OPEN = 0x020
IN_ATTRIB = 0x004
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: The events that make a name the kernel caches wrong.
GONE = IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
#: What the top-level watch asks for: also new names and changed data, for the listing.
MASK = GONE | IN_CREATE | IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR

_HEADER = struct.Struct("iIII")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Event:
    wd: int  # the watch it came from
    mask: int
    name: bytes


def parse(data: bytes) -> Iterator[Event]:
    """The events in a buffer read from an inotify descriptor."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        name = data[offset : offset + length].rstrip(b"\0")
        offset += length
        yield Event(wd, mask, name)


class Inotify:
    """A non-blocking inotify descriptor."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "inotify_init1")
        self.fd: int = fd

    def add(self, path: bytes, mask: int) -> int:
        """Watch *path* for the events in *mask*; the watch descriptor."""
        wd = int(_libc.inotify_add_watch(self.fd, path, mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "inotify_add_watch")
        return wd

    def read(self) -> list[Event]:
        """Every event queued now (none if there is nothing to read)."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        return list(parse(data))

    def close(self) -> None:
        os.close(self.fd)


class TopLevelWatch(Inotify):
    """An inotify descriptor watching one directory for entries that come and go."""

    def __init__(self, dir_fd: int) -> None:
        super().__init__()
        try:
            self.add(f"/proc/self/fd/{dir_fd}".encode(), MASK)
        except OSError:
            self.close()
            raise
