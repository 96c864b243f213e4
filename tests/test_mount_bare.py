"""Bare entries through the kernel: a listing below the top tells files' names, types
and inode numbers without attributes, and the kernel links none of them.

A caller listing a store path gets what ``getdents`` on SOURCE gives (the same
names and types), ``d_ino`` equal to the ``st_ino`` a later ``lstat`` shows, and
the daemon remembers only the directories until a file is looked up
(:mod:`noatimefs.listing`, "Bare entries").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount

_PROBE = r"""
import os, stat
def kind(e):
    return "dir" if e.is_dir(follow_symlinks=False) else (
        "link" if e.is_symlink() else ("file" if e.is_file(follow_symlinks=False) else "other"))
top = DATA["top"]
os.listdir(top)  # the top level first: its entries take the daemon's C module in use
listed = {e.name: [kind(e), e.inode()] for e in os.scandir(os.path.join(top, "pkg"))}
emit({"listed": listed})
"""

_STAT = r"""
import os
emit({n: os.lstat(os.path.join(DATA["dir"], n)).st_ino for n in DATA["names"]})
"""


def _store(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "share").mkdir()
    for i in range(20):
        (pkg / f"file-{i}").write_bytes(b"x" * i)
    (pkg / "link").symlink_to("file-1")
    (pkg / "dangling").symlink_to("nowhere")
    os.mkfifo(pkg / "fifo")
    (root / "other-path").mkdir()
    return pkg


def _kinds(path: Path) -> dict[str, str]:
    def kind(e: os.DirEntry[str]) -> str:
        if e.is_dir(follow_symlinks=False):
            return "dir"
        if e.is_symlink():
            return "link"
        return "file" if e.is_file(follow_symlinks=False) else "other"

    return {e.name: kind(e) for e in os.scandir(path)}


def test_files_are_listed_without_attributes_and_looked_up_when_stat_ed(world_tmp: Path) -> None:
    src = world_tmp / "src"
    pkg = _store(src)
    with util.mounted(src, owner=util.NOBODY[0], allow_other=True) as m:
        uid, gid = util.NOBODY
        before = m.status()
        got = util.run_as(uid, gid, _PROBE, {"top": str(m.path)})["listed"]
        listed = m.status()
        assert {n: k for n, (k, _) in got.items()} == _kinds(pkg)
        files = sorted(n for n, (k, _) in got.items() if k in ("file", "link"))
        assert len(files) == 22
        # The kernel linked the directories and the FIFO of pkg (and the top level's two
        # paths), but no file: the daemon remembers none of them.
        linked = listed["inodes"] - before["inodes"]
        assert linked == 2 + 3, f"{linked} inodes remembered after the listings"
        assert listed["lookups_bare"] == 0

        st_ino = util.run_as(uid, gid, _STAT, {"dir": str(m.path / "pkg"), "names": files})
        after = m.status()
        assert {n: got[n][1] for n in files} == st_ino, "d_ino is not the st_ino a stat shows"
        # The first looked up in SOURCE, the second filled the listing, which answers the rest.
        assert after["lookups_bare"] == 2, "the stats were not lookups from SOURCE"
        assert after["lookups_listed"] - listed["lookups_listed"] == len(files) - 1
        assert after["inodes"] - listed["inodes"] == len(files)
        # What a stat shows is SOURCE's file, presented to its consumer as ever.
        for name in files:
            through, there = os.lstat(m.path / "pkg" / name), os.lstat(pkg / name)
            assert through.st_size == there.st_size, name
            assert stat.S_IFMT(through.st_mode) == stat.S_IFMT(there.st_mode), name
            assert through.st_uid == uid, name


def test_a_file_added_after_a_bare_listing_shows_and_stats(world_tmp: Path) -> None:
    src = world_tmp / "src"
    pkg = _store(src)
    with util.mounted(src) as m:
        os.listdir(m.path)
        assert _kinds(m.path / "pkg") == _kinds(pkg)
        (pkg / "new").write_bytes(b"new bytes")
        (pkg / "file-3").unlink()
        (pkg / "file-3").symlink_to("new")
        assert _kinds(m.path / "pkg") == _kinds(pkg)
        assert (m.path / "pkg" / "new").read_bytes() == b"new bytes"
        assert os.readlink(m.path / "pkg" / "file-3") == "new"
        assert m.status()["lookups_bare"] >= 2


_WALK_STATS = r"""
import os
top = DATA["top"]
sizes = {}
for d in sorted(os.listdir(top)):
    for e in os.scandir(os.path.join(top, d)):
        sizes[d + "/" + e.name] = e.stat(follow_symlinks=False).st_size
emit(sizes)
"""


def test_a_caller_that_stats_what_it_lists_is_listed_in_full_from_then_on(
    world_tmp: Path,
) -> None:
    """Like ``find -printf %s``: once it looks up a file it was listed bare, the rest of
    that directory is answered from the listing filled, and the directories it
    opens after that come with their files' attributes."""
    src = world_tmp / "src"
    for i in range(10):
        (src / f"p{i}").mkdir(parents=True)
        for j in range(20):
            (src / f"p{i}" / f"f{j}").write_bytes(b"x" * j)
    with util.mounted(src, owner=util.NOBODY[0], allow_other=True) as m:
        sizes = util.run_as(*util.NOBODY, _WALK_STATS, {"top": str(m.path)})
        status = m.status()
    assert sizes == {f"p{i}/f{j}": j for i in range(10) for j in range(20)}
    # Two lookups of names listed bare (the second fills p0's listing), then all in full.
    assert status["lookups_bare"] == 2, "not listed in full once the caller stats files"
