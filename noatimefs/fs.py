"""The FUSE adapter: pyfuse3 requests in, policy decisions and SOURCE calls out.

This module is a protocol adapter only. What to present and what to do with an
open's flags is decided in :mod:`noatimefs.policy`; which inodes the kernel
knows is kept in :mod:`noatimefs.inodes`; every path is resolved beneath SOURCE
by :mod:`noatimefs.source`, never through a symlink.

Caveats
-------
* Read-only: every request that would write answers ``EROFS`` (the mount is
  ``ro`` too, so the kernel refuses most of them before asking).
* ``opendir`` receives no open flags from pyfuse3, so a directory's
  ``O_NOATIME`` cannot be seen: directories are always opened without it and
  are not counted as kept or dropped. (The kernel has already let the open
  through, the presented owner being the caller.)
* Entries are presented by the rule in :mod:`noatimefs.policy`; POSIX ACLs of
  SOURCE are not consulted.
* ``.`` and ``..`` are not listed by readdir and ``..`` is never looked up
  (no NFS export support).
* An entry renamed or replaced in SOURCE behind a remembered inode answers
  ``ESTALE``; the kernel then looks the path up afresh. A new file that took
  a remembered file's inode number is another inode (:mod:`noatimefs.inodes`).

Concurrency contract
--------------------
pyfuse3 runs each request as a trio task. The only ``await`` in a handler is
the hand-off of slow work to a worker thread: a read that would block on the
disk, and the listing of SOURCE's top level when none is kept (both call
:func:`noatimefs.loop.hand_off` first, so that another task reads the next
requests meanwhile); every other handler runs to completion without
yielding, so the inode table, the handle tables and the counters are never
seen half-updated and need no lock. The thread touches no daemon state: a read
awaiting its thread holds only its own descriptor, which cannot be closed
under it (the kernel sends ``release`` only after every read on the handle has
been answered); the top-level listing is built in the thread and handed to
:mod:`noatimefs.toplevel`, which applies the changes seen meanwhile.

Listings: ``opendir`` only checks the caller's access and tells the kernel
whether it may keep serving its own copy of the listing
(:mod:`noatimefs.kernelcache`); the first ``readdir`` of a handle
takes the listing (kept, or made then). Offsets are cookies that mean the same
in every listing of a directory, so a handle at the top level goes on in the
kept list as it changes. Kept listings hold facts of SOURCE only; readdir
presents them per request (:mod:`noatimefs.listing`).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import stat
import time
import types
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import psutil
import pyfuse3
import trio

from noatimefs import kernelcache, listing, loop, policy, procinfo, replyflags
from noatimefs.consumers import consumer_for_uid
from noatimefs.dircache import DirCache
from noatimefs.inodes import ROOT_ID, Identity, InodeTable, Node, clock
from noatimefs.readahead import MAX_FILE, ReadAhead, siblings
from noatimefs.source import (
    COLD,
    O_PATH,
    Source,
    identify,
    identify_open,
    incarnation,
    native,
    proc_path,
)
from noatimefs.stats import Stats
from noatimefs.toplevel import TopLevel
from noatimefs.views import Allow, View, parse_uid
from noatimefs.walkahead import WalkAhead
from noatimefs.watch import (
    GONE,
    IN_ATTRIB,
    IN_DELETE_SELF,
    IN_MOVE_SELF,
    IN_Q_OVERFLOW,
    Event,
    TopLevelWatch,
)

log = logging.getLogger(__name__)

#: A read that must wait for the disk is done in the request loop itself when
#: at most this many bytes remain in the file, and in a worker thread otherwise.
INLINE_READ = 64 * 1024
#: How long before a directory's files are read ahead again (seconds).
READ_AHEAD_AGAIN = 60.0

#: The virtual, read-only xattr on the mount root that reports the daemon's state.
STATUS_XATTR = b"user.noatimefs.status"

#: With ``--per-user``: the node of the root's ``self`` symlink (no view uses
#: ids below ``1 << 48``), and its name.
SELF_ID = 2
SELF_NAME = b"self"


class _errors:  # noqa: N801 (used as a function: ``with _errors():``)
    """Map an ``OSError`` from SOURCE to the ``FUSEError`` the caller gets.

    A class, not a ``contextlib.contextmanager`` generator: it is entered on
    nearly every request, and costs 0.2 µs where the generator cost 1 µs.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:  # (None: never swallows an exception)
        if isinstance(exc, OSError):
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


def _answers(listed: dict[bytes, listing.Entry], name: bytes) -> bool:
    """Whether a current listing by name (none bare) answers a lookup of *name* as SOURCE
    would."""
    return len(name) <= _NAME_MAX or name in listed


def _stale() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.ESTALE)


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


@dataclass(slots=True)
class _FileHandle:
    node: Node
    size: int  # the file's size when it was opened


@dataclass(slots=True)
class _DirHandle:
    node: Node
    fd: int  # open for reading on the directory (-1 for SOURCE's root: root_fd is used)
    ctime_ns: int  # of the directory when it was opened
    entries: list[listing.Entry] | None = None  # listed at the first readdir
    kernel_cache: bool = False  # opened with FOPEN_CACHE_DIR: replies may fill the kernel's copy
    attributes: bool = False  # opened by a thread that stats what it lists: list nothing bare
    #: With --per-user, the mount root's own listing: self and the views.
    root_entries: list[tuple[bytes, pyfuse3.EntryAttributes]] | None = None
    root_st: os.stat_result | None = None  # SOURCE's root when that listing was made


#: How many store paths looked up cold are remembered until the caller goes into one.
_COLD_PATHS_MAX = 4096
#: How many threads that stat what they list are remembered (listing.py, "Bare entries").
_STATTERS_MAX = 4096
#: Linux's NAME_MAX. A listing cannot tell why it lacks a longer name: SOURCE answers it
#: (``ENAMETOOLONG`` on most filesystems, where a listing would say ``ENOENT``).
_NAME_MAX = 255


class NoatimeFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        source: Source,
        consumer: policy.Consumer,
        *,
        timeout: float = 300.0,
        daemon_uid: int | None = None,
        per_user: Allow | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.consumer = consumer
        self.timeout = timeout
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        #: With ``--per-user``, who may have a view; None: one view, the mount's root.
        self.per_user = per_user
        root_view = View(consumer, tag=0)
        self.inodes = InodeTable(os.stat(source.root_fd), root_view, incarnation(source.root_fd))
        self.views: dict[int, View] = {}  # by uid
        if per_user is None:
            root_view.root = self.inodes.root
            self.views[consumer.uid] = root_view
        self.files: dict[int, _FileHandle] = {}  # fh is the backing fd
        self.dirs: dict[int, _DirHandle] = {}
        self._dir_ids = itertools.count(1)
        #: Let the kernel keep listings (noatimefs.replyflags): not with --timeout 0,
        #: which asks for every listing to come from SOURCE.
        self.kernel_listings = replyflags.loaded() and timeout > 0
        self.stats = Stats()
        self.dir_cache: DirCache[listing.Entry] = DirCache(timeout)
        self.top = TopLevel(source.root_fd, timeout)
        self._watch: TopLevelWatch | None = None  # while background() runs
        self.initialized = trio.Event()  # set once the kernel has sent INIT
        self.read_ahead = ReadAhead(source)
        self.walk_ahead = WalkAhead(source.root_fd)
        self._read_ahead_at: dict[Identity, float] = {}  # directory -> when
        self._data_walked = b""  # the store path last named to walk ahead with its data
        # store paths looked up cold, not yet entered, oldest first
        self._cold_paths: OrderedDict[bytes, None] = OrderedDict()
        # threads that looked up a name listed bare, oldest first (OrderedDict: see DirCache)
        self._statters: OrderedDict[int, None] = OrderedDict()

    def init(self) -> None:
        """pyfuse3 calls this on the kernel's INIT request, just before it answers it."""
        self.initialized.set()

    def close(self) -> None:
        """End the read-ahead workers and the walk-ahead helper (after the request loop)."""
        self.read_ahead.close()
        self.walk_ahead.close()

    # -- helpers ---------------------------------------------------------

    def _node(self, node_id: int) -> Node:
        try:
            return self.inodes.get(node_id)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """*node*'s attributes from *st*, presented to *node*'s view."""
        attr = listing.attributes(st, self.timeout)
        attr.st_ino = pyfuse3.InodeT(node.id)
        attr.generation = node.gen
        presented = policy.present(st.st_mode, st.st_uid, st.st_gid, node.view.consumer)
        attr.st_uid, attr.st_gid, attr.st_mode = presented
        return attr

    def _check(self, node: Node, fd: int) -> os.stat_result:
        """``fstat`` of *fd*, opened by *node*'s path; ``ESTALE`` (fd closed) if not *node*'s file.

        The incarnation is compared too (one more system call), where *node* has one
        and is not settled (:mod:`noatimefs.inodes`, "Settled files").
        """
        st = os.fstat(fd)
        if node.is_settled_as(st):
            self.stats.checks_settled += 1
            return st
        if node.key[2] is None:
            backed = node.is_backed_by(st, None)
        else:
            alive_at = clock()  # *fd* holds the file
            backed = node.is_backed_by(st, incarnation(fd))
            if backed:
                self._seen(node, st, alive_at)
        if not backed:
            os.close(fd)
            raise _stale()
        return st

    def _seen(self, node: Node, st: os.stat_result, alive_at: int) -> None:
        """*node*'s incarnation was just seen to match in *st*'s file, held at *alive_at*."""
        if self.source.is_local(st.st_dev):
            node.seen(st.st_ctime_ns, alive_at)

    def _open_dir(self, node: Node) -> tuple[int, os.stat_result]:
        """An ``O_PATH`` descriptor on directory *node* below the top, checked to still be
        it, and its ``fstat``."""
        fd = self.source.open(node.path(), O_PATH | os.O_DIRECTORY)
        return fd, self._check(node, fd)

    def _current_listing(self, node: Node, st: os.stat_result) -> dict[bytes, listing.Entry] | None:
        """The cached listing of directory *node* by name, if it is of *node*'s ctime
        *st* (a change of its entries changes that); else None: then ask SOURCE."""
        cached = self.dir_cache.current(node.key, st.st_ctime_ns)
        if cached is None:
            return None
        if cached.by_name is None:
            cached.by_name = {entry[0]: entry for entry in cached.entries}
        return cached.by_name

    def _open_node(self, node: Node, flags: int) -> tuple[int, os.stat_result]:
        """Open *node* itself (no trailing symlink followed) and check it is still it."""
        fd = self.source.open(node.path(), flags | os.O_NOFOLLOW)
        return fd, self._check(node, fd)

    def _fstat_open(self, node: Node) -> os.stat_result | None:
        """``fstat`` of a file handle open on *node*; None when none is."""
        if node.opens:
            for fd, handle in self.files.items():
                if handle.node is node:
                    return os.fstat(fd)
        return None

    def _open_current(self, node: Node, flags: int) -> tuple[int, os.stat_result]:
        """:meth:`_open_node`, also refusing a changed ctime with ``ESTALE``.

        Where SOURCE's filesystem gives no incarnation, a recycled inode number
        passes the identity check (ext4 hands a freed number straight to the
        next new file); its new ctime bumps the generation, and ``ESTALE``
        makes the kernel look the name up afresh (:mod:`noatimefs.inodes`).
        """
        fd, st = self._open_node(node, flags)
        if self.inodes.refresh(node, st):
            os.close(fd)
            raise _stale()
        return fd, st

    def _may(self, required: int, st: os.stat_result, ctx: pyfuse3.RequestContext) -> bool:
        """Re-check the caller's real access to the source entry (policy docstring)."""
        groups = frozenset((ctx.gid,))
        if policy.needs_groups(st.st_mode, st.st_uid, st.st_gid, ctx.uid, ctx.gid):
            groups |= procinfo.groups(ctx.pid)
        return policy.may_access(required, st.st_mode, st.st_uid, st.st_gid, ctx.uid, groups)

    # -- lookups and attributes ------------------------------------------

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_ID and self.per_user is not None:
            return self._lookup_in_user_root(name, ctx)
        parent = self._node(parent_inode)
        if parent.parent is None:
            kept = self._kept_top()
            if kept is not None and _answers(kept, name):
                return self._lookup_kept(parent, name, kept)
            return self._lookup_top(parent, name)
        # Below the top level: from the parent's cached listing while it is current (no
        # more system calls than the parent's identity check), else from SOURCE.
        with _errors():
            fd, dir_st = self._open_dir(parent)
            try:
                listed = self._current_listing(parent, dir_st)
                if listed is not None:
                    listed = self._answering(listed, name, ctx.pid, parent, fd, dir_st)
                if listed is None:
                    alive_at = clock()
                    st, inc = identify(fd, name)
            finally:
                os.close(fd)
        if listed is not None:
            self.stats.lookups_listed += 1
            attr = self._answer_listed(parent, name, listed)
        else:
            node = self.inodes.remember(parent, name, st, inc)
            if inc is not None:
                self._seen(node, st, alive_at)
            attr = self._entry(node, st)
        if self._enters_cold_path(parent):
            # Walk it ahead now, not at the store path's own lookup: a caller that only
            # stats store paths would wait for the helper's disk reads, never needed.
            self.walk_ahead.want(parent.name, onward=False)
        return attr

    def _lookup_top(self, root: Node, name: bytes) -> pyfuse3.EntryAttributes:
        """A top-level lookup from SOURCE (none is kept)."""
        with _errors():
            # A store path SOURCE no longer holds in memory: what follows it will be
            # cold too. One held is identified through the descriptor that told so.
            alive_at = clock()
            fd = self.source.open_cached(name)
            st, inc = identify_open(fd) if fd >= 0 else identify(self.source.root_fd, name)
        node = self.inodes.remember(root, name, st, inc)
        if inc is not None:
            self._seen(node, st, alive_at)
        if fd == COLD and stat.S_ISDIR(st.st_mode):
            self._remember_cold_path(name)
        return self._entry(node, st)

    def _kept_top(self) -> dict[bytes, listing.Entry] | None:
        """The kept top level by name, every change made before this request applied in it;
        None when none is kept (:mod:`noatimefs.toplevel`)."""
        if self.top.by_name() is None:
            return None
        self._top_events()  # (an overflowed queue drops the listing: then None)
        return self.top.by_name()

    def _lookup_kept(
        self, root: Node, name: bytes, kept: dict[bytes, listing.Entry]
    ) -> pyfuse3.EntryAttributes:
        """A top-level lookup answered from the kept listing, a missing name with ``ENOENT``.

        The kept listing holds SOURCE's names as of now, with the attributes it
        was made (or an event relisted the name) with: what a readdirplus of it
        would send, no older. No system call, but two for a directory
        (:meth:`Source.in_memory`: an ``openat2`` and its ``close``): whether
        SOURCE still holds it in memory, which a lookup from SOURCE tells for the
        walk ahead (see :meth:`_lookup_top`).
        """
        self.stats.lookups_kept += 1
        attr = self._answer_listed(root, name, kept)
        if stat.S_ISDIR(attr.st_mode) and not self.source.in_memory(name):
            self._remember_cold_path(name)
        return attr

    def _answer_listed(
        self, parent: Node, name: bytes, listed: dict[bytes, listing.Entry]
    ) -> pyfuse3.EntryAttributes:
        """The lookup of *name* in *parent* answered from *parent*'s current listing by
        name: ``ENOENT`` for a name it does not hold, else what readdirplus would send."""
        entry = listed.get(name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        _, key, mode, uid, gid, attr, _ = entry
        assert attr is not None  # (a bare entry is looked up in SOURCE: _answering)
        node = self.inodes.remember_key(parent, name, key, mode, attr.st_ctime_ns)
        # The listing's own attributes, presented here as listing.reply presents them:
        # pyfuse3 copies them into the reply before any other handler runs.
        attr.st_ino = pyfuse3.InodeT(node.id)
        attr.generation = node.gen
        attr.st_uid, attr.st_gid, attr.st_mode = policy.present(
            mode, uid, gid, parent.view.consumer
        )
        return attr

    def _answering(
        self,
        listed: dict[bytes, listing.Entry],
        name: bytes,
        tid: int,
        parent: Node,
        fd: int,
        dir_st: os.stat_result,
    ) -> dict[bytes, listing.Entry] | None:
        """The listing that answers thread *tid*'s lookup of *name* in *parent* (open on
        *fd*, with *dir_st*), whose current listing is *listed*; None: ask SOURCE.

        A name listed bare is SOURCE's to tell (:mod:`noatimefs.listing`, "Bare
        entries"). A thread that looks one up stats what it lists: it is remembered,
        and directories it opens after that are listed in full. Its next such
        lookup fills the listing it looks in, so that the rest of that directory's
        names are answered from it too.
        """
        entry = listed.get(name)
        if entry is None:
            return listed if len(name) <= _NAME_MAX else None
        if not listing.is_bare(entry):
            return listed
        self.stats.lookups_bare += 1
        if tid in self._statters:
            return self._filled_listing(parent, fd, dir_st)
        self._statters[tid] = None
        if len(self._statters) > _STATTERS_MAX:
            self._statters.popitem(last=False)
        return None

    def _filled_listing(
        self, node: Node, fd: int, st: os.stat_result
    ) -> dict[bytes, listing.Entry] | None:
        """The current listing of directory *node* (open on *fd*, with *st*), filled in
        full and kept so; by name."""
        cached = self.dir_cache.current(node.key, st.st_ctime_ns)
        if cached is None:
            return None
        self._fill(node, fd, st.st_ctime_ns, cached.entries)
        return self._current_listing(node, st)

    def _fill(
        self, node: Node, fd: int, ctime_ns: int, entries: list[listing.Entry]
    ) -> list[listing.Entry]:
        """*node*'s cached *entries* (of the directory open on *fd*, at *ctime_ns*) filled
        in full (:func:`listing.filled`), and cached so in their place."""
        full = listing.filled(fd, entries, self.timeout)
        self.dir_cache.put(node.key, ctime_ns, full)
        return full

    def _remember_cold_path(self, name: bytes) -> None:
        self._cold_paths[name] = None
        if len(self._cold_paths) > _COLD_PATHS_MAX:
            self._cold_paths.popitem(last=False)

    def _enters_cold_path(self, parent: Node) -> bool:
        """A lookup in *parent*: is it the first into a store path that was looked up cold?"""
        in_store_path = parent.parent is not None and parent.parent.parent is None
        return in_store_path and self._cold_paths.pop(parent.name, False) is None

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for node_id, nlookup in inode_list:
            self.inodes.forget(node_id, nlookup)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.per_user is not None and inode in (ROOT_ID, SELF_ID):
            return self._user_root_entry(inode, ctx)
        node = self._node(inode)
        try:
            with _errors():
                fd, st = self._open_node(node, O_PATH)
                os.close(fd)
        except pyfuse3.FUSEError:
            # Deleted or replaced in SOURCE but still open through the mount: answer
            # for the file the caller holds (the kernel asks before reading it).
            held = self._fstat_open(node)
            if held is None:
                raise
            return self._entry(node, held)
        if self.inodes.refresh(node, st):
            raise _stale()  # maybe a new file under a recycled number: look it up afresh
        return self._entry(node, st)

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == SELF_ID and self.per_user is not None:
            return str(ctx.uid).encode()  # the uid FUSE names: the host's, in any namespace
        node = self._node(inode)
        with _errors():
            fd, _ = self._open_current(node, O_PATH)
            try:
                return os.readlink(b"", dir_fd=fd)
            finally:
                os.close(fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with _errors():
            sv = self.source.statvfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = sv.f_bsize
        data.f_frsize = sv.f_frsize
        data.f_blocks = sv.f_blocks
        data.f_bfree = sv.f_bfree
        data.f_bavail = sv.f_bavail
        data.f_files = sv.f_files
        data.f_ffree = sv.f_ffree
        data.f_favail = sv.f_favail
        data.f_namemax = sv.f_namemax
        return data

    # -- files -----------------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if policy.is_write(flags):
            raise _erofs()
        node = self._node(inode)
        with _errors():
            # O_NONBLOCK: should SOURCE have put a FIFO where the file was, the open must not
            # wait for a writer (the whole daemon would wait); the identity check refuses it.
            # A recycled inode number (see _open_current) answers ESTALE: the
            # kernel's inode and page cache are the old file's.
            fd, st = self._open_current(node, os.O_RDONLY | os.O_NONBLOCK)
        try:
            decision = policy.decide_open(flags, ctx.uid, st.st_uid, self.daemon_uid)
            if not self._may(decision.required, st, ctx):
                raise pyfuse3.FUSEError(errno.EACCES)
            if decision.noatime is policy.Noatime.KEPT:
                self.stats.kept(ctx.pid)
                node.view.noatime_kept += 1
            elif decision.noatime is policy.Noatime.DROPPED:
                self.stats.dropped(ctx.pid, ctx.uid, node.path(), st.st_uid)
                node.view.noatime_dropped += 1
            status_flags = policy.status_flags(decision.noatime, self.source.is_local(st.st_dev))
            if status_flags is not None:
                with _errors():
                    fcntl.fcntl(fd, fcntl.F_SETFL, status_flags)
        except BaseException:
            os.close(fd)
            raise
        self.stats.opens += 1
        node.view.opens += 1
        node.opens += 1
        self.files[fd] = _FileHandle(node, st.st_size)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        done = 0
        with _errors():
            # Serve from the page cache without a thread hand-off when we can;
            # hand the rest to a worker so a slow disk stalls only this caller.
            # (Filesystems without RWF_NOWAIT, tmpfs among them, never block on
            # a disk: they are read inline.)
            try:
                while done < size:
                    n = os.preadv(fh, [view[done:]], off + done, os.RWF_NOWAIT)
                    if n == 0:
                        break
                    done += n
            except BlockingIOError:
                self.stats.reads_waited += 1
                handle = self.files.get(fh)
                if handle is not None:
                    self._read_ahead_around(handle.node, handle.size)
                if (handle.size if handle else size) - off - done <= INLINE_READ:
                    # A small rest (a store is mostly small files) costs less
                    # read here than the round trip to a worker thread would.
                    done += os.preadv(fh, [view[done:]], off + done)
                else:
                    loop.hand_off()  # another task reads the next requests meanwhile
                    done += await trio.to_thread.run_sync(os.preadv, fh, [view[done:]], off + done)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                done += os.preadv(fh, [view[done:]], off + done)
        # pyfuse3 replies from any buffer; a view saves copying the data again.
        return cast(bytes, view[:done])

    def _read_ahead_around(self, node: Node, size: int) -> None:
        """*node*'s data (*size* bytes) was not cached: read small files ahead.

        Its directory's other small files, at most once a minute per directory and
        only from a listing at hand (SOURCE's top level has none): see
        :mod:`noatimefs.readahead`; and, for a small file, those of its store path
        and the ones after it, in the walk-ahead helper (:mod:`noatimefs.walkahead`).
        """
        parent = node.parent
        if parent is None:
            return
        now = time.monotonic()
        if now - self._read_ahead_at.get(parent.key, -READ_AHEAD_AGAIN) < READ_AHEAD_AGAIN:
            return
        if len(self._read_ahead_at) >= 100_000:
            self._read_ahead_at.clear()
        self._read_ahead_at[parent.key] = now
        kept = self.dir_cache.peek(parent.key)
        if kept is not None:
            entries = [(e[0], e[2], None if e[5] is None else e[5].st_size) for e in kept.entries]
            self.read_ahead.want(siblings(entries, parent.path(), node.name))
        # A caller reading a store path's small files cold reads the next ones too, most
        # likely (a tar of a closure, a VM booting); one reading a big file, not so.
        if size > MAX_FILE:
            return
        top = node
        while top.parent is not None and top.parent.parent is not None:
            top = top.parent
        if top.parent is not None and top.name != self._data_walked:
            self._data_walked = top.name
            self.walk_ahead.want(top.name, data=True)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self.files.pop(fh, None)
        if handle is not None:
            handle.node.opens -= 1
        with _errors():
            os.close(fh)

    # -- directories -----------------------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode == ROOT_ID and self.per_user is not None:
            return self._open_user_root(ctx)
        # Nothing is listed yet (a caller may open a directory and never read it: GNU find
        # opens ".." to climb back). A fresh stat: the access re-check uses SOURCE's mode
        # of now, and the first readdir the ctime the listing cache is checked against.
        node = self._node(inode)
        with _errors():
            if node.parent is None:
                fd, dir_st = -1, os.fstat(self.source.root_fd)
            else:
                fd, dir_st = self._open_node(node, os.O_RDONLY | os.O_DIRECTORY)
        if not self._may(policy.R_OK, dir_st, ctx):
            if fd >= 0:
                os.close(fd)
            raise pyfuse3.FUSEError(errno.EACCES)
        self.inodes.refresh(node, dir_st)
        fh = next(self._dir_ids)
        node.opens += 1
        handle = self.dirs[fh] = _DirHandle(node, fd, dir_st.st_ctime_ns)
        handle.attributes = ctx.pid in self._statters
        if not self.kernel_listings:
            return pyfuse3.FileHandleT(fh)
        handle.kernel_cache = True
        stamp = self._stamp_now(handle)
        keep, node.cached = kernelcache.kernel_cache(node.cached, stamp, alone=node.opens == 1)
        return pyfuse3.FileHandleT(replyflags.handle(fh, keep=keep))

    def _stamp_now(self, handle: _DirHandle) -> int | None:
        """The stamp of the listing *handle*'s directory has now (kernelcache.kernel_cache)."""
        if handle.node.parent is not None:
            return handle.ctime_ns  # a change of the directory's entries changes its ctime
        if not self.top.watching:
            return None  # no watch: a change would not be seen
        self._top_events()
        return self.top.version

    def _stamp_served(self, handle: _DirHandle) -> int | None:
        """The stamp of the listing *handle* serves (None: not one a later opendir could know)."""
        if handle.node.parent is not None:
            return handle.ctime_ns
        if not self.top.watching or not self.top.holds(handle.entries):
            return None
        return self.top.version

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        if self.kernel_listings and replyflags.inactive(fh):
            self._kernel_listings_off()
        handle = self.dirs[replyflags.strip(fh)]
        self.stats.readdirs += 1
        if handle.node is self.inodes.root and self.per_user is not None:
            return self._read_user_root(handle, start_id, token)
        node = handle.node
        if node.parent is None and (handle.entries is None or start_id == 0):
            handle.entries = await self._top_listing()  # (re)wound: the listing of now
        elif handle.entries is None:
            handle.entries = self._listing(handle)
        listing.reply(token, node, handle.entries, start_id, node.view.consumer, self.inodes)
        if handle.kernel_cache:
            node.cached = kernelcache.served(node.cached, self._stamp_served(handle))

    def _kernel_listings_off(self) -> None:
        """A handle came back with its flag bits: pyfuse3 answered without our fuse_reply_open."""
        self.kernel_listings = False
        log.warning(
            "the kernel cannot keep listings (noatimefs._replyflags loaded too late?): "
            "every listing is served by the daemon"
        )

    def _listing(self, handle: _DirHandle) -> list[listing.Entry]:
        """The listing of a directory below the top level: cached, or made now."""
        node = handle.node
        cached = self.dir_cache.get(node.key, handle.ctime_ns)
        store_path = node.parent is not None and node.parent.parent is None
        # Files are listed bare where the C module sends them so, to a caller not known
        # to stat them (noatimefs.listing, "Bare entries").
        bare = replyflags.carries_bare() and not handle.attributes
        if cached is not None:
            if store_path:
                self._walk_if_cold(node, cached.entries, inodes=not bare)
            if not handle.attributes or not any(listing.is_bare(e) for e in cached.entries):
                return cached.entries
            with _errors():
                return self._fill(node, handle.fd, handle.ctime_ns, cached.entries)
        with _errors():
            entries = listing.list_dir(handle.fd, self.timeout, node.key[0] if bare else None)
        self.dir_cache.put(node.key, handle.ctime_ns, entries)
        if store_path:
            self.walk_ahead.want(node.name, inodes=not bare)  # a walk of the store may follow
        return entries

    def _walk_if_cold(self, node: Node, entries: list[listing.Entry], inodes: bool) -> None:
        """The store path *node*'s listing is served from the daemon's cache, which outlives
        SOURCE's: if what lies below it is cold, a walk would wait for the disk at each of
        its directories' opens. Its first subdirectory not resolving from memory says so:
        it is named to the walk-ahead helper, as a store path listed now is."""
        sub = next((entry[0] for entry in entries if stat.S_ISDIR(entry[2])), None)
        if sub is not None and not self.source.in_memory(node.path() + b"/" + sub):
            self.walk_ahead.want(node.name, inodes=inodes)

    async def _top_listing(self) -> list[listing.Entry]:
        """SOURCE's top-level listing: kept (see :mod:`noatimefs.toplevel`), or made now.

        Made in a worker thread, and another task reads requests meanwhile: a cold
        listing of 10⁵ paths waits for the disk at every inode, and must not stall
        the other callers.
        """
        self._top_events()  # every change made before this request, applied
        entries = self.top.entries()
        if entries is not None:
            return entries
        build = self.top.begin()
        loop.hand_off()
        with _errors():
            entries = await trio.to_thread.run_sync(self._list_top)
        return self.top.install(build, entries)

    def _list_top(self) -> list[listing.Entry]:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.source.root_fd)
        try:
            return listing.list_dir(fd, self.timeout)
        finally:
            os.close(fd)

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self.dirs.pop(replyflags.strip(fh), None)
        if handle is not None:
            handle.node.opens -= 1
            if handle.fd >= 0:
                os.close(handle.fd)

    # -- extended attributes ---------------------------------------------

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if inode == ROOT_ID and name == STATUS_XATTR:
            return self.status_json()
        if self.per_user is not None and inode in (ROOT_ID, SELF_ID):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = self._node(inode)
        with _errors():
            fd, st = self._open_current(node, O_PATH)
            try:
                if stat.S_ISLNK(st.st_mode):
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
                return os.getxattr(proc_path(fd), name)
            finally:
                os.close(fd)

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        if self.per_user is not None and inode in (ROOT_ID, SELF_ID):
            return []
        node = self._node(inode)
        with _errors():
            fd, st = self._open_current(node, O_PATH)
            try:
                if stat.S_ISLNK(st.st_mode):
                    return []
                names = os.listxattr(proc_path(fd))
            finally:
                os.close(fd)
        if ctx.uid != 0:
            # SOURCE's filesystem lists trusted.* names only to CAP_SYS_ADMIN; the kernel does
            # not filter what a FUSE daemon (running as root) lists, so filter them here.
            names = [n for n in names if not n.startswith("trusted.")]
        return [pyfuse3.XAttrNameT(os.fsencode(n)) for n in names]

    # -- views and the per-user root ------------------------------------

    def _view(self, uid: int, caller_uid: int) -> View | None:
        """The view of *uid*; None if there is none for *caller_uid* to enter.

        A view is made on its first lookup by its own uid (or root): anyone may
        enter a view that exists, as anyone may reach a ``--owner`` mount, but
        nobody can make the daemon hold views for uids that never came.
        """
        view = self.views.get(uid)
        if view is None:
            assert self.per_user is not None
            if caller_uid not in (0, uid) or not self.per_user.admits(uid):
                return None
            view = View(consumer_for_uid(uid), tag=len(self.views) + 1)
            self.views[uid] = view
            log.info("view of uid %d made (%d views)", uid, len(self.views))
        return view

    def _lookup_in_user_root(
        self, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == SELF_NAME:
            return self._user_root_entry(SELF_ID, ctx)
        uid = parse_uid(name)
        view = None if uid is None else self._view(uid, ctx.uid)
        if view is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        with _errors():
            st = os.stat(self.source.root_fd)
            node = self.inodes.add_root(view, st, incarnation(self.source.root_fd))
        return self._entry(node, st)

    def _user_root_entry(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """The attributes of the per-user root (a directory) or of its ``self`` symlink."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(inode)
        attr.entry_timeout = self.timeout
        attr.st_uid = os.geteuid()
        attr.st_gid = os.getegid()
        started = int(self.stats.started * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = started
        attr.st_blksize = 4096
        if inode == SELF_ID:
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_nlink = 1
            attr.st_size = len(str(ctx.uid))  # the text differs per caller: not cached
            attr.attr_timeout = 0
        else:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.attr_timeout = self.timeout
        return attr

    def _open_user_root(self, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        """A listing of the per-user root: ``self`` and the views the kernel knows."""
        entries = [(SELF_NAME, self._user_root_entry(SELF_ID, ctx))]
        with _errors():
            st = os.stat(self.source.root_fd)
        for uid, view in sorted(self.views.items()):
            if view.root is not None and view.root.nlookup > 0:
                entries.append((str(uid).encode(), self._entry(view.root, st)))
        fh = next(self._dir_ids)
        self.dirs[fh] = _DirHandle(self.inodes.root, -1, 0, root_entries=entries, root_st=st)
        return pyfuse3.FileHandleT(fh)

    def _read_user_root(
        self, handle: _DirHandle, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        entries = handle.root_entries or []
        for index in range(start_id, len(entries)):
            name, attr = entries[index]
            if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                break
            view = self.views.get(parse_uid(name) or -1) if name != SELF_NAME else None
            if view is not None and view.root is not None and handle.root_st is not None:
                self.inodes.add_root(view, handle.root_st, view.root.key[2])

    def _view_counts(self) -> dict[str, dict[str, int]]:
        inodes = Counter(node.view.tag for node in self.inodes)
        return {str(uid): view.as_dict(inodes[view.tag]) for uid, view in self.views.items()}

    # -- the daemon's state ----------------------------------------------

    async def background(self) -> None:
        """Watch SOURCE's top level and invalidate what the kernel caches of it.

        Started by :mod:`noatimefs.mount` beside the request loop, once mounted.
        """
        watch = self.start_watch()
        if watch is None:
            return
        # A busy request loop must not keep a change of SOURCE waiting.
        loop.wake_on(watch.fd)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._purge_listings)
                while True:
                    await trio.lowlevel.wait_readable(watch.fd)
                    self._top_events()
        finally:
            loop.forget(watch.fd)
            self.stop_watch()

    def start_watch(self) -> TopLevelWatch | None:
        """Watch SOURCE's top level: from now on its listing may be kept (None: cannot)."""
        try:
            self._watch = TopLevelWatch(self.source.root_fd)
        except OSError as exc:
            log.warning(
                "cannot watch SOURCE's top level (%s): removed paths stay visible for up to "
                "%gs, and the top level is listed afresh for every caller",
                exc.strerror,
                self.timeout,
            )
            return None
        self.top.watching = True
        return self._watch

    def stop_watch(self) -> None:
        self.top.watching = False
        self.top.drop()
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _top_events(self) -> None:
        """Handle every event queued on the top-level watch now."""
        if self._watch is None:
            return
        while events := self._watch.read():
            for event in events:
                self.on_top_level_event(event)

    async def _purge_listings(self) -> None:
        """Drop expired directory listings now and then, so an idle daemon shrinks."""
        period = max(self.timeout, 1.0)
        while True:
            await trio.sleep(period)
            self.dir_cache.purge()

    def on_top_level_event(self, event: Event) -> None:
        if event.mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflowed: invalidating every top-level entry")
            self.top.drop()
            for node in list(self.inodes):
                if node.parent is not None and node.parent.parent is None:
                    self._invalidate_top(node.name, node.parent)
            return
        if event.name:
            self.top.changed(event.name)  # whatever happened to it: list it again
        if event.mask & (GONE | IN_ATTRIB) and event.name:
            self._invalidate_top(event.name)
        elif event.mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            log.warning("SOURCE %s itself was removed or moved away", self.source.path)

    def _invalidate_top(self, name: bytes, root: Node | None = None) -> None:
        """Make the kernel forget top-level *name* under *root* (default: in every view)."""
        roots = [root] if root is not None else [v.root for v in self.views.values() if v.root]
        for node in roots:
            if node.nlookup <= 0:
                continue  # the kernel holds nothing under a root it forgot
            self.stats.invalidations += 1
            pyfuse3.invalidate_entry_async(
                pyfuse3.InodeT(node.id), pyfuse3.FileNameT(name), ignore_enoent=True
            )

    def status(self) -> dict[str, object]:
        # psutil reads /proc, which needs a descriptor: with the daemon's descriptors all in
        # use (callers can hold as many files open as it may open), report None, never raise.
        try:
            proc = psutil.Process()
            rss: int | None = proc.memory_info().rss
            fds: int | None = proc.num_fds()
        except (psutil.Error, OSError):
            rss = fds = None
        return {
            "pid": os.getpid(),
            "source": self.source.path,
            "owner": None if self.per_user is not None else self.consumer.uid,
            "per_user": None if self.per_user is None else self.per_user.describe(),
            "views": self._view_counts(),
            "rss": rss,
            "fds": fds,
            "inodes": len(self.inodes),
            "handles": len(self.files) + len(self.dirs),
            "listing_cache_entries": len(self.dir_cache),
            "listing_cache_hits": self.dir_cache.hits,
            "listing_cache_misses": self.dir_cache.misses,
            "top_level_entries": len(self.top),
            "top_level_listed": self.top.listed,
            "top_level_updated": self.top.updated,
            "kernel_listings": self.kernel_listings,
            "kernel_listings_flagged": replyflags.applied(),
            "native_syscalls": native,  # noatimefs._syscalls in use (not ctypes)
            "read_ahead_files": self.read_ahead.files,
            "read_ahead_dropped": self.read_ahead.dropped,
            "walk_ahead_named": self.walk_ahead.named,
            "walk_ahead_dropped": self.walk_ahead.dropped,
            "walk_ahead_pid": self.walk_ahead.pid,
            **self.stats.as_dict(),
        }

    def status_json(self) -> bytes:
        return json.dumps(self.status(), sort_keys=True).encode()

    # -- everything that would write -------------------------------------

    async def setattr(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mknod(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mkdir(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def rmdir(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def symlink(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def rename(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def link(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _erofs()

    async def write(self, *args: object, **kwargs: object) -> int:
        raise _erofs()

    async def setxattr(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def removexattr(self, *args: object, **kwargs: object) -> None:
        raise _erofs()
