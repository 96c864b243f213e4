"""Bad input: the documented exit code, one line ``noatimefs: error: …``, no mount, no daemon.

Exit codes (README.rst): 2 usage, 3 bad SOURCE, 4 bad MOUNTPOINT, 5 unknown owner,
6 FUSE unavailable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import util

import noatimefs

pytestmark = pytest.mark.mount

DEADLINE = 30.0


@dataclass
class Case:
    source: Path | str
    mountpoint: Path | str
    code: int
    says: Sequence[str] = ()
    args: Sequence[str] = ()
    wrapper: Sequence[str] = ()
    env: dict[str, str] | None = None
    cleanups: list[Callable[[], object]] = field(default_factory=list)


def run_daemon(case: Case, token: str) -> subprocess.CompletedProcess[str]:
    """Run the daemon expecting it to refuse; if it does not exit, unmount, kill, and fail."""
    argv = [*case.wrapper, *util.daemon_argv(case.source, case.mountpoint, *case.args)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=case.env,
        cwd="/",
    )
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        util.umount(case.mountpoint)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"daemon did not refuse {argv} within {DEADLINE} s:\n{out}\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert util.pids_mentioning(token) == [], "a process was left behind"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def assert_refused(case: Case, base: Path) -> str:
    # Only mounts below our own temp dir: other tests on the machine may mount meanwhile.
    before = {e.mount_id for e in util.mounts_below(base)}
    r = run_daemon(case, str(base))
    after = {e.mount_id for e in util.mounts_below(base)}
    lines = r.stderr.splitlines()
    assert r.returncode == case.code, f"exit {r.returncode}, expected {case.code}: {r.stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith("noatimefs: error: "), lines
    for fragment in case.says:
        assert fragment in lines[0], (fragment, lines[0])
    assert after - before == set(), "something was mounted"
    assert r.stdout == ""
    return lines[0]


def _dir(p: Path, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    os.chown(p, *owner)
    p.chmod(mode)
    return p


def _file(p: Path) -> Path:
    p.write_bytes(b"not a directory\n")
    return p


def is_dead(path: Path) -> bool:
    """A dead FUSE mount answers ENOTCONN to anything that reaches the (gone) daemon.

    ``stat`` may still work from the kernel's attribute cache; ``statvfs`` always asks.
    """
    return util.errno_of(lambda: os.statvfs(path)) == errno.ENOTCONN


@contextlib.contextmanager
def dead_fuse_mount(path: Path) -> Iterator[None]:
    """A FUSE mount whose daemon (a tiny pyfuse3 server, not noatimefs) was SIGKILLed."""
    code = (
        "import sys, pyfuse3, trio\n"
        "pyfuse3.init(pyfuse3.Operations(), sys.argv[1], ['fsname=deadtest', 'subtype=deadtest'])\n"
        "trio.run(pyfuse3.main)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        util.wait_for_mount(path, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert is_dead(path)
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        problems = util.umount(path)
        assert not problems, problems


def _hide_dev_fuse_wrapper() -> list[str]:
    """Run the daemon in its own mount namespace with a /dev that has no fuse node."""
    script = (
        "mount -t tmpfs -o mode=0755,size=64k nodev /dev"
        " && mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/zero c 1 5"
        " && mknod -m 666 /dev/urandom c 1 9 && mknod -m 666 /dev/random c 1 8"
        ' && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation=private", "--", "/bin/sh", "-c", script, "sh"]


def _src(t: Path) -> Path:
    src = _dir(t / "src")
    (src / "file").write_bytes(b"x")
    return src


Setup = Callable[[Path, contextlib.ExitStack], Case]

CASES: dict[str, Setup] = {
    "source missing": lambda t, _: Case(t / "nope", _dir(t / "mnt"), 3, ["does not exist"]),
    "source not a dir": lambda t, _: Case(_file(t / "f"), _dir(t / "mnt"), 3, ["not a directory"]),
    "mountpoint missing": lambda t, _: Case(_src(t), t / "nope", 4, ["does not exist"]),
    "mountpoint not a dir": lambda t, _: Case(_src(t), _file(t / "f"), 4, ["not a directory"]),
    "mountpoint not empty": lambda t, _: Case(
        _src(t), _file(_dir(t / "mnt") / "x").parent, 4, ["not empty"]
    ),
    "mountpoint inside source": lambda t, _: Case(
        _src(t), _dir(t / "src" / "mnt"), 4, ["inside SOURCE"]
    ),
    "mountpoint is source": lambda t, _: Case(_dir(t / "empty"), t / "empty", 4, ["SOURCE"]),
    "unknown owner": lambda t, _: Case(
        _src(t), _dir(t / "mnt"), 5, ["no-such-user-x"], args=["--owner", "no-such-user-x"]
    ),
    "no /dev/fuse": lambda t, _: Case(
        _src(t), _dir(t / "mnt"), 6, ["/dev/fuse"], wrapper=_hide_dev_fuse_wrapper()
    ),
}


def _mountpoint_via_symlink(t: Path, _: contextlib.ExitStack) -> Case:
    src = _src(t)
    _dir(src / "inner")
    os.symlink(src, t / "link")
    return Case(src, t / "link" / "inner", 4, ["inside SOURCE"])


def _already_mounted(t: Path, stack: contextlib.ExitStack) -> Case:
    mnt = _dir(t / "mnt")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "noatimefs-test", mnt], check=True)
    stack.callback(lambda: util.umount(mnt, fuse=False))
    return Case(_src(t), mnt, 4, ["already mounted"])


def _dead_foreign_fuse(t: Path, stack: contextlib.ExitStack) -> Case:
    mnt = _dir(t / "mnt")
    stack.enter_context(dead_fuse_mount(mnt))
    # The message must say how to recover.
    return Case(_src(t), mnt, 4, ["dead", f"fusermount3 -u {mnt}"])


def _dead_source(t: Path, stack: contextlib.ExitStack) -> Case:
    """A SOURCE even root cannot read: a dead FUSE mount (ENOTCONN)."""
    src = _dir(t / "src")
    stack.enter_context(dead_fuse_mount(src))
    return Case(src, _dir(t / "mnt"), 3, ["SOURCE"])


def _unreadable_source_as_user(t: Path, _: contextlib.ExitStack) -> Case:
    """A 0700 root SOURCE, with the daemon run as 65534 (root reads everything)."""
    src = _src(t)
    src.chmod(0o700)
    mnt = _dir(t / "mnt", owner=util.NOBODY)
    wrapper = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return Case(src, mnt, 3, ["cannot be read"], wrapper=wrapper)


def _no_fusermount3_as_user(t: Path, _: contextlib.ExitStack) -> Case:
    """An unprivileged daemon needs fusermount3; here it is not on PATH."""
    mnt = _dir(t / "mnt", owner=util.NOBODY)
    wrapper = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {"PATH": str(_dir(t / "empty-bin")), "HOME": "/"}
    return Case(_src(t), mnt, 6, ["fusermount3"], wrapper=wrapper, env=env)


def _dev_fuse_closed_to_user(t: Path, _: contextlib.ExitStack) -> Case:
    """/dev/fuse is 0600 root here (DESIGN.md fact 9): an unprivileged mount fails, cleanly."""
    if os.stat("/dev/fuse").st_mode & 0o006:
        pytest.skip("/dev/fuse is open to other users on this machine")
    mnt = _dir(t / "mnt", owner=util.NOBODY)
    wrapper = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return Case(_src(t), mnt, 6, [], wrapper=wrapper)


CASES.update(
    {
        "mountpoint inside source via symlink": _mountpoint_via_symlink,
        "mountpoint already mounted": _already_mounted,
        "mountpoint dead foreign FUSE mount": _dead_foreign_fuse,
        "source is a dead FUSE mount": _dead_source,
        "source unreadable (daemon as 65534)": _unreadable_source_as_user,
        "no fusermount3 (daemon as 65534)": _no_fusermount3_as_user,
        "/dev/fuse closed (daemon as 65534)": _dev_fuse_closed_to_user,
    }
)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused(world_tmp: Path, name: str) -> None:
    util.fuse_available()
    with contextlib.ExitStack() as stack:
        case = CASES[name](world_tmp, stack)
        assert_refused(case, world_tmp)


def test_dead_noatimefs_mount_is_recovered(world_tmp: Path) -> None:
    """A mount left by a crashed noatimefs is cleared by the next start, which then mounts."""
    src = _src(world_tmp)
    mnt = _dir(world_tmp / "mnt")
    with util.mounted(src, mnt) as crashed:
        # Used before the crash, as any real mount is: the kernel now caches the
        # root's attributes, so a plain stat() of the dead mount still succeeds.
        assert (mnt / "file").read_bytes() == b"x"
        os.stat(mnt)
        crashed.proc.send_signal(signal.SIGKILL)
        crashed.proc.wait()
        assert is_dead(mnt)
        with util.mounted(src, mnt) as again:
            assert (mnt / "file").read_bytes() == b"x"
            entries = [e for e in util.mount_entries() if e.mountpoint == str(mnt)]
            assert len(entries) == 1, entries
            assert "dead" in again.log_text()
            assert str(mnt) in again.log_text()
        assert util.mount_entry(mnt) is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [([], "required"), (["--no-such-option", "a", "b"], "--no-such-option"), (["a"], "required")],
)
def test_usage_errors_exit_2(args: list[str], fragment: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "noatimefs", *args], capture_output=True, text=True, check=False
    )
    assert r.returncode == 2, r
    last = r.stderr.splitlines()[-1]
    assert last.startswith("noatimefs: error: "), r.stderr
    assert fragment in last, r.stderr


def test_version() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "noatimefs", "--version"], capture_output=True, text=True, check=True
    )
    assert noatimefs.__version__ in r.stdout
    assert r.stderr == ""
