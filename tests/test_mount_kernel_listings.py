"""The kernel keeps listings (FOPEN_CACHE_DIR), and never serves a stale one.

Through a real mount: a listing read again comes from the kernel's copy (the
daemon's READDIR count does not move), a change in SOURCE shows at the next
listing, at the top level and below it, and a listing read across a change
lists each name once, also when other readers fill the kernel's copy meanwhile.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount


def _source(root: Path, paths: int = 600) -> None:
    for i in range(paths):
        (root / f"{i:04d}-pkg").mkdir()
        (root / f"{i:04d}-pkg" / "file").write_bytes(b"x")


def _names(path: Path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.fixture
def src(world_tmp: Path) -> Path:
    root = world_tmp / "src"
    root.mkdir()
    _source(root)
    return root


def test_a_listing_read_again_is_served_by_the_kernel(src: Path) -> None:
    with util.mounted(src) as m:
        assert m.status()["kernel_listings"] is True, "noatimefs._replyflags is not in use"
        for path in (m.path, m.path / "0007-pkg"):
            first = _names(path)
            readdirs = m.status()["readdirs"]
            assert readdirs > 0
            for _ in range(3):
                assert _names(path) == first
            assert m.status()["readdirs"] == readdirs, f"{path}: listed by the daemon again"


@pytest.mark.parametrize("where", ["top", "below"])
def test_a_change_shows_at_the_next_listing(src: Path, where: str) -> None:
    with util.mounted(src) as m:
        rel = Path("0007-pkg") if where == "below" else Path()
        assert _names(m.path / rel) == _names(src / rel)
        assert _names(m.path / rel) == _names(src / rel)  # now from the kernel's copy
        for round_ in range(3):
            (src / rel / f"added-{round_}").mkdir()
            assert _names(m.path / rel) == _names(src / rel), f"round {round_}: added"
            os.rmdir(src / rel / f"added-{round_}")
            assert _names(m.path / rel) == _names(src / rel), f"round {round_}: removed"


def test_a_listing_read_across_a_change_lists_each_name_once(src: Path) -> None:
    """A reader part way through when SOURCE changes, while others list it afresh."""
    with util.mounted(src) as m:
        before = set(_names(src))
        assert set(_names(m.path)) == before  # the kernel holds a copy
        fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            it = os.scandir(fd)
            got = [next(it).name for _ in range(150)]  # part of the listing, in chunks
            removed = {f"{i:04d}-pkg" for i in range(0, 600, 7)}
            for name in removed:
                shutil.rmtree(src / name)
            added = {f"new-{i}" for i in range(80)}
            for name in added:
                (src / name).mkdir()
            after = set(_names(src))
            for _ in range(2):  # others list the changed top level, filling the kernel's copy
                assert set(_names(m.path)) == after
            got += [e.name for e in it]
            it.close()
        finally:
            os.close(fd)
        assert len(got) == len(set(got)), "a name was listed twice"
        assert set(got) >= before & after, "a name there all along was skipped"
        assert set(got) <= before | after
        assert set(_names(m.path)) == after


def test_the_kernels_copy_is_kept_when_the_kept_top_level_only_expired(src: Path) -> None:
    """An expired top-level listing is listed again, but its names are the watch's: the
    kernel's copy of them stays good, and the listing after the relisting is the kernel's."""
    with util.mounted(src, None, "--timeout", "2") as m:
        first = _names(m.path)
        assert _names(m.path) == first  # the kernel's copy, filled
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")  # the kernel drops its copy (the daemon cannot know)
        time.sleep(2.5)  # the daemon's kept listing expires (not a synchronisation)
        assert _names(m.path) == first  # listed by the daemon again, from SOURCE
        readdirs = m.status()["readdirs"]
        assert _names(m.path) == first
        assert m.status()["readdirs"] == readdirs, "the copy made by the listing was dropped"
