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
    A *bare* entry (below) has ``attr`` None, only the file type in ``mode``,
    -1 as uid and gid, and in ``key`` the directory's ``st_dev`` and the
    entry's ``d_ino``, with no incarnation: it is never remembered.

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

Bare entries
------------
Below the top level, a regular file or symlink is listed *bare*: its name,
type and inode number from ``getdents`` alone, no ``lstat`` and no
incarnation (:func:`list_dir` with *bare_on*). :func:`reply` sends it with
node id 0, which the kernel takes as "no attributes for this entry"
(``fuse_direntplus_link``): the caller gets the name, ``d_type`` and
``d_ino``, and the kernel links no inode, so a later ``stat`` of the name is
a LOOKUP, answered from SOURCE. A walk that never stats files (``find``,
``du --inodes``, a shell glob) then costs the daemon nothing per file, and
SOURCE no ``lstat`` of it, as a plain ``getdents`` costs natively.
Directories keep their attributes: a walk goes into them. The top level is
kept whole (:mod:`noatimefs.toplevel`: it answers lookups itself).

A caller that does stat what it lists (``find -printf %s``, ``ls -l``) would
pay a LOOKUP per file instead of an ``lstat`` in the listing. So
:class:`noatimefs.fs.NoatimeFS` remembers a thread that looks up a name it
was listed bare, lists the directories it opens afterwards with attributes,
and fills a bare listing it looks names up in (:func:`filled`): one
``lstat`` and handle per file, as a listing in full costs.

A bare entry presents nothing of SOURCE but what a plain READDIR would: no
owner, mode, size or times. Its ``d_ino`` is the node id a lookup of it will
most likely give (:meth:`InodeTable.listed_ino`), SOURCE's inode number with
``--owner``; a file whose preferred id is taken (a recycled number still
remembered) is looked up under a spill id, and its ``d_ino`` then differs from
its ``st_ino``, as on overlayfs without ``xino``.

pyfuse3 cannot send node id 0 with a name: the C module
(``noatimefs/_replyflags.c``) does, for an entry whose generation is
:data:`BARE`. A bare entry sent without that module would name a node the
daemon never made, so directories are listed bare only once
:func:`noatimefs.replyflags.carries_bare` has seen readdirplus entries go through
it.

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
import stat
from collections.abc import Callable

import pyfuse3

from noatimefs import policy
from noatimefs.inodes import Identity, InodeTable, Node, identity
from noatimefs.order import cookie
from noatimefs.source import identify

#: A kept listing entry: (name, identity, real mode, real uid, real gid, the other
#: attributes, the name's cookie); a bare one has no attributes (module docstring).
Entry = tuple[bytes, Identity, int, int, int, "pyfuse3.EntryAttributes | None", int]

#: The generation that marks an entry to be sent bare (keep in step with ``_replyflags.c``):
#: no node's generation (a counter from 0) comes near it.
BARE = 1 << 63


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


def bare_entry(name: bytes, fmt: int, dev: int, ino: int) -> Entry:
    """A bare entry (module docstring): type *fmt*, inode number *ino* on device *dev*."""
    return (name, (dev, ino, None), fmt, -1, -1, None, cookie(name))


def is_bare(entry: Entry) -> bool:
    return entry[5] is None


def _bare_type(dirent: os.DirEntry[str]) -> int:
    """``S_IFREG`` or ``S_IFLNK`` if ``getdents`` told *dirent* is one, else 0.

    ``DirEntry`` tells the type without a system call where the filesystem gives
    ``d_type`` (ext4, xfs, btrfs, tmpfs do); where it does not, it ``lstat``-s.
    """
    if dirent.is_symlink():
        return stat.S_IFLNK
    if dirent.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return 0


def list_dir(fd: int, timeout: float, bare_on: int | None = None) -> list[Entry]:
    """The entries of the directory open (for reading) on *fd*, in cookie order.

    With *bare_on* (the directory's ``st_dev``), regular files and symlinks are
    bare entries (module docstring). Touches no daemon state, so it may run in a
    worker thread.
    """
    entries = []
    with os.scandir(fd) as it:
        for dirent in it:
            name = os.fsencode(dirent.name)
            if bare_on is not None and (fmt := _bare_type(dirent)):
                entries.append(bare_entry(name, fmt, bare_on, dirent.inode()))
                continue
            try:
                st, incarnation = identify(fd, name)
            except FileNotFoundError:
                continue  # removed since it was listed
            entries.append(make_entry(name, st, incarnation, timeout))
    return in_cookie_order(entries)


def filled(fd: int, entries: list[Entry], timeout: float) -> list[Entry]:
    """*entries* (of the directory open on *fd*) with every bare one listed in full, in the
    same order; a name gone since is left out."""
    full = []
    for entry in entries:
        if is_bare(entry):
            try:
                st, incarnation = identify(fd, entry[0])
            except FileNotFoundError:
                continue
            entry = make_entry(entry[0], st, incarnation, timeout)
        full.append(entry)
    return full


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
    of each entry it returns, but a bare one's (node id 0).
    """
    sent = 0
    bare: pyfuse3.EntryAttributes | None = None
    for index in range(after(entries, start), len(entries)):
        name, key, mode, uid, gid, attr, offset = entries[index]
        if attr is None:
            if bare is None:
                bare = pyfuse3.EntryAttributes()
                bare.generation = BARE
            bare.st_ino = pyfuse3.InodeT(inodes.listed_ino(key, parent.view.tag))
            bare.st_mode = mode
            if not pyfuse3.readdir_reply(token, name, bare, offset):
                break
            sent += 1
            continue
        ctime_ns = attr.st_ctime_ns
        node_id, attr.generation = inodes.peek(key, mode, ctime_ns, parent.view.tag)
        attr.st_ino = pyfuse3.InodeT(node_id)
        attr.st_uid, attr.st_gid, attr.st_mode = present(mode, uid, gid, consumer)
        if not pyfuse3.readdir_reply(token, name, attr, offset):
            break  # not sent: the table must not learn of it
        inodes.remember_key(parent, name, key, mode, ctime_ns, node_id)
        sent += 1
    return sent
