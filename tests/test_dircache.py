"""The directory listing cache (pure data structure, no mount)."""

from __future__ import annotations

import os
from pathlib import Path

from noatimefs.dircache import DirCache


def listing(n: int, path: Path) -> list[bytes]:
    return [b"e%d" % i for i in range(n)]


def test_hit_needs_same_ctime(tmp_path: Path) -> None:
    cache: DirCache[bytes] = DirCache(timeout=60)
    st = os.lstat(tmp_path)
    cache.put((1, 2), st.st_ctime_ns, listing(3, tmp_path))
    hit = cache.get((1, 2), st.st_ctime_ns)
    assert hit is not None
    assert len(hit.entries) == 3
    assert cache.get((1, 2), st.st_ctime_ns + 1) is None  # another incarnation
    assert cache.get((1, 2), st.st_ctime_ns) is None  # and the stale listing was dropped
    assert len(cache) == 0


def test_bounded_by_entries_oldest_first(tmp_path: Path) -> None:
    cache: DirCache[bytes] = DirCache(timeout=60, max_entries=10)
    st = os.lstat(tmp_path)
    for key in range(5):
        cache.put((0, key), st.st_ctime_ns, listing(4, tmp_path))
    assert len(cache) <= 10
    assert cache.get((0, 4), st.st_ctime_ns) is not None
    assert cache.get((0, 0), st.st_ctime_ns) is None


def test_zero_timeout_caches_nothing(tmp_path: Path) -> None:
    cache: DirCache[bytes] = DirCache(timeout=0)
    st = os.lstat(tmp_path)
    cache.put((1, 1), st.st_ctime_ns, listing(1, tmp_path))
    assert cache.get((1, 1), st.st_ctime_ns) is None


def test_expired_listing_is_a_miss(tmp_path: Path) -> None:
    cache: DirCache[bytes] = DirCache(timeout=1e-9)
    st = os.lstat(tmp_path)
    cache.put((1, 1), st.st_ctime_ns, listing(1, tmp_path))
    assert cache.get((1, 1), st.st_ctime_ns) is None


def test_purge_drops_only_expired(tmp_path: Path) -> None:
    cache: DirCache[bytes] = DirCache(timeout=60)
    cache.put((1, 1), 5, [b"a", b"b"])
    assert cache.purge() == 0
    assert len(cache) == 2
    cache.timeout = -1
    cache.put((1, 2), 5, [b"c"])  # a non-positive timeout caches nothing
    assert len(cache) == 2


def test_current_checks_like_get_and_counts_nothing(tmp_path: Path) -> None:
    cache: DirCache[bytes] = DirCache(timeout=60)
    cache.put((1, 1), 5, [b"a"])
    assert cache.current((1, 1), 5) is not None
    assert cache.current((1, 1), 6) is None  # changed since: dropped
    assert cache.get((1, 1), 5) is None
    assert (cache.hits, cache.misses) == (0, 1)
