"""Big directories list completely and correctly, also twice in parallel.

Each listing is made by a separate process (Debian's python3, ``os.scandir``)
and returns every name with its type as readdir reported it; a listing must
have no duplicate and no missing name, and two listings made at the same time
must be the same set. Default: the session store's ``many/`` (20,000 names).
``-m slow``: a directory of 200,000 entries (files, symlinks and directories,
names of 7 to 206 bytes, so readdir buffers fill at every possible offset).
"""

from __future__ import annotations

import json
import os
import subprocess
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


def _list_in_parallel(path: Path, copies: int = 2) -> tuple[list[Listing], float]:
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [util.SYSTEM_PYTHON, "-c", LISTER, os.fspath(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(copies)
    ]
    listings = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        listings.append([(name, kind) for name, kind in json.loads(out)])
    return listings, time.monotonic() - t0


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
    listings, seconds = _list_in_parallel(store_mount.path / "many")
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
        first, seconds_first = _list_in_parallel(m.path / "big")
        again, seconds_again = _list_in_parallel(m.path / "big")
        status = m.status()
        assert m.proc.poll() is None
    _check(first, expected)
    _check(again, expected)
    result = {
        "entries": BIG,
        "two_parallel_listings_s": round(seconds_first, 2),
        "again_s": round(seconds_again, 2),
        "daemon_inodes": status["inodes"],
        "daemon_rss_mib": status["rss"] >> 20,
    }
    print(result)
    record_property("list_200k", result)
