"""The main job: O_NOATIME dropped for callers who do not own the backing file, kept otherwise."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount

NOBODY_UID, NOBODY_GID = util.NOBODY

# Runs as 65534: O_NOATIME on the source (expected EPERM), then through the mount.
_DROP_PROBE = """
src, mnt, n = DATA["src"], DATA["mnt"], DATA["opens"]
out = {"pid": os.getpid(), "comm": open("/proc/self/comm").read().strip()}
out["src_file"] = errno_of(read_file, src + "/noatime/file.txt", os.O_NOATIME)
out["src_dir"] = errno_of(list_dir, src + "/noatime/dir", os.O_NOATIME)
out["mnt_file"] = [read_file(mnt + "/noatime/file.txt", os.O_NOATIME).hex() for _ in range(n)]
out["mnt_dir"] = list_dir(mnt + "/noatime/dir", os.O_NOATIME)
emit(out)
"""


def drop_lines(log: str, pid: int) -> list[str]:
    return [line for line in log.splitlines() if "O_NOATIME dropped" in line and f"{pid}" in line]


def test_nobody_noatime_open_is_eperm_on_source_and_works_through_mount(
    store: Path, store_mount: util.Mount
) -> None:
    opens = 3
    before = store_mount.status()
    r = util.run_as(
        NOBODY_UID,
        NOBODY_GID,
        _DROP_PROBE,
        {"src": str(store), "mnt": str(store_mount.path), "opens": opens},
    )
    after = store_mount.status()

    # The kernel refuses the flag on the source: the problem noatimefs exists for.
    assert r["src_file"] == errno.EPERM
    assert r["src_dir"] == errno.EPERM
    # Through the mount: the same bytes, the same listing.
    expected = (store / "noatime" / "file.txt").read_bytes()
    assert [bytes.fromhex(h) for h in r["mnt_file"]] == [expected] * opens
    assert r["mnt_dir"] == sorted(os.listdir(store / "noatime" / "dir"))

    # Counted: every file open dropped the flag (opendir gets no flags from FUSE).
    assert after["noatime_dropped"] - before["noatime_dropped"] == opens, (before, after)
    assert after["noatime_kept"] == before["noatime_kept"], (before, after)
    comm = r["comm"]
    by_proc_before = before["dropped_by_process"].get(comm, 0)
    assert after["dropped_by_process"].get(comm, 0) - by_proc_before == opens, after

    # Logged once for this process, naming it (pid, name, uid).
    lines = drop_lines(store_mount.log_text(), r["pid"])
    assert len(lines) == 1, store_mount.log_text()
    line = lines[0]
    assert f"pid {r['pid']}" in line, line
    assert comm in line, line
    assert f"uid {NOBODY_UID}" in line, line


def test_status_has_the_contracted_fields_and_is_hidden(store_mount: util.Mount) -> None:
    status = store_mount.status()
    for key in ("pid", "noatime_kept", "noatime_dropped", "opens", "inodes", "handles"):
        assert isinstance(status[key], int), (key, status)
    for key in ("dropped_by_process", "kept_by_process"):
        assert isinstance(status[key], dict), (key, status)
    assert status["pid"] == store_mount.pid
    assert util.STATUS_XATTR not in os.listxattr(store_mount.path)


def test_status_counts_opens_and_handles(store_mount: util.Mount) -> None:
    before = store_mount.status()
    fd = os.open(store_mount.path / "data" / "a.txt", os.O_RDONLY)
    try:
        during = store_mount.status()
    finally:
        os.close(fd)
    assert during["opens"] == before["opens"] + 1, (before, during)
    assert during["handles"] >= 1, during


def test_nobody_owning_the_backing_file_keeps_noatime(store: Path, store_mount: util.Mount) -> None:
    """data/nobody.txt is really 65534's: the flag is honoured, not dropped."""
    before = store_mount.status()
    code = """
emit({"src": read_file(DATA["src"], os.O_NOATIME).hex(),
      "mnt": read_file(DATA["mnt"], os.O_NOATIME).hex()})
"""
    res = util.run_as(
        NOBODY_UID,
        NOBODY_GID,
        code,
        {
            "src": str(store / "data" / "nobody.txt"),
            "mnt": str(store_mount.path / "data" / "nobody.txt"),
        },
    )
    after = store_mount.status()
    assert res["src"] == res["mnt"] == (store / "data" / "nobody.txt").read_bytes().hex()
    assert after["noatime_kept"] - before["noatime_kept"] == 1, (before, after)
    assert after["noatime_dropped"] == before["noatime_dropped"], (before, after)


def test_other_users_noatime_is_still_refused_by_the_kernel(store_mount: util.Mount) -> None:
    """One presented owner per mount: to anyone else the file is not theirs (DESIGN fact 4)."""
    code = """
p = DATA + "/noatime/file.txt"
emit({"noatime": errno_of(read_file, p, os.O_NOATIME), "plain": errno_of(read_file, p)})
"""
    before = store_mount.status()
    r = util.run_as(4242, 4242, code, str(store_mount.path))
    after = store_mount.status()
    assert r == {"noatime": errno.EPERM, "plain": 0}
    assert after["noatime_dropped"] == before["noatime_dropped"]


# --------------------------------------------------------------------------- atime, for real


@pytest.fixture
def strictatime_source(world_tmp: Path) -> Iterator[Path]:
    """A tmpfs mounted ``strictatime`` (every read updates atime), unmounted afterwards."""
    src = world_tmp / "src"
    src.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "strictatime,mode=0755,size=16m", "noatimefs-test", src],
        check=True,
    )
    try:
        yield src
    finally:
        problems = util.umount(src, fuse=False)
        assert not problems, problems


OLD_ATIME_NS = 1_000_000_000 * 10**9  # 2001-09-09


def test_root_keeps_noatime_and_backing_atime_is_untouched(strictatime_source: Path) -> None:
    src = strictatime_source
    for name in ("noatime.bin", "plain.bin"):
        p = src / name
        p.write_bytes(name.encode() * 1000)
        p.chmod(0o444)
        os.utime(p, ns=(OLD_ATIME_NS, p.stat().st_mtime_ns))
    with util.mounted(src, owner=NOBODY_UID, allow_other=True) as m:
        before = m.status()
        fd = os.open(m.path / "noatime.bin", os.O_RDONLY | os.O_NOATIME)
        try:
            assert os.read(fd, 1 << 16) == b"noatime.bin" * 1000
        finally:
            os.close(fd)
        after = m.status()
        # A different file, so the page cache of the first cannot hide this read.
        assert (m.path / "plain.bin").read_bytes() == b"plain.bin" * 1000
        final = m.status()
    assert after["noatime_kept"] - before["noatime_kept"] == 1, (before, after)
    assert after["noatime_dropped"] == before["noatime_dropped"], (before, after)
    assert sum(after["kept_by_process"].values()) - sum(before["kept_by_process"].values()) == 1
    assert final["noatime_kept"] == after["noatime_kept"], (after, final)
    # The O_NOATIME read left the backing atime alone; the plain read moved it
    # (so the first assertion is not vacuous on this source).
    assert (src / "noatime.bin").stat().st_atime_ns == OLD_ATIME_NS
    assert (src / "plain.bin").stat().st_atime_ns != OLD_ATIME_NS
