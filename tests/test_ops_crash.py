"""Crash recovery: a SIGKILLed daemon leaves a dead mount (never an empty directory), readers
get errors (never wrong data), and the next noatimefs on that mountpoint clears it and mounts.
A dead mount of another filesystem, and any live mount, is never touched."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount

DEAD = (errno.ENOTCONN, errno.ECONNABORTED)
BIG = "data/big.bin"

# A reader on /usr/bin/python3. It reads the first chunk, says so, waits for "go" on stdin
# (sent once the daemon is dead), then reads on: every byte it gets must be the file's.
_STEP_READER = r"""
import json, os, sys
path, expected_path, chunk = sys.argv[1], sys.argv[2], 1 << 16
expected = open(expected_path, "rb").read()
out = {"ok_bytes": 0, "wrong_at": None, "errno": None}
fd = os.open(path, os.O_RDONLY)
def take(data):
    at = out["ok_bytes"]
    if data != expected[at : at + len(data)]:
        out["wrong_at"] = at
        return False
    out["ok_bytes"] += len(data)
    return True
take(os.read(fd, chunk))
print("started", flush=True)
sys.stdin.readline()
try:
    while out["ok_bytes"] < len(expected):
        data = os.read(fd, chunk)
        if not data:
            break
        if not take(data):
            break
except OSError as e:
    out["errno"] = e.errno
try:
    os.open(path, os.O_RDONLY)
    out["reopen_errno"] = 0
except OSError as e:
    out["reopen_errno"] = e.errno
print(json.dumps(out), flush=True)
"""

# Reads the file whole, again and again, until an error; any wrong byte is reported.
_LOOP_READER = r"""
import json, os, sys
path, expected_path = sys.argv[1], sys.argv[2]
expected = open(expected_path, "rb").read()
out = {"rounds": 0, "wrong": 0, "short": 0, "errno": None}
print("started", flush=True)
while True:
    try:
        with open(path, "rb", buffering=0) as f:
            got = b""
            while True:
                data = f.read(1 << 16)
                if not data:
                    break
                if data != expected[len(got) : len(got) + len(data)]:
                    out["wrong"] += 1
                got += data
    except OSError as e:
        out["errno"] = e.errno
        break
    if got != expected:
        out["short"] += 1
    out["rounds"] += 1
print(json.dumps(out), flush=True)
"""


class Daemon:
    """A noatimefs daemon started by hand, ready when it says ``READY=1`` (sd_notify).

    (Waiting for "a new mount in mountinfo" is not enough here: the kernel reuses
    the dead mount's id for the new one.)
    """

    def __init__(self, source: Path, mountpoint: Path, log_path: Path) -> None:
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.sock_path = log_path.with_suffix(".notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "noatimefs", str(source), str(mountpoint)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=dict(os.environ, NOTIFY_SOCKET=str(self.sock_path)),
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> util.MountEntry:
        end = time.monotonic() + util.DAEMON_DEADLINE
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no READY=1 after the deadline:\n{self.log()}")
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            # The short cap re-checks that the daemon is alive.
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if ready and b"READY=1" in self.sock.recv(4096).split(b"\n"):
                entry = util.mount_entry(self.mountpoint)
                assert entry is not None
                assert entry.fstype == "fuse.noatimefs", entry
                return entry

    def stop(self) -> list[str]:
        problems = util.umount(self.mountpoint)
        try:
            self.proc.wait(timeout=util.DAEMON_DEADLINE)
        except subprocess.TimeoutExpired:
            problems.append("daemon did not exit after unmount: killed")
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0:
            problems.append(f"daemon exited {self.proc.returncode}:\n{self.log()}")
        self.sock.close()
        return problems


@contextlib.contextmanager
def started(source: Path, mountpoint: Path, log_path: Path) -> Iterator[Daemon]:
    d = Daemon(source, mountpoint, log_path)
    try:
        d.wait_ready()
        yield d
    finally:
        problems = d.stop()
    assert problems == [], problems


def start_reader(code: str, path: Path, expected: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [util.SYSTEM_PYTHON, "-c", code, str(path), str(expected)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "started\n", (line, proc.stderr.read() if proc.stderr else "")
    return proc


def finish_reader(proc: subprocess.Popen[str], go: bool = False) -> dict[str, object]:
    out, err = proc.communicate("go\n" if go else None, timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.splitlines()[-1])
    assert isinstance(result, dict)
    return result


def make_dead_fuse_mount(mountpoint: Path, fstype: str, source: str) -> None:
    """A FUSE mount of *fstype* whose daemon is gone: mount(2) on /dev/fuse, then close it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0"
        flags = 1 | 2 | 4  # MS_RDONLY | MS_NOSUID | MS_NODEV
        if libc.mount(source.encode(), bytes(mountpoint), fstype.encode(), flags, opts.encode()):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(mountpoint))
    finally:
        os.close(fd)
    assert errno_of(os.statvfs, mountpoint) in DEAD


def errno_of(fn: Callable[[Path], object], path: Path) -> int:
    """0 when ``fn(path)`` works, else its errno."""
    try:
        fn(path)
    except OSError as e:
        return e.errno or -1
    return 0


def noatimefs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noatimefs", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_sigkill_mid_read_gives_errors_not_wrong_data_and_a_restart_recovers(
    store: Path, world_tmp: Path
) -> None:
    mnt = world_tmp / "mnt"
    mnt.mkdir(mode=0o755)
    with util.mounted(store, mnt, expect_clean_exit=False) as m:
        step = start_reader(_STEP_READER, m.path / BIG, store / BIG)
        loop = start_reader(_LOOP_READER, m.path / BIG, store / BIG)
        try:
            os.kill(m.pid, signal.SIGKILL)
            assert m.proc.wait(timeout=util.DAEMON_DEADLINE) == -signal.SIGKILL
            step_out = finish_reader(step, go=True)
            loop_out = finish_reader(loop)
        finally:
            for p in (step, loop):
                if p.poll() is None:
                    p.kill()
                    p.wait()

        # Readers: an error, and never a wrong byte.
        size = (store / BIG).stat().st_size
        assert step_out["wrong_at"] is None, step_out
        assert step_out["errno"] in DEAD, step_out
        assert isinstance(step_out["ok_bytes"], int)
        assert step_out["ok_bytes"] < size, step_out
        assert step_out["reopen_errno"] in DEAD, step_out
        assert loop_out["wrong"] == 0, loop_out
        assert loop_out["short"] == 0, loop_out
        assert loop_out["errno"] in DEAD, loop_out

        # The mount is dead, not an empty directory.
        dead = util.mount_entry(mnt)
        assert dead is not None
        assert dead.fstype == "fuse.noatimefs", dead
        # (stat may still be answered from the kernel's attribute cache; these ask the daemon.)
        assert errno_of(os.listdir, mnt) in DEAD
        assert errno_of(os.statvfs, mnt) in DEAD

        # A second daemon on the same mountpoint clears it, says so once, and serves.
        with started(store, mnt, world_tmp / "second.log") as second:
            assert (mnt / BIG).read_bytes() == (store / BIG).read_bytes()
            assert [e.fstype for e in util.mounts_below(mnt)] == ["fuse.noatimefs"]
            cleared = [line for line in second.log().splitlines() if "cleared a dead" in line]
            assert len(cleared) == 1, second.log()
            assert str(mnt) in cleared[0], cleared
    assert util.mounts_below(mnt) == []


def test_dead_noatimefs_mount_is_cleared_before_mounting(store: Path, world_tmp: Path) -> None:
    util.fuse_available()
    mnt = world_tmp / "mnt"
    mnt.mkdir(mode=0o755)
    try:
        make_dead_fuse_mount(mnt, "fuse.noatimefs", str(store))
        with started(store, mnt, world_tmp / "daemon.log") as d:
            assert sorted(os.listdir(mnt)) == sorted(os.listdir(store))
            assert "cleared a dead noatimefs mount" in d.log()
    finally:
        util.umount(mnt)
    assert util.mounts_below(mnt) == []


def test_dead_mount_of_another_type_is_left_alone(store: Path, world_tmp: Path) -> None:
    util.fuse_available()
    mnt = world_tmp / "mnt"
    mnt.mkdir(mode=0o755)
    try:
        make_dead_fuse_mount(mnt, "fuse.other", "other-source")
        before = util.mount_entry(mnt)
        r = noatimefs(str(store), str(mnt))
        assert r.returncode == 4, r
        assert r.stderr.startswith("noatimefs: error: MOUNTPOINT"), r.stderr
        assert "fuse.other" in r.stderr, r.stderr
        assert "dead" in r.stderr, r.stderr
        assert util.mount_entry(mnt) == before, "the dead mount of another type was touched"
    finally:
        assert util.umount(mnt) == []


def test_live_mounts_are_left_alone(store: Path, world_tmp: Path) -> None:
    util.fuse_available()
    mnt = world_tmp / "mnt"
    mnt.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "live", str(mnt)], check=True)
    try:
        before = util.mount_entry(mnt)
        r = noatimefs(str(store), str(mnt))
        assert r.returncode == 4, r
        assert "already mounted" in r.stderr, r.stderr
        assert util.mount_entry(mnt) == before
    finally:
        assert util.umount(mnt, fuse=False) == []
    with util.mounted(store, mnt) as m:
        r = noatimefs(str(store), str(mnt))
        assert r.returncode == 4, r
        assert util.mount_entry(mnt) == m.entry
        assert m.proc.poll() is None
