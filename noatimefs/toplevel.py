"""SOURCE's top-level listing, kept between readdirs and kept right by the inotify watch.

The top level is a store's biggest directory (10⁵ paths and more) and the one
callers list most (``ls``, shell globs and completion, garbage collectors), and
GNU find opens it again each time it climbs back out of a store path. It is
also the one directory whose entries come and go. So it is listed from SOURCE
once, and then kept up to date name by name from the events of
:class:`noatimefs.watch.TopLevelWatch`: each event that names an entry (created,
deleted, moved in or out, its attributes or data changed) makes :meth:`changed`
``lstat`` that name again and add, replace or drop its entry. An overflowed
event queue (``IN_Q_OVERFLOW``) drops the whole listing; the next readdir lists
SOURCE again. Without a watch (it could not be set up, or the daemon has not
started it yet) or with ``--timeout 0`` nothing is kept: every readdir lists
afresh. A kept listing also expires after ``--timeout`` seconds, as entries
and attributes do in the kernel (a store path being built changes its own
times and link count without an event at the top level). An expiry leaves
:attr:`TopLevel.version` as it is: the names are still right (the watch ran),
so the kernel's copy of them stays good, and the listing made next is of the
same version.

The daemon reads the watch's queue before it serves a kept listing (see
``NoatimeFS._top_events``), and the kernel queues an inotify event before the
call that changed SOURCE returns: so a listing never misses a change made
before it was asked for. A lookup at the top level is answered from the kept
listing the same way (:meth:`TopLevel.by_name`): the entry, or ``ENOENT``.

A listing is made outside the request loop (a worker thread, see ``fs.py``),
and events may come meanwhile: :meth:`begin` opens a :class:`Build` that
records the names they touch, and :meth:`install` applies those to the fresh
listing before keeping it (or keeps nothing, if the queue overflowed or the
watch was not running when the listing began).

The kept list is in cookie order (:mod:`noatimefs.listing`, "Offsets") and
each change is made in it in place, at its place by cookie: a handle part way
through goes on in the changed list. :attr:`TopLevel.version` counts the
changes (the stamp of the kernel's copy of the listing, see
``listing.kernel_cache``).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from noatimefs.listing import Entry, entry_cookie, make_entry
from noatimefs.source import identify


@dataclass
class Build:
    """A listing of the top level being made: the names that changed meanwhile."""

    names: set[bytes] = field(default_factory=set)
    spoiled: bool = False  # it must not be kept


class TopLevel:
    def __init__(self, root_fd: int, timeout: float) -> None:
        self.root_fd = root_fd
        self.timeout = timeout
        self.watching = False  # set by the daemon while its watch runs
        self._by_name: dict[bytes, Entry] | None = None  # None: nothing kept
        self._list: list[Entry] | None = None  # _by_name's values, in cookie order
        self.version = 0  # + 1 at each change of the names kept, and at each drop
        self._expires = 0.0
        self._builds: list[Build] = []
        self.listed = 0  # listings made from SOURCE
        self.updated = 0  # entries listed again one by one, from events

    def __len__(self) -> int:
        return len(self._by_name) if self._by_name is not None else 0

    def entries(self) -> list[Entry] | None:
        """The kept listing, or None: then list SOURCE (:meth:`begin`, :meth:`install`)."""
        if self._by_name is None:
            return None
        if time.monotonic() >= self._expires:
            # Its attributes may be old now (a store path being built changes its own
            # times without an event here), but its names are still SOURCE's: the watch
            # ran throughout. The version stays: a copy the kernel holds of the names is
            # still right, and so is the listing made next (see install).
            self._by_name = None
            self._list = None
            return None
        return self._list

    def by_name(self) -> dict[bytes, Entry] | None:
        """The kept entries by name (as :meth:`entries`), or None: then ask SOURCE.

        A lookup answers from them, a missing name included, once the watch's
        queued events are applied: they hold every name SOURCE's top level has.
        """
        return self._by_name if self.entries() is not None else None

    def holds(self, entries: list[Entry] | None) -> bool:
        """Whether *entries* is the kept list (the one changes are made in)."""
        return entries is not None and entries is self._list

    def begin(self) -> Build:
        """Before listing SOURCE's top level: record what changes meanwhile."""
        build = Build(spoiled=not self.watching or self.timeout <= 0)
        self._builds.append(build)
        return build

    def install(self, build: Build, entries: list[Entry]) -> list[Entry]:
        """Keep *entries* (in cookie order, as ``list_dir`` gives them), listed since
        :meth:`begin` gave *build*; the list to serve."""
        self._builds.remove(build)
        if build.spoiled:
            return entries
        # No new version: since the last one (a drop, an expiry, a change) the watch has
        # run throughout (a build it did not see is spoiled), so these are the names
        # that version stands for; changes made meanwhile are applied below.
        self.listed += 1
        self._by_name = {entry[0]: entry for entry in entries}
        self._list = entries
        self._expires = time.monotonic() + self.timeout
        for name in build.names:
            self._relist(name)
        return self.entries() or entries

    def changed(self, name: bytes) -> None:
        """An event says the entry *name* may have changed: list it again."""
        for build in self._builds:
            build.names.add(name)
        if self._by_name is not None:
            self._relist(name)

    def drop(self) -> None:
        """Forget the listing (and spoil those being made): the next readdir lists SOURCE."""
        self.version += 1
        self._by_name = None
        self._list = None
        for build in self._builds:
            build.spoiled = True

    def _relist(self, name: bytes) -> None:
        assert self._by_name is not None
        assert self._list is not None
        try:
            st, incarnation = identify(self.root_fd, name)
        except FileNotFoundError:
            old = self._by_name.pop(name, None)
            if old is not None:
                del self._list[self._place(old)]
                self.version += 1
            return
        except OSError:
            self.drop()  # cannot tell: list it all again when asked
            return
        self.updated += 1
        self.version += 1
        entry = make_entry(name, st, incarnation, self.timeout)
        old = self._by_name.get(name)
        self._by_name[name] = entry
        if old is not None:
            self._list[self._place(old)] = entry
        else:
            bisect.insort_right(self._list, entry, key=entry_cookie)

    def _place(self, entry: Entry) -> int:
        """The index of *entry* (which is kept) in the list."""
        assert self._list is not None
        index = bisect.bisect_left(self._list, entry_cookie(entry), key=entry_cookie)
        while self._list[index] is not entry:  # another name with the same cookie
            index += 1
        return index
