"""Per-request cost of the daemon's handlers, in-process (no FUSE, no kernel): µs per call.

    .venv/bin/python bench/handlers.py [DIR]              # this checkout
    cd / && PYTHONPATH=/other/checkout .venv/bin/python /this/bench/handlers.py [DIR]

DIR (default ``/var/tmp/noatimefs-handlers``) gets ``d/`` with 2,000 files and
2,000 symlinks once. Measured, best of 5 passes over every name: ``lookup``
below the top level and of a top-level name, ``opendir`` and the first
``readdir`` with the listing cache cold (per entry; nothing is sent),
a lookup below the top level again, answered from that listing, now cached;
``getattr``, ``open`` + ``release`` and ``readlink`` of remembered nodes. One
JSON line on stdout, with the file of the package used: run two checkouts in
turn, several times, and compare (the machine is noisy).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import cast

import pyfuse3
import trio

import noatimefs
from noatimefs import policy
from noatimefs.fs import NoatimeFS
from noatimefs.inodes import ROOT_ID
from noatimefs.source import Source

N = 2000
PASSES = 5


class Ctx:
    uid = 0
    gid = 0
    pid = os.getpid()
    umask = 0o022


def build(root: str) -> None:
    d = os.path.join(root, "d")
    if os.path.isdir(d):
        return
    os.makedirs(d)
    for i in range(N):
        with open(f"{d}/f{i}", "w") as f:
            f.write("x" * 100)
        os.symlink(f"f{i}", f"{d}/l{i}")


async def best(count: int, one_pass: Callable[[], Awaitable[object]]) -> float:
    """The fastest of :data:`PASSES` passes, in µs per item of *count*."""
    times = []
    for _ in range(PASSES):
        t0 = time.perf_counter()
        await one_pass()
        times.append((time.perf_counter() - t0) / count)
    return round(min(times) * 1e6, 2)


async def measure(root: str) -> dict[str, float]:
    consumer = policy.Consumer(65534, frozenset({65534}), 65534)
    ops = NoatimeFS(Source(root), consumer, timeout=300, daemon_uid=0)
    ops.kernel_listings = False  # no libfuse here to carry the flags (noatimefs.replyflags)
    c = cast(pyfuse3.RequestContext, Ctx())  # duck-typed
    names = [b"f%d" % i for i in range(N)] + [b"l%d" % i for i in range(N)]
    d = (await ops.lookup(ROOT_ID, b"d", c)).st_ino
    out: dict[str, float] = {}

    async def lookups_below() -> None:
        ids = [(await ops.lookup(d, n, c)).st_ino for n in names]
        await ops.forget([(i, 1) for i in ids])

    async def lookups_top() -> None:
        for _ in names:
            await ops.lookup(ROOT_ID, b"d", c)
        await ops.forget([(d, len(names))])

    async def cold_listing() -> None:
        ops.dir_cache.drop(ops.inodes.get(d).key)
        fh = await ops.opendir(d, c)
        await ops.readdir(fh, 0, cast(pyfuse3.ReaddirToken, None))  # opendir lists nothing
        await ops.releasedir(fh)

    out["lookup below the top"] = await best(len(names), lookups_below)
    out["lookup at the top"] = await best(len(names), lookups_top)
    out["opendir per entry, listing cache cold"] = await best(len(names), cold_listing)
    out["lookup below the top, listing cached"] = await best(len(names), lookups_below)
    files = [(await ops.lookup(d, n, c)).st_ino for n in names[:N]]
    links = [(await ops.lookup(d, n, c)).st_ino for n in names[N:]]

    async def getattrs() -> None:
        for i in files:
            await ops.getattr(i, c)

    async def opens() -> None:
        for i in files:
            await ops.release((await ops.open(i, os.O_RDONLY, c)).fh)

    async def readlinks() -> None:
        for i in links:
            await ops.readlink(i, c)

    out["getattr"] = await best(len(files), getattrs)
    out["open + release"] = await best(len(files), opens)
    out["readlink"] = await best(len(links), readlinks)
    ops.close()
    return out


def _take_nothing(token: object, name: bytes, attr: object, next_id: int) -> bool:
    """readdir_reply without a kernel: the reply is full at once, so only the listing
    is made (and kept), none of it sent."""
    return False


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/noatimefs-handlers"
    build(root)
    pyfuse3.readdir_reply = _take_nothing
    result = trio.run(measure, root)
    print(json.dumps({"package": os.path.dirname(noatimefs.__file__), **result}))


if __name__ == "__main__":
    main()
