"""Memory and descriptors at scale: walk a store through the mount, make the kernel forget.

The measuring code is ``bench/scale.py`` (run it by hand for the full report);
these tests run it on their own mounts and assert what must hold whatever the
machine: the walk sees every entry, the daemon's inode table follows what the
kernel remembers (it shrinks back after ``drop_caches``), and the daemon holds
no descriptor per remembered inode, nor one per past open.

Default run: a ~20,000-entry tree and 5,000 open/close cycles. ``-m slow``:
the 1,000,000-entry tree (cached by storegen under /var/tmp/noatimefs-scale,
shared with the benchmark, kept between runs on purpose: it takes minutes to
make) and 100,000 cycles. RSS is reported, and asserted only loosely: CPython
keeps freed memory in its arenas, so RSS need not fall when the table shrinks.

``drop_caches`` is machine-wide: another process dropping caches during a walk
makes the kernel forget entries mid-walk. Such drops are counted (from
/proc/vmstat) and relax only the assertions they would break.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import util

from noatimefs import storegen

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parent.parent
SMALL_ENTRIES = 20_000
SMALL_CYCLES = 5_000
BIG_ENTRIES = 1_000_000
BIG_CYCLES = 100_000
#: Entries the kernel may still hold after drop_caches (the root, anything in use).
FORGET_SLACK = 16
#: A loose bound on RSS per remembered inode (measured: ~450 bytes).
MAX_BYTES_PER_INODE = 4096


def _load_scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


scale = _load_scale()


def _cycle_files(src: Path, count: int = 100) -> list[str]:
    """Small files with contents (the tree's own files are empty: metadata only)."""
    d = src / "cycles"
    d.mkdir()
    for i in range(count):
        (d / f"f{i:03d}").write_bytes(f"cycle file {i}\n".encode() * 64)
    return [f"cycles/f{i:03d}" for i in range(count)]


@pytest.fixture(scope="module")
def small_tree() -> Iterator[tuple[Path, storegen.Summary, list[str]]]:
    util.fuse_available()
    with util.world_tmpdir("noatimefs-scale-") as base:
        src = base / "store"
        summary = storegen.generate(src, entries=SMALL_ENTRIES, max_file_size=0, seed=3)
        files = _cycle_files(src)
        yield src, summary, files
        storegen.remove_tree(src)


def _check_walk(
    result: object, expected_entries: int, record: Callable[[str, object], None]
) -> None:
    r = result
    assert isinstance(r, scale.WalkResult)
    print(r.text())
    record("walk", r.to_json())
    assert r.entries_seen == expected_entries
    # No descriptor per remembered inode: the fd count does not move with the table.
    assert r.walked["fds"] == r.start["fds"] == r.forgotten["fds"], r.to_json()
    if r.foreign_drops == 0:
        assert r.walked["inodes"] == r.start["inodes"] + expected_entries - 1, r.to_json()
        assert 0 < r.bytes_per_inode < MAX_BYTES_PER_INODE, r.to_json()
    else:
        assert r.walked["inodes"] <= r.start["inodes"] + expected_entries, r.to_json()
    # The kernel forgot: the table is back to (near) where it started.
    assert r.forgotten["inodes"] <= r.start["inodes"] + FORGET_SLACK, r.to_json()
    if r.rewalked is not None:
        assert r.rewalked["fds"] == r.start["fds"], r.to_json()


def _check_cycles(result: object, cycles: int, record: Callable[[str, object], None]) -> None:
    c = result
    assert isinstance(c, scale.CycleResult)
    print(c.text())
    record("cycles", vars(c))
    assert c.cycles == cycles
    assert c.fds_after == c.fds_before, vars(c)
    assert c.fds_while_open == c.fds_before + c.held, vars(c)


def test_walk_then_forget_small(
    small_tree: tuple[Path, storegen.Summary, list[str]],
    record_property: Callable[[str, object], None],
) -> None:
    src, summary, files = small_tree
    with util.mounted(src) as m:
        result = scale.walk_and_forget(m.path, m.status)
        assert m.proc.poll() is None
    # + the root, + the cycles directory and its files
    _check_walk(result, summary.entries + 1 + 1 + len(files), record_property)


def test_open_close_cycles_leave_no_descriptor_small(
    small_tree: tuple[Path, storegen.Summary, list[str]],
    record_property: Callable[[str, object], None],
) -> None:
    src, _, files = small_tree
    with util.mounted(src) as m:
        paths = [os.fspath(m.path / f) for f in files]
        result = scale.open_close_cycles(paths, SMALL_CYCLES, m.status)
        status = m.status()
    _check_cycles(result, SMALL_CYCLES, record_property)
    assert status["opens"] == SMALL_CYCLES + len(files), status


@pytest.mark.slow
def test_million_entry_walk_and_100k_cycles(record_property: Callable[[str, object], None]) -> None:
    util.fuse_available()
    dest = scale.CACHE_DIR / f"store-{BIG_ENTRIES}"
    scale.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    summary = storegen.ensure_tree(dest, **scale.tree_args(BIG_ENTRIES))
    with util.mounted(dest) as m:
        walk = scale.walk_and_forget(m.path, m.status)
        files = scale.small_files(os.fspath(m.path), 1000)
        cycles = scale.open_close_cycles(files, BIG_CYCLES, m.status)
        assert m.proc.poll() is None
    _check_walk(walk, summary.entries + 1, record_property)
    _check_cycles(cycles, BIG_CYCLES, record_property)


#: Store paths at the top level: by default, and with ``-m slow``.
SMALL_TOP = 2_000
BIG_TOP = 200_000
#: A loose bound on the daemon's RSS per top-level entry (kept listing + remembered inode).
MAX_BYTES_PER_TOP_ENTRY = 4096


def _check_top(result: object, paths: int, record: Callable[[str, object], None]) -> None:
    r = result
    assert isinstance(r, scale.TopLevelResult)
    print(r.text())
    record("top_level", r.to_json())
    assert r.entries == r.kept == paths
    assert r.stat_ms, "no stat was answered while the top level was listed"


def test_top_level_listing_small(
    world_tmp: Path, record_property: Callable[[str, object], None]
) -> None:
    src = world_tmp / "src"
    storegen.generate(src, **scale.top_tree_args(SMALL_TOP))
    with util.mounted(src) as m:
        probes = scale.top_probes(os.fspath(src), os.fspath(m.path), 500)
        result = scale.list_top_level(m.path, m.status, probes)
        assert m.proc.poll() is None
    _check_top(result, SMALL_TOP, record_property)


@pytest.mark.slow
def test_top_level_of_200k_store_paths(record_property: Callable[[str, object], None]) -> None:
    util.fuse_available()
    dest = scale.CACHE_DIR / f"top-{BIG_TOP}"
    scale.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    storegen.ensure_tree(dest, **scale.top_tree_args(BIG_TOP))
    cost = scale.listing_cost(os.fspath(dest))
    print(cost)
    record_property("kept_listing", cost)
    with util.mounted(dest) as m:
        probes = scale.top_probes(os.fspath(dest), os.fspath(m.path))
        result = scale.list_top_level(m.path, m.status, probes)
        assert m.proc.poll() is None
    _check_top(result, BIG_TOP, record_property)
    assert result.rss_per_entry < MAX_BYTES_PER_TOP_ENTRY
    assert cost["bytes_per_entry"] < MAX_BYTES_PER_TOP_ENTRY
