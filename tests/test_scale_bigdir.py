"""Big directories list completely and correctly, also twice in parallel.

Each listing is made by a separate process (Debian's python3, ``os.scandir``)
and returns every name with its type as readdir reported it; a listing must
have no duplicate and no missing name, and two listings made at the same time
must be the same set. Default: the session store's ``many/`` (20,000 names).
``-m slow``: a directory of 200,000 entries (files, symlinks and directories,
names of 7 to 206 bytes, so readdir buffers fill at every possible offset).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import conftest
import pytest
import util

pytestmark = pytest.mark.mount

BIG = 200_000

LISTER = """
import json, os, sys
out = []
with os.scandir(sys.argv[1]) as it:
    for e in it:
        kind = "l" if e.is_symlink() else "d" if e.is_dir(follow_symlinks=False) else "f"
        out.append([e.name, kind])
json.dump(out, sys.stdout)
"""

Listing = list[tuple[str, str]]


def _list_in_parallel(
    path: Path, copies: int = 2, probe: Path | None = None
) -> tuple[list[Listing], float, list[float]]:
    """List *path* in *copies* processes at once; with *probe*, ``statvfs`` it meanwhile.

    ``statvfs`` is never cached by the kernel, so each one is a request the daemon
    answers while it is busy listing: the third return value is their latencies.
    """
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        # Output to files, not pipes: a lister blocked on a full pipe would never exit.
        outs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(copies)]
        procs = [
            subprocess.Popen(
                [util.SYSTEM_PYTHON, "-c", LISTER, os.fspath(path)],
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
            )
            for out in outs
        ]
        lat = []
        while probe is not None and any(p.poll() is None for p in procs):
            t = time.perf_counter()
            os.statvfs(probe)
            lat.append(time.perf_counter() - t)
        listings = []
        for p, out in zip(procs, outs, strict=True):
            _, err = p.communicate(timeout=900)
            assert p.returncode == 0, err
            out.seek(0)
            listings.append([(name, kind) for name, kind in json.load(out)])
    return listings, time.monotonic() - t0, lat


def _check(listings: list[Listing], expected: dict[str, str]) -> None:
    for listing in listings:
        names = [name for name, _ in listing]
        assert len(names) == len(set(names)), "a name was listed twice"
        missing = expected.keys() - set(names)
        extra = set(names) - expected.keys()
        assert not missing, f"{len(missing)} names missing, e.g. {sorted(missing)[:5]}"
        assert not extra, f"{len(extra)} names not in SOURCE, e.g. {sorted(extra)[:5]}"
        assert dict(listing) == expected, "a type differs"
    assert all(sorted(x) == sorted(listings[0]) for x in listings[1:])


def test_many_lists_completely_twice_in_parallel(
    store: Path, store_mount: util.Mount, record_property: Callable[[str, object], None]
) -> None:
    expected = {f"f{i:05d}": "f" for i in range(conftest.MANY)}
    listings, seconds, _ = _list_in_parallel(store_mount.path / "many")
    _check(listings, expected)
    record_property("list_many_seconds", round(seconds, 2))


def _name(i: int) -> str:
    return f"e{i:06d}" + "x" * (i % 200)


@pytest.mark.slow
def test_200k_entries_list_completely_twice_in_parallel(
    world_tmp: Path, record_property: Callable[[str, object], None]
) -> None:
    src = world_tmp / "src"
    big = src / "big"
    big.mkdir(parents=True)
    expected = {}
    for i in range(BIG):
        name = _name(i)
        p = big / name
        if i % 50 == 0:
            p.mkdir()
            expected[name] = "d"
        elif i % 10 == 0:
            os.symlink(f"target-{i}", p)
            expected[name] = "l"
        else:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
            expected[name] = "f"
    with util.mounted(src) as m:
        first, seconds_first, lat = _list_in_parallel(m.path / "big", probe=m.path)
        again, seconds_again, _ = _list_in_parallel(m.path / "big")
        status = m.status()
        assert m.proc.poll() is None
    _check(first, expected)
    _check(again, expected)
    result = {
        "entries": BIG,
        "two_parallel_listings_s": round(seconds_first, 2),
        "again_s": round(seconds_again, 2),
        "statvfs_during_first": {
            "count": len(lat),
            "median_ms": round(statistics.median(lat) * 1000, 3) if lat else None,
            "max_ms": round(max(lat) * 1000, 3) if lat else None,
        },
        "daemon_inodes": status["inodes"],
        "daemon_rss_mib": status["rss"] >> 20,
    }
    print(result)
    record_property("list_200k", result)
