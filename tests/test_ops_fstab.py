"""``mount -t fuse.noatimefs`` and fstab lines, through mount(8) and mount.fuse3.

mount(8) runs ``/sbin/mount.fuse`` (mount.fuse3) with PATH removed from the
environment; mount.fuse3 runs ``/bin/sh -c "noatimefs SOURCE MNT -o OPTS"``, so
``noatimefs`` must be on the shell's default PATH: the install step is a link
``/usr/local/bin/noatimefs``. The tests make that link (under a lock, removed
afterwards) and check that mount(8) returns once the mount is live, with the
daemon in the background.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount

LINK = util.INSTALLED_LINK
NOBODY_UID, NOBODY_GID = util.NOBODY


@pytest.fixture
def installed() -> Iterator[Path]:
    """``/usr/local/bin/noatimefs`` -> this venv's ``noatimefs``, for the test's duration."""
    util.fuse_available()
    with util.installed_command() as link:
        yield link


def mount_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    """mount(8); a helper that stayed in the foreground would time out here."""
    return subprocess.run(
        ["mount", *args], capture_output=True, text=True, timeout=120, check=False, cwd="/"
    )


def daemon_pids(mountpoint: Path) -> list[int]:
    return util.pids_mentioning(str(mountpoint))


def wait_gone(pid: int) -> None:
    """Wait (deadline) for *pid*, not our child, to exit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], util.DAEMON_DEADLINE)
        assert ready, f"pid {pid} still running {util.DAEMON_DEADLINE} s after the unmount"
    finally:
        os.close(fd)


@contextlib.contextmanager
def cleaned_up(*mountpoints: Path) -> Iterator[None]:
    """Whatever happens: unmount, then make sure no daemon for these mountpoints survives."""
    try:
        yield
    finally:
        problems = []
        for mnt in mountpoints:
            pids = daemon_pids(mnt)
            problems += util.umount(mnt)
            for pid in pids:
                wait_gone(pid)
        assert problems == [], problems


def test_mount_t_fuse_noatimefs_returns_once_live_and_serves(
    installed: Path, store: Path, world_tmp: Path
) -> None:
    mnt = world_tmp / "mnt"
    mnt.mkdir(mode=0o755)
    with cleaned_up(mnt):
        r = mount_cmd(
            "-t", "fuse.noatimefs", str(store), str(mnt), "-o", f"owner={NOBODY_UID},allow_other"
        )
        assert r.returncode == 0, r.stderr
        entry = util.mount_entry(mnt)
        assert entry is not None, r.stderr
        assert entry.fstype == "fuse.noatimefs"
        assert entry.source == str(store)
        assert {"ro", "allow_other", "default_permissions"} <= entry.options
        pids = daemon_pids(mnt)
        assert len(pids) == 1, pids
        assert os.getsid(pids[0]) == pids[0], "the daemon did not detach into its own session"

        got = util.run_as(
            NOBODY_UID,
            NOBODY_GID,
            "emit({'data': read_file(DATA + '/data/a.txt').hex(), 'uid': os.stat(DATA).st_uid})",
            str(mnt),
        )
        assert bytes.fromhex(got["data"]) == (store / "data" / "a.txt").read_bytes()
        assert got["uid"] == NOBODY_UID

        u = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, check=False)
        assert u.returncode == 0, u.stderr
        wait_gone(pids[0])
        assert util.mount_entry(mnt) is None


def test_fstab_lines_with_fstab_only_options_mount_with_mount_a(
    installed: Path, store: Path, world_tmp: Path
) -> None:
    auto, manual = world_tmp / "auto", world_tmp / "manual"
    for d in (auto, manual):
        d.mkdir(mode=0o755)
    fstab = world_tmp / "fstab"
    fstab.write_text(
        "# test fstab\n"
        f"{store} {auto} fuse.noatimefs "
        f"owner={NOBODY_UID},allow_other,nofail,_netdev,x-systemd.requires=x.service 0 0\n"
        f"{store} {manual} fuse.noatimefs noauto,nofail,owner={NOBODY_UID} 0 0\n"
    )
    with cleaned_up(auto, manual):
        r = mount_cmd("-a", "--fstab", str(fstab))
        assert r.returncode == 0, r.stderr
        entry = util.mount_entry(auto)
        assert entry is not None, r.stderr
        assert entry.fstype == "fuse.noatimefs"
        assert "allow_other" in entry.options
        for fstab_only in ("nofail", "_netdev", "noauto", "x-systemd.requires=x.service"):
            assert fstab_only not in entry.options, entry
        assert util.mount_entry(manual) is None, "noauto was mounted by mount -a"
        assert sorted(os.listdir(auto)) == sorted(os.listdir(store))

        # mount(8) sees the mount as the fstab line's (same source, type): -a again is a no-op.
        again = mount_cmd("-a", "--fstab", str(fstab))
        assert again.returncode == 0, again.stderr
        assert len(util.mounts_below(auto)) == 1

        # A noauto line mounts when asked for by its mountpoint.
        r = mount_cmd("--fstab", str(fstab), str(manual))
        assert r.returncode == 0, r.stderr
        entry = util.mount_entry(manual)
        assert entry is not None
        assert "allow_other" not in entry.options
        assert (manual / "data" / "a.txt").read_bytes() == (store / "data" / "a.txt").read_bytes()


def test_mount_t_reports_the_daemons_error_and_exit_code(
    installed: Path, store: Path, world_tmp: Path
) -> None:
    mnt = world_tmp / "mnt"
    mnt.mkdir(mode=0o755)
    with cleaned_up(mnt):
        r = mount_cmd("-t", "fuse.noatimefs", str(world_tmp / "missing"), str(mnt))
        assert r.returncode == 3, r
        assert "noatimefs: error: SOURCE" in r.stderr, r.stderr
        r = mount_cmd("-t", "fuse.noatimefs", "-o", "owner=no-such-user", str(store), str(mnt))
        assert r.returncode == 5, r
        assert util.mount_entry(mnt) is None


# The parent's side of notify.Background, without a mount: the child fails, or reports ready.
_BACKGROUND = """
import os, sys
from noatimefs.notify import Background
mode, pidfile, fifo = sys.argv[1:]
b = Background()
code = b.fork()
if code is not None:
    print("parent", code)
    sys.exit(code)
if mode == "fail":
    print("child: cannot mount", file=sys.stderr)
    sys.exit(6)
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
b.ready()
print("not shown: stdout is /dev/null now")
with open(fifo, "rb") as f:  # blocks until the test opens it for writing
    f.read()
"""


def run_background(mode: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BACKGROUND, mode, str(tmp / "pid"), str(tmp / "fifo")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_background_parent_relays_a_failure_before_ready(world_tmp: Path) -> None:
    r = run_background("fail", world_tmp)
    assert r.returncode == 6, r
    assert r.stdout == "parent 6\n"
    assert "child: cannot mount" in r.stderr


def test_background_parent_exits_0_on_ready_and_the_child_lets_go_of_its_pipes(
    world_tmp: Path,
) -> None:
    os.mkfifo(world_tmp / "fifo")
    r = run_background("ready", world_tmp)  # returns: the child no longer holds the pipes
    pid = int((world_tmp / "pid").read_text())
    try:
        assert r.returncode == 0, r
        assert r.stdout == "parent 0\n"
        assert os.getsid(pid) == pid
    finally:
        with open(world_tmp / "fifo", "wb"):
            pass
        wait_gone(pid)
