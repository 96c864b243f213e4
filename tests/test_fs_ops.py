"""The pyfuse3 adapter in-process: handlers called directly, no mount, a duck-typed ctx."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pyfuse3
import pytest
import trio
import util

from noatimefs import fs as fs_module
from noatimefs import listing, policy, replyflags, source
from noatimefs.fs import STATUS_XATTR, NoatimeFS
from noatimefs.inodes import ROOT_ID
from noatimefs.source import Source
from noatimefs.watch import IN_Q_OVERFLOW, Event

T = TypeVar("T")


@dataclass
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = os.getpid()
    umask: int = 0o022


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    async def call() -> T:
        return await fn(*args)

    return trio.run(call)


def errno_of(fn: Callable[..., Awaitable[object]], *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(fn, *args)
    return info.value.errno


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "pkg" / "bin").mkdir(parents=True)
    (src / "pkg" / "data").write_bytes(b"store bytes\n" * 100)
    (src / "pkg" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "pkg" / "bin" / "tool").chmod(0o555)
    os.link(src / "pkg" / "data", src / "pkg" / "hardlink")
    (src / "pkg" / "link").symlink_to("data")
    (src / "secret").write_bytes(b"no")
    (src / "secret").chmod(0o600)
    os.setxattr(src / "pkg" / "data", "user.origin", b"test")
    return src


@pytest.fixture
def ops(tree: Path) -> Iterator[NoatimeFS]:
    source = Source(str(tree))
    consumer = policy.Consumer(65534, frozenset({65534}), 65534)
    fs = NoatimeFS(source, consumer, timeout=5.0, daemon_uid=0)
    yield fs
    fs.close()
    source.close()


def lookup(ops: NoatimeFS, path: str, ctx: Ctx | None = None) -> pyfuse3.EntryAttributes:
    node_id = ROOT_ID
    attr = run(ops.getattr, ROOT_ID, ctx or Ctx())
    for part in path.split("/"):
        attr = run(ops.lookup, node_id, part.encode(), ctx or Ctx())
        node_id = attr.st_ino
    return attr


def test_lookup_presents_consumer_and_source_inode(ops: NoatimeFS, tree: Path) -> None:
    attr = lookup(ops, "pkg/data")
    st = os.lstat(tree / "pkg" / "data")
    assert attr.st_ino == st.st_ino
    assert (attr.st_uid, attr.st_gid) == (65534, 65534)  # public: the consumer's gid
    assert attr.st_mode == stat.S_IFREG | 0o444
    assert attr.st_size == st.st_size
    assert attr.entry_timeout == attr.attr_timeout == 5.0


def test_unreadable_file_keeps_real_owner(ops: NoatimeFS) -> None:
    attr = lookup(ops, "secret")
    assert (attr.st_uid, stat.S_IMODE(attr.st_mode)) == (0, 0o600)


def test_hard_links_are_one_inode(ops: NoatimeFS) -> None:
    assert lookup(ops, "pkg/data").st_ino == lookup(ops, "pkg/hardlink").st_ino


def test_lookup_missing_is_enoent(ops: NoatimeFS) -> None:
    assert errno_of(ops.lookup, ROOT_ID, b"nope", Ctx()) == errno.ENOENT


def test_unknown_inode_is_enoent(ops: NoatimeFS) -> None:
    assert errno_of(ops.getattr, 999_999, Ctx()) == errno.ENOENT


def test_open_read_release_and_noatime_counters(ops: NoatimeFS) -> None:
    node = lookup(ops, "pkg/data").st_ino
    user = Ctx(uid=65534, gid=65534)
    info = run(ops.open, node, os.O_RDONLY | os.O_NOATIME, user)
    flags = fcntl.fcntl(info.fh, fcntl.F_GETFL)
    assert not flags & os.O_NOATIME
    # Opened O_NONBLOCK (a FIFO must not stall the open); left so where reads ignore it
    assert bool(flags & os.O_NONBLOCK) is ops.source.is_local(os.fstat(info.fh).st_dev)
    assert run(ops.read, info.fh, 0, 12) == b"store bytes\n"
    assert run(ops.read, info.fh, 1200 - 5, 100) == b"ytes\n"  # short at EOF
    run(ops.release, info.fh)
    assert (ops.stats.noatime_dropped, ops.stats.noatime_kept) == (1, 0)
    info = run(ops.open, node, os.O_RDONLY | os.O_NOATIME, Ctx())
    flags = fcntl.fcntl(info.fh, fcntl.F_GETFL)
    assert flags & os.O_NOATIME
    assert not flags & os.O_NONBLOCK
    run(ops.release, info.fh)
    assert (ops.stats.noatime_dropped, ops.stats.noatime_kept) == (1, 1)
    assert not ops.files


def test_open_clears_nonblock_where_reads_would_see_it(
    ops: NoatimeFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SOURCE on a filesystem not known to ignore O_NONBLOCK in reads (FUSE, NFS, 9p)."""
    assert ops.source.is_local(os.stat(ops.source.root_fd).st_dev)  # ext4, xfs, btrfs, tmpfs
    monkeypatch.setattr(ops.source, "is_local", lambda dev: False)
    info = run(ops.open, lookup(ops, "pkg/data").st_ino, os.O_RDONLY, Ctx(uid=65534, gid=65534))
    assert not fcntl.fcntl(info.fh, fcntl.F_GETFL) & os.O_NONBLOCK
    assert run(ops.read, info.fh, 0, 5) == b"store"
    run(ops.release, info.fh)


@pytest.mark.parametrize(("path", "local"), [("/dev/shm", True), ("/proc", False), ("/sys", False)])
def test_source_tells_local_filesystems_by_device(path: str, local: bool) -> None:
    src = Source("/")
    try:
        assert src.is_local(os.stat(path).st_dev) is local  # tmpfs; proc and sysfs
        assert src.is_local(os.stat(path).st_dev) is local  # (kept)
        assert not src.is_local(os.makedev(4095, 1_048_575))  # mounted nowhere
    finally:
        src.close()


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "tmpfs"])
def test_source_tells_its_own_filesystem_local(fstype: str) -> None:
    """Also btrfs, whose files' st_dev is a subvolume's device that mountinfo does not name."""
    with util.world_tmpdir() as base, util.scratch_fs(base, fstype) as root:
        (root / "sub").mkdir()
        src = Source(str(root / "sub"))
        try:
            assert src.is_local(os.stat(root / "sub").st_dev)
        finally:
            src.close()


def test_open_rechecks_real_access(ops: NoatimeFS) -> None:
    node = lookup(ops, "secret").st_ino
    assert errno_of(ops.open, node, os.O_RDONLY, Ctx(uid=65534, gid=65534)) == errno.EACCES
    assert not ops.files


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_write_opens_are_erofs(ops: NoatimeFS, flags: int) -> None:
    node = lookup(ops, "pkg/data").st_ino
    assert errno_of(ops.open, node, flags, Ctx()) == errno.EROFS


def test_write_operations_are_erofs(ops: NoatimeFS) -> None:
    assert errno_of(ops.mkdir, ROOT_ID, b"d", 0o755, Ctx()) == errno.EROFS
    assert errno_of(ops.unlink, ROOT_ID, b"secret", Ctx()) == errno.EROFS
    assert errno_of(ops.setxattr, ROOT_ID, b"user.x", b"1", Ctx()) == errno.EROFS
    assert errno_of(ops.create, ROOT_ID, b"f", 0o644, os.O_WRONLY, Ctx()) == errno.EROFS


def test_readlink_and_xattrs(ops: NoatimeFS) -> None:
    assert run(ops.readlink, lookup(ops, "pkg/link").st_ino, Ctx()) == b"data"
    node = lookup(ops, "pkg/data").st_ino
    assert run(ops.listxattr, node, Ctx()) == [b"user.origin"]
    assert run(ops.getxattr, node, b"user.origin", Ctx()) == b"test"
    assert errno_of(ops.getxattr, node, b"user.none", Ctx()) == errno.ENODATA


def test_status_xattr_only_on_root(ops: NoatimeFS) -> None:
    status = json.loads(run(ops.getxattr, ROOT_ID, STATUS_XATTR, Ctx()))
    assert status["pid"] == os.getpid()
    assert status["owner"] == 65534
    assert STATUS_XATTR not in run(ops.listxattr, ROOT_ID, Ctx())


def test_replaced_file_is_stale(ops: NoatimeFS, tree: Path) -> None:
    node = lookup(ops, "pkg/data").st_ino
    (tree / "pkg" / "data.new").write_bytes(b"new")
    os.rename(tree / "pkg" / "data.new", tree / "pkg" / "data")
    assert errno_of(ops.getattr, node, Ctx()) == errno.ESTALE
    assert errno_of(ops.open, node, os.O_RDONLY, Ctx()) == errno.ESTALE
    assert lookup(ops, "pkg/data").st_ino != node  # a fresh lookup finds the new file


def test_changed_ctime_bumps_generation(ops: NoatimeFS, tree: Path) -> None:
    first = lookup(ops, "pkg/bin/tool")
    os.chmod(tree / "pkg" / "bin" / "tool", 0o544)  # a new ctime, as a recycled inode has
    again = lookup(ops, "pkg/bin/tool")
    assert again.st_ino == first.st_ino
    assert again.generation == first.generation + 1


def test_forget_frees_nodes(ops: NoatimeFS) -> None:
    before = len(ops.inodes)
    node = lookup(ops, "pkg/data").st_ino
    lookup(ops, "pkg/data")
    pkg = lookup(ops, "pkg").st_ino
    assert len(ops.inodes) == before + 2
    run(ops.forget, [(node, 2), (pkg, 3)])
    assert len(ops.inodes) == before


def test_symlink_in_path_is_not_followed(ops: NoatimeFS, tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_bytes(b"outside")
    node = lookup(ops, "pkg/data").st_ino
    os.rename(tree / "pkg", tree / "pkg.old")
    (tree / "pkg").symlink_to(outside)
    assert errno_of(ops.open, node, os.O_RDONLY, Ctx()) in (errno.ELOOP, errno.ESTALE)


def test_statfs_matches_source(ops: NoatimeFS, tree: Path) -> None:
    data = run(ops.statfs, Ctx())
    sv = os.statvfs(tree)
    assert (data.f_bsize, data.f_blocks, data.f_files) == (sv.f_bsize, sv.f_blocks, sv.f_files)


# --------------------------------------------------------------------------- listings


@dataclass(frozen=True)
class Listed:
    name: bytes
    ino: int
    uid: int
    mode: int
    size: int


def readdir(
    ops: NoatimeFS,
    node_id: int,
    monkeypatch: pytest.MonkeyPatch,
    ctx: Ctx | None = None,
    per_call: int = 1 << 30,
) -> list[Listed]:
    """opendir, readdir until the end (*per_call* entries per reply), releasedir."""
    got: list[Listed] = []
    room = [0]
    offset = [0]  # the next_id of the last entry taken, as the kernel passes it back

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if room[0] == 0:
            return False
        room[0] -= 1
        got.append(Listed(name, attr.st_ino, attr.st_uid, attr.st_mode, attr.st_size))
        offset[0] = next_id
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = run(ops.opendir, node_id, ctx or Ctx())
    try:
        while True:
            before = len(got)
            room[0] = per_call
            run(ops.readdir, fh, offset[0], None)
            if len(got) == before:
                return got
    finally:
        run(ops.releasedir, fh)


def test_opendir_lists_nothing_until_read(ops: NoatimeFS, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = lookup(ops, "pkg").st_ino
    for node_id in (ROOT_ID, pkg):
        fh = run(ops.opendir, node_id, Ctx())
        run(ops.releasedir, fh)
    assert (ops.dir_cache.misses, ops.dir_cache.hits, ops.top.listed) == (0, 0, 0)
    assert ops.walk_ahead.named == 0  # nothing was listed, so no walk of the store follows
    assert {e.name for e in readdir(ops, pkg, monkeypatch)} == {
        b"bin",
        b"data",
        b"hardlink",
        b"link",
    }
    assert ops.dir_cache.misses == 1
    readdir(ops, pkg, monkeypatch)
    assert (ops.dir_cache.misses, ops.dir_cache.hits) == (1, 1)


def test_a_store_path_listed_from_the_cache_is_walked_ahead_once_source_is_cold(
    ops: NoatimeFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's listing cache outlives SOURCE's caches: a store path served from it
    is named to the walk-ahead helper when its first subdirectory is no longer in memory."""
    named: list[bytes] = []
    monkeypatch.setattr(ops.walk_ahead, "want", lambda name, **_: named.append(name))
    pkg = lookup(ops, "pkg").st_ino
    readdir(ops, pkg, monkeypatch)
    assert named == [b"pkg"]  # listed now
    readdir(ops, pkg, monkeypatch)
    assert named == [b"pkg"]  # from the cache, and pkg/bin resolves from memory
    asked: list[bytes] = []

    def cold(relpath: bytes) -> bool:
        asked.append(relpath)
        return False

    monkeypatch.setattr(ops.source, "in_memory", cold)
    readdir(ops, pkg, monkeypatch)
    assert (named, asked) == ([b"pkg", b"pkg"], [b"pkg/bin"])


def test_opendir_rechecks_real_access(ops: NoatimeFS, tree: Path) -> None:
    (tree / "private").mkdir(mode=0o700)
    node = lookup(ops, "private").st_ino
    assert errno_of(ops.opendir, node, Ctx(uid=65534, gid=65534)) == errno.EACCES
    assert not ops.dirs
    run(ops.releasedir, run(ops.opendir, node, Ctx()))


def test_readdir_resumes_at_offsets_and_presents_each_entry(
    ops: NoatimeFS, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = readdir(ops, lookup(ops, "pkg").st_ino, monkeypatch, per_call=1)
    by_name = {e.name: e for e in got}
    assert len(got) == len(by_name) == 4
    data = os.lstat(tree / "pkg" / "data")
    assert by_name[b"data"].ino == by_name[b"hardlink"].ino == data.st_ino
    assert by_name[b"data"].uid == 65534
    assert by_name[b"data"].mode == stat.S_IFREG | 0o444
    got = readdir(ops, ROOT_ID, monkeypatch)
    secret = next(e for e in got if e.name == b"secret")
    assert (secret.uid, secret.mode) == (0, stat.S_IFREG | 0o600)  # unusable: real owner


def test_a_kept_listing_is_presented_per_consumer(
    ops: NoatimeFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listings hold facts of SOURCE only: each reply presents them to its own consumer."""
    pkg = ops.inodes.get(lookup(ops, "pkg").st_ino)
    readdir(ops, pkg.id, monkeypatch)
    kept = ops.dir_cache.peek(pkg.key)
    assert kept is not None
    sent: list[tuple[bytes, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        sent.append((name, attr.st_uid))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    token = cast(pyfuse3.ReaddirToken, None)
    for uid in (65534, 4242):
        listing.reply(
            token, pkg, kept.entries, 0, policy.Consumer(uid, frozenset(), uid), ops.inodes
        )
    assert dict(sent[:4]) == dict.fromkeys([b"bin", b"data", b"hardlink", b"link"], 65534)
    assert dict(sent[4:]) == dict.fromkeys([b"bin", b"data", b"hardlink", b"link"], 4242)


def test_the_top_level_listing_is_kept_and_follows_source(
    ops: NoatimeFS, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept while the watch runs; every change made before a readdir shows in it."""

    def source() -> dict[bytes, tuple[int, int]]:
        return {
            os.fsencode(n): (os.lstat(tree / n).st_ino, os.lstat(tree / n).st_size)
            for n in os.listdir(tree)
        }

    def mounted() -> dict[bytes, tuple[int, int]]:
        """Like source(); a recycled inode number whose old file the table still holds
        shows as another node id (:mod:`noatimefs.inodes`): it counts as the source's."""
        ids = {}
        for e in readdir(ops, ROOT_ID, monkeypatch):
            ino = os.lstat(tree / os.fsdecode(e.name)).st_ino if e.ino >= 1 << 63 else e.ino
            ids[e.name] = (ino, e.size)
        return ids

    (tree / "single").write_bytes(b"old")
    assert ops.start_watch() is not None
    try:
        assert mounted() == source()
        assert mounted() == source()
        assert ops.top.listed == 1  # the second readdir was served from the kept listing
        (tree / "new").write_bytes(b"created")  # created
        (tree / "tmp").mkdir()
        (tree / "tmp").rename(tree / "moved-in")  # moved into place
        (tree / "secret").unlink()  # deleted
        (tree / "single.tmp").write_bytes(b"replaced, longer")
        (tree / "single.tmp").rename(tree / "single")  # replaced
        (tree / "pkg" / "data").chmod(0o400)  # below the top level: no event, no change
        assert mounted() == source()
        assert ops.top.listed == 1  # updated name by name, not listed again
        ops.on_top_level_event(Event(-1, IN_Q_OVERFLOW, b""))
        assert ops.top.entries() is None  # an overflowed queue drops the listing
        assert mounted() == source()
        assert ops.top.listed == 2
    finally:
        ops.stop_watch()
    assert mounted() == source()
    assert ops.top.listed == 2  # without a watch nothing is kept


def test_top_level_lookups_answer_from_the_kept_listing(
    ops: NoatimeFS, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the top level kept, a lookup there asks SOURCE nothing, and applies the watch's
    queued events first: a change made before it always shows (no task runs between here)."""

    def stat_of(name: bytes) -> tuple[int, int, int] | int:
        """(inode number, size, owner) or the errno; a spill id (an inode number ext4 gave
        again while the table holds its old file, see noatimefs.inodes) shows as -1."""
        try:
            attr = run(ops.lookup, ROOT_ID, name, Ctx())
        except pyfuse3.FUSEError as exc:
            return exc.errno
        return attr.st_ino if attr.st_ino < 1 << 63 else -1, attr.st_size, attr.st_uid

    (tree / "single").write_bytes(b"old")
    assert ops.start_watch() is not None
    try:
        readdir(ops, ROOT_ID, monkeypatch)
        assert ops.top.by_name() is not None
        (tree / "new").write_bytes(b"created")
        (tree / "secret").unlink()
        (tree / "single.tmp").write_bytes(b"replaced, longer")
        (tree / "single.tmp").rename(tree / "single")
        new, single = os.lstat(tree / "new"), os.lstat(tree / "single")
        assert stat_of(b"new") in {(ino, new.st_size, 65534) for ino in (new.st_ino, -1)}
        assert stat_of(b"single") in {(ino, single.st_size, 65534) for ino in (single.st_ino, -1)}
        assert stat_of(b"secret") == errno.ENOENT
        assert stat_of(b"never") == errno.ENOENT
        assert stat_of(b"n" * 300) == errno.ENAMETOOLONG  # SOURCE's answer, not the listing's
        assert stat_of(b"pkg")[2] == 65534  # type: ignore[index]
        assert ops.stats.lookups_kept == 5
        assert ops.top.listed == 1
    finally:
        ops.stop_watch()
    assert stat_of(b"new") in {(ino, new.st_size, 65534) for ino in (new.st_ino, -1)}
    assert ops.stats.lookups_kept == 5  # without a watch nothing is kept: SOURCE answers


def test_lookups_below_the_top_answer_from_a_current_listing(
    ops: NoatimeFS, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a directory's cached listing is of its ctime of now, a lookup in it asks SOURCE
    only for the directory's identity; once its entries change, SOURCE answers again."""
    asked: list[bytes] = []
    real_identify = source.identify

    def identify(dirfd: int, name: bytes) -> tuple[os.stat_result, bytes | None]:
        asked.append(name)
        return real_identify(dirfd, name)

    monkeypatch.setattr(fs_module, "identify", identify)
    pkg = lookup(ops, "pkg").st_ino
    readdir(ops, pkg, monkeypatch)
    data = run(ops.lookup, pkg, b"data", Ctx())
    assert (data.st_ino, data.st_size, data.st_uid) == (
        os.lstat(tree / "pkg" / "data").st_ino,
        1200,
        65534,
    )
    assert run(ops.lookup, pkg, b"hardlink", Ctx()).st_ino == data.st_ino
    assert stat.S_ISLNK(run(ops.lookup, pkg, b"link", Ctx()).st_mode)
    assert errno_of(ops.lookup, pkg, b"never", Ctx()) == errno.ENOENT
    assert (asked, ops.stats.lookups_listed) == ([], 4)
    # A name longer than NAME_MAX: SOURCE tells why there is none (the listing cannot).
    assert errno_of(ops.lookup, pkg, b"n" * 300, Ctx()) == errno.ENAMETOOLONG
    assert (asked, ops.stats.lookups_listed) == ([b"n" * 300], 4)

    (tree / "pkg" / "never").write_bytes(b"now there")
    assert run(ops.lookup, pkg, b"never", Ctx()).st_size == 9
    assert (asked, ops.stats.lookups_listed) == ([b"n" * 300, b"never"], 4)


def test_without_the_c_module_listings_still_work_and_stop_asking_the_kernel(
    ops: NoatimeFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process nothing carries the flag bits (no libfuse reply): they come back in
    the handle, as they would if noatimefs._replyflags were loaded too late."""
    ops.kernel_listings = True
    pkg = lookup(ops, "pkg").st_ino
    fh = run(ops.opendir, pkg, Ctx())
    assert replyflags.inactive(fh)
    run(ops.releasedir, fh)
    assert not ops.dirs
    assert {e.name for e in readdir(ops, pkg, monkeypatch)} == {
        b"bin",
        b"data",
        b"hardlink",
        b"link",
    }
    assert ops.kernel_listings is False
    fh = run(ops.opendir, pkg, Ctx())
    assert not replyflags.inactive(fh)  # no longer asked for
    run(ops.releasedir, fh)
