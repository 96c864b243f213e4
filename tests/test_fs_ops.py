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
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio

from noatimefs import policy
from noatimefs.fs import STATUS_XATTR, NoatimeFS
from noatimefs.inodes import ROOT_ID
from noatimefs.source import Source

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
    assert run(ops.read, info.fh, 0, 12) == b"store bytes\n"
    assert run(ops.read, info.fh, 1200 - 5, 100) == b"ytes\n"  # short at EOF
    run(ops.release, info.fh)
    assert (ops.stats.noatime_dropped, ops.stats.noatime_kept) == (1, 0)
    info = run(ops.open, node, os.O_RDONLY | os.O_NOATIME, Ctx())
    assert fcntl.fcntl(info.fh, fcntl.F_GETFL) & os.O_NOATIME
    run(ops.release, info.fh)
    assert (ops.stats.noatime_dropped, ops.stats.noatime_kept) == (1, 1)
    assert not ops.files


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
