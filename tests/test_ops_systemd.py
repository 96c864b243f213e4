"""systemd: the template unit verifies, and its ExecStart line speaks sd_notify correctly.

The ExecStart line is taken from ``systemd/noatimefs@.service``, expanded the way
systemd would (``%f``, ``$OPTIONS``, ``${SOURCE}`` from an environment file) and
run under a real ``NOTIFY_SOCKET`` the test binds: ``READY=1`` must arrive only
once the mount is in /proc/self/mountinfo, and SIGTERM must give ``STOPPING=1``
and then a clean unmount and exit 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import units
import util
from units import NotifySocket, escape_path, expand, read_env_file, service_section, systemd_tool

from noatimefs import notify

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
TEMPLATE = SYSTEMD_DIR / "noatimefs@.service"
EXAMPLE_CONF = SYSTEMD_DIR / "noatimefs.conf.example"
LINK = util.INSTALLED_LINK
#: Options that give a unit its own mount namespace: the mount would be invisible outside.
FORBIDDEN = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "MountFlags",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "RootDirectory",
)


@pytest.fixture
def installed() -> Iterator[Path]:
    """``/usr/local/bin/noatimefs`` -> this venv's ``noatimefs``, for the test's duration."""
    with util.installed_command() as link:
        yield link


# --------------------------------------------------------------------------- the unit file


def test_unit_is_type_notify_restarts_on_failure_and_clears_stale_mounts() -> None:
    service = service_section(TEMPLATE)
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "/etc/noatimefs/%i.conf"
    # First a dead mount is cleared, then a missing mountpoint (/run/...) is made.
    clear, make = (shlex.split(line) for line in units.exec_lines(TEMPLATE, "ExecStartPre"))
    (after,) = (shlex.split(line) for line in units.exec_lines(TEMPLATE, "ExecStopPost"))
    for argv in (clear, after):
        assert argv[0].startswith("-"), f"a failure to unmount must be ignored: {argv}"
        assert argv[0].lstrip("-").endswith("/fusermount3"), argv
        assert "-u" in argv
        assert argv[-1] == "%f", argv
    assert make == ["-/bin/mkdir", "-p", "%f"], make
    for key in FORBIDDEN:
        assert key not in service, f"{key}= cuts the unit off from mount propagation"
    env = read_env_file(EXAMPLE_CONF)
    assert set(env) == {"SOURCE", "OPTIONS"}, env


def test_unit_files_pass_systemd_analyze_verify(installed: Path, world_tmp: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    units = sorted(SYSTEMD_DIR.glob("*.service")) + sorted(SYSTEMD_DIR.glob("*.mount"))
    assert TEMPLATE in units
    for unit in units:
        copies = [world_tmp / unit.name]
        if unit.name.endswith("@.service"):
            instance = escape_path(Path("/mnt/store"))
            copies.append(world_tmp / unit.name.replace("@.", f"@{instance}."))
        for copy in copies:
            shutil.copyfile(unit, copy)
            r = subprocess.run(
                [analyze, "verify", str(copy)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            ours = [line for line in (r.stdout + r.stderr).splitlines() if copy.name in line]
            assert r.returncode == 0, r.stdout + r.stderr
            assert ours == [], "\n".join(ours)


# --------------------------------------------------------------------------- ExecStart + sd_notify


@pytest.mark.mount
def test_execstart_line_sends_ready_after_mounting_and_stopping_before_unmounting(
    installed: Path, store: Path, world_tmp: Path
) -> None:
    util.fuse_available()
    mnt = world_tmp / "srv store"  # a space: ${SOURCE}/%f must stay one word
    mnt.mkdir(mode=0o755)
    instance = escape_path(mnt)
    conf = world_tmp / f"{instance}.conf"
    conf.write_text(f"SOURCE={store}\nOPTIONS=--owner {util.NOBODY[0]} --allow-other\n")
    specifiers = {"f": str(mnt), "i": instance, "I": str(mnt).lstrip("/"), "%": "%"}
    argv = expand(service_section(TEMPLATE)["ExecStart"], read_env_file(conf), specifiers)
    assert argv[0] == str(LINK), argv
    assert argv[-2:] == [str(store), str(mnt)], argv

    notify_sock = NotifySocket(world_tmp / "notify")
    log_path = world_tmp / "daemon.log"
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_sock.path))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/"
        )

    def describe() -> str:
        return f"{argv}\nexit {proc.returncode}, log:\n{log_path.read_text(errors='replace')}"

    try:
        first = notify_sock.receive(proc, describe())
        # READY=1 is the first word, and by then the mount exists.
        entry = util.mount_entry(mnt)
        assert "READY=1" in first, first
        assert entry is not None, "READY=1 before the mount was in mountinfo"
        assert entry.fstype == "fuse.noatimefs"
        assert entry.source == str(store)
        assert "allow_other" in entry.options
        assert any(line.startswith("STATUS=") for line in first), first
        assert (mnt / "data" / "a.txt").read_bytes() == (store / "data" / "a.txt").read_bytes()

        proc.send_signal(signal.SIGTERM)
        second = notify_sock.receive(proc, describe())
        assert second == ["STOPPING=1"], second
        assert proc.wait(timeout=util.DAEMON_DEADLINE) == 0, describe()
        assert util.mount_entry(mnt) is None, "still mounted after a clean stop"
        lines = log_path.read_text().splitlines()
        assert lines, describe()
        bad = [line for line in lines if not re.match(r"<[0-7]>", line)]
        assert bad == [], f"log lines without a journald priority: {bad}"
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        problems = util.umount(mnt)
        notify_sock.close()
    assert problems == [], problems


# --------------------------------------------------------------------------- journald priorities


def test_errors_carry_journald_priority_with_systemd_flag(world_tmp: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "noatimefs", "--systemd", str(world_tmp / "no"), str(world_tmp)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 3, r
    assert r.stderr.startswith("<3>noatimefs: error: SOURCE"), r.stderr


def test_journal_stream_turns_priorities_on_without_the_flag(world_tmp: Path) -> None:
    err_path = world_tmp / "stderr"
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        r = subprocess.run(
            [sys.executable, "-m", "noatimefs", "--owner", "no-such-user", "/", str(world_tmp)],
            stderr=err,
            env=dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"),
            timeout=60,
            check=False,
        )
    assert r.returncode in (4, 5), err_path.read_text()
    assert err_path.read_text().startswith("<3>noatimefs: error:"), err_path.read_text()


# --------------------------------------------------------------------------- notify, in process


def test_notify_without_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"noatimefs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready("serving") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_to_a_missing_socket_does_not_raise(
    monkeypatch: pytest.MonkeyPatch, world_tmp: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(world_tmp / "gone"))
    assert notify.notify("READY=1") is False
