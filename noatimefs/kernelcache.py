"""The kernel's copy of a directory's listing: when it may be kept (pure).

The kernel can serve ``getdents`` from its own copy of a FUSE directory's
listing (``FOPEN_CACHE_DIR``; carried through pyfuse3 by
:mod:`noatimefs.replyflags`). It fills the copy from the READDIR replies of any
handle opened with that flag, entry by entry, each going on where the copy ends
(by offset), and keeps it across opens while an open says
``FOPEN_KEEP_CACHE``; an open that does not makes it drop the copy. It asks the
daemon at every open, so the daemon decides there, with :func:`kernel_cache`,
and follows what each reply may have put in the copy with :func:`served`.

What the copy holds is told by a *stamp* of the listing it was filled from,
which changes whenever the listing does: a directory's ``st_ctime_ns`` (its
entries cannot change without it), or the kept top level's version (changed by
the inotify watch, :mod:`noatimefs.toplevel`). Replies of listings with another
stamp can go into one copy (a handle that opened before a change goes on
reading); offsets that mean the same in every listing
(:mod:`noatimefs.listing`) keep such a copy a listing still, each name at most
once, and the next open has it dropped.
"""

from __future__ import annotations

import enum


class Copy(enum.Enum):
    """What the kernel holds of a listing when no stamp says it."""

    EMPTY = "empty"  # dropped at an opendir: the next reply from the start fills it
    UNKNOWN = "unknown"  # a mix, or never told: the next opendir has it dropped


#: The kernel's copy of a directory's listing: a stamp, or a :class:`Copy`.
Cached = int | Copy


def kernel_cache(cached: Cached, stamp: int | None, *, alone: bool) -> tuple[bool, Cached]:
    """At an opendir: may the kernel keep its copy of the listing; what it holds after.

    *cached* is what the kernel may hold (:func:`served`), *stamp* the stamp of
    the listing now (None: it cannot be told, so no copy is kept). Keep the copy
    only if it is of the listing now; otherwise the open has the kernel drop it.
    The copy is then empty only if no other handle is open on the directory
    (*alone*): another's reply may still be on its way into it.
    """
    if stamp is not None and cached == stamp:
        return True, cached
    return False, Copy.EMPTY if alone else Copy.UNKNOWN


def served(cached: Cached, stamp: int | None) -> Cached:
    """After a READDIR reply of a listing with *stamp*: what the kernel's copy holds.

    The reply may have gone into the copy: an empty copy becomes *stamp*'s; one
    of another listing becomes a mix, known by no stamp.
    """
    if stamp is None:
        return Copy.UNKNOWN
    if cached is Copy.EMPTY:
        return stamp
    return cached if cached == stamp else Copy.UNKNOWN
