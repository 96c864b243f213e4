"""Life cycle: what is mounted, with which options and owner; every way to stop ends in exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount


@pytest.fixture
def small_source(world_tmp: Path) -> Path:
    src = world_tmp / "src"
    src.mkdir()
    (src / "file").write_bytes(b"small\n")
    (src / "file").chmod(0o444)
    return src


def test_mountinfo_entry(small_source: Path) -> None:
    with util.mounted(small_source) as m:
        entry = m.entry
        assert entry is not None
        assert entry.fstype == "fuse.noatimefs"
        assert entry.source == str(small_source)
        assert "ro" in entry.mount_options
        assert "default_permissions" in entry.super_options
        assert "allow_other" not in entry.super_options


def test_relative_source_is_shown_absolute(small_source: Path) -> None:
    rel = os.path.relpath(small_source, "/")  # mounted() runs the daemon in /
    with util.mounted(rel) as m:
        assert m.entry is not None
        assert m.entry.source == str(small_source)
        assert (m.path / "file").read_bytes() == b"small\n"


def test_paths_with_spaces_and_odd_bytes(world_tmp: Path) -> None:
    src = world_tmp / "my store\tdir\\x"
    src.mkdir()
    (src / "a file").write_bytes(b"spaced\n")
    mnt = world_tmp / "mount point"
    mnt.mkdir()
    with util.mounted(src, mnt) as m:
        assert m.entry is not None
        assert m.entry.source == str(src)
        assert m.entry.mountpoint == str(mnt)
        assert (mnt / "a file").read_bytes() == b"spaced\n"


def test_owner_defaults_to_the_daemon_user(small_source: Path) -> None:
    with util.mounted(small_source) as m:
        assert os.lstat(m.path / "file").st_uid == os.geteuid()


@pytest.mark.parametrize("owner", ["nobody", "65534"])
def test_owner_by_name_or_uid(small_source: Path, owner: str) -> None:
    with util.mounted(small_source, owner=owner, allow_other=True) as m:
        assert os.lstat(m.path / "file").st_uid == 65534
        assert os.lstat(m.path / "file").st_gid == 65534  # public: the owner's primary gid
        assert "allow_other" in util.mount_entry(m.path).super_options  # type: ignore[union-attr]
        r = util.run_as(*util.NOBODY, "emit(read_file(DATA).decode())", str(m.path / "file"))
        assert r == "small\n"


def test_without_allow_other_other_users_are_refused(small_source: Path) -> None:
    with util.mounted(small_source, owner="nobody") as m:
        r = util.run_as(*util.NOBODY, "emit(errno_of(os.stat, DATA))", str(m.path / "file"))
        assert r != 0  # EACCES: the kernel keeps other users out of a FUSE mount


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_and_exits_0(small_source: Path, sig: signal.Signals) -> None:
    with util.mounted(small_source) as m:
        m.proc.send_signal(sig)
        assert m.proc.wait(timeout=util.DAEMON_DEADLINE) == 0, m.log_text()
        assert util.mount_entry(m.path) is None, m.log_text()


# What a shell does to a command it starts in the background (``noatimefs SRC MNT &``
# in a script): SIGINT ignored. A signal ignored is discarded even while blocked.
_IGNORING_SIGINT = [
    util.SYSTEM_PYTHON,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def test_sigint_right_after_the_mount_stops_a_daemon_started_with_sigint_ignored(
    small_source: Path,
) -> None:
    with util.mounted(small_source, wrapper=_IGNORING_SIGINT) as m:
        m.proc.send_signal(signal.SIGINT)  # before the daemon's own handlers, most likely
        assert m.proc.wait(timeout=util.DAEMON_DEADLINE) == 0, m.log_text()
        assert util.mount_entry(m.path) is None, m.log_text()


def test_umount_stops_the_daemon_with_exit_0(small_source: Path) -> None:
    with util.mounted(small_source) as m:
        subprocess.run(["umount", m.path], check=True)
        assert m.proc.wait(timeout=util.DAEMON_DEADLINE) == 0, m.log_text()
        assert util.mount_entry(m.path) is None


def test_fusermount_stops_the_daemon_with_exit_0(small_source: Path) -> None:
    with util.mounted(small_source) as m:
        subprocess.run(["fusermount3", "-u", m.path], check=True)
        assert m.proc.wait(timeout=util.DAEMON_DEADLINE) == 0, m.log_text()
        assert util.mount_entry(m.path) is None


def test_busy_mount_survives_a_failed_unmount(small_source: Path) -> None:
    """``fusermount3 -u`` on a busy mount fails (EBUSY) and the daemon keeps serving."""
    with util.mounted(small_source) as m:
        fd = os.open(m.path / "file", os.O_RDONLY)
        try:
            r = subprocess.run(["fusermount3", "-u", m.path], capture_output=True, check=False)
            assert r.returncode != 0
            assert m.proc.poll() is None
            assert os.pread(fd, 100, 0) == b"small\n"
        finally:
            os.close(fd)


def test_exit_leaves_no_process(small_source: Path) -> None:
    with util.mounted(small_source) as m:
        token = str(m.path)
        assert util.pids_mentioning(token) == [m.pid]
    assert util.pids_mentioning(token) == []
