"""The mount shows the tree as SOURCE has it: links, inode identity, big dirs, xattrs, statfs.

Also exec and mmap of files through the mount.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import platform
import stat
import subprocess
from pathlib import Path

import pytest
import util
from conftest import MANY, XATTRS

pytestmark = pytest.mark.mount


@pytest.mark.parametrize("name", ["rel", "abs", "dangling", "dirlink"])
def test_symlinks_read_as_on_source(store: Path, store_mount: util.Mount, name: str) -> None:
    src, mnt = store / "links" / name, store_mount.path / "links" / name
    assert stat.S_ISLNK(os.lstat(mnt).st_mode)
    assert os.readlink(mnt) == os.readlink(src)
    assert os.lstat(mnt).st_size == os.lstat(src).st_size


def test_relative_symlinks_resolve_inside_the_mount(store: Path, store_mount: util.Mount) -> None:
    m = store_mount.path
    assert (m / "links" / "rel").read_bytes() == (store / "data" / "a.txt").read_bytes()
    assert os.path.realpath(m / "links" / "rel") == str(m / "data" / "a.txt")
    assert sorted(os.listdir(m / "links" / "dirlink")) == sorted(os.listdir(store / "data"))
    assert not (m / "links" / "dangling").exists()
    # A symlink inside the storegen tree pointing to another store path.
    for root, _, files in os.walk(store / "nix"):
        for f in files:
            p = Path(root) / f
            if p.is_symlink() and p.exists():
                rel = p.relative_to(store)
                assert (m / rel).read_bytes() == p.read_bytes(), rel


def test_hard_links_are_one_inode(store: Path, store_mount: util.Mount) -> None:
    m = store_mount.path / "data"
    a, h = os.lstat(m / "a.txt"), os.lstat(m / "hard.txt")
    assert a.st_ino == h.st_ino
    assert a.st_nlink == h.st_nlink == 2
    assert os.lstat(m / "big.bin").st_ino != a.st_ino
    # Same answer after the kernel has forgotten nothing and after a fresh lookup by other name.
    assert os.stat(m / "hard.txt").st_ino == os.stat(m / "a.txt").st_ino


def test_inode_numbers_are_distinct_and_stable(store_mount: util.Mount) -> None:
    m = store_mount.path / "nix"
    first = {str(p): p.lstat().st_ino for p in m.rglob("*")}
    second = {str(p): p.lstat().st_ino for p in m.rglob("*")}
    assert first == second
    by_ino = collections.defaultdict(list)
    for p, ino in first.items():
        by_ino[ino].append(p)
    shared = {ino: ps for ino, ps in by_ino.items() if len(ps) > 1}
    assert not shared, shared


def test_inode_numbers_survive_a_remount(store: Path, store_mount: util.Mount) -> None:
    """A second daemon on the same SOURCE shows the same inode numbers (9p qids stay valid)."""
    rels = ["data", "data/a.txt", "data/hard.txt", "links/rel", "bin/true", "many/f12345"]
    rels += [str(p.relative_to(store)) for p in sorted((store / "nix").iterdir())[:5]]
    first = {rel: os.lstat(store_mount.path / rel).st_ino for rel in rels}
    with util.mounted(store, owner=util.NOBODY[0], allow_other=True) as again:
        second = {rel: os.lstat(again.path / rel).st_ino for rel in rels}
    assert first == second
    assert len(set(first.values())) == len(rels) - 1  # a.txt and hard.txt are one inode


def test_big_directory_lists_each_entry_once_with_d_ino_equal_st_ino(
    store: Path, store_mount: util.Mount
) -> None:
    with os.scandir(store_mount.path / "many") as it:
        entries = [(e.name, e.inode(), e.stat(follow_symlinks=False).st_ino) for e in it]
    names = [n for n, _, _ in entries]
    dupes = [n for n, c in collections.Counter(names).items() if c > 1]
    assert not dupes, dupes[:10]
    assert len(names) == MANY
    assert set(names) == set(os.listdir(store / "many"))
    wrong = [(n, d, s) for n, d, s in entries if d != s]
    assert not wrong, wrong[:10]
    assert len({s for _, _, s in entries}) == MANY


@pytest.mark.skipif(platform.machine() != "x86_64", reason="getdents64 syscall number")
def test_big_directory_listing_is_stable_across_reads(store_mount: util.Mount) -> None:
    """A listing read in small chunks (getdents resumes at offsets) still sees each name once."""
    code = """
import ctypes
names = []
fd = os.open(DATA, os.O_RDONLY | os.O_DIRECTORY)
buf = ctypes.create_string_buffer(1024)  # a few entries per getdents64 call
libc = ctypes.CDLL(None, use_errno=True)
SYS_getdents64 = 217
while True:
    n = libc.syscall(SYS_getdents64, fd, buf, len(buf))
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    if n == 0:
        break
    off = 0
    while off < n:
        reclen = int.from_bytes(buf.raw[off + 16:off + 18], "little")
        name = buf.raw[off + 19:off + reclen].split(b"\\0", 1)[0].decode()
        names.append(name)
        off += reclen
os.close(fd)
emit(names)
"""
    names = util.run_as(*util.NOBODY, code, str(store_mount.path / "many"))
    counts = collections.Counter(names)
    # SOURCE (ext4) lists "." and ".."; a FUSE fs may leave them out, but not repeat them.
    assert counts.pop(".", 1) == 1
    assert counts.pop("..", 1) == 1
    assert len(counts) == MANY
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("rel", ["data/xattr.txt", "data/xdir"])
def test_user_xattrs_listed_and_read_as_on_source(
    store: Path, store_mount: util.Mount, rel: str
) -> None:
    src, mnt = store / rel, store_mount.path / rel
    assert sorted(os.listxattr(mnt)) == sorted(os.listxattr(src))
    assert set(XATTRS) <= set(os.listxattr(mnt))
    for name, value in XATTRS.items():
        assert os.getxattr(mnt, name) == value == os.getxattr(src, name)


def test_xattrs_as_the_presented_owner(store: Path, store_mount: util.Mount) -> None:
    code = """
p = DATA
emit({n: os.getxattr(p, n).hex() for n in sorted(os.listxattr(p)) if n.startswith("user.")})
"""
    r = util.run_as(*util.NOBODY, code, str(store_mount.path / "data" / "xattr.txt"))
    assert r == {n: v.hex() for n, v in sorted(XATTRS.items())}


def test_missing_xattr_is_enodata(store_mount: util.Mount) -> None:
    got = util.errno_of(lambda: os.getxattr(store_mount.path / "data" / "a.txt", "user.nope"))
    assert got == errno.ENODATA


def test_statvfs_as_on_source(store: Path, store_mount: util.Mount) -> None:
    src, mnt = os.statvfs(store), os.statvfs(store_mount.path)
    for field in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
        assert getattr(mnt, field) == getattr(src, field), field
    # Free counts move with whatever else the machine writes: within 1 %.
    for field, total in (("f_bfree", "f_blocks"), ("f_bavail", "f_blocks"), ("f_ffree", "f_files")):
        slack = getattr(src, total) // 100
        assert abs(getattr(mnt, field) - getattr(src, field)) <= slack, field


def test_exec_through_the_mount(store_mount: util.Mount) -> None:
    bindir = store_mount.path / "bin"
    subprocess.run([bindir / "true"], check=True)
    out = subprocess.run([bindir / "hello.sh", "x"], check=True, capture_output=True, text=True)
    assert out.stdout == "hello-from-store x\n"
    # And as the presented owner, and as a stranger.
    code = 'emit([errno_of(run_file, DATA + "/true"), errno_of(run_file, DATA + "/hello.sh")])'
    assert util.run_as(*util.NOBODY, code, str(bindir)) == [0, 0]
    assert util.run_as(4242, 4242, code, str(bindir)) == [0, 0]


def test_mmap_through_the_mount(store: Path, store_mount: util.Mount) -> None:
    expected = (store / "data" / "big.bin").read_bytes()
    with (
        open(store_mount.path / "data" / "big.bin", "rb") as f,
        mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm,
    ):
        assert len(mm) == len(expected)
        assert mm[:4096] == expected[:4096]
        assert mm[-4096:] == expected[-4096:]
        assert mm[:] == expected
    with (
        open(store_mount.path / "bin" / "true", "rb") as f,
        mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC) as mm,
    ):
        assert mm[:4] == b"\x7fELF"


def test_file_contents_match_source_everywhere(store: Path, store_mount: util.Mount) -> None:
    """Every regular file of the storegen tree reads back byte for byte (as 65534)."""
    rels = sorted(
        str(p.relative_to(store))
        for p in (store / "nix").rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    code = 'emit({rel: sha256_file(DATA["mnt"] + "/" + rel) for rel in DATA["rels"]})'
    got = util.run_as(*util.NOBODY, code, {"mnt": str(store_mount.path), "rels": rels})
    want = util.run_as(*util.NOBODY, code, {"mnt": str(store), "rels": rels})
    assert got == want
    assert len(got) > 50


def test_stat_fields_as_presented(store: Path, store_mount: util.Mount) -> None:
    """Sizes, times, link counts, types as on SOURCE; owner 65534 only where 65534 may use it.

    Public entries (everyone may read them) get 65534's primary gid too; the
    private directory keeps its real owner and group.
    """
    for rel in ("data/a.txt", "data/big.bin", "data/xdir", "links/rel", "bin/true", "private"):
        s, m = os.lstat(store / rel), os.lstat(store_mount.path / rel)
        assert stat.S_IFMT(m.st_mode) == stat.S_IFMT(s.st_mode), rel
        assert (m.st_size, m.st_nlink, m.st_mtime_ns) == (s.st_size, s.st_nlink, s.st_mtime_ns), rel
        assert m.st_gid == (s.st_gid if rel == "private" else util.NOBODY[1]), rel
        # Never a permission bit the source does not have.
        assert stat.S_IMODE(m.st_mode) & ~stat.S_IMODE(s.st_mode) == 0, (rel, oct(m.st_mode))
    assert os.lstat(store_mount.path / "data" / "a.txt").st_uid == util.NOBODY[0]
    assert os.lstat(store_mount.path / "private").st_uid == 0


def test_the_mount_reads_ahead_a_megabyte(store_mount: util.Mount) -> None:
    """Big reads reach the daemon in 1 MiB requests, not the kernel's 128 KiB default for FUSE."""
    dev = os.stat(store_mount.path).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert int(knob.read_text()) == 1024
