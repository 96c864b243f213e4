"""The inode table: which backing files the kernel remembers, under which node ids.

What is kept per remembered inode (a :class:`Node`, ``__slots__``, no descriptor):
its FUSE node id, the backing identity, one name it was last seen under (a
reference to the parent :class:`Node` plus the name), the kernel's lookup
count, a generation, the backing ``st_ctime_ns`` and how many handles are open
on it. Paths are rebuilt from the parent chain when needed, so a node costs a
few hundred bytes and holds no descriptor: the daemon pins nothing in SOURCE
beyond what callers hold open.

Identity
--------
A backing file is ``(st_dev, st_ino, incarnation)``. The incarnation is the
file handle ``name_to_handle_at`` gives (:func:`noatimefs.source.incarnation`,
its type and bytes taken as opaque): on ext4, xfs, btrfs and tmpfs it holds the
inode's generation, so a new file that reuses a freed inode number (ext4 hands
one to the next new file at once) is another identity. Every check that a path
still leads to a node compares the incarnation too.

Node ids
--------
One node per identity the kernel knows in each view (:mod:`noatimefs.views`).
A new node gets its *preferred* id, ``(tag << 48) | st_ino``, when no
remembered node holds that id, and otherwise a *spill* id from a counter above
``1 << 63``. The tag numbers, in order of discovery, the tag key of the
identity in its view (:meth:`InodeTable.tag_key`: the view and the backing
device). With one view (``--owner``), SOURCE's own filesystem is tag 0, so
``stat`` through the mount shows the source's inode numbers and a hard link is
one inode; with ``--per-user`` each view numbers its own tags, so the same
backing file in two views is two inodes, each with its own presented owner in
the kernel.
Identities no preferred id can hold (an inode number above 48 bits, the root's
id, more than 32767 tags) get a spill id remembered for the daemon's life. The
root is always 1.

So a recycled inode number is always a *different* node id while the kernel
still remembers the old file, never a different answer under the old id: the
old node's requests go to the old name (gone, or another identity there:
``ESTALE``). The new file keeps its spill id for as long as the kernel
remembers it; looked up again after that, it gets its preferred id if free.
Spill ids are never reused.

Settled files
-------------
Asking for the incarnation is one more system call on every open, getattr,
opendir and readlink. It is skipped for a file found with the ctime it had when its
incarnation was last seen to match, if that ctime was *settled* then: at
least :data:`SETTLE_NS` older than the kernel's coarse clock read while the
file was held (:func:`settled`). A file that reuses the number was made after
the old one was gone, so after that clock reading, and its ctime is at least
that reading less the filesystem's timestamp granularity (at most 2 s):
newer than the settled ctime, which it cannot equal. This holds only where
this kernel's clock stamps the ctime (:data:`noatimefs.source.LOCAL_FILESYSTEMS`)
and the clock is not set back past it; elsewhere the incarnation is always
asked. A store's files settle two seconds after they are made; a new or just
changed file is checked in full.

Without a handle
----------------
Where the filesystem gives none (``EOPNOTSUPP``: kernels before 6.7 on a
filesystem without export support), the incarnation is None; where it keeps
no generation (9p, or a FUSE filesystem that reports none) the handle tells no
more than the inode number. There a recycled number is the same identity,
caught only by a heuristic: when a lookup finds the identity it remembers
with another file type, or (for a non-directory no handle is open on) another
``st_ctime_ns``, the node's generation is bumped, and since the kernel
compares the generation of every entry reply with the inode it holds
(``fuse_stale_inode``) it retires the old inode and its page cache instead of
serving the old bytes under the new name. A new file of the same type whose
ctime equals the old one's (created within the same clock tick as the old
one's last change), or a request the kernel had in flight while the daemon
answered the new file's lookup, slips through: a caller holding the old name
may then be answered with the new file's link text, attributes or bytes.

The heuristic runs on every filesystem: a file changed in place gets a new
generation too, and the kernel drops its cached pages. A file with an open
handle cannot have its number reused (the handle keeps the old inode alive),
so open files are never disturbed.

A node whose lookup count drops to zero is removed from the table, and its id
is free again; children still remembered keep it alive through their parent
reference, so their paths can always be rebuilt.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING

from noatimefs.kernelcache import Cached, Copy

if TYPE_CHECKING:
    from noatimefs.views import View

ROOT_ID = 1
_TAG_SHIFT = 48
_INO_MASK = (1 << _TAG_SHIFT) - 1
_MAX_TAGS = 1 << 15
_SPILL_BASE = 1 << 63

#: A backing file: ``(st_dev, st_ino, incarnation)`` (see the module docstring).
Identity = tuple[int, int, "bytes | None"]

#: How much older than the clock a ctime must be to be settled: the coarsest timestamp
#: granularity of the local filesystems (FAT's 2 s; ext4, xfs, btrfs, tmpfs: 1 ns or 1 s).
SETTLE_NS = 2_000_000_000
_CLOCK_REALTIME_COARSE = 5  # the clock file times are taken from (Linux; not in os or time)


def clock() -> int:
    """The kernel's coarse real-time clock, in ns: what a file's ctime is stamped from."""
    return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)


def settled(ctime_ns: int, alive_at: int) -> bool:
    """Whether a file with ctime *ctime_ns*, known to exist at :func:`clock` *alive_at*,
    can be told from every later file with its inode number by the ctime alone
    (module docstring, "Settled files")."""
    return ctime_ns <= alive_at - SETTLE_NS


def identity(st: os.stat_result, incarnation: bytes | None) -> Identity:
    return (st.st_dev, st.st_ino, incarnation)


class Node:
    __slots__ = (
        "id",
        "key",
        "parent",
        "name",
        "nlookup",
        "gen",
        "ctime_ns",
        "fmt",
        "opens",
        "view",
        "cached",
        "settled",
    )

    def __init__(
        self,
        node_id: int,
        key: Identity,
        parent: Node | None,
        name: bytes,
        mode: int,
        ctime_ns: int,
        view: View,
    ) -> None:
        self.id = node_id
        self.key = key
        self.parent = parent
        self.name = name
        self.nlookup = 0
        self.gen = 0
        self.ctime_ns = ctime_ns
        self.fmt = stat.S_IFMT(mode)
        self.opens = 0
        self.view = view  # the presentation this node belongs to (views.py)
        #: A directory: what the kernel holds of its listing (kernelcache).
        self.cached: Cached = Copy.UNKNOWN
        #: The settled ctime its incarnation was last seen with, or None (module docstring).
        self.settled: int | None = None

    def path(self) -> bytes:
        """The path relative to SOURCE this node was last seen under (``b""``: a root).

        A node without a parent is SOURCE's root in its view.
        """
        parts = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        parts.reverse()
        return b"/".join(parts)

    def is_backed_by(self, st: os.stat_result, incarnation: bytes | None) -> bool:
        """Whether a file found by path (its stat and incarnation) is this node's."""
        return (st.st_dev, st.st_ino, incarnation) == self.key

    def is_settled_as(self, st: os.stat_result) -> bool:
        """Whether a file found by path is this node's without asking its incarnation: its
        inode number, with the settled ctime (module docstring, "Settled files")."""
        return (
            st.st_ctime_ns == self.settled and st.st_ino == self.key[1] and st.st_dev == self.key[0]
        )

    def seen(self, ctime_ns: int, alive_at: int) -> None:
        """This node's incarnation was just seen to match, with *ctime_ns*, in a file held at
        :func:`clock` *alive_at*, on a filesystem whose ctimes this kernel stamps."""
        self.settled = ctime_ns if settled(ctime_ns, alive_at) else None


class InodeTable:
    """The nodes the kernel knows, in every view.

    *view* is the view whose SOURCE root is the mount's root (node 1, view tag
    0); with ``--per-user`` node 1 is the daemon's own root directory instead,
    still keyed as SOURCE's root, and each view's root is added with
    :meth:`add_root`.
    """

    def __init__(
        self, root_st: os.stat_result, view: View, root_incarnation: bytes | None = None
    ) -> None:
        self._tags: dict[Hashable, int] = {}
        self._spilled: dict[tuple[int, Identity], int] = {}  # those no preferred id can hold
        self._next_spill = _SPILL_BASE
        root_key = identity(root_st, root_incarnation)
        self._tag(self.tag_key(root_key, view.tag))  # SOURCE's own filesystem is tag 0
        self.root = Node(ROOT_ID, root_key, None, b"", root_st.st_mode, root_st.st_ctime_ns, view)
        self.root.nlookup = 1  # the kernel never forgets the root
        self._nodes: dict[int, Node] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, Identity], Node] = {(view.tag, root_key): self.root}

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes.values())

    def get(self, node_id: int) -> Node:
        """The node with *node_id*; ``KeyError`` if the kernel cannot know it."""
        return self._nodes[node_id]

    # -- node ids ----------------------------------------------------------

    @staticmethod
    def tag_key(key: Identity, view_tag: int) -> Hashable:
        """What the tag of *key*'s preferred node id numbers: its view and backing device."""
        return (view_tag, key[0])

    def _tag(self, tag_key: Hashable) -> int | None:
        """The tag of *tag_key*, numbered in order of discovery; None once all are taken."""
        tag = self._tags.get(tag_key)
        if tag is None and len(self._tags) < _MAX_TAGS:
            tag = self._tags[tag_key] = len(self._tags)
        return tag

    def preferred_id(self, tag_key: Hashable, ino: int) -> int | None:
        """``(tag << 48) | ino``, or None where that cannot be a node id of its own."""
        tag = self._tag(tag_key)
        if tag is None or not 0 < ino <= _INO_MASK:
            return None
        node_id = (tag << _TAG_SHIFT) | ino
        return None if node_id == ROOT_ID else node_id

    def _new_id(self, key: Identity, view_tag: int, *, take: bool) -> int:
        """The id a new node of *key* gets: its preferred id if no node holds it, else a spill id.

        With *take* false nothing changes, and the same id is given to the
        next call that takes one (see :meth:`peek`).
        """
        preferred = self.preferred_id(self.tag_key(key, view_tag), key[1])
        if preferred is not None and preferred not in self._nodes:
            return preferred
        if preferred is None:
            spilled = self._spilled.get((view_tag, key))
            if spilled is not None:
                return spilled
        node_id = self._next_spill
        if take:
            self._next_spill += 1
            if preferred is None:
                self._spilled[view_tag, key] = node_id
        return node_id

    def listed_ino(self, key: Identity, view_tag: int = 0) -> int:
        """The ``d_ino`` to list for a file by its device and inode number alone (a bare
        entry, :mod:`noatimefs.listing`): its preferred id, what a lookup of it gives unless
        another file holds that id; its inode number where no preferred id can be."""
        preferred = self.preferred_id(self.tag_key(key, view_tag), key[1])
        return key[1] if preferred is None else preferred

    def node_id(self, key: Identity, view_tag: int = 0) -> int:
        """The node id a lookup of *key* in view *view_tag* would give now (changing nothing)."""
        node = self._by_key.get((view_tag, key))
        return node.id if node is not None else self._new_id(key, view_tag, take=False)

    def add_root(
        self, view: View, root_st: os.stat_result, incarnation: bytes | None = None
    ) -> Node:
        """Remember SOURCE's root in *view* (``--per-user``; lookup count + 1)."""
        key = identity(root_st, incarnation)
        node = self._by_key.get((view.tag, key))
        if node is None:
            node_id = self._new_id(key, view.tag, take=True)
            node = Node(node_id, key, None, b"", root_st.st_mode, root_st.st_ctime_ns, view)
            self._nodes[node_id] = self._by_key[view.tag, key] = node
        view.root = node
        node.nlookup += 1
        return node

    # -- what the kernel learns and forgets --------------------------------

    def remember(
        self, parent: Node, name: bytes, st: os.stat_result, incarnation: bytes | None = None
    ) -> Node:
        """Record that the kernel now knows *name* in *parent* (lookup count + 1)."""
        key = identity(st, incarnation)
        return self.remember_key(parent, name, key, st.st_mode, st.st_ctime_ns)

    def remember_key(
        self, parent: Node, name: bytes, key: Identity, mode: int, ctime_ns: int, peeked: int = 0
    ) -> Node:
        """:meth:`remember` from the few facts it needs (a cached listing keeps no stat).

        *peeked* is the node id :meth:`peek` gave for *key* just before, with no change
        to the table since (readdir): a preferred id it gave is still free, and is taken
        without working it out again.
        """
        view = parent.view
        node = self._by_key.get((view.tag, key))
        if node is None:
            if 0 < peeked < _SPILL_BASE and peeked not in self._nodes:
                node_id = peeked
            else:
                node_id = self._new_id(key, view.tag, take=True)
            node = Node(node_id, key, parent, name, mode, ctime_ns, view)
            self._nodes[node_id] = self._by_key[view.tag, key] = node
        else:
            if node.parent is not None:
                node.parent = parent
                node.name = name
            self.refresh_from(node, mode, ctime_ns)
        node.nlookup += 1
        return node

    def _recycled(self, node: Node, fmt: int, ctime_ns: int) -> bool | None:
        """Whether news of (*fmt*, *ctime_ns*) means a new file under *node*'s number.

        None for older news (a cached listing), which teaches nothing. A new
        file type always means a new file; a new ctime does for a non-directory
        no handle is open on (an open file's number cannot be reused). Only
        where there is no incarnation can it truly be a new file; elsewhere a
        new ctime means a change in place, whose pages the kernel must drop.
        """
        if fmt == node.fmt and ctime_ns < node.ctime_ns:
            return None
        if node.parent is None:
            return False
        return fmt != node.fmt or (
            ctime_ns != node.ctime_ns and fmt != stat.S_IFDIR and node.opens == 0
        )

    def peek(self, key: Identity, mode: int, ctime_ns: int, view_tag: int = 0) -> tuple[int, int]:
        """The (node id, generation) :meth:`remember_key` would give, changing nothing.

        readdir must know what it would send before it knows whether the entry
        fits in the reply; a node created, renamed or re-generated for an entry
        the kernel never received would answer for a file the kernel does not
        know.
        """
        node = self._by_key.get((view_tag, key))
        if node is None:
            return self._new_id(key, view_tag, take=False), 0
        recycled = self._recycled(node, stat.S_IFMT(mode), ctime_ns)
        return node.id, node.gen + 1 if recycled else node.gen

    def refresh(self, node: Node, st: os.stat_result) -> bool:
        """Update *node* from a fresh stat; True if it may be a new file (generation bumped)."""
        return self.refresh_from(node, st.st_mode, st.st_ctime_ns)

    def refresh_from(self, node: Node, mode: int, ctime_ns: int) -> bool:
        fmt = stat.S_IFMT(mode)
        recycled = self._recycled(node, fmt, ctime_ns)
        if recycled is None:
            return False
        if recycled:
            node.gen += 1
        node.fmt = fmt
        node.ctime_ns = ctime_ns
        return recycled

    def forget(self, node_id: int, nlookup: int) -> None:
        node = self._nodes.get(node_id)
        if node is None or node is self.root:
            return
        node.nlookup -= nlookup
        if node.nlookup <= 0:
            del self._nodes[node_id]
            del self._by_key[node.view.tag, node.key]
