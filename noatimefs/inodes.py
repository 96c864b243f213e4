"""The inode table: which backing objects the kernel remembers, under which numbers.

What is kept per remembered inode (a :class:`Node`, ``__slots__``, no descriptor):
its FUSE node id, the backing identity ``(st_dev, st_ino)``, one name it was
last seen under (a reference to the parent :class:`Node` plus the name), the
kernel's lookup count, a generation, the backing ``st_ctime_ns`` and how many
handles are open on it. Paths are rebuilt from the parent chain when needed,
so a node costs a few hundred bytes and holds no descriptor: the daemon pins
nothing in SOURCE beyond what callers hold open.

Node ids are stable: a pure function of the backing identity and the view
(:mod:`noatimefs.views`) the node belongs to. With one view (``--owner``), on
SOURCE's own filesystem the id *is* the backing ``st_ino`` (so ``stat`` through
the mount shows the source's inode numbers and a hard link is one inode);
otherwise an entry gets ``(n << 48) | st_ino`` with ``n`` numbering the (view,
device) pairs in order of discovery, so the same backing file in two views is
two inodes, each with its own presented owner in the kernel. Identities that fit neither
scheme (huge inode numbers, inode 1, too many devices) get ids from a counter
above ``1 << 63``, remembered for the daemon's life. The root is always 1.

Recycled backing inode numbers: when a lookup finds the identity it remembers
but with another file type, or (for a non-directory no handle is open on) with
another ``st_ctime_ns``, the backing inode may be a new file that reused the
number. The node's generation is bumped, and since the kernel compares the
generation of every entry reply with the inode it holds (``fuse_stale_inode``),
it retires the old inode and its page cache instead of serving the old bytes
under the new name. A file with an open handle cannot have its number reused
(the handle keeps the old inode alive), so open files are never disturbed.

A node whose lookup count drops to zero is removed from the table; children
still remembered keep it alive through their parent reference, so their paths
can always be rebuilt.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from noatimefs.views import View

ROOT_ID = 1
_DEV_SHIFT = 48
_INO_MASK = (1 << _DEV_SHIFT) - 1
_MAX_DEVS = (1 << 15) - 1
_SPILL_BASE = 1 << 63


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
    )

    def __init__(
        self,
        node_id: int,
        key: tuple[int, int],
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


class InodeTable:
    """The nodes the kernel knows, in every view.

    *view* is the view whose SOURCE root is the mount's root (node 1, view tag
    0); with ``--per-user`` node 1 is the daemon's own root directory instead,
    still keyed as SOURCE's root, and each view's root is added with
    :meth:`add_root`.
    """

    def __init__(self, root_st: os.stat_result, view: View) -> None:
        self._devs: dict[tuple[int, int], int] = {(view.tag, root_st.st_dev): 0}
        self._spill: dict[tuple[int, int, int], int] = {}
        self._spill_ids = itertools.count(_SPILL_BASE)
        root_key = (root_st.st_dev, root_st.st_ino)
        self.root = Node(ROOT_ID, root_key, None, b"", root_st.st_mode, root_st.st_ctime_ns, view)
        self.root.nlookup = 1  # the kernel never forgets the root
        self._nodes: dict[int, Node] = {ROOT_ID: self.root}

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes.values())

    def get(self, node_id: int) -> Node:
        """The node with *node_id*; ``KeyError`` if the kernel cannot know it."""
        return self._nodes[node_id]

    def node_id(self, key: tuple[int, int], tag: int = 0) -> int:
        """The stable node id of the backing identity *key* in the view numbered *tag*."""
        if key == self.root.key and tag == self.root.view.tag:
            return ROOT_ID
        dev, ino = key
        index = self._devs.get((tag, dev))
        if index is None and len(self._devs) <= _MAX_DEVS:
            index = self._devs[tag, dev] = len(self._devs)
        if index is not None and 1 < ino <= _INO_MASK:
            return (index << _DEV_SHIFT) | ino
        spilled = self._spill.get((tag, dev, ino))
        if spilled is None:
            spilled = self._spill[tag, dev, ino] = next(self._spill_ids)
        return spilled

    def add_root(self, view: View, root_st: os.stat_result | None) -> Node:
        """Remember SOURCE's root in *view* (``--per-user``), or again after a forget.

        *root_st* (SOURCE's root) is needed the first time only.
        """
        node = view.root
        if node is None:
            assert root_st is not None
            key = (root_st.st_dev, root_st.st_ino)
            node_id = self.node_id(key, view.tag)
            node = Node(node_id, key, None, b"", root_st.st_mode, root_st.st_ctime_ns, view)
            view.root = node
        self._nodes[node.id] = node
        node.nlookup += 1
        return node

    def remember(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        """Record that the kernel now knows *name* in *parent* (lookup count + 1)."""
        return self.remember_key(parent, name, (st.st_dev, st.st_ino), st.st_mode, st.st_ctime_ns)

    def remember_key(
        self, parent: Node, name: bytes, key: tuple[int, int], mode: int, ctime_ns: int
    ) -> Node:
        """:meth:`remember` from the few facts it needs (a cached listing keeps no stat)."""
        node_id = self.node_id(key, parent.view.tag)
        node = self._nodes.get(node_id)
        if node is None:
            node = Node(node_id, key, parent, name, mode, ctime_ns, parent.view)
            self._nodes[node_id] = node
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
        no handle is open on (an open file's number cannot be reused).
        """
        if fmt == node.fmt and ctime_ns < node.ctime_ns:
            return None
        if node.parent is None:
            return False
        return fmt != node.fmt or (
            ctime_ns != node.ctime_ns and fmt != stat.S_IFDIR and node.opens == 0
        )

    def peek(self, key: tuple[int, int], mode: int, ctime_ns: int, tag: int = 0) -> tuple[int, int]:
        """The (node id, generation) :meth:`remember_key` would give, changing nothing.

        readdir must know what it would send before it knows whether the entry
        fits in the reply; a node renamed or re-generated for an entry the
        kernel never received would answer for a file the kernel does not know.
        """
        node_id = self.node_id(key, tag)
        node = self._nodes.get(node_id)
        if node is None:
            return node_id, 0
        recycled = self._recycled(node, stat.S_IFMT(mode), ctime_ns)
        return node_id, node.gen + 1 if recycled else node.gen

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
