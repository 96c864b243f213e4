"""Every write-type operation through the mount fails with EROFS, and SOURCE stays unchanged."""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import util

pytestmark = pytest.mark.mount

Op = Callable[[Path], object]


def _open(flags: int, name: str = "data/a.txt") -> Op:
    def op(m: Path) -> None:
        os.close(os.open(m / name, flags, 0o644))

    return op


# Each op gets the mount's root; names that must not exist yet start with "new".
WRITE_OPS: dict[str, Op] = {
    "open O_WRONLY": _open(os.O_WRONLY),
    "open O_RDWR": _open(os.O_RDWR),
    "open O_WRONLY|O_APPEND": _open(os.O_WRONLY | os.O_APPEND),
    "open O_RDONLY|O_TRUNC": _open(os.O_RDONLY | os.O_TRUNC),
    "open O_CREAT new": _open(os.O_WRONLY | os.O_CREAT, "data/new-file"),
    "open O_CREAT|O_EXCL new": _open(os.O_RDONLY | os.O_CREAT | os.O_EXCL, "new-file"),
    "open O_TMPFILE": _open(os.O_WRONLY | os.O_TMPFILE, "data"),
    "mkdir": lambda m: os.mkdir(m / "data" / "new-dir"),
    "rmdir (empty)": lambda m: os.rmdir(m / "data" / "xdir"),
    "rmdir (full)": lambda m: os.rmdir(m / "many"),
    "unlink": lambda m: os.unlink(m / "data" / "a.txt"),
    "unlink symlink": lambda m: os.unlink(m / "links" / "rel"),
    "rename file": lambda m: os.rename(m / "data" / "a.txt", m / "data" / "new-name"),
    "rename dir": lambda m: os.rename(m / "data" / "xdir", m / "new-dir"),
    "rename over": lambda m: os.rename(m / "data" / "a.txt", m / "data" / "empty"),
    "link": lambda m: os.link(m / "data" / "a.txt", m / "data" / "new-link"),
    "symlink": lambda m: os.symlink("a.txt", m / "data" / "new-symlink"),
    "mknod fifo": lambda m: os.mknod(m / "data" / "new-fifo", 0o644 | stat.S_IFIFO),
    "mknod regular": lambda m: os.mknod(m / "data" / "new-reg", 0o644 | stat.S_IFREG),
    "chmod": lambda m: os.chmod(m / "data" / "a.txt", 0o777),
    "chmod dir": lambda m: os.chmod(m / "data", 0o777),
    "chown": lambda m: os.chown(m / "data" / "a.txt", 1, 1),
    "lchown symlink": lambda m: os.chown(m / "links" / "rel", 1, 1, follow_symlinks=False),
    "utime": lambda m: os.utime(m / "data" / "a.txt", (0, 0)),
    "utime now": lambda m: os.utime(m / "data" / "a.txt"),
    "truncate": lambda m: os.truncate(m / "data" / "a.txt", 0),
    "setxattr new": lambda m: os.setxattr(m / "data" / "a.txt", "user.new", b"x"),
    "setxattr existing": lambda m: os.setxattr(m / "data" / "xattr.txt", "user.color", b"red"),
    "setxattr status": lambda m: os.setxattr(m, util.STATUS_XATTR, b"{}"),
    "removexattr": lambda m: os.removexattr(m / "data" / "xattr.txt", "user.color"),
    "removexattr dir": lambda m: os.removexattr(m / "data" / "xdir", "user.color"),
}


@pytest.mark.parametrize("name", sorted(WRITE_OPS))
def test_write_op_is_erofs(store_mount: util.Mount, name: str) -> None:
    got = util.errno_of(lambda: WRITE_OPS[name](store_mount.path))
    assert got == errno.EROFS, f"{name}: {errno.errorcode.get(got, got)}"


def test_ftruncate_and_write_on_a_read_only_fd_fail(store_mount: util.Mount) -> None:
    fd = os.open(store_mount.path / "data" / "a.txt", os.O_RDONLY)
    try:
        assert util.errno_of(lambda: os.write(fd, b"x")) == errno.EBADF
        assert util.errno_of(lambda: os.ftruncate(fd, 0)) in (errno.EBADF, errno.EINVAL)
        assert util.errno_of(lambda: os.fchmod(fd, 0o777)) == errno.EROFS
    finally:
        os.close(fd)


_NOBODY_WRITES = """
m = DATA
def w(p, flags):
    os.close(os.open(p, flags, 0o644))
emit({
    "open O_RDWR own file": errno_of(w, m + "/data/nobody.txt", os.O_RDWR),
    "open O_WRONLY": errno_of(w, m + "/data/a.txt", os.O_WRONLY),
    "create": errno_of(w, m + "/data/new-file", os.O_WRONLY | os.O_CREAT),
    "mkdir": errno_of(os.mkdir, m + "/new-dir"),
    "unlink": errno_of(os.unlink, m + "/data/a.txt"),
    "chmod own file": errno_of(os.chmod, m + "/data/nobody.txt", 0o666),
    "utime": errno_of(os.utime, m + "/data/a.txt"),
    "setxattr": errno_of(os.setxattr, m + "/data/a.txt", "user.new", b"x"),
})
"""


def test_presented_owner_writes_are_erofs(store_mount: util.Mount) -> None:
    """The presented owner "owns" what it sees, yet every write is refused too."""
    r = util.run_as(*util.NOBODY, _NOBODY_WRITES, str(store_mount.path))
    assert r == {k: errno.EROFS for k in r}, r


def test_presented_owner_userns_root_writes_are_erofs(store_mount: util.Mount) -> None:
    r = util.run_as(*util.NOBODY, _NOBODY_WRITES, str(store_mount.path), userns="user")
    assert r == {k: errno.EROFS for k in r}, r


@pytest.fixture(scope="module", autouse=True)
def store_manifest(store: Path) -> dict[str, dict[str, Any]]:
    """SOURCE's manifest before this module's first test."""
    return util.manifest(store)


def test_source_unchanged_after_write_attempts(
    store: Path, store_manifest: dict[str, dict[str, Any]], store_mount: util.Mount
) -> None:
    """Runs after the write tests above (file order); the ``store`` fixture re-checks at the end."""
    results = {}
    for name, op in WRITE_OPS.items():
        results[name] = util.errno_of(functools.partial(op, store_mount.path))
    assert set(results.values()) == {errno.EROFS}, results
    after = util.manifest(store)
    assert after == store_manifest, util.manifest_diff(store_manifest, after)


def test_mount_is_read_only_in_mountinfo(store: Path, store_mount: util.Mount) -> None:
    entry = util.mount_entry(store_mount.path)
    assert entry is not None
    assert entry.fstype == "fuse.noatimefs"
    assert entry.source == str(store)
    assert "ro" in entry.mount_options, entry
    assert "default_permissions" in entry.super_options, entry
    assert "allow_other" in entry.super_options, entry
    assert os.statvfs(store_mount.path).f_flag & os.ST_RDONLY
