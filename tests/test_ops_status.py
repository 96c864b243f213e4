"""``noatimefs status MOUNTPOINT``: the figures a running daemon reports match what was done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount

NOBODY_UID, NOBODY_GID = util.NOBODY

# Runs as 65534 on /usr/bin/python3 (so its comm is "python3"): N opens with O_NOATIME.
_OPENS = """
out = {"comm": open("/proc/self/comm").read().strip(), "data": []}
for _ in range(DATA["n"]):
    out["data"].append(read_file(DATA["path"], os.O_NOATIME).hex())
emit(out)
"""


def status_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noatimefs", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_counts_three_dropped_noatime_opens_by_python3(store: Path) -> None:
    with util.mounted(store, owner=NOBODY_UID, allow_other=True) as m:
        r = util.run_as(
            NOBODY_UID,
            NOBODY_GID,
            _OPENS,
            {"path": str(m.path / "noatime" / "file.txt"), "n": 3},
        )
        assert r["comm"] == "python3"
        expected = (store / "noatime" / "file.txt").read_bytes()
        assert [bytes.fromhex(h) for h in r["data"]] == [expected] * 3

        raw = status_cmd("--json", str(m.path))
        assert raw.returncode == 0, raw.stderr
        status = json.loads(raw.stdout)
        assert status["pid"] == m.pid
        assert status["noatime_dropped"] == 3, status
        assert status["dropped_by_process"] == {"python3": 3}, status
        assert status["noatime_kept"] == 0, status
        assert status["kept_by_process"] == {}, status
        assert status["opens"] == 3, status
        assert status["handles"] == 0, status  # every open was closed
        assert status["inodes"] >= 3, status  # root, noatime/, noatime/file.txt
        assert status["rss"] > 0, status
        assert status["source"] == str(store)
        assert status["owner"] == NOBODY_UID

        human = status_cmd(str(m.path))
        assert human.returncode == 0, human.stderr
        lines = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in human.stdout.splitlines())
        )
        assert lines["pid"] == str(m.pid)
        assert lines["O_NOATIME dropped"] == "3"
        assert lines["O_NOATIME kept"] == "0"
        assert "python3 3" in human.stdout
        assert lines["opens served"] == "3"
        assert lines["source"] == str(store)
        for key in ("uptime", "rss", "inodes remembered", "open handles"):
            assert key in lines, human.stdout


def test_status_of_a_per_user_mount_counts_per_view(store: Path) -> None:
    with util.mounted(store, None, "--per-user", allow_other=True) as m:
        for uid, gid, n in ((*util.NOBODY, 3), (1000, 1000, 2)):
            path = str(m.path / "self" / "noatime" / "file.txt")
            util.run_as(uid, gid, _OPENS, {"path": path, "n": n})
        status = json.loads(status_cmd("--json", str(m.path)).stdout)
        human = status_cmd(str(m.path))
    assert status["owner"] is None
    assert status["per_user"] == "any uid"
    for uid, n in ((NOBODY_UID, 3), (1000, 2)):
        view = status["views"][str(uid)]
        assert view["opens"] == view["noatime_dropped"] == n, status
        assert view["noatime_kept"] == 0, status
    assert status["dropped_by_process"] == {"python3": 5}, status
    assert human.returncode == 0, human.stderr
    assert "views for:" in human.stdout
    assert "views:" in human.stdout
    assert f"uid {NOBODY_UID}:" in human.stdout
    assert "3 opens, O_NOATIME kept 0, dropped 3" in human.stdout
    assert "2 opens, O_NOATIME kept 0, dropped 2" in human.stdout


def test_status_of_a_directory_that_is_not_a_mount_is_exit_4(world_tmp: Path) -> None:
    r = status_cmd(str(world_tmp))
    assert r.returncode == 4, r
    assert r.stdout == ""
    assert r.stderr.startswith("noatimefs: error: "), r.stderr
    assert "not a mountpoint" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_status_of_another_mount_type_is_exit_4(world_tmp: Path) -> None:
    util.fuse_available()
    mnt = world_tmp / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", os.fspath(mnt)], check=True)
    try:
        r = status_cmd(str(mnt))
        assert r.returncode == 4, r
        assert "tmpfs mount, not noatimefs" in r.stderr, r.stderr
    finally:
        assert util.umount(mnt, fuse=False) == []
