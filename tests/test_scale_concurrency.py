"""Concurrency: parallel big reads stay correct, and a ``stat`` is answered during them.

The daemon serves reads that would block on the disk from trio worker threads,
so a caller waiting on a slow read must not hold up another caller's ``stat``.
These tests measure that and report the latencies (``-s`` prints them; they
are also recorded as junit properties); they assert only that everything
completes with the right bytes, never a timing.

- 16 readers (``sha256sum`` processes) over 16 different big files, with a
  cold page cache, while the test ``stat``\\ s small files through the mount
  (``--timeout 0``, so every ``stat`` reaches the daemon).
- One big cold read from a disk throttled for the daemon alone (a blkio
  cgroup: ``blkio.throttle.read_bps_device``), with ``stat``\\ s beside it.

Default: 16 x 8 MiB files, a 24 MiB throttled read at 8 MiB/s. ``-m slow``:
16 x 256 MiB and a 128 MiB throttled read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import util

from noatimefs import storegen

pytestmark = pytest.mark.mount

READERS = 16
SMALL_SIZE = 8 << 20
BIG_SIZE = 256 << 20
THROTTLE_BPS = 8 << 20
SMALL_THROTTLED = 24 << 20
BIG_THROTTLED = 128 << 20
BLKIO = Path("/sys/fs/cgroup/blkio")

Record = Callable[[str, object], None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _store(base: Path, big_files: int, big_size: int) -> tuple[Path, list[str], list[str]]:
    """A store with *big_files* big files; returns SOURCE, the big files, small files to stat."""
    src = base / "src"
    summary = storegen.generate(
        src, paths=40, files_per_path=8, big_files=big_files, big_size=big_size, seed=21
    )
    small = []
    for dirpath, _, filenames in os.walk(src):
        small += [os.path.relpath(os.path.join(dirpath, f), src) for f in filenames]
    big = set(summary.big_files)
    return src, summary.big_files, sorted(p for p in small if p not in big)


def _latency_summary(lat: Sequence[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in lat)
    if not ms:
        return {"count": 0}
    return {
        "count": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 3),
        "max_ms": round(ms[-1], 3),
    }


def _stat_while(running: Callable[[], bool], targets: Sequence[Path]) -> list[float]:
    """``stat`` *targets* round-robin while *running()*; the latency of each."""
    lat = []
    i = 0
    while running():
        t0 = time.perf_counter()
        os.stat(targets[i % len(targets)])
        lat.append(time.perf_counter() - t0)
        i += 1
    return lat


def _stat_n(targets: Sequence[Path], n: int) -> list[float]:
    count = iter(range(n))
    return _stat_while(lambda: next(count, None) is not None, targets)


def _sha256sum(paths: Sequence[Path]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            ["sha256sum", os.fspath(p)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for p in paths
    ]


def _digests(procs: Sequence[subprocess.Popen[str]]) -> list[str]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
        out.append(stdout.split()[0])
    return out


def _parallel_readers(base: Path, size: int, record: Record) -> None:
    src, big, small = _store(base, READERS, size)
    want = [_sha256(src / b) for b in big]
    with util.mounted(src, None, "--timeout", "0") as m:
        targets = [m.path / s for s in small]
        idle = _latency_summary(_stat_n(targets, 2000))
        _drop_caches()
        t0 = time.monotonic()
        procs = _sha256sum([m.path / b for b in big])
        loaded = _stat_while(lambda: any(p.poll() is None for p in procs), targets)
        got = _digests(procs)
        seconds = time.monotonic() - t0
        assert m.proc.poll() is None
    assert got == want, "a reader got wrong bytes"
    assert loaded, "no stat completed while the readers ran"
    result = {
        "readers": READERS,
        "file_mib": size >> 20,
        "seconds": round(seconds, 2),
        "mib_per_s": round(READERS * size / 2**20 / seconds, 1),
        "stat_idle": idle,
        "stat_during_reads": _latency_summary(loaded),
    }
    print(result)
    record("parallel_readers", result)


def test_sixteen_parallel_readers_and_stats(world_tmp: Path, record_property: Record) -> None:
    _parallel_readers(world_tmp, SMALL_SIZE, record_property)


@pytest.mark.slow
def test_sixteen_parallel_readers_and_stats_big(world_tmp: Path, record_property: Record) -> None:
    _parallel_readers(world_tmp, BIG_SIZE, record_property)


# --------------------------------------------------------------------------- a slow disk


@contextlib.contextmanager
def _throttled(dev: int, bps: int) -> Iterator[Path]:
    """A blkio cgroup (v1) reading *dev* at *bps* bytes/s; removed afterwards."""
    if not (BLKIO / "blkio.throttle.read_bps_device").exists():
        pytest.skip("no cgroup v1 blkio throttling here")
    cg = BLKIO / f"noatimefs-test-{os.getpid()}"
    cg.mkdir()
    try:
        try:
            (cg / "blkio.throttle.read_bps_device").write_text(
                f"{os.major(dev)}:{os.minor(dev)} {bps}\n"
            )
        except OSError as exc:
            pytest.skip(f"cannot throttle device {os.major(dev)}:{os.minor(dev)}: {exc}")
        yield cg
    finally:
        # The daemon has exited by now; move anything left back, then remove the group.
        for pid in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (BLKIO / "cgroup.procs").write_text(pid)
        cg.rmdir()


def _slow_read(base: Path, size: int, record: Record) -> None:
    src, big, small = _store(base, 1, size)
    want = _sha256(src / big[0])
    with (
        _throttled(os.stat(src).st_dev, THROTTLE_BPS) as cg,
        util.mounted(src, None, "--timeout", "0") as m,
    ):
        targets = [m.path / s for s in small]
        idle = _latency_summary(_stat_n(targets, 2000))
        (cg / "cgroup.procs").write_text(str(m.pid))  # its worker threads follow it
        _drop_caches()
        for s in small:  # the stat targets' metadata back in memory, unthrottled
            os.stat(src / s)
        t0 = time.monotonic()
        (reader,) = _sha256sum([m.path / big[0]])
        loaded = _stat_while(lambda: reader.poll() is None, targets)
        (got,) = _digests([reader])
        seconds = time.monotonic() - t0
        assert m.proc.poll() is None
    assert got == want
    assert loaded, "no stat completed during the slow read"
    result = {
        "file_mib": size >> 20,
        "throttle_mib_per_s": THROTTLE_BPS >> 20,
        "read_seconds": round(seconds, 2),
        "stat_idle": idle,
        "stat_during_slow_read": _latency_summary(loaded),
    }
    print(result)
    record("slow_read", result)


def test_stat_is_answered_during_a_slow_cold_read(world_tmp: Path, record_property: Record) -> None:
    _slow_read(world_tmp, SMALL_THROTTLED, record_property)


@pytest.mark.slow
def test_stat_is_answered_during_a_slow_cold_read_big(
    world_tmp: Path, record_property: Record
) -> None:
    _slow_read(world_tmp, BIG_THROTTLED, record_property)
