"""A living store: paths appear, disappear, are renamed into place, and reuse inode numbers.

Every test mounts its own SOURCE (the session store must stay unchanged) and
changes SOURCE directly while the mount is up, the way a store's builder and
garbage collector do. What is asserted is what a caller reads through the
mount: bytes, errno and inode numbers, never timings.

The kernel caches entries and attributes for ``--timeout`` seconds (300 by
default); the daemon's inotify watch on SOURCE's top level invalidates a store
path that goes away. Most tests run with the default and with ``--timeout 0``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import util

from noatimefs import storegen

pytestmark = pytest.mark.mount

#: How long the daemon may take to close a released handle (it is asynchronous).
RELEASE_DEADLINE = 10.0


def _errno(fn: object, *args: object) -> int:
    """0 if ``fn(*args)`` works, else its errno."""
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or -1
    return 0


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rmtree(path: Path) -> None:
    """Remove a store path (its directories are read-only), as a garbage collector would."""
    if path.is_dir() and not path.is_symlink():
        storegen.remove_tree(path)
    else:
        path.unlink()


def _wait_no_handles(m: util.Mount) -> None:
    """Poll until the daemon holds no handle (FUSE_RELEASE is sent asynchronously)."""
    deadline = time.monotonic() + RELEASE_DEADLINE
    while m.status()["handles"]:
        assert time.monotonic() < deadline, f"handles still open: {m.status()}"
        time.sleep(0.01)


def _poll_enoent(path: Path) -> None:
    """Poll until *path* gives ENOENT (the watcher's invalidation is asynchronous)."""
    deadline = time.monotonic() + RELEASE_DEADLINE
    while _errno(os.stat, path) != errno.ENOENT:
        assert time.monotonic() < deadline, f"{path} still visible after {RELEASE_DEADLINE} s"
        time.sleep(0.01)


def _new_store_path(src: Path, name: str, content: bytes) -> Path:
    """Create ``src/name`` like a store does: build it under a temp name, then rename."""
    tmp = src / f".tmp-{name}"
    (tmp / "bin").mkdir(parents=True)
    (tmp / "bin" / "tool").write_bytes(content)
    (tmp / "bin" / "tool").chmod(0o555)
    (tmp / "bin").chmod(0o555)
    tmp.chmod(0o555)
    final = src / name
    tmp.rename(final)
    return final


@pytest.fixture
def store_src(world_tmp: Path) -> Path:
    src = world_tmp / "src"
    storegen.generate(src, paths=6, files_per_path=4, seed=11)
    return src


# --------------------------------------------------------------------------- paths appear


@pytest.mark.parametrize("timeout", [None, "0"], ids=["default-timeout", "timeout-0"])
def test_new_path_is_visible_at_once_even_after_a_failed_lookup(
    store_src: Path, timeout: str | None
) -> None:
    args = ("--timeout", timeout) if timeout else ()
    name = storegen.store_hash(99, 1) + "-fresh-1.0"
    single = storegen.store_hash(99, 2) + "-builder.sh"
    with util.mounted(store_src, None, *args) as m:
        before = set(os.listdir(m.path))
        # Failed lookups first: a stale negative entry would hide the new paths.
        assert _errno(os.stat, m.path / name) == errno.ENOENT
        assert _errno(os.stat, m.path / name / "bin" / "tool") == errno.ENOENT
        assert _errno(os.stat, m.path / single) == errno.ENOENT

        _new_store_path(store_src, name, b"#!/bin/sh\necho fresh\n")
        (store_src / single).write_bytes(b"echo built\n")

        assert _read(m.path / name / "bin" / "tool") == b"#!/bin/sh\necho fresh\n"
        assert _read(m.path / single) == b"echo built\n"
        assert set(os.listdir(m.path)) == before | {name, single}
        assert os.listdir(m.path / name) == ["bin"]


# --------------------------------------------------------------------------- paths disappear


@pytest.mark.parametrize(
    "timeout",
    [None, "0"],
    ids=["default-timeout", "timeout-0"],
)
def test_deleted_path_gives_enoent_and_open_handles_keep_their_bytes(
    store_src: Path, timeout: str | None
) -> None:
    args = ("--timeout", timeout) if timeout else ()
    name = storegen.store_hash(98, 1) + "-doomed-2.0"
    payload = random.Random(5).randbytes(1 << 20)
    path = _new_store_path(store_src, name, payload)
    (path / "bin").chmod(0o755)
    (path / "bin" / "other").write_bytes(b"other file\n")
    (path / "bin").chmod(0o555)
    with util.mounted(store_src, None, *args) as m:
        mp = m.path / name
        # Walk it, and open the tool before the deletion without reading it,
        # so its bytes can only come from the daemon's descriptor afterwards.
        assert sorted(os.listdir(mp / "bin")) == ["other", "tool"]
        assert _read(mp / "bin" / "other") == b"other file\n"
        fd = os.open(mp / "bin" / "tool", os.O_RDONLY)
        try:
            _rmtree(path)
            assert not path.exists()
            got = bytearray()
            while chunk := os.read(fd, 1 << 16):
                got += chunk
            assert _sha(bytes(got)) == _sha(payload), "an open handle lost its bytes"
        finally:
            os.close(fd)
        assert m.proc.poll() is None, "daemon died"
        assert name not in os.listdir(m.path)
        for p in (mp, mp / "bin", mp / "bin" / "tool", mp / "bin" / "other"):
            assert _errno(os.stat, p) == errno.ENOENT, p
        assert _errno(_read, mp / "bin" / "other") == errno.ENOENT
        assert m.status()["pid"] == m.pid


# --------------------------------------------------------------------------- renames


@pytest.mark.parametrize("timeout", [None, "0"], ids=["default-timeout", "timeout-0"])
def test_renamed_into_place_serves_the_new_content(store_src: Path, timeout: str | None) -> None:
    """A temp path moved into place, and a file replaced by rename, read back new bytes."""
    args = ("--timeout", timeout) if timeout else ()
    name = storegen.store_hash(97, 1) + "-renamed-1.0"
    top_file = storegen.store_hash(97, 2) + "-source.tar.gz.drv"
    with util.mounted(store_src, None, *args) as m:
        assert _errno(os.stat, m.path / name) == errno.ENOENT
        _new_store_path(store_src, name, b"v1\n")
        assert _read(m.path / name / "bin" / "tool") == b"v1\n"

        # A single-file path replaced atomically (a new inode under the old name).
        (store_src / top_file).write_bytes(b"old contents\n")
        assert _read(m.path / top_file) == b"old contents\n"
        tmp = store_src / ".tmp-drv"
        tmp.write_bytes(b"new contents, longer than the old\n")
        tmp.rename(store_src / top_file)
        assert _read(m.path / top_file) == b"new contents, longer than the old\n"

        # A whole store path swapped for a new directory under the same name.
        old = store_src / (name + ".old")
        (store_src / name).rename(old)
        _new_store_path(store_src, name, b"v2, the rebuilt one\n")
        assert _read(m.path / name / "bin" / "tool") == b"v2, the rebuilt one\n"
        _rmtree(old)
        assert (m.path / name / "bin" / "tool").stat().st_size == len(b"v2, the rebuilt one\n")
        assert m.proc.poll() is None


# --------------------------------------------------------------------------- inode numbers reused


@pytest.fixture
def ext4_src(world_tmp: Path) -> Iterator[Path]:
    """A small fresh ext4 (loop device) as SOURCE: ext4 hands out freed inode numbers again."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    img = world_tmp / "ext4.img"
    src = world_tmp / "src"
    src.mkdir()
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot loop-mount an ext4 image: {r.stderr}")
        pytest.skip(f"cannot loop-mount an ext4 image: {r.stderr.strip()}")
    try:
        src.chmod(0o755)
        yield src
    finally:
        problems = util.umount(src, fuse=False)  # mount -o loop detaches the loop device
        assert not problems, problems


def _create_reusing(directory: Path, name: str, ino: int, data: bytes) -> None:
    """Create ``directory/name`` with *data*; skip the test if it did not get inode *ino*."""
    p = directory / name
    p.write_bytes(data)
    if p.stat().st_ino != ino:
        pytest.skip(f"ext4 did not reuse inode {ino} (got {p.stat().st_ino})")


@pytest.mark.parametrize(
    ("where", "timeout"),
    [
        pytest.param("nested", None, id="nested-default-timeout"),
        pytest.param("nested", "0", id="nested-timeout-0"),
        # A single-file store path garbage-collected and built again under its name:
        # the top-level watcher drops the entry, the next lookup sees the new file.
        pytest.param("top", None, id="top-default-timeout"),
    ],
)
def test_reused_inode_number_under_the_same_name_serves_the_new_bytes(
    ext4_src: Path, where: str, timeout: str | None
) -> None:
    args = ("--timeout", timeout) if timeout else ()
    d = ext4_src / "d" if where == "nested" else ext4_src
    d.mkdir(exist_ok=True)
    name = "f" if where == "nested" else storegen.store_hash(96, 1) + "-builder.sh"
    rel = d.relative_to(ext4_src) / name
    old = random.Random(1).randbytes(64 << 10)
    new = random.Random(2).randbytes(64 << 10)  # same size: a size check cannot tell them apart
    (d / name).write_bytes(old)
    ino = (d / name).stat().st_ino
    with util.mounted(ext4_src, None, *args) as m:
        assert _read(m.path / rel) == old  # now in the kernel's page cache
        _wait_no_handles(m)  # the daemon's descriptor must be gone, or ext4 cannot reuse
        (d / name).unlink()
        if where == "top":  # the collector's deletion is seen before the rebuild
            _poll_enoent(m.path / rel)
        _create_reusing(d, name, ino, new)
        got = _read(m.path / rel)
        assert got == new, "the mount served the bytes of the file that used to have this number"
        assert m.proc.poll() is None


@pytest.mark.parametrize("timeout", [None, "0"], ids=["default-timeout", "timeout-0"])
def test_reused_inode_number_under_another_name_is_a_new_file(
    ext4_src: Path, timeout: str | None
) -> None:
    """The kernel still remembers the old file when its number comes back under a new name."""
    args = ("--timeout", timeout) if timeout else ()
    d = ext4_src / "d"
    d.mkdir()
    old = random.Random(3).randbytes(64 << 10)
    new = random.Random(4).randbytes(64 << 10)
    (d / "old").write_bytes(old)
    ino = (d / "old").stat().st_ino
    with util.mounted(ext4_src, None, *args) as m:
        assert _read(m.path / "d" / "old") == old
        _wait_no_handles(m)
        (d / "old").unlink()
        _create_reusing(d, "new", ino, new)
        assert _read(m.path / "d" / "new") == new
        # The old name must never give the new file's bytes: ENOENT, or an error
        # from the retired inode (EIO/ESTALE) while the old entry is still cached.
        allowed = {errno.ENOENT} if timeout == "0" else {errno.ENOENT, errno.ESTALE, errno.EIO}
        e = _errno(_read, m.path / "d" / "old")
        assert e in allowed, f"old name: {os.strerror(e)}" if e else "the old name still reads"
        assert _read(m.path / "d" / "new") == new
        assert sorted(os.listdir(m.path / "d")) == ["new"]
        assert m.proc.poll() is None


# --------------------------------------------------------------------------- nested filesystems


@pytest.fixture
def tmpfs_in_tmpfs(world_tmp: Path) -> Iterator[tuple[Path, Path]]:
    """SOURCE is a tmpfs with a second tmpfs mounted on SOURCE/inner (inode numbers collide)."""
    src = world_tmp / "src"
    src.mkdir()
    inner = src / "inner"
    mounted: list[Path] = []
    try:
        for target in (src, inner):
            if target is inner:
                inner.mkdir()
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "mode=0755,size=8m", "noatimefs-test", target],
                check=True,
            )
            mounted.append(target)
        yield src, inner
    finally:
        problems = []
        for target in reversed(mounted):
            problems += util.umount(target, fuse=False)
        assert not problems, problems


def _fill(root: Path, tag: str) -> None:
    """The same layout on each filesystem, so their native inode numbers line up."""
    (root / "dir").mkdir()
    for i in range(20):
        (root / "dir" / f"f{i}").write_bytes(f"{tag} file {i}\n".encode())
    os.link(root / "dir" / "f0", root / "dir" / "hard0")
    os.link(root / "dir" / "f0", root / "hard0-top")


def test_second_filesystem_inside_source_gets_its_own_inode_numbers(
    tmpfs_in_tmpfs: tuple[Path, Path],
) -> None:
    src, inner = tmpfs_in_tmpfs
    _fill(src, "outer")
    _fill(inner, "inner")

    def inos(root: Path, *, skip: str | None = None) -> dict[str, int]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            if skip is not None and skip in dirnames:
                dirnames.remove(skip)
            for n in dirnames + filenames:
                p = Path(dirpath, n)
                out[str(p.relative_to(root))] = p.lstat().st_ino
        return out

    native_outer, native_inner = inos(src, skip="inner"), inos(inner)
    assert set(native_outer.values()) & set(native_inner.values()), (
        "precondition: two fresh tmpfs should share inode numbers natively"
    )
    with util.mounted(src) as m:
        outer_ids = inos(m.path, skip="inner")
        inner_ids = inos(m.path / "inner")
        inner_root = (m.path / "inner").stat().st_ino
        # Every entry of the outer filesystem keeps its own number...
        assert outer_ids == native_outer
        # ...the inner one's are different from all of them...
        assert not (set(inner_ids.values()) | {inner_root}) & set(outer_ids.values())
        assert len(set(inner_ids.values())) == len(set(native_inner.values()))
        # ...and hard links stay one inode on both.
        for ids in (outer_ids, inner_ids):
            assert ids["dir/f0"] == ids["dir/hard0"] == ids["hard0-top"]
            assert len({ids[f"dir/f{i}"] for i in range(20)}) == 20
        assert (m.path / "inner" / "dir" / "f0").stat().st_nlink == 3
        # Contents: colliding ids would make the kernel serve one file for the other.
        for i in range(20):
            assert _read(m.path / "dir" / f"f{i}") == f"outer file {i}\n".encode()
            assert _read(m.path / "inner" / "dir" / f"f{i}") == f"inner file {i}\n".encode()
        assert _read(m.path / "inner" / "hard0-top") == b"inner file 0\n"
        assert m.proc.poll() is None


# --------------------------------------------------------------------------- the kept top level


def _top(root: Path) -> dict[str, tuple[int, int, str]]:
    """Each top-level name with its inode number, size and type, as readdir(plus) gave them.

    Through the mount, an inode number at or above 2⁶³ (a spill id: SOURCE's number
    was still held by the node of a removed file, which ext4 gave the new one, see
    noatimefs.inodes) stands for "not SOURCE's number" and is shown as -1.
    """
    out = {}
    with os.scandir(root) as it:
        for e in it:
            st = e.stat(follow_symlinks=False)
            ino = st.st_ino if st.st_ino < 1 << 63 else -1
            out[e.name] = (ino, st.st_size, "d" if e.is_dir(follow_symlinks=False) else "-")
    return out


def _same_top(mount: Path, source: Path) -> bool:
    """The mount's top level is SOURCE's: names, sizes and types, and inode numbers where
    the mount could give SOURCE's own (each spill id stands for a distinct file)."""
    shown, real = _top(mount), _top(source)
    if shown.keys() != real.keys():
        return False
    return all(shown[n][1:] == real[n][1:] and shown[n][0] in (real[n][0], -1) for n in real)


@pytest.mark.parametrize("timeout", [None, "0"], ids=["default-timeout", "timeout-0"])
def test_top_level_lookups_answer_from_the_kept_listing_never_stale(
    store_src: Path, timeout: str | None
) -> None:
    """Once the top level is kept, a lookup there is answered from it, never from an old copy.

    Every name looked up below is one the kernel has never been told of (it
    came after the listing), so each lookup reaches the daemon.
    """
    args = ("--timeout", timeout) if timeout else ()
    with util.mounted(store_src, None, *args) as m:
        assert _same_top(m.path, store_src)  # the daemon keeps it (not with --timeout 0)
        asked = 0
        for i in range(3):
            added = _new_store_path(store_src, storegen.store_hash(96, i) + "-added-1.0", b"a")
            gone = _new_store_path(store_src, storegen.store_hash(97, i) + "-gone-1.0", b"g")
            single = store_src / (storegen.store_hash(98, i) + "-builder.sh")
            single.write_bytes(b"old\n")
            # The first lookup applies every event so far: all three names are kept now.
            assert (m.path / added.name / "bin" / "tool").read_bytes() == b"a", f"round {i}"
            _rmtree(gone)
            tmp = store_src / ".tmp-single"
            tmp.write_bytes(b"replaced, longer\n")
            tmp.rename(single)
            assert _errno(os.lstat, m.path / gone.name) == errno.ENOENT, f"round {i}: removed"
            assert os.lstat(m.path / single.name).st_size == single.stat().st_size, f"round {i}"
            assert _errno(os.lstat, m.path / f"never-{i}") == errno.ENOENT
            asked += 4
        status = m.status()
        if timeout is None:
            assert status["lookups_kept"] == asked, "top-level lookups went to SOURCE"
            assert status["top_level_listed"] == 1
        else:
            assert status["lookups_kept"] == 0, "nothing is kept with --timeout 0"


def _forget_dentries() -> None:
    """Have the kernel drop every unused dentry and inode, the mount's included (a FORGET
    to the daemon for each): the next lookups reach the daemon, whose caches stay."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def test_lookups_below_the_top_answer_from_cached_listings_never_stale(store_src: Path) -> None:
    """A lookup below the top level in a directory the daemon has listed is answered from
    that listing while the directory is unchanged, and from SOURCE once it changes."""
    path = _new_store_path(store_src, storegen.store_hash(94, 1) + "-tools-1.0", b"tool\n")
    bin_dir = path / "bin"
    with util.mounted(store_src, None) as m:
        shown = m.path / path.name / "bin"
        assert sorted(os.listdir(shown)) == ["tool"]  # the daemon keeps this listing
        _forget_dentries()
        assert _read(shown / "tool") == b"tool\n"
        assert _errno(os.lstat, shown / "missing") == errno.ENOENT
        answered = m.status()["lookups_listed"]
        assert answered >= 2, "lookups in a listed directory went to SOURCE"
        (bin_dir / "added").write_bytes(b"added\n")  # the directory's ctime moves
        (bin_dir / "tool").unlink()
        _forget_dentries()
        assert _read(shown / "added") == b"added\n"
        assert _errno(os.lstat, shown / "tool") == errno.ENOENT
        assert m.status()["lookups_listed"] == answered, "a stale listing answered"


def test_the_kept_top_level_listing_is_never_stale(store_src: Path) -> None:
    """The daemon keeps the top-level listing; each change made before a listing shows in it."""
    single = storegen.store_hash(95, 1) + "-builder.sh"
    (store_src / single).write_bytes(b"old\n")
    with util.mounted(store_src, None) as m:
        assert _top(m.path) == _top(store_src)
        assert _top(m.path) == _top(store_src)
        listed = m.status()["top_level_listed"]
        assert listed == 1, "the top level was listed again: it is not kept"
        for i in range(3):
            name = storegen.store_hash(95, 10 + i) + "-added-1.0"
            _new_store_path(store_src, name, b"#!/bin/sh\n")  # moved into place
            (store_src / f"{name}.drv").write_bytes(b"Derive()")  # created in place
            assert _same_top(m.path, store_src), f"round {i}: added"
            _rmtree(store_src / name)  # collected
            assert _same_top(m.path, store_src), f"round {i}: removed"
            tmp = store_src / ".tmp-single"
            tmp.write_bytes(b"replaced %d\n" % i * (i + 2))
            tmp.rename(store_src / single)  # replaced
            assert _same_top(m.path, store_src), f"round {i}: replaced"
        assert m.status()["top_level_listed"] == listed  # kept and updated, never listed again
