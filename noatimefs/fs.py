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
the hand-off of a read that would block on the disk to a worker thread (it
calls :func:`noatimefs.loop.hand_off` first, so that another task reads the
next requests meanwhile); every other handler runs to completion without
yielding, so the inode table, the handle tables and the counters are never
seen half-updated and need no lock. A read awaiting its thread holds only its
own descriptor, which cannot be closed under it: the kernel sends ``release``
only after every read on the handle has been answered.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import psutil
import pyfuse3
import trio

from noatimefs import loop, policy, procinfo
from noatimefs.dircache import DirCache
from noatimefs.inodes import ROOT_ID, Identity, InodeTable, Node, identity
from noatimefs.readahead import MAX_FILE, ReadAhead, siblings
from noatimefs.source import O_PATH, Source, identify, incarnation, proc_path
from noatimefs.stats import Stats
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


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Map an ``OSError`` from SOURCE to the ``FUSEError`` the caller gets."""
    try:
        yield
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


def _stale() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.ESTALE)


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


#: A listed entry: its name, backing identity, and the attributes readdir sends.
_Listed = tuple[bytes, Identity, pyfuse3.EntryAttributes]


@dataclass(slots=True)
class _FileHandle:
    node: Node
    size: int  # the file's size when it was opened


@dataclass
class _DirHandle:
    node: Node
    entries: list[_Listed]


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
    ) -> None:
        super().__init__()
        self.source = source
        self.consumer = consumer
        self.timeout = timeout
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        self.inodes = InodeTable(os.stat(source.root_fd), incarnation(source.root_fd))
        self.files: dict[int, _FileHandle] = {}  # fh is the backing fd
        self.dirs: dict[int, _DirHandle] = {}
        self._dir_ids = itertools.count(1)
        self.stats = Stats()
        self.dir_cache: DirCache[_Listed] = DirCache(timeout)
        self.initialized = trio.Event()  # set once the kernel has sent INIT
        self.read_ahead = ReadAhead(source)
        self.walk_ahead = WalkAhead(source.root_fd)
        self._read_ahead_at: dict[Identity, float] = {}  # directory -> when
        self._data_walked = b""  # the store path last named to walk ahead with its data

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
        return self._attributes(st, node.id, node.gen)

    def _attributes(self, st: os.stat_result, node_id: int, gen: int) -> pyfuse3.EntryAttributes:
        uid, gid, mode = policy.present(st.st_mode, st.st_uid, st.st_gid, self.consumer)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node_id
        attr.generation = gen
        attr.entry_timeout = self.timeout
        attr.attr_timeout = self.timeout
        attr.st_mode = mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = uid
        attr.st_gid = gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    @staticmethod
    def _check(node: Node, fd: int) -> os.stat_result:
        """``fstat`` of *fd*, opened by *node*'s path; ``ESTALE`` (fd closed) if not *node*'s file.

        The incarnation is compared too (one more system call), where *node* has one.
        """
        st = os.fstat(fd)
        if not node.is_backed_by(st, incarnation(fd) if node.key[2] is not None else None):
            os.close(fd)
            raise _stale()
        return st

    def _open_dir(self, node: Node) -> int:
        """An ``O_PATH`` descriptor on directory *node*, checked to still be it."""
        if node is self.inodes.root:
            return os.dup(self.source.root_fd)
        fd = self.source.open(node.path(), O_PATH | os.O_DIRECTORY)
        self._check(node, fd)
        return fd

    def _identify_child(self, parent: Node, name: bytes) -> tuple[os.stat_result, bytes | None]:
        """``lstat`` and incarnation of *name* in *parent* (:func:`noatimefs.source.identify`)."""
        if parent is self.inodes.root:
            return identify(self.source.root_fd, name)
        fd = self._open_dir(parent)
        try:
            return identify(fd, name)
        finally:
            os.close(fd)

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
        parent = self._node(parent_inode)
        # A store path SOURCE no longer holds in memory: what follows it will be cold too.
        cold = parent is self.inodes.root and not self.source.in_memory(name)
        with _errors():
            st, inc = self._identify_child(parent, name)
        node = self.inodes.remember(parent, name, st, inc)
        if cold and stat.S_ISDIR(st.st_mode):
            self.walk_ahead.want(name, onward=False)
        return self._entry(node, st)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for node_id, nlookup in inode_list:
            self.inodes.forget(node_id, nlookup)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
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
            status_flags = os.O_RDONLY  # O_NONBLOCK off again
            if decision.noatime is policy.Noatime.KEPT:
                status_flags |= os.O_NOATIME
                self.stats.kept(ctx.pid)
            elif decision.noatime is policy.Noatime.DROPPED:
                self.stats.dropped(ctx.pid, ctx.uid, node.path(), st.st_uid)
            with _errors():
                fcntl.fcntl(fd, fcntl.F_SETFL, status_flags)
        except BaseException:
            os.close(fd)
            raise
        self.stats.opens += 1
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
        listing = self.dir_cache.peek(parent.key)
        if listing is not None:
            entries = [(name, attr.st_mode, attr.st_size) for name, _, attr in listing.entries]
            self.read_ahead.want(siblings(entries, parent.path(), node.name))
        # A caller reading a store path's small files cold reads the next ones too, most
        # likely (a tar of a closure, a VM booting); one reading a big file, not so.
        if size > MAX_FILE:
            return
        top = node
        while top.parent is not None and top.parent is not self.inodes.root:
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
        node = self._node(inode)
        # A fresh stat of the directory: the access re-check below and the cached
        # listing's validity use SOURCE's mode and ctime of now.
        with _errors():
            fd, dir_st = self._open_node(node, os.O_RDONLY | os.O_DIRECTORY)
            try:
                listing = None
                if node is not self.inodes.root:
                    listing = self.dir_cache.get(node.key, dir_st.st_ctime_ns)
                if listing is not None:
                    entries = listing.entries
                else:
                    entries = [
                        (name, key, self._attributes(st, self.inodes.node_id(key), 0))
                        for name, st, key in self._list(fd)
                    ]
                    self.inodes.refresh(node, dir_st)
                    if node is not self.inodes.root:
                        self.dir_cache.put(node.key, dir_st.st_ctime_ns, entries)
            finally:
                os.close(fd)
        if not self._may(policy.R_OK, dir_st, ctx):
            raise pyfuse3.FUSEError(errno.EACCES)
        if node.parent is self.inodes.root and listing is None:
            self.walk_ahead.want(node.name)  # a walk of the store may follow
        fh = next(self._dir_ids)
        node.opens += 1
        self.dirs[fh] = _DirHandle(node, entries)
        return pyfuse3.FileHandleT(fh)

    @staticmethod
    def _list(fd: int) -> list[tuple[bytes, os.stat_result, Identity]]:
        """Names, lstat results and identities of the directory open on *fd*, in readdir order."""
        entries = []
        with os.scandir(fd) as it:
            for entry in it:
                name = os.fsencode(entry.name)
                try:
                    st, inc = identify(fd, name)
                except FileNotFoundError:
                    continue  # removed since it was listed
                entries.append((name, st, identity(st, inc)))
        return entries

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        handle = self.dirs[fh]
        parent = handle.node
        entries = handle.entries
        inodes = self.inodes
        for index in range(start_id, len(entries)):
            name, key, attr = entries[index]
            mode, ctime_ns = attr.st_mode, attr.st_ctime_ns
            node_id, gen = inodes.peek(key, mode, ctime_ns)
            if attr.st_ino != node_id:  # another node holds its preferred id by now
                attr.st_ino = node_id
            if attr.generation != gen:
                attr.generation = gen
            if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                break  # not sent: the table must not learn of it
            inodes.remember_key(parent, name, key, mode, ctime_ns)

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self.dirs.pop(fh, None)
        if handle is not None:
            handle.node.opens -= 1

    # -- extended attributes ---------------------------------------------

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if inode == ROOT_ID and name == STATUS_XATTR:
            return self.status_json()
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

    # -- the daemon's state ----------------------------------------------

    async def background(self) -> None:
        """Watch SOURCE's top level and invalidate what the kernel caches of it.

        Started by :mod:`noatimefs.mount` beside the request loop, once mounted.
        """
        try:
            watch = TopLevelWatch(self.source.root_fd)
        except OSError as exc:
            log.warning(
                "cannot watch SOURCE's top level (%s): removed paths stay visible for up to %gs",
                exc.strerror,
                self.timeout,
            )
            return
        # A busy request loop must not keep a change of SOURCE waiting.
        loop.wake_on(watch.fd)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._purge_listings)
                while True:
                    await trio.lowlevel.wait_readable(watch.fd)
                    for event in watch.read():
                        self.on_top_level_event(event)
        finally:
            loop.forget(watch.fd)
            watch.close()

    async def _purge_listings(self) -> None:
        """Drop expired directory listings now and then, so an idle daemon shrinks."""
        period = max(self.timeout, 1.0)
        while True:
            await trio.sleep(period)
            self.dir_cache.purge()

    def on_top_level_event(self, event: Event) -> None:
        if event.mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflowed: invalidating every top-level entry")
            for node in list(self.inodes):
                if node.parent is self.inodes.root:
                    self._invalidate_top(node.name)
        elif event.mask & (GONE | IN_ATTRIB) and event.name:
            self._invalidate_top(event.name)
        elif event.mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            log.warning("SOURCE %s itself was removed or moved away", self.source.path)

    def _invalidate_top(self, name: bytes) -> None:
        self.stats.invalidations += 1
        pyfuse3.invalidate_entry_async(
            pyfuse3.InodeT(ROOT_ID), pyfuse3.FileNameT(name), ignore_enoent=True
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
            "owner": self.consumer.uid,
            "rss": rss,
            "fds": fds,
            "inodes": len(self.inodes),
            "handles": len(self.files) + len(self.dirs),
            "listing_cache_entries": len(self.dir_cache),
            "listing_cache_hits": self.dir_cache.hits,
            "listing_cache_misses": self.dir_cache.misses,
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
