"""Directory listings: what is kept of each entry, and how readdir presents it.

A listing is made once (``scandir`` and an ``lstat`` per entry) and may be
served many times (:mod:`noatimefs.dircache`, :mod:`noatimefs.toplevel`), to
callers the daemon presents entries to differently. So a kept entry holds only
facts of SOURCE, independent of who asks (:data:`Entry`):

``(name, key, mode, uid, gid, attr, cookie)``
    the name; the backing identity ``(st_dev, st_ino, incarnation)``
    (:mod:`noatimefs.inodes`); the *real*
    ``st_mode``, ``st_uid`` and ``st_gid``; one ``pyfuse3.EntryAttributes``
    holding every other field readdir sends (size, link count, times, block
    counts, timeouts); and the name's cookie (below), computed once.

:func:`reply` presents them per request: right before each
``pyfuse3.readdir_reply`` it sets the node id, the generation and the
presented uid, gid and mode (:func:`noatimefs.policy.present`, cached) on the
entry's one ``EntryAttributes``. That is safe because ``readdir_reply`` copies
the attributes into the reply buffer, and no other handler runs during the
loop (it has no ``await``). The consumer to present to is a parameter, so
listings can be shared by callers presented differently.

Offsets
-------
A readdir offset (the kernel's ``d_off``, "where to go on from") is not an
index but the cookie of the entry's name, a keyed 63-bit hash
(:func:`noatimefs.order.cookie`, which the walk-ahead helper orders by too), and
every listing is in cookie order (:func:`in_cookie_order`). So an offset means the same in
every listing of a directory, as a hashed directory's offsets do on ext4: a
handle can go on from an offset in a newer listing, where names added or
removed meanwhile may or may not show but no other name is skipped or repeated.
That is what lets the kernel keep listings (below), and lets the kept top level
be edited in place. Two names of one directory with the same cookie (odds of
about n²/2⁶⁴) would lose the second when a readdir resumes between them.

The kernel's listing cache
--------------------------
The kernel may serve ``getdents`` from its own copy of a listing
(:mod:`noatimefs.kernelcache`): cookies are what keeps such a copy right
when it was filled from more than one listing.
"""

from __future__ import annotations

import bisect
import operator
import os
from collections.abc import Callable

import pyfuse3

from noatimefs import policy
from noatimefs.inodes import Identity, InodeTable, Node, identity
from noatimefs.order import cookie
from noatimefs.source import identify

#: A kept listing entry: (name, identity, real mode, real uid, real gid, the other
#: attributes, the name's cookie).
Entry = tuple[bytes, Identity, int, int, int, pyfuse3.EntryAttributes, int]


def make_entry(name: bytes, st: os.stat_result, incarnation: bytes | None, timeout: float) -> Entry:
    """The kept facts of *name*, ``lstat``-ed as *st*."""
    attr = attributes(st, timeout)
    key = identity(st, incarnation)
    return (name, key, st.st_mode, st.st_uid, st.st_gid, attr, cookie(name))


def attributes(st: os.stat_result, timeout: float) -> pyfuse3.EntryAttributes:
    """The attributes of *st* that do not depend on who asks (no id, owner or mode yet)."""
    attr = pyfuse3.EntryAttributes()
    attr.entry_timeout = timeout
    attr.attr_timeout = timeout
    attr.st_nlink = st.st_nlink
    attr.st_rdev = st.st_rdev
    attr.st_size = st.st_size
    attr.st_blksize = st.st_blksize
    attr.st_blocks = st.st_blocks
    attr.st_atime_ns = st.st_atime_ns
    attr.st_mtime_ns = st.st_mtime_ns
    attr.st_ctime_ns = st.st_ctime_ns
    return attr


#: An entry's cookie: the readdir offset that goes on after it.
entry_cookie: Callable[[Entry], int] = operator.itemgetter(6)


def in_cookie_order(entries: list[Entry]) -> list[Entry]:
    """*entries*, sorted in place by cookie (the order every served listing has)."""
    entries.sort(key=entry_cookie)
    return entries


def after(entries: list[Entry], offset: int) -> int:
    """The index in *entries* (in cookie order) where a readdir at *offset* goes on."""
    return bisect.bisect_right(entries, offset, key=entry_cookie) if offset else 0


def list_dir(fd: int, timeout: float) -> list[Entry]:
    """The entries of the directory open (for reading) on *fd*, in cookie order.

    Touches no daemon state, so it may run in a worker thread.
    """
    entries = []
    with os.scandir(fd) as it:
        for dirent in it:
            name = os.fsencode(dirent.name)
            try:
                st, incarnation = identify(fd, name)
            except FileNotFoundError:
                continue  # removed since it was listed
            entries.append(make_entry(name, st, incarnation, timeout))
    return in_cookie_order(entries)


#: Called as present(mode, uid, gid, consumer) -> presented (uid, gid, mode).
Presenter = Callable[[int, int, int, policy.Consumer], tuple[int, int, int]]


def reply(
    token: pyfuse3.ReaddirToken,
    parent: Node,
    entries: list[Entry],
    start: int,
    consumer: policy.Consumer,
    inodes: InodeTable,
    present: Presenter = policy.present,
) -> int:
    """Send *entries* (in cookie order) after offset *start*, presented to *consumer*.

    How many were sent. An entry is remembered in *inodes* (the kernel's lookup
    count + 1) only once the kernel has taken it: readdirplus counts as a lookup
    of each entry it returns.
    """
    sent = 0
    for index in range(after(entries, start), len(entries)):
        name, key, mode, uid, gid, attr, offset = entries[index]
        ctime_ns = attr.st_ctime_ns
        node_id, attr.generation = inodes.peek(key, mode, ctime_ns, parent.view.tag)
        attr.st_ino = pyfuse3.InodeT(node_id)
        attr.st_uid, attr.st_gid, attr.st_mode = present(mode, uid, gid, consumer)
        if not pyfuse3.readdir_reply(token, name, attr, offset):
            break  # not sent: the table must not learn of it
        inodes.remember_key(parent, name, key, mode, ctime_ns, node_id)
        sent += 1
    return sent
