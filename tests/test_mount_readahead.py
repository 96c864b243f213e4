"""What the daemon reads ahead of a caller, through a real mount.

A cold read of one file reads its directory's other small files ahead
(noatimefs.readahead): SOURCE lives on the machine's disk (``/tmp``), its pages
evicted with ``POSIX_FADV_DONTNEED``; ``fincore`` (util-linux) tells which are
resident. Listing a store path walks it and the store paths after it ahead
(noatimefs.walkahead): inotify tells which of SOURCE's directories were opened.
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import util

from noatimefs import readahead, watch

pytestmark = pytest.mark.mount

SMALL = [f"f{i}".encode() for i in range(6)]


def _resident(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip() or 0)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_one_that_waits(m: util.Mount, candidates: list[Path], evict: list[Path]) -> Path:
    """Read the *candidates* (SOURCE paths) through the mount in turn, *evict* evicted before
    each, until one read makes the daemon wait for the disk; that one (SOURCE's path).

    A read finding nothing cached still starts the disk's readahead, and where the
    disk answers within the call (a virtual disk the host serves from its own cache)
    the daemon's ``RWF_NOWAIT`` read succeeds: nothing was cold, nothing read ahead.
    """
    for path in candidates:
        for f in evict:
            _evict(f)
        assert [_resident(f) for f in evict] == [0] * len(evict)
        waited = m.status()["reads_waited"]
        assert (m.path / path.relative_to(m.source)).read_bytes() == path.read_bytes()
        if m.status()["reads_waited"] > waited:
            return path
    pytest.skip("the disk answered every read at once: no read waited, nothing was tested")


def test_a_cold_read_reads_the_other_small_files_of_its_directory_ahead() -> None:
    with util.world_tmpdir("noatimefs-readahead-") as work:
        lib = work / "src" / "0000-pkg-1.0" / "lib"
        lib.mkdir(parents=True)
        for name in SMALL:
            (lib / name.decode()).write_bytes(os.urandom(64 << 10))
        (lib / "big").write_bytes(os.urandom(readahead.MAX_FILE + 4096))
        (lib / "empty").write_bytes(b"")
        os.mkfifo(lib / "fifo")
        (lib / "link").symlink_to("f1")
        (lib / "sub").mkdir()
        files = [lib / n.decode() for n in SMALL] + [lib / "big"]
        with util.mounted(work / "src") as m:
            mlib = m.path / "0000-pkg-1.0" / "lib"
            assert len(os.listdir(mlib)) == len(SMALL) + 5  # the listing the daemon keeps
            read = _read_one_that_waits(m, files[: len(SMALL)], files)
            rest = [f for f in files[: len(SMALL)] if f != read]
            deadline = time.monotonic() + 20
            while any(_resident(f) < f.stat().st_size for f in rest):
                assert time.monotonic() < deadline, ([_resident(f) for f in rest], m.status())
                time.sleep(0.01)  # the workers' reads are asynchronous: poll for them
            status = m.status()
            assert status["read_ahead_files"] == len(rest)  # not big, empty, fifo, link, sub
            assert _resident(lib / "big") == 0
            assert stat.S_ISFIFO(os.lstat(lib / "fifo").st_mode)


def test_siblings_picks_small_regular_files_in_listing_order() -> None:
    reg, d, lnk = stat.S_IFREG | 0o444, stat.S_IFDIR | 0o555, stat.S_IFLNK | 0o777
    entries = [
        (b"a", reg, 10),
        (b"self", reg, 10),
        (b"dir", d, 4096),
        (b"link", lnk, 3),
        (b"empty", reg, 0),
        (b"huge", reg, readahead.MAX_FILE + 1),
        (b"b", reg, readahead.MAX_FILE),
    ]
    assert readahead.siblings(entries, b"p/lib", b"self") == [b"p/lib/a", b"p/lib/b"]
    assert readahead.siblings(entries, b"", b"self") == [b"a", b"b"]


def test_siblings_keeps_to_the_budget_of_a_directory() -> None:
    reg = stat.S_IFREG | 0o444
    many = [(b"%d" % i, reg, 1) for i in range(readahead.MAX_FILES_PER_DIR + 10)]
    assert len(readahead.siblings(many, b"d", b"")) == readahead.MAX_FILES_PER_DIR
    size = readahead.MAX_FILE
    full = [(b"%d" % i, reg, size) for i in range(readahead.MAX_PER_DIR // size + 3)]
    assert len(readahead.siblings(full, b"d", b"")) == readahead.MAX_PER_DIR // size


def _watch_opens(dirs: list[Path]) -> tuple[watch.Inotify, dict[int, Path]]:
    """An inotify descriptor reporting opens of *dirs*, and its watch descriptors."""
    inotify = watch.Inotify()
    return inotify, {inotify.add(os.fsencode(d), watch.IN_OPEN): d for d in dirs}


def _opened(
    inotify: watch.Inotify, wds: dict[int, Path], want: set[Path], seconds: float
) -> set[Path]:
    """The watched directories opened until all of *want* were (or *seconds* passed)."""
    seen: set[Path] = set()
    deadline = time.monotonic() + seconds
    while not want <= seen and (left := deadline - time.monotonic()) > 0:
        if select.select([inotify.fd], [], [], left)[0]:
            seen |= {wds[e.wd] for e in inotify.read() if e.mask & watch.IN_OPEN and e.wd in wds}
    return seen


def test_listing_a_store_path_walks_it_and_the_next_ones_ahead() -> None:
    with util.world_tmpdir("noatimefs-walkahead-") as work:
        src = work / "src"
        for i in range(4):
            (src / f"{i:04d}-pkg-1.0" / "lib" / "deep").mkdir(parents=True)
            (src / f"{i:04d}-pkg-1.0" / "lib" / "deep" / "f").write_bytes(b"x")
        with util.mounted(work / "src") as m:
            order = [src / name for name in os.listdir(m.path)]  # as a walk of the mount goes
            first, after = order[1], order[2:]  # order[0], listed before first, is not walked
            deep = [p / "lib" / "deep" for p in order]
            inotify, wds = _watch_opens(deep)
            try:
                assert os.listdir(m.path / first.name) == ["lib"]  # no caller went deeper
                want = {first / "lib" / "deep"} | {p / "lib" / "deep" for p in after}
                seen = _opened(inotify, wds, want, seconds=20)
                assert seen == want  # not the store path listed before the named one
            finally:
                inotify.close()
            assert m.status()["walk_ahead_named"] == 1
            assert os.listdir(m.path / first.name) == ["lib"]  # a cached listing: no new walk
            assert m.status()["walk_ahead_named"] == 1
            helpers = psutil.Process(m.pid).children()
            assert ["noatimefs.walkahead" in h.cmdline() for h in helpers] == [True]
        assert not any(h.is_running() for h in helpers)  # ended with the daemon


def test_a_cold_store_path_is_walked_ahead_when_a_caller_goes_into_it() -> None:
    with util.world_tmpdir("noatimefs-walkahead-") as work:
        src = work / "src"
        for i in range(3):
            (src / f"{i:04d}-pkg-1.0" / "lib").mkdir(parents=True)
            (src / f"{i:04d}-pkg-1.0" / "lib" / "f").write_bytes(b"x")
            (src / f"{i:04d}-pkg-1.0" / "bin").mkdir()
        pkg = src / "0001-pkg-1.0"
        with util.mounted(work / "src") as m:
            inotify, wds = _watch_opens([pkg / "bin"])  # no caller opens it: only a walk does
            try:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("2\n")  # SOURCE's dentries and inodes: a cold store
                for i in range(3):
                    os.stat(m.path / f"{i:04d}-pkg-1.0")  # a caller that only stats
                assert m.status()["walk_ahead_named"] == 0
                assert (m.path / pkg.name / "lib" / "f").read_bytes() == b"x"
                assert _opened(inotify, wds, {pkg / "bin"}, seconds=20) == {pkg / "bin"}
            finally:
                inotify.close()
            assert m.status()["walk_ahead_named"] == 1


def test_a_cold_read_reads_the_small_files_of_its_store_path_and_the_next_ones_ahead() -> None:
    with util.world_tmpdir("noatimefs-dataahead-") as work:
        src = work / "src"
        for i in range(4):
            for sub in ("lib", "share"):
                (src / f"{i:04d}-pkg-1.0" / sub).mkdir(parents=True)
                (src / f"{i:04d}-pkg-1.0" / sub / "f").write_bytes(os.urandom(64 << 10))
        with util.mounted(work / "src") as m:
            order = [src / name for name in os.listdir(m.path)]  # as a walk of the mount goes
            first, after = order[1], order[2:]  # order[0], listed before first, is not read
            files = [p / sub / "f" for p in order for sub in ("lib", "share")]
            ours = [first / "lib" / "f", first / "share" / "f"]
            read = _read_one_that_waits(m, ours, files)

            want = [f for f in ours if f != read] + [
                p / sub / "f" for p in after for sub in ("lib", "share")
            ]
            deadline = time.monotonic() + 20
            while any(_resident(f) < f.stat().st_size for f in want):
                assert time.monotonic() < deadline, ([_resident(f) for f in want], m.status())
                time.sleep(0.01)  # the helper's reads are asynchronous: poll for them
            assert [_resident(order[0] / sub / "f") for sub in ("lib", "share")] == [0, 0]
