"""Helpers for tests that mount noatimefs for real: mounts, unprivileged callers, manifests.

Everything here is independent of the package under test (it parses mountinfo
itself, runs the daemon only through its command line) so a bug in the core
cannot hide a failure.

- :func:`mounted` runs ``python -m noatimefs`` as a subprocess, waits for the
  mount in ``/proc/self/mountinfo`` (woken by ``poll(POLLPRI)`` on it, with a
  deadline) while watching the daemon, and always unmounts and stops the daemon.
- :func:`run_as` runs a real process as another user (``setpriv``), optionally
  as root of its own user namespace (``unshare -r``/``-rm``), with Debian's
  ``/usr/bin/python3`` and :data:`PROBE_LIB` prepended; it returns the JSON the
  code printed with ``emit(...)``.
- :func:`fuse_available` skips (or fails, with ``CI=true``) when FUSE is missing.
- :func:`manifest` summarises a tree so "SOURCE unchanged" can be asserted.
- :func:`world_tmpdir` makes a temp dir every user can traverse (pytest's
  ``tmp_path`` lives under a 0700 directory) and refuses to delete it while
  something is mounted below it.
- :func:`dev_fuse_open_to_users` opens ``/dev/fuse`` to every user (0666) for
  a block, for unprivileged FUSE daemons, and restores its mode.
- :func:`scratch_fs` mounts a small fresh ext4, xfs, btrfs (image on a loop
  device) or tmpfs, and unmounts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

__all__ = [
    "DAEMON_DEADLINE",
    "CONF_DIR",
    "INSTALLED_LINK",
    "INSTALLED_UNIT",
    "INSTALL_PREFIX",
    "REPO",
    "dev",
    "install_lock",
    "installed_command",
    "leftovers_of_install",
    "system_installed",
    "unchanged_store",
    "NOBODY",
    "PROBE_LIB",
    "STATUS_XATTR",
    "SYSTEM_PYTHON",
    "REGISTRY",
    "DaemonDied",
    "Installed",
    "Mount",
    "MountEntry",
    "Userns",
    "current_seq",
    "daemon_argv",
    "dev_fuse_open_to_users",
    "errno_of",
    "fuse_available",
    "manifest",
    "manifest_diff",
    "mount_entries",
    "mount_entry",
    "mounted",
    "mounts_below",
    "pids_mentioning",
    "run_as",
    "run_as_argv",
    "scratch_fs",
    "umount",
    "wait_for_mount",
    "world_tmpdir",
]

#: Debian's interpreter: executable by every user (the pyenv one under /root is not).
SYSTEM_PYTHON = "/usr/bin/python3"
#: The presented owner most tests use, and QEMU's usual user.
NOBODY = (65534, 65534)
STATUS_XATTR = "user.noatimefs.status"
#: How long a daemon may take to mount, or to exit after an unmount.
DAEMON_DEADLINE = 20.0
_MOUNTINFO = "/proc/self/mountinfo"
_LOG_KEEP = 1 << 20  # characters of a finished daemon's log kept in memory
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --------------------------------------------------------------------------- mountinfo


@dataclasses.dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    mount_options: frozenset[str]
    super_options: frozenset[str]

    @property
    def options(self) -> frozenset[str]:
        return self.mount_options | self.super_options


def _unescape(field: str) -> str:
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1 : i + 4].isdigit() and len(raw[i + 1 : i + 4]) == 3:
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mount_entries() -> list[MountEntry]:
    """All mounts of this process's mount namespace, in mount order."""
    with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        sep = fields.index("-", 6)
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                mountpoint=_unescape(fields[4]),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                mount_options=frozenset(fields[5].split(",")),
                super_options=frozenset(fields[sep + 3].split(",")),
            )
        )
    return entries


def _resolve(path: str | os.PathLike[str]) -> str:
    """The path as mountinfo spells it: symlinks resolved in the parent only.

    The last component is not touched (``realpath`` would stat it, and a
    mountpoint with a wedged daemon behind it may never answer).
    """
    p = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def _mount_ids(path: str | os.PathLike[str]) -> frozenset[int]:
    target = _resolve(path)
    return frozenset(e.mount_id for e in mount_entries() if e.mountpoint == target)


def mount_entry(path: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount on *path* (its parent's symlinks resolved; the path itself not)."""
    target = _resolve(path)
    found = None
    for entry in mount_entries():
        if entry.mountpoint == target:
            found = entry
    return found


def mounts_below(path: str | os.PathLike[str]) -> list[MountEntry]:
    """Mounts on *path* or anywhere below it."""
    top = _resolve(path)
    return [e for e in mount_entries() if e.mountpoint == top or e.mountpoint.startswith(top + "/")]


class _MountTableWatch:
    """Wakes up when the mount table changes (proc(5): ``POLLPRI`` on mountinfo)."""

    def __init__(self) -> None:
        self._fd = os.open(_MOUNTINFO, os.O_RDONLY)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLPRI | select.POLLERR)

    def wait(self, timeout: float) -> None:
        self._poll.poll(max(0, int(timeout * 1000)))

    def close(self) -> None:
        os.close(self._fd)


def umount(path: str | os.PathLike[str], *, fuse: bool = True) -> list[str]:
    """Unmount whatever is on *path*: ``fusermount3 -u`` (if *fuse*), then ``umount -l``.

    Returns the problems met on the way (empty when the first attempt worked).
    """
    problems: list[str] = []
    p = _resolve(path)
    cmds = [["fusermount3", "-u", p]] if fuse else []
    cmds += [["umount", p], ["umount", "-l", p]]
    for cmd in cmds:
        if mount_entry(p) is None:
            break
        r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
        if r.returncode != 0:
            problems.append(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    if mount_entry(p) is not None:
        problems.append(f"{p} is still mounted")
    return problems


# --------------------------------------------------------------------------- temp dirs


@contextlib.contextmanager
def world_tmpdir(prefix: str = "noatimefs-test-") -> Iterator[Path]:
    """A fresh 0755 root-owned directory under /tmp that every user can traverse.

    On exit: anything still mounted below it is unmounted lazily and reported as
    an error (a test that leaks a mount fails), then the tree is removed.
    """
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        leaked = mounts_below(d)
        for entry in reversed(leaked):
            subprocess.run(["umount", "-l", entry.mountpoint], capture_output=True, check=False)
        stuck = mounts_below(d)
        if stuck:  # never rmtree through a mount (it could be a bind of anything)
            names = ", ".join(f"{e.mountpoint} ({e.fstype})" for e in stuck)
            raise AssertionError(f"cannot unmount below {d}, left in place: {names}")
        shutil.rmtree(d)
        if leaked:
            names = ", ".join(f"{e.mountpoint} ({e.fstype})" for e in leaked)
            raise AssertionError(f"mounts left behind below {d}: {names}")


#: Image sizes: the smallest each mkfs accepts, with room to spare (images are sparse).
_SCRATCH_SIZES = {"ext4": 32 << 20, "xfs": 320 << 20, "btrfs": 128 << 20}


@contextlib.contextmanager
def scratch_fs(where: Path, fstype: str) -> Iterator[Path]:
    """A fresh *fstype* (ext4, xfs, btrfs: an image on a loop device; or tmpfs) on *where*/fs.

    The mounted root is 0755. Skips when it cannot be made or mounted here; with
    ``CI=true`` that is a failure for ext4 and tmpfs (xfs and btrfs need kernel
    support a CI machine may lack; ``./dev`` installs their mkfs).
    """

    def cannot(why: str) -> None:
        msg = f"cannot mount a scratch {fstype}: {why}"
        if os.environ.get("CI") == "true" and fstype in ("ext4", "tmpfs"):
            pytest.fail(msg + " (CI=true: this is a failure, not a skip)", pytrace=False)
        pytest.skip(msg)

    target = where / "fs"
    target.mkdir()
    if fstype == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "noatimefs-test", str(target)]
    else:
        mkfs = shutil.which(f"mkfs.{fstype}")
        if mkfs is None:
            cannot(f"mkfs.{fstype} not installed")
        img = where / f"{fstype}.img"
        with open(img, "wb") as f:
            f.truncate(_SCRATCH_SIZES[fstype])
        r = subprocess.run(
            [str(mkfs), *(["-q", "-F"] if fstype == "ext4" else ["-q", "-f"]), str(img)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            cannot(f"mkfs.{fstype}: {r.stderr.strip()}")
        cmd = ["mount", "-t", fstype, "-o", "loop", str(img), str(target)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        cannot(r.stderr.strip())
    try:
        target.chmod(0o755)
        yield target
    finally:
        problems = umount(target, fuse=False)  # mount -o loop detaches the loop device
        assert not problems, problems


# --------------------------------------------------------------------------- FUSE available


def fuse_available() -> None:
    """Skip the calling test (or fixture) when real FUSE mounts cannot be made here.

    Needs root, ``/dev/fuse`` (a character device) and ``fusermount3`` on PATH.
    With ``CI=true`` in the environment a missing piece fails instead of skipping.
    """
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    try:
        st = os.stat("/dev/fuse")
        if not stat.S_ISCHR(st.st_mode):
            missing.append("/dev/fuse as a character device")
    except OSError as e:
        missing.append(f"/dev/fuse ({e.strerror})")
    if shutil.which("fusermount3") is None:
        missing.append("fusermount3 on PATH")
    for tool in ("setpriv", "unshare", "mount", "umount"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} on PATH")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        missing.append(SYSTEM_PYTHON)
    if missing:
        msg = "real FUSE mounts need " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI=true: this is a failure, not a skip)", pytrace=False)
        pytest.skip(msg)


# --------------------------------------------------------------------------- processes


def pids_mentioning(token: str) -> list[int]:
    """Pids (other than ours) whose command line contains *token*."""
    found = []
    me = os.getpid()
    needle = token.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(name))
    return found


def daemon_argv(
    source: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *args: str,
    owner: str | int | None = None,
    allow_other: bool = False,
) -> list[str]:
    """The command line ``mounted()`` runs (useful for tests of bad input)."""
    argv = [sys.executable, "-m", "noatimefs"]
    if owner is not None:
        argv += ["--owner", str(owner)]
    if allow_other:
        argv.append("--allow-other")
    return [*argv, *args, os.fspath(source), os.fspath(mountpoint)]


class DaemonDied(AssertionError):
    """The daemon exited before its mount appeared."""


@dataclasses.dataclass
class Mount:
    """A running noatimefs daemon and its mount (what :func:`mounted` yields)."""

    path: Path
    source: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]
    entry: MountEntry | None = None
    #: Mount ids on the mountpoint before the daemon started (not its own).
    preexisting: frozenset[int] = frozenset()
    seq: int = 0
    finished_seq: int | None = None
    _final_log: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        """Everything the daemon wrote to stdout/stderr so far."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<no log: {e}>"

    def status(self) -> dict[str, Any]:
        """The live counters: the JSON in the root's ``user.noatimefs.status`` xattr."""
        raw = os.getxattr(self.path, STATUS_XATTR)
        result = json.loads(raw)
        assert isinstance(result, dict), result
        return result

    def describe(self) -> str:
        return (
            f"daemon pid {self.pid} ({' '.join(self.argv)}), "
            f"exit {self.proc.returncode}, log:\n{self.log_text()}"
        )


_seq = itertools.count(1)
#: Every Mount made in this process; conftest attaches their logs to failed tests.
REGISTRY: list[Mount] = []


def current_seq() -> int:
    """A counter that orders mount starts/ends and test starts."""
    return next(_seq)


def wait_for_mount(
    path: str | os.PathLike[str],
    proc: subprocess.Popen[bytes] | None = None,
    deadline: float = DAEMON_DEADLINE,
    describe: Any = None,
    ignore: frozenset[int] = frozenset(),
    replaces_dead: bool = False,
) -> MountEntry:
    """Wait until *path* is a mountpoint of a FUSE filesystem; fail if *proc* dies first.

    Mounts whose id is in *ignore* (those there before the daemon started) do not
    count, except with *replaces_dead* (they were dead FUSE mounts the daemon is
    expected to replace; mount ids are reused, so the replacement may have the
    same id): then a mount on *path* that answers ``statvfs`` counts.
    """
    end = time.monotonic() + deadline
    watch = _MountTableWatch()  # opened before the first look, so no change is missed
    try:
        while True:
            entry = mount_entry(path)
            if entry is not None and entry.fstype.startswith("fuse"):
                if entry.mount_id not in ignore:
                    return entry
                if replaces_dead and errno_of(lambda: os.statvfs(path)) == 0:
                    return entry
            if proc is not None and proc.poll() is not None:
                raise DaemonDied(
                    f"daemon exited with {proc.returncode} before mounting {path}"
                    + (f"\n{describe()}" if describe else "")
                )
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{path} not mounted after {deadline} s"
                    + (f"\n{describe()}" if describe else "")
                )
            # Woken by a mount-table change; the short cap re-checks the daemon's health.
            watch.wait(min(left, 0.2))
    finally:
        watch.close()


@contextlib.contextmanager
def mounted(
    source: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str] | None = None,
    *args: str,
    owner: str | int | None = None,
    allow_other: bool = False,
    env: Mapping[str, str] | None = None,
    wrapper: Sequence[str] = (),
    expect_clean_exit: bool = True,
) -> Iterator[Mount]:
    """Mount *source* with ``python -m noatimefs`` for the duration of the block.

    *mountpoint* defaults to a fresh empty directory (removed afterwards). *args*
    are extra command-line arguments (``"--debug"``, ``"-o", "..."``). *wrapper*
    is a command prefix (``["setpriv", ...]``) that must ``exec`` the daemon so the
    pid stays the daemon's. The daemon's output goes to a log file whose text is
    attached to failures. Teardown, always: ``fusermount3 -u``, wait for the
    daemon (deadline), then ``umount -l`` and SIGKILL of the daemon's pid as last
    resorts; it then asserts that nothing is left mounted and, if the daemon was
    still running when the block ended and *expect_clean_exit*, that it exited 0.
    """
    fuse_available()
    with world_tmpdir("noatimefs-mount-") as work:
        mnt = Path(mountpoint) if mountpoint is not None else work / "mnt"
        if mountpoint is None:
            mnt.mkdir()
            mnt.chmod(0o755)
        log_path = work / "daemon.log"
        argv = [
            *wrapper,
            *daemon_argv(source, mnt, *args, owner=owner, allow_other=allow_other),
        ]
        already = _mount_ids(mnt)
        # A dead FUSE mount there is one the daemon may clear and replace (crash recovery).
        replaces_dead = bool(already) and errno_of(lambda: os.statvfs(mnt)) == errno.ENOTCONN
        run_env = dict(os.environ if env is None else env)
        run_env.setdefault("PYTHONFAULTHANDLER", "1")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=run_env,
                cwd="/",
            )
        m = Mount(
            path=mnt,
            source=Path(source),
            proc=proc,
            log_path=log_path,
            argv=argv,
            preexisting=already,
        )
        m.seq = current_seq()
        REGISTRY.append(m)
        try:
            m.entry = wait_for_mount(
                mnt, proc, describe=m.describe, ignore=already, replaces_dead=replaces_dead
            )
            yield m
        except BaseException as exc:
            for problem in _stop(m, expect_clean_exit):
                exc.add_note(problem)
            raise
        else:
            problems = _stop(m, expect_clean_exit)
            if problems:
                raise AssertionError("\n".join(problems))


def _stop(m: Mount, expect_clean_exit: bool) -> list[str]:
    """Unmount and stop the daemon of *m*; return what went wrong (nothing, ideally).

    Only the daemon's own mounts are touched (not one that was there before it).
    """
    problems: list[str] = []
    was_running = m.proc.poll() is None

    def own_mounted() -> bool:
        top = mount_entry(m.path)
        if top is None:
            return False
        if m.entry is not None:  # ids are reused: the one we waited for, if still on top
            return top.mount_id == m.entry.mount_id
        return top.mount_id not in m.preexisting

    try:
        if own_mounted():
            r = subprocess.run(
                ["fusermount3", "-u", os.fspath(m.path)],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            if r.returncode != 0:
                problems.append(f"fusermount3 -u {m.path}: exit {r.returncode}: {r.stderr.strip()}")
        try:
            m.proc.wait(timeout=DAEMON_DEADLINE)
        except subprocess.TimeoutExpired:
            problems.append(f"daemon pid {m.pid} still running {DAEMON_DEADLINE} s after unmount")
        if own_mounted():
            problems.append(f"{m.path} still mounted after fusermount3 -u; using umount -l")
            subprocess.run(["umount", "-l", os.fspath(m.path)], capture_output=True, check=False)
            if own_mounted():
                problems.append(f"{m.path} is still mounted")
        if m.proc.poll() is None:
            problems.append(f"killing daemon pid {m.pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, signal.SIGKILL)
            m.proc.wait(timeout=DAEMON_DEADLINE)
        if was_running and expect_clean_exit and m.proc.returncode != 0:
            problems.append(f"daemon exited with {m.proc.returncode}, expected 0 after unmount")
    finally:
        text = m.log_text()  # kept for failure reports after the log file is gone
        m._final_log = text if len(text) <= _LOG_KEEP else "…\n" + text[-_LOG_KEEP:]
        m.finished_seq = current_seq()
    if problems:
        problems.append(m.describe())
    return problems


# --------------------------------------------------------------------------- unprivileged callers

#: Prepended to every ``run_as`` code string (stdlib only, runs on /usr/bin/python3).
PROBE_LIB = r"""
import errno, hashlib, json, os, subprocess, sys
DATA = json.loads(sys.stdin.read() or "null")
# The JSON result goes to the original stdout; anything else (children) to stderr.
_RESULT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

def emit(obj):
    _RESULT.write(json.dumps(obj))
    _RESULT.flush()

def errno_of(fn, *args):
    # 0 when fn(*args) works, else the errno (names in errno.errorcode).
    try:
        fn(*args)
        return 0
    except OSError as e:
        return e.errno if e.errno else -1

def read_file(p, flags=0):
    fd = os.open(p, os.O_RDONLY | flags)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)

def sha256_file(p, flags=0):
    h = hashlib.sha256()
    fd = os.open(p, os.O_RDONLY | flags)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)
    finally:
        os.close(fd)

def run_file(p):
    # exec p (no shell); failure of exec raises OSError, a non-zero exit ENOEXEC.
    pid = os.posix_spawn(p, [p], {"PATH": "/usr/bin:/bin"})
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise OSError(errno.ENOEXEC, "exit status %d" % code)

def list_dir(p, flags=0):
    if flags:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | flags)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)
    return sorted(os.listdir(p))

def mount_overlay(lower, upper, work, merged, options=""):
    # options: more mount options, e.g. "userxattr," (what rootless tools pass)
    opts = options + "lowerdir=%s,upperdir=%s,workdir=%s" % (lower, upper, work)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, merged],
                   check=True, capture_output=True, text=True)
"""

Userns = Literal["user", "mount"] | None


def _as_user_prefix(
    uid: int,
    gid: int,
    userns: Userns,
    groups: Sequence[int] | None,
    init_groups: bool = False,
) -> list[str]:
    prefix: list[str] = []
    if (uid, gid) != (0, 0) or groups is not None or init_groups:
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
        if init_groups:
            prefix.append("--init-groups")  # the user's groups from /etc/group
        elif groups:
            prefix.append("--groups=" + ",".join(str(g) for g in groups))
        else:
            prefix.append("--clear-groups")
    if userns == "user":
        prefix += ["unshare", "--map-root-user", "--"]
    elif userns == "mount":
        prefix += ["unshare", "--map-root-user", "--mount", "--propagation=private", "--"]
    return prefix


def run_as_argv(
    uid: int,
    gid: int,
    argv: Sequence[str],
    *,
    userns: Userns = None,
    groups: Sequence[int] | None = None,
    init_groups: bool = False,
    input_text: str = "",
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    cwd: str = "/",
) -> subprocess.CompletedProcess[str]:
    """Run *argv* as uid/gid (``setpriv``), in a user namespace if *userns*.

    *userns* ``"user"`` is ``unshare -r`` (the user becomes root of a new user
    namespace), ``"mount"`` is ``unshare -rm`` (plus a private mount namespace,
    for overlay mounts). Supplementary groups are cleared unless *groups* is
    given or *init_groups* (``setpriv --init-groups``: the groups /etc/group gives
    the user; needs a passwd entry). Returns the completed process (no check).
    """
    run_env = {"PATH": _SAFE_PATH, "HOME": "/", "LANG": "C.UTF-8"}
    if env:
        run_env.update(env)
    return subprocess.run(
        [*_as_user_prefix(uid, gid, userns, groups, init_groups), *argv],
        input=input_text,
        capture_output=True,
        text=True,
        env=run_env,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def run_as(
    uid: int,
    gid: int,
    code: str,
    data: object = None,
    *,
    userns: Userns = None,
    groups: Sequence[int] | None = None,
    init_groups: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> Any:
    """Run Python *code* (stdlib only) as uid/gid and return what it ``emit()``-ed.

    The code runs on ``/usr/bin/python3 -c`` after :data:`PROBE_LIB` (so it has
    ``DATA`` = *data* (sent as JSON on stdin), ``emit``, ``errno_of``,
    ``read_file``, ``run_file``, ``list_dir``, ``mount_overlay``...). A non-zero
    exit raises ``AssertionError`` with the process's stderr.
    """
    r = run_as_argv(
        uid,
        gid,
        [SYSTEM_PYTHON, "-c", PROBE_LIB + "\n" + code],
        userns=userns,
        groups=groups,
        init_groups=init_groups,
        input_text=json.dumps(data),
        env=env,
        timeout=timeout,
    )
    who = f"uid {uid} gid {gid}" + (f" in userns ({userns})" if userns else "")
    if r.returncode != 0:
        raise AssertionError(f"probe as {who} exited {r.returncode}:\n{r.stderr}")
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(
            f"probe as {who} printed no JSON ({e}):\n{r.stdout!r}\n{r.stderr}"
        ) from None


def errno_of(fn: Callable[[], object]) -> int:
    """0 when ``fn()`` works, else the errno of the ``OSError`` it raised."""
    try:
        fn()
    except OSError as e:
        return e.errno if e.errno else -1
    return 0


# --------------------------------------------------------------------------- manifests


def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in sorted(names)}


def _describe(path: str) -> dict[str, Any]:
    st = os.lstat(path)
    d: dict[str, Any] = {
        "mode": oct(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "nlink": st.st_nlink,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "xattrs": _xattrs(path),
    }
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        d["sha256"] = h.hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        d["target"] = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        d["entries"] = sorted(os.listdir(path))
    return d


def manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Relative path -> mode, owner, size, nlink, mtime, ctime, xattrs, sha256/target/entries.

    Does not follow symlinks or descend into other filesystems. Atimes are left
    out on purpose (reads change them).
    """
    top = os.fspath(path)
    top_dev = os.lstat(top).st_dev
    out = {".": _describe(top)}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, top)] = _describe(p)
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(root, d)).st_dev == top_dev]
    return out


def manifest_diff(before: Mapping[str, Any], after: Mapping[str, Any], limit: int = 20) -> str:
    """A short human-readable difference of two manifests ('' when equal)."""
    lines = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            lines.append(f"{key}: {before.get(key)} -> {after.get(key)}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return "\n".join(lines)


_DEV_FUSE_LOCK = Path("/run/lock/noatimefs-test-dev-fuse.lock")
_dev_fuse_depth: list[int] = []  # the modes to restore, while /dev/fuse is held open


@contextlib.contextmanager
def dev_fuse_open_to_users() -> Iterator[None]:
    """``/dev/fuse`` mode 0666 (Debian's default) for the caller's duration, then as it was.

    Here it is 0600 (DESIGN.md, fact 9), so unprivileged FUSE daemons (a rootless
    noatimefs, fuse-overlayfs) cannot open it. The mode found is restored in a
    ``finally``, whatever happens; a lock serialises the tests that change it
    (across processes; nested uses in one process are no-ops).
    """
    import fcntl

    if os.geteuid() != 0:
        pytest.skip("changing the mode of /dev/fuse needs root")
    if _dev_fuse_depth:  # nested: the outer one holds the lock and restores the mode
        yield
        return
    with open(_DEV_FUSE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        _dev_fuse_depth.append(before)
        try:
            os.chmod("/dev/fuse", 0o666)
            yield
        finally:
            os.chmod("/dev/fuse", before)
            _dev_fuse_depth.pop()


#: Where systemd units and mount.fuse3 find the command (they do not see the venv).
INSTALLED_LINK = Path("/usr/local/bin/noatimefs")
_INSTALL_LOCK = Path("/run/lock/noatimefs-test-install.lock")
#: The clone this test suite belongs to (``./dev`` is there).
REPO = Path(__file__).resolve().parent.parent
#: What ``./dev install`` makes besides INSTALLED_LINK (its defaults).
INSTALL_PREFIX = Path("/opt/noatimefs")
INSTALLED_UNIT = Path("/etc/systemd/system/noatimefs@.service")
CONF_DIR = Path("/etc/noatimefs")


@contextlib.contextmanager
def install_lock() -> Iterator[None]:
    """Held while a test changes the system-wide install (another session may test too)."""
    import fcntl

    if os.geteuid() != 0:
        pytest.skip("installing noatimefs system-wide needs root")
    with open(_INSTALL_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def installed_command() -> Iterator[Path]:
    """``/usr/local/bin/noatimefs`` -> this venv's ``noatimefs``, for the caller's duration.

    An existing link to the same target is used as it is; anything else there is
    never touched (the test fails instead).
    """
    target = Path(sys.executable).parent / "noatimefs"
    assert target.is_file(), target
    with install_lock():
        created = False
        if INSTALLED_LINK.is_symlink() or INSTALLED_LINK.exists():
            if os.path.realpath(INSTALLED_LINK) != os.path.realpath(target):
                pytest.fail(f"{INSTALLED_LINK} exists and is not {target}: not touching it")
        else:
            INSTALLED_LINK.symlink_to(target)
            created = True
        try:
            yield INSTALLED_LINK
        finally:
            if created:
                INSTALLED_LINK.unlink()


def dev(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``REPO/dev ARGS`` (output captured, no check)."""
    return subprocess.run(
        [str(REPO / "dev"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        timeout=timeout,
        check=False,
    )


def leftovers_of_install() -> list[str]:
    """What of ``./dev install``'s default places exists now."""
    places = [INSTALLED_LINK, INSTALL_PREFIX, INSTALLED_UNIT, CONF_DIR / "noatimefs.conf.example"]
    return [str(p) for p in places if p.is_symlink() or p.exists()]


@dataclasses.dataclass(frozen=True)
class Installed:
    """What :func:`system_installed` did: ``./dev install``'s output and how long it took."""

    output: str
    seconds: float


@contextlib.contextmanager
def system_installed() -> Iterator[Installed]:
    """``./dev install`` for the block (under :func:`install_lock`), ``./dev uninstall`` after.

    Fails, touching nothing, when something is already installed there.
    """
    with install_lock():
        there = leftovers_of_install()
        if there:
            pytest.fail(
                f"noatimefs is already installed here ({', '.join(there)}): not touching it"
            )
        start = time.monotonic()
        r = dev("install")
        seconds = time.monotonic() - start
        try:
            assert r.returncode == 0, f"./dev install: exit {r.returncode}\n{r.stdout}{r.stderr}"
            yield Installed(r.stdout + r.stderr, seconds)
        finally:
            u = dev("uninstall")
            assert u.returncode == 0, f"./dev uninstall: exit {u.returncode}\n{u.stdout}{u.stderr}"


@contextlib.contextmanager
def unchanged_store(prefix: str, build: Callable[[Path], None]) -> Iterator[Path]:
    """A SOURCE built by *build* in a temp dir every user can reach; unchanged at the end."""
    with world_tmpdir(prefix) as base:
        root = base / "store"
        root.mkdir(mode=0o755)
        build(root)
        before = manifest(root)
        yield root
        after = manifest(root)
        assert after == before, "SOURCE changed:\n" + manifest_diff(before, after)


def trust_figures(test: str, row: Mapping[str, Any]) -> None:
    """Append ``{"test": test, **row}`` as a JSON line to ``$NOATIMEFS_TRUST_FIGURES``, if set."""
    path = os.environ.get("NOATIMEFS_TRUST_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **row}) + "\n")
