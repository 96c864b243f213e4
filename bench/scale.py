#!/usr/bin/env python3
"""The million-entry walk: daemon memory and descriptors at real scale.

Mounts a metadata-only store tree made by :mod:`noatimefs.storegen` (cached
under ``/var/tmp/noatimefs-scale``), then measures, from the daemon's status
xattr (``user.noatimefs.status`` on the mount root: ``inodes``, ``rss``,
``fds``) and psutil:

1. the state after mounting;
2. after ``find MNT -printf '%i %s\\n'`` (every entry looked up and stat-ed);
3. after ``echo 2 > /proc/sys/vm/drop_caches`` (the kernel evicts its inodes
   and sends FORGETs; the daemon's table should shrink back to the root);
4. after a second walk (RSS should reuse the memory freed in 3, not grow);
5. descriptors around ``--cycles`` open/close cycles of small files.

Bytes per remembered inode = RSS growth / inodes added, taken at the largest
table sampled during the first walk (another process's drop_caches can empty
the table mid-walk; such drops are counted and reported). The growth includes
the daemon's directory-listing cache (bounded by its entry count), so
``--table`` also measures a bare in-process InodeTable. RSS often does not fall
back after the forget (CPython keeps its freed small-object arenas, and the
listing cache lives for --timeout); the table size and the second walk are
what show the memory is bounded. Run as root (it mounts and drops caches)::

    .venv/bin/python bench/scale.py --entries 1000000 [--json out.json]

``--top-level N`` measures a store's shape instead: a top level of N store
paths (one directory with two empty files each, 5% single files; cached under
the same directory), listed cold by a fresh daemon with SOURCE's caches
dropped, while another thread ``stat``-s paths the kernel has not seen (each
a lookup the daemon answers) and calls ``statvfs`` (never cached by the kernel):
their latencies say whether the listing stalls other callers. Then: the kept
listing's size (``top_level_entries``), the daemon's RSS growth per top-level
entry (which includes the inode the kernel now remembers for each, readdirplus
being a lookup), and the bytes per entry of a kept listing alone, measured
in-process (:func:`listing_cost`)::

    .venv/bin/python bench/scale.py --top-level 200000 --cycles 0

The tests import :func:`walk_and_forget`, :func:`open_close_cycles` and
:func:`list_top_level` and run them on their own mounts
(``tests/test_scale_walk.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))  # also when loaded by a test from its file

from run import drops  # noqa: E402  (bench/run.py, beside this script)

from noatimefs import storegen  # noqa: E402

STATUS_XATTR = "user.noatimefs.status"
CACHE_DIR = Path("/var/tmp/noatimefs-scale")
MOUNT_DEADLINE = 30.0
#: How long to wait for the daemon's table to settle after drop_caches.
FORGET_DEADLINE = 120.0

Status = Callable[[], dict[str, Any]]


def tree_args(entries: int) -> dict[str, int]:
    """The storegen arguments of the walk's tree (metadata only: empty files)."""
    return {"entries": entries, "files_per_path": 12, "max_file_size": 0, "seed": 0}


def drop_caches(level: int) -> None:
    """``echo LEVEL > /proc/sys/vm/drop_caches`` (2: dentries and inodes; 3: also pages)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{level}\n")


def read_status(mnt: str | os.PathLike[str]) -> dict[str, Any]:
    result = json.loads(os.getxattr(mnt, STATUS_XATTR))
    assert isinstance(result, dict)
    return result


def snapshot(status: Status) -> dict[str, int]:
    s = status()
    # The pipe to the walk-ahead helper is one descriptor for the daemon's life, not per inode.
    fds = int(s["fds"]) - (s.get("walk_ahead_pid") is not None)
    return {"inodes": int(s["inodes"]), "rss": int(s["rss"]), "fds": fds}


def wait_for_forgets(status: Status, floor: int, deadline: float = FORGET_DEADLINE) -> float:
    """Poll the daemon until its table is at most *floor* inodes or stops shrinking.

    FORGETs arrive in batches after the kernel evicts its inodes; the table has
    settled when it reaches *floor* or has not changed for one second. Returns
    the seconds waited. (A poll with a deadline, not a sleep for synchronisation.)
    """
    t0 = time.monotonic()
    last = snapshot(status)["inodes"]
    last_change = t0
    while True:
        now = time.monotonic()
        inodes = snapshot(status)["inodes"]
        if inodes <= floor or now - t0 > deadline:
            return now - t0
        if inodes != last:
            last, last_change = inodes, now
        elif now - last_change > 1.0:
            return now - t0
        time.sleep(0.05)


@dataclasses.dataclass
class WalkResult:
    entries_seen: int
    walk_seconds: float
    forget_seconds: float
    start: dict[str, int]
    walked: dict[str, int]
    forgotten: dict[str, int]
    rewalked: dict[str, int] | None
    #: drop_caches by other processes during the walks: they make the kernel forget
    #: (and the table shrink) mid-walk, so "after find" then undercounts the entries.
    foreign_drops: int = 0
    #: The largest table seen during the first walk (sampled), and RSS then.
    peak: dict[str, int] | None = None

    @property
    def bytes_per_inode(self) -> float:
        """RSS growth per inode added, at the largest table seen during the first walk."""
        top = self.peak if self.peak is not None else self.walked
        added = top["inodes"] - self.start["inodes"]
        return (top["rss"] - self.start["rss"]) / max(1, added)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bytes_per_inode"] = round(self.bytes_per_inode, 1)
        return d

    def text(self) -> str:
        def row(name: str, s: dict[str, int] | None) -> str:
            if s is None:
                return ""
            return (
                f"  {name:<22} inodes {s['inodes']:>9,}  rss {s['rss'] / 2**20:8.1f} MiB"
                f"  fds {s['fds']}\n"
            )

        return (
            f"walked {self.entries_seen:,} entries in {self.walk_seconds:.1f} s; "
            f"table settled {self.forget_seconds:.1f} s after drop_caches\n"
            + row("after mount", self.start)
            + row("largest during find", self.peak)
            + row("after find", self.walked)
            + row("after drop_caches 2", self.forgotten)
            + row("after a second find", self.rewalked)
            + f"  RSS growth per remembered inode: {self.bytes_per_inode:.0f} bytes "
            "(at the largest table; includes the daemon's directory-listing cache)\n"
            + (
                f"  WARNING: {self.foreign_drops} drop_caches by other processes during the "
                "walks (the kernel forgot entries mid-walk)\n"
                if self.foreign_drops
                else ""
            )
        )


def find_count(mnt: str | os.PathLike[str]) -> tuple[int, float]:
    """Run ``find MNT -printf '%i %s\\n'``; the number of lines and the seconds taken."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out:
        r = subprocess.run(["find", os.fspath(mnt), "-printf", "%i %s\n"], stdout=out, check=False)
        seconds = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"find {mnt} exited {r.returncode}")
        out.seek(0)
        lines = sum(1 for _ in out)
    return lines, seconds


class PeakSampler:
    """Samples the daemon's status every *interval* s in a thread; keeps the largest table."""

    def __init__(self, status: Status, interval: float = 0.5) -> None:
        self.status = status
        self.interval = interval
        self.peak = {"inodes": 0, "rss": 0, "fds": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            s = snapshot(self.status)
            if s["inodes"] > self.peak["inodes"]:
                self.peak = s

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def walk_and_forget(
    mnt: str | os.PathLike[str], status: Status | None = None, rewalk: bool = True
) -> WalkResult:
    """Walk *mnt* with find, make the kernel forget, optionally walk again; measure each step."""
    status = status or (lambda: read_status(mnt))
    drop_caches(2)  # start from a kernel that remembers nothing of this mount
    wait_for_forgets(status, floor=1)
    start = snapshot(status)
    drops0 = drops()
    with PeakSampler(status) as sampler:
        entries, walk_seconds = find_count(mnt)
    walked = snapshot(status)
    walked_peak = sampler.peak if sampler.peak["inodes"] > walked["inodes"] else walked
    foreign = drops() - drops0
    drop_caches(2)
    forget_seconds = wait_for_forgets(status, floor=start["inodes"])
    forgotten = snapshot(status)
    rewalked = None
    if rewalk:
        drops0 = drops()
        find_count(mnt)
        rewalked = snapshot(status)
        foreign += drops() - drops0
        drop_caches(2)
        wait_for_forgets(status, floor=start["inodes"])
    return WalkResult(
        entries,
        walk_seconds,
        forget_seconds,
        start,
        walked,
        forgotten,
        rewalked,
        foreign,
        walked_peak,
    )


def wait_for_releases(status: Status, deadline: float = 30.0) -> None:
    """Poll until the daemon holds no handle (the kernel sends RELEASE asynchronously)."""
    end = time.monotonic() + deadline
    while status()["handles"]:
        if time.monotonic() > end:
            raise RuntimeError(f"handles still open {deadline} s after the last close: {status()}")
        time.sleep(0.01)


@dataclasses.dataclass
class CycleResult:
    cycles: int
    seconds: float
    fds_before: int
    fds_after: int
    fds_while_open: int
    held: int

    def text(self) -> str:
        return (
            f"{self.cycles:,} open/read/close cycles in {self.seconds:.1f} s "
            f"({self.cycles / self.seconds:,.0f}/s): daemon fds {self.fds_before} -> "
            f"{self.fds_after}; with {self.held} files held open: {self.fds_while_open}\n"
        )


def open_close_cycles(
    files: Sequence[str], cycles: int, status: Status, held: int = 100
) -> CycleResult:
    """Open, read one byte from and close *files* round-robin *cycles* times.

    Then hold *held* of them open at once, to see descriptors follow handles.
    """
    fds_before = snapshot(status)["fds"]
    t0 = time.monotonic()
    n = len(files)
    for i in range(cycles):
        fd = os.open(files[i % n], os.O_RDONLY)
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)
    seconds = time.monotonic() - t0
    wait_for_releases(status)
    fds_after = snapshot(status)["fds"]
    opened: list[int] = []
    try:
        for path in files[:held]:
            opened.append(os.open(path, os.O_RDONLY))
        fds_while_open = snapshot(status)["fds"]
    finally:
        for fd in opened:
            os.close(fd)
    return CycleResult(cycles, seconds, fds_before, fds_after, fds_while_open, len(opened))


def table_cost(root: str, limit: int) -> dict[str, float]:
    """Remember up to *limit* entries of *root* in an in-process :class:`InodeTable`.

    The daemon's table without FUSE or the kernel in the way (nothing can
    evict): RSS growth per node, and RSS after the table is dropped again.
    """
    import gc

    import psutil

    from noatimefs.inodes import InodeTable, Node
    from noatimefs.policy import Consumer
    from noatimefs.views import View

    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    table = InodeTable(os.stat(root), View(Consumer(0, frozenset(), 0), tag=0))
    stack: list[tuple[str, Node]] = [(root, table.root)]
    t0 = time.monotonic()
    while stack and len(table) < limit:
        path, node = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                child = table.remember(node, os.fsencode(entry.name), st)
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, child))
    seconds = time.monotonic() - t0
    nodes = len(table)
    rss1 = proc.memory_info().rss
    del table, stack, node
    gc.collect()
    rss2 = proc.memory_info().rss
    return {
        "nodes": nodes,
        "seconds": round(seconds, 1),
        "rss_before": rss0,
        "rss_full": rss1,
        "rss_after_del": rss2,
        "bytes_per_node": round((rss1 - rss0) / max(1, nodes), 1),
    }


# ---------------------------------------------------------------- a mount of our own


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


@contextlib.contextmanager
def mount(source: str, workdir: Path, *args: str) -> Iterator[tuple[str, int]]:
    """``noatimefs SOURCE WORKDIR/mnt`` for the block; yields (mountpoint, daemon pid)."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    log = workdir / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "noatimefs", *args, source, str(mnt)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + MOUNT_DEADLINE
        while not _mounted(str(mnt)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"noatimefs did not mount:\n{log.read_text()}")
            time.sleep(0.05)
        yield str(mnt), proc.pid
    finally:
        if _mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        if _mounted(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        try:
            proc.wait(MOUNT_DEADLINE)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        sys.stderr.write(f"daemon exit {proc.returncode}; log tail:\n")
        sys.stderr.write("".join(log.read_text(errors="replace").splitlines(True)[-5:]))


def top_tree_args(paths: int) -> dict[str, int]:
    """The storegen arguments of a big top level (metadata only)."""
    return {"paths": paths, "dirs_per_path": 1, "files_per_dir": 2, "max_file_size": 0, "seed": 0}


def _percentile(xs: Sequence[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


@dataclasses.dataclass
class TopLevelResult:
    entries: int  # names listed
    cold_seconds: float  # the first listing, SOURCE's caches dropped, nothing kept
    warm_seconds: float  # the same again, served from the kept listing
    kept: int  # top_level_entries of the daemon's status after the first listing
    rss_before: int
    rss_after: int
    inodes_added: int
    stat_ms: list[float]  # lookups of unseen paths during the cold listing
    statvfs_ms: list[float]  # statvfs during the cold listing

    @property
    def rss_per_entry(self) -> float:
        return (self.rss_after - self.rss_before) / max(1, self.kept)

    @staticmethod
    def _summary(xs: Sequence[float]) -> dict[str, float]:
        return {
            "count": len(xs),
            "median_ms": round(statistics.median(xs), 3) if xs else float("nan"),
            "p99_ms": round(_percentile(xs, 0.99), 3),
            "max_ms": round(max(xs), 3) if xs else float("nan"),
        }

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stat_ms"] = self._summary(self.stat_ms)
        d["statvfs_ms"] = self._summary(self.statvfs_ms)
        d["rss_per_entry"] = round(self.rss_per_entry, 1)
        return d

    def text(self) -> str:
        st, sv = self._summary(self.stat_ms), self._summary(self.statvfs_ms)
        return (
            f"top level of {self.entries:,} entries: listed cold in {self.cold_seconds:.2f} s, "
            f"warm in {self.warm_seconds:.3f} s; kept {self.kept:,} entries\n"
            f"  during the cold listing: stat of an unseen path median {st['median_ms']} ms, "
            f"p99 {st['p99_ms']} ms, max {st['max_ms']} ms ({st['count']} stats); "
            f"statvfs median {sv['median_ms']} ms, max {sv['max_ms']} ms ({sv['count']})\n"
            f"  daemon RSS {self.rss_before / 2**20:.1f} -> {self.rss_after / 2**20:.1f} MiB: "
            f"{self.rss_per_entry:.0f} bytes per top-level entry (the kept listing, and "
            f"{self.inodes_added:,} inodes the kernel now remembers)\n"
        )


def list_top_level(
    mnt: str | os.PathLike[str], status: Status, probes: Sequence[str]
) -> TopLevelResult:
    """List *mnt* cold while a thread stats *probes* (paths below it) and statvfs-es it."""
    drop_caches(3)
    wait_for_forgets(status, floor=1)
    before = status()
    stat_ms: list[float] = []
    statvfs_ms: list[float] = []
    done = threading.Event()

    def probe() -> None:
        for path in probes:
            if done.is_set():
                return
            t = time.perf_counter()
            os.stat(path)
            stat_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            os.statvfs(mnt)
            statvfs_ms.append((time.perf_counter() - t) * 1000)

    prober = threading.Thread(target=probe, daemon=True)
    t0 = time.perf_counter()
    prober.start()
    try:
        names = os.listdir(mnt)
        cold = time.perf_counter() - t0
    finally:
        done.set()
        prober.join()
    after = status()
    t0 = time.perf_counter()
    again = os.listdir(mnt)
    warm = time.perf_counter() - t0
    if sorted(again) != sorted(names):
        raise RuntimeError("the kept top-level listing differs from the first one")
    return TopLevelResult(
        len(names),
        cold,
        warm,
        int(after["top_level_entries"]),
        int(before["rss"]),
        int(after["rss"]),
        int(after["inodes"]) - int(before["inodes"]),
        stat_ms,
        statvfs_ms,
    )


def listing_cost(root: str) -> dict[str, float]:
    """Keep a listing of *root* in-process, as the daemon keeps its top level; bytes per entry."""
    import gc

    import psutil

    from noatimefs.listing import list_dir
    from noatimefs.toplevel import TopLevel

    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = TopLevel(fd, 300.0)
        top.watching = True
        build = top.begin()
        entries = top.install(build, list_dir(fd, 300.0))
        rss1 = proc.memory_info().rss
    finally:
        os.close(fd)
    n = len(entries)
    del top, build, entries
    gc.collect()
    return {
        "entries": n,
        "rss_before": rss0,
        "rss_kept": rss1,
        "bytes_per_entry": round((rss1 - rss0) / max(1, n), 1),
    }


def top_probes(source: str, mnt: str, count: int = 5000) -> list[str]:
    """Paths below *mnt* for :func:`list_top_level` to stat: a file in each of *count*
    store paths of *source* (taken from the end of its listing: seen last, if at all)."""
    found = []
    with os.scandir(source) as it:
        names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
    for name in reversed(names[-count:]):
        with os.scandir(os.path.join(source, name)) as it:
            first = next((e.name for e in it), None)
        if first is not None:
            found.append(os.path.join(mnt, name, first))
    return found


def small_files(root: str, limit: int) -> list[str]:
    """Up to *limit* regular files below *root* (through the mount)."""
    found: list[str] = []
    for dirpath, _, filenames in os.walk(root):
        found += (os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
        if len(found) >= limit:
            break
    return [p for p in found if os.path.isfile(p) and not os.path.islink(p)][:limit]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--top-level", type=int, default=0, help="top-level store paths (not --entries)")
    p.add_argument("--cycles", type=int, default=100_000, help="open/close cycles (0: none)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--table", action="store_true", help="also measure an in-process InodeTable of the tree"
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("run as root (mounts, drop_caches)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.top_level:
        dest = CACHE_DIR / f"top-{args.top_level}"
        summary = storegen.ensure_tree(dest, **top_tree_args(args.top_level))
    else:
        dest = CACHE_DIR / f"store-{args.entries}"
        summary = storegen.ensure_tree(dest, **tree_args(args.entries))
    print(
        f"tree {dest}: {summary.entries:,} entries ({summary.dirs:,} dirs, "
        f"{summary.files:,} files, {summary.symlinks:,} symlinks), "
        f"ready in {time.monotonic() - t0:.0f} s",
        flush=True,
    )
    results: dict[str, Any] = {"tree": summary.to_json()}
    if args.top_level:
        cost = listing_cost(str(dest))
        print(
            f"in-process kept listing of {cost['entries']:,} top-level entries: "
            f"{cost['bytes_per_entry']:.0f} bytes/entry (RSS {cost['rss_before'] / 2**20:.0f} -> "
            f"{cost['rss_kept'] / 2**20:.0f} MiB)",
            flush=True,
        )
        results["listing"] = cost
    if args.table:
        cost = table_cost(str(dest), args.entries + 1)
        print(
            f"in-process InodeTable of {cost['nodes']:,} nodes: "
            f"{cost['bytes_per_node']:.0f} bytes/node (RSS {cost['rss_before'] / 2**20:.0f} -> "
            f"{cost['rss_full'] / 2**20:.0f} MiB, {cost['rss_after_del'] / 2**20:.0f} MiB "
            "after the table is dropped)",
            flush=True,
        )
        results["table"] = cost
    work = Path(tempfile.mkdtemp(prefix="noatimefs-scale-"))
    try:
        with mount(str(dest), work) as (mnt, pid):
            if args.top_level:
                top = list_top_level(mnt, lambda: read_status(mnt), top_probes(str(dest), mnt))
                print(top.text(), flush=True)
                results["top_level"] = top.to_json()
            else:
                walk = walk_and_forget(mnt)
                print(walk.text(), flush=True)
                results["walk"] = walk.to_json()
            if args.cycles:
                files = small_files(mnt, 1000)
                cyc = open_close_cycles(files, args.cycles, lambda: read_status(mnt))
                print(cyc.text(), flush=True)
                results["cycles"] = dataclasses.asdict(cyc)
            results["daemon_pid"] = pid
            results["final_status"] = read_status(mnt)
    finally:
        with contextlib.suppress(OSError):
            (work / "mnt").rmdir()
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
