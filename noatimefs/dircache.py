"""Directory listings the daemon may serve again without asking SOURCE.

The kernel keeps its own copy of a listing (:mod:`noatimefs.kernelcache`), but
it drops it under memory pressure, at ``drop_caches``, when it forgets the
directory, and whenever SOURCE changed; the daemon then lists again. Below
SOURCE's top level a store does not change, so a listing (names and
``lstat`` results) is kept for the same time the kernel may keep entries and
attributes (``--timeout``), in a cache bounded by its total number of entries.

A listing is only served for the directory it was made from: it is kept under
the directory's identity, incarnation included (a recycled inode number is
another key, see :mod:`noatimefs.inodes`), and the caller passes the
directory's current ``st_ctime_ns``: a listing made before a change is a miss.
SOURCE's top level is not kept here: paths come and go there, and it is kept
by :mod:`noatimefs.toplevel`, right by the inotify watch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Key = Hashable  # a directory's backing identity
E = TypeVar("E")


@dataclass(slots=True)
class Listing(Generic[E]):
    ctime_ns: int  # of the directory it was made from
    entries: list[E]
    expires: float
    by_name: dict[bytes, E] | None = None  # made by the first lookup answered from it


class DirCache(Generic[E]):
    """Listings by directory identity, oldest dropped first past *max_entries* in all."""

    def __init__(self, timeout: float, max_entries: int = 100_000) -> None:
        self.timeout = timeout
        self.max_entries = max_entries
        # Oldest first. An OrderedDict, not a dict: a dict's first key is found by stepping
        # over the slots of every key deleted before it, so dropping the oldest again and
        # again costs time in proportion to what was dropped (35 µs a drop at 100,000 keys).
        self._listings: OrderedDict[Key, Listing[E]] = OrderedDict()
        self._size = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """The number of entries held, over all listings."""
        return self._size

    def get(self, key: Key, ctime_ns: int) -> Listing[E] | None:
        """The listing of the directory *key* whose ctime is now *ctime_ns*, if one is held."""
        listing = self.current(key, ctime_ns)
        if listing is None:
            self.misses += 1
        else:
            self.hits += 1
        return listing

    def current(self, key: Key, ctime_ns: int) -> Listing[E] | None:
        """:meth:`get`, uncounted (a lookup asks, and is counted by its caller)."""
        listing = self._listings.get(key)
        if listing is not None:
            if listing.expires > time.monotonic() and listing.ctime_ns == ctime_ns:
                return listing
            self.drop(key)
        return None

    def peek(self, key: Key) -> Listing[E] | None:
        """The listing held for *key*, unchecked and uncounted (for hints, never for answers)."""
        return self._listings.get(key)

    def put(self, key: Key, ctime_ns: int, entries: list[E]) -> None:
        if self.timeout <= 0 or len(entries) > self.max_entries:
            return
        self.drop(key)
        while self._listings and self._size + len(entries) > self.max_entries:
            _, oldest = self._listings.popitem(last=False)
            self._size -= len(oldest.entries)
        self._listings[key] = Listing(ctime_ns, entries, time.monotonic() + self.timeout)
        self._size += len(entries)

    def drop(self, key: Key) -> None:
        listing = self._listings.pop(key, None)
        if listing is not None:
            self._size -= len(listing.entries)

    def purge(self) -> int:
        """Drop every expired listing (an idle daemon should not keep them); how many."""
        now = time.monotonic()
        expired = [key for key, listing in self._listings.items() if listing.expires <= now]
        for key in expired:
            self.drop(key)
        return len(expired)
