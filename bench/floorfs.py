"""floorfs: the cheapest read-only pyfuse3 filesystem, the benchmark's floor.

It snapshots SOURCE into memory at start (one ``lstat`` per entry) and then
answers ``lookup``, ``getattr``, ``readdir``, ``readlink``, ``statfs`` and
``open`` from that snapshot without a system call; ``read`` is one ``pread``
on a descriptor opened at the first ``open`` of the file and cached for the
life of the mount.  Kernel caching is what a store wants: ``ro``, entries and
attributes cached for a long time, ``keep_cache`` on every open.  What the
benchmark measures through it is the price of the binding (the kernel round
trip plus pyfuse3's dispatch), which noatimefs cannot go below without
changing how requests reach Python.

Entries are presented like noatimefs presents a store the consumer may read:
uid = ``--owner``, the real gid, the real mode.  It is a benchmark tool, not a
filesystem to rely on: the snapshot never changes, handlers never await, and
nothing outside the snapshot exists.

With ``--passthrough`` it touches SOURCE as a passthrough filesystem must,
as bindfs does, and no more: an ``lstat`` of the path per lookup and getattr
(attributes fresh from it), an ``open`` per open closed on release, and an
``open`` and one read of the directory per opendir (the names and the
readdirplus attributes still come from the snapshot). The snapshot then only
names paths: what the benchmark measures through it is the binding's price
plus the disk's, the least a pyfuse3 passthrough can cost.

    python bench/floorfs.py [--owner UID] [--max-tasks N] [--passthrough] SOURCE MOUNTPOINT
"""

from __future__ import annotations

import argparse
import collections
import errno
import itertools
import json
import logging
import os
import resource
import select
import signal
import stat
import sys
import time
from collections.abc import Sequence

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, InodeT

from noatimefs import loop

log = logging.getLogger("floorfs")

TIMEOUT = 86400.0


class Node:
    """One snapshotted entry."""

    __slots__ = ("attr", "children", "names", "path", "target")

    def __init__(self, attr: pyfuse3.EntryAttributes, path: str) -> None:
        self.attr = attr
        self.path = path
        self.children: dict[bytes, int] | None = None
        self.names: list[tuple[bytes, int]] | None = None
        self.target: bytes | None = None


def _attr(st: os.stat_result, ino: int, uid: int) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = InodeT(ino)
    a.generation = 0
    a.entry_timeout = TIMEOUT
    a.attr_timeout = TIMEOUT
    a.st_mode = pyfuse3.ModeT(st.st_mode)
    a.st_nlink = st.st_nlink
    a.st_uid = uid
    a.st_gid = st.st_gid
    a.st_rdev = st.st_rdev
    a.st_size = st.st_size
    a.st_blksize = st.st_blksize
    a.st_blocks = st.st_blocks
    a.st_atime_ns = st.st_atime_ns
    a.st_mtime_ns = st.st_mtime_ns
    a.st_ctime_ns = st.st_ctime_ns
    return a


def snapshot(source: str, uid: int) -> list[Node | None]:
    """Walk SOURCE; index i of the result is inode i (0 unused, 1 the root)."""
    nodes: list[Node | None] = [None]
    root = Node(_attr(os.lstat(source), pyfuse3.ROOT_INODE, uid), source)
    nodes.append(root)
    stack = [root]
    while stack:
        d = stack.pop()
        d.children, d.names = {}, []
        with os.scandir(d.path) as it:
            for e in it:
                ino = len(nodes)
                node = Node(_attr(e.stat(follow_symlinks=False), ino, uid), e.path)
                nodes.append(node)
                name = os.fsencode(e.name)
                d.children[name] = ino
                d.names.append((name, ino))
                mode = node.attr.st_mode
                if stat.S_ISDIR(mode):
                    stack.append(node)
                elif stat.S_ISLNK(mode):
                    node.target = os.fsencode(os.readlink(e.path))
    return nodes


class FloorOperations(pyfuse3.Operations):
    """Answers from the snapshot; see the module docstring."""

    def __init__(self, source: str, uid: int, passthrough: bool = False) -> None:
        super().__init__()
        self.nodes = snapshot(source, uid)
        self.uid = uid
        #: Touch SOURCE as a passthrough must (see --passthrough); the snapshot only names.
        self.passthrough = passthrough
        self.dirs: dict[int, tuple[int, int]] = {}  # passthrough: handle -> (descriptor, inode)
        self._dir_handles = itertools.count(1)
        self.fds: dict[int, int] = {}  # inode -> cached read-only descriptor
        self.calls: collections.Counter[str] = collections.Counter()  # requests by type
        self.max_fds = _raise_nofile() - 64
        sv = os.statvfs(source)
        self.statvfs = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files"):
            setattr(self.statvfs, f, getattr(sv, f))
        self.statvfs.f_ffree = self.statvfs.f_favail = 0
        self.statvfs.f_namemax = sv.f_namemax

    def _node(self, inode: int) -> Node:
        try:
            node = self.nodes[inode]
        except IndexError:
            node = None
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.calls["lookup"] += 1
        children = self._node(parent_inode).children
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        ino = children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._fresh(ino) if self.passthrough else self._node(ino).attr

    def _fresh(self, ino: int) -> pyfuse3.EntryAttributes:
        """Inode *ino*'s attributes from an ``lstat`` of its path now (--passthrough)."""
        try:
            st = os.lstat(self._node(ino).path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return _attr(st, ino, self.uid)

    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.calls["getattr"] += 1
        return self._fresh(inode) if self.passthrough else self._node(inode).attr

    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileNameT:
        self.calls["readlink"] += 1
        target = self._node(inode).target
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return FileNameT(target)

    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        self.calls["opendir"] += 1
        node = self._node(inode)
        if node.names is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not self.passthrough:
            return FileHandleT(inode)
        try:
            fd = os.open(node.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        fh = next(self._dir_handles)
        self.dirs[fh] = (fd, inode)
        return FileHandleT(fh)

    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.calls["readdir"] += 1
        if self.passthrough:
            fd, inode = self.dirs[fh]
            if start_id == 0:  # read the directory once, as a passthrough must
                with os.scandir(fd) as it:
                    for _ in it:
                        pass
            fh = FileHandleT(inode)
        names = self._node(fh).names or []
        nodes = self.nodes
        for i in range(start_id, len(names)):
            name, ino = names[i]
            node = nodes[ino]
            assert node is not None
            if not pyfuse3.readdir_reply(token, FileNameT(name), node.attr, i + 1):
                return

    async def releasedir(self, fh: FileHandleT) -> None:
        self.calls["releasedir"] += 1
        if self.passthrough:
            os.close(self.dirs.pop(fh)[0])

    async def open(
        self, inode: InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        self.calls["open"] += 1
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.passthrough:  # a descriptor per open, closed on release
            try:
                own = os.open(self._node(inode).path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            return pyfuse3.FileInfo(fh=FileHandleT(own), keep_cache=True)
        fd = self.fds.get(inode)
        if fd is None:
            node = self._node(inode)
            if len(self.fds) >= self.max_fds:  # evict the oldest descriptor
                os.close(self.fds.pop(next(iter(self.fds))))
            try:
                fd = os.open(node.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            self.fds[inode] = fd
        return pyfuse3.FileInfo(fh=FileHandleT(inode), keep_cache=True)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        self.calls["read"] += 1
        if self.passthrough:
            return os.pread(fh, size, off)
        fd = self.fds.get(fh)
        if fd is None:  # evicted while open: reopen
            fd = os.open(self._node(fh).path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            self.fds[fh] = fd
        return os.pread(fd, size, off)

    async def release(self, fh: FileHandleT) -> None:
        self.calls["release"] += 1
        if self.passthrough:
            os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self.calls["statfs"] += 1
        return self.statvfs

    async def getxattr(
        self, inode: InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        self.calls["getxattr"] += 1
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(
        self, inode: InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        self.calls["listxattr"] += 1
        return []

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        self.calls["forget"] += 1
        pass


def _raise_nofile() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root: to fs.nr_open); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        return want
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard


def fast_loop(every: int = 64) -> None:
    """Experiment: let pyfuse3's request loop read the next request without parking.

    pyfuse3 parks every worker on a trio lock and ``wait_readable`` (an
    ``epoll_ctl`` pair and a scheduler pass) before *each* request.  This
    replaces that wait with a zero-timeout ``poll``: while requests are queued
    they are read back to back, with a trio checkpoint every ``every``
    requests.  Only safe with one worker task (``max_tasks=1``), since a
    second, parked reader could be woken for a request this one already took,
    and with handlers that never block.
    """
    fd = loop.fuse_fd()
    if fd is None:
        raise RuntimeError("no /dev/fuse descriptor")
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    parked = pyfuse3._wait_fuse_readable  # type: ignore[attr-defined]
    count = 0

    async def wait_fuse_readable() -> bool:
        nonlocal count
        if poller.poll(0):
            count += 1
            if count % every == 0:
                await trio.lowlevel.checkpoint()
            return True
        result: bool = await parked()
        return result

    pyfuse3._wait_fuse_readable = wait_fuse_readable  # type: ignore[attr-defined]


async def _serve(ops: FloorOperations, max_tasks: int) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
            with trio.open_signal_receiver(*sigs) as signals:
                async for signum in signals:
                    if signum == signal.SIGUSR1:  # report and reset the request counts
                        log.info("calls %s", json.dumps(dict(ops.calls), sort_keys=True))
                        ops.calls.clear()
                        continue
                    log.info("signal %d: unmounting", signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await pyfuse3.main(max_tasks=max_tasks)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="floorfs", description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--owner", type=int, default=os.getuid(), help="presented uid")
    p.add_argument("--max-tasks", type=int, default=99, help="pyfuse3 worker tasks")
    p.add_argument("--debug", action="store_true")
    p.add_argument(
        "--passthrough",
        action="store_true",
        help="touch SOURCE as a passthrough filesystem must, no more: lstat per lookup and "
        "getattr, open/close per open, open and one read of a directory per opendir",
    )
    p.add_argument(
        "--fast-loop", action="store_true", help="experiment: read queued requests without parking"
    )
    p.add_argument(
        "--noatimefs-loop",
        action="store_true",
        help="the request loop noatimefs runs (noatimefs/loop.py) instead of pyfuse3's",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s floorfs %(levelname)s %(message)s",
    )
    t0 = time.monotonic()
    ops = FloorOperations(os.path.abspath(args.source), args.owner, args.passthrough)
    log.info("snapshot: %d entries in %.2fs", len(ops.nodes) - 1, time.monotonic() - t0)
    options = set(pyfuse3.default_options)
    options |= {"ro", "allow_other", "fsname=" + os.path.abspath(args.source), "subtype=floorfs"}
    pyfuse3.init(ops, args.mountpoint, options)
    log.info("mounted %s on %s", args.source, args.mountpoint)
    if args.noatimefs_loop and not loop.install():
        raise SystemExit("floorfs: noatimefs's request loop cannot be installed here")
    if args.fast_loop:
        fast_loop()
        args.max_tasks = 1
        log.info("fast loop: one worker task, no parking while requests are queued")
    try:
        trio.run(_serve, ops, args.max_tasks)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
