"""Listings without a mount: offsets (cookies), the kept top level, the kernel's copy rule."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from noatimefs import kernelcache, listing, order
from noatimefs.listing import Entry
from noatimefs.toplevel import TopLevel


def entries(names: set[bytes]) -> list[Entry]:
    """Stand-in entries: offsets only look at the name and its cookie."""
    stand_in = [cast(Entry, (name, None, 0, 0, 0, None, order.cookie(name))) for name in names]
    return listing.in_cookie_order(stand_in)


def read_across(before: list[Entry], now: list[Entry], taken: int) -> list[bytes]:
    """A reader that took *taken* entries of *before*, then went on from its offset in *now*."""
    names = [e[0] for e in before[:taken]]
    offset = order.cookie(names[-1]) if names else 0
    return names + [e[0] for e in now[listing.after(now, offset) :]]


names = st.sets(st.binary(min_size=1, max_size=12), max_size=60)


@given(names, names, names, st.data())
def test_a_reader_going_on_in_a_changed_listing_sees_each_name_once(
    kept: set[bytes], removed: set[bytes], added: set[bytes], data: st.DataObject
) -> None:
    """Like a hashed directory: the names in both listings once each, no name twice."""
    before = entries(kept | removed)
    now = entries((kept | added) - removed)
    taken = data.draw(st.integers(0, len(before)))
    got = read_across(before, now, taken)
    assert len(got) == len(set(got)), "a name was listed twice"
    assert set(got) >= set(kept) - removed, "a name in both listings was skipped"
    assert set(got) <= kept | removed | added


@given(names, st.data())
def test_a_listing_read_in_pieces_is_read_whole(these: set[bytes], data: st.DataObject) -> None:
    whole = entries(these)
    got: list[bytes] = []
    offset = 0
    while (first := listing.after(whole, offset)) < len(whole):
        piece = whole[first : first + data.draw(st.integers(1, 7))]
        got += [e[0] for e in piece]
        offset = order.cookie(piece[-1][0])
    assert got == [e[0] for e in whole]


def test_cookies_are_positive_offsets() -> None:
    for name in (b"a", b"..x", os.urandom(40)):
        assert 0 < order.cookie(name) < 1 << 63


EMPTY, UNKNOWN = kernelcache.Copy.EMPTY, kernelcache.Copy.UNKNOWN


@pytest.mark.parametrize(
    ("cached", "stamp", "alone", "keep", "now"),
    [
        (UNKNOWN, 5, True, False, EMPTY),  # nothing known of the kernel's copy: drop it
        (EMPTY, 5, True, False, EMPTY),
        (5, 5, True, True, 5),  # it is of the listing now: keep it
        (5, 5, False, True, 5),
        (4, 5, True, False, EMPTY),  # of an older listing: drop it
        (4, 5, False, False, UNKNOWN),  # ... and another handle's reply may still go in
        (5, None, True, False, EMPTY),  # the listing now cannot be told: never keep
    ],
)
def test_kernel_cache_keeps_only_a_copy_of_the_listing_now(
    cached: kernelcache.Cached,
    stamp: int | None,
    alone: bool,
    keep: bool,
    now: kernelcache.Cached,
) -> None:
    assert kernelcache.kernel_cache(cached, stamp, alone=alone) == (keep, now)


@pytest.mark.parametrize(
    ("cached", "stamp", "after"),
    [
        (EMPTY, 5, 5),  # the first reply after a drop fills the copy
        (5, 5, 5),
        (5, 4, UNKNOWN),  # a reply of another listing: a mix
        (5, None, UNKNOWN),
        (EMPTY, None, UNKNOWN),
        (UNKNOWN, 5, UNKNOWN),
    ],
)
def test_what_a_reply_leaves_in_the_kernels_copy(
    cached: kernelcache.Cached, stamp: int | None, after: kernelcache.Cached
) -> None:
    assert kernelcache.served(cached, stamp) == after


def test_the_kept_top_level_is_changed_in_place_in_cookie_order(tmp_path: Path) -> None:
    for i in range(200):
        (tmp_path / f"p{i}").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = TopLevel(fd, timeout=300.0)
        top.watching = True
        build = top.begin()
        kept = top.install(build, listing.list_dir(fd, 300.0))
        version = top.version
        for i in range(0, 200, 3):
            (tmp_path / f"p{i}").unlink()
            top.changed(os.fsencode(f"p{i}"))
        for i in range(300, 340):
            (tmp_path / f"p{i}").write_bytes(b"new")
            top.changed(os.fsencode(f"p{i}"))
        (tmp_path / "p1").write_bytes(b"longer now")
        top.changed(b"p1")
        now = top.entries()
        assert now is kept, "a change made a new list: a handle part way through lost it"
        assert top.holds(kept)
        assert [e[0] for e in now] == [e[0] for e in entries(set(map(os.fsencode, os.listdir(fd))))]
        p1 = next(e for e in now if e[0] == b"p1")[5]
        assert p1 is not None
        assert p1.st_size == len(b"longer now")
        assert top.version > version
    finally:
        os.close(fd)


def test_the_top_levels_version_moves_with_its_names_not_with_its_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version stamps the kernel's copy of the names: an expiry (attributes may be old,
    the watch kept the names) leaves it, a drop or a changed name moves it."""
    for i in range(5):
        (tmp_path / f"p{i}").write_bytes(b"x")
    now = [1000.0]
    monkeypatch.setattr("noatimefs.toplevel.time.monotonic", lambda: now[0])
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = TopLevel(fd, timeout=300.0)
        top.watching = True
        top.install(top.begin(), listing.list_dir(fd, 300.0))
        version = top.version
        now[0] += 301
        assert top.entries() is None  # expired: list SOURCE again
        assert top.version == version
        again = top.install(top.begin(), listing.list_dir(fd, 300.0))
        assert top.holds(again)
        assert top.version == version  # the same names: a kernel's copy of them stays good
        (tmp_path / "p9").write_bytes(b"new")
        top.changed(b"p9")
        assert top.version == version + 1
        top.drop()  # (an overflowed event queue: names may have been missed)
        assert top.version == version + 2
        assert top.entries() is None
    finally:
        os.close(fd)


def test_files_and_symlinks_are_listed_bare_directories_and_the_rest_in_full(
    tmp_path: Path,
) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "link").symlink_to("file")
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dev = os.fstat(fd).st_dev
        bare = {e[0]: e for e in listing.list_dir(fd, 300.0, dev)}
        full = {e[0]: e for e in listing.list_dir(fd, 300.0)}
    finally:
        os.close(fd)
    assert sorted(n for n, e in bare.items() if listing.is_bare(e)) == [b"file", b"link"]
    assert not any(listing.is_bare(e) for e in full.values())
    for name in (b"file", b"link"):
        st = os.lstat(tmp_path / os.fsdecode(name))
        _, key, mode, uid, gid, attr, offset = bare[name]
        assert key == (dev, st.st_ino, None)
        assert mode == stat.S_IFMT(st.st_mode)
        assert (uid, gid, attr) == (-1, -1, None)  # nothing of SOURCE but type and number
        assert offset == full[name][6]
    for name in (b"dir", b"fifo"):
        assert bare[name][:5] == full[name][:5]
        assert bare[name][5] is not None
