"""``noatimefs run [options] SOURCE -- COMMAND [ARGS...]``: a mount for one command's lifetime.

SOURCE is mounted at a private temporary mountpoint, ``MNT`` below; COMMAND
runs with ``NOATIMEFS_MOUNTPOINT=MNT`` in its environment and every ``{}`` in
its arguments replaced by MNT (``-virtfs local,path={},...`` for QEMU). When
COMMAND exits -- or the run is interrupted -- the daemon is stopped, the mount
is gone and the directory removed, and ``noatimefs run`` exits with COMMAND's
status (128+N when COMMAND was killed by signal N; 127/126 when it could not be
started; the daemon's exit code when SOURCE could not be mounted).

Signals: the daemon runs in a session of its own, so Ctrl-C at a terminal
reaches COMMAND (which is in our process group) but not the daemon. While
COMMAND runs, ``run`` ignores SIGINT and SIGQUIT as system(3) does -- COMMAND
decides what an interrupt means -- and relays SIGTERM and SIGHUP to it. Before
COMMAND has started, any of them aborts the run (exit 128+N).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from types import FrameType

from noatimefs import mountinfo
from noatimefs.errors import Exit, QuietError

log = logging.getLogger(__name__)

ENV_VAR = "NOATIMEFS_MOUNTPOINT"
#: How long the daemon may take to mount, and to exit once asked to stop.
DEADLINE = 60.0
_RELAYED = (signal.SIGTERM, signal.SIGHUP)
_IGNORED = (signal.SIGINT, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def build_parser() -> argparse.ArgumentParser:
    from noatimefs import cli

    parser = argparse.ArgumentParser(
        prog="noatimefs run",
        usage="noatimefs run [options] SOURCE -- COMMAND [ARGS...]",
        description=(
            "Mount SOURCE at a private temporary directory, run COMMAND with its path in "
            f"${ENV_VAR} and in place of every {{}} in ARGS, then unmount and exit with "
            "COMMAND's status."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help="the store directory to re-export")
    cli.add_mount_options(parser)
    return parser


def daemon_argv(args: argparse.Namespace, mountpoint: str) -> list[str]:
    """The command line of the private daemon (the same interpreter, ``-m noatimefs``)."""
    argv = [sys.executable, "-m", "noatimefs", "--foreground"]
    if args.owner is not None:
        argv += ["--owner", args.owner]
    if args.allow_other:
        argv.append("--allow-other")
    if args.per_user:
        argv.append("--per-user")
    if args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    if args.debug:
        argv.append("--debug")
    if args.plain_loop:
        argv.append("--plain-loop")
    for group in args.options:
        argv += ["-o", group]
    return [*argv, "--", os.path.abspath(args.source), mountpoint]


def substitute(command: Sequence[str], mountpoint: str) -> list[str]:
    """COMMAND with every ``{}`` in its arguments replaced by *mountpoint*."""
    return [command[0], *(arg.replace("{}", mountpoint) for arg in command[1:])]


def _die_with_parent() -> None:
    """In the daemon (before exec): SIGTERM it if ``noatimefs run`` dies first."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class _Signals:
    """What SIGINT/SIGQUIT/SIGTERM/SIGHUP do in each phase of a run.

    ``setup``: abort (raise :class:`_Interrupted`); ``command``: relay SIGTERM and
    SIGHUP to the command, ignore SIGINT and SIGQUIT; ``cleanup``: ignore all.
    Python-level handlers, so the daemon and the command get default
    dispositions again when they exec.
    """

    def __init__(self) -> None:
        self.phase = "setup"
        self.child: subprocess.Popen[bytes] | None = None
        #: Signals to relay that came before :meth:`adopt`: the command runs (and may
        #: say it is ready) before ``Popen`` returns to us.
        self._pending: list[int] = []

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.phase == "setup":
            raise _Interrupted(signum)
        if self.phase == "command" and signum in _RELAYED:
            if self.child is None:
                self._pending.append(signum)
            else:
                self._relay(signum)

    def _relay(self, signum: int) -> None:
        assert self.child is not None
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(signum)

    def adopt(self, child: subprocess.Popen[bytes]) -> None:
        """Relay to *child* from now on, and the signals that came before it was known."""
        self.child = child
        while self._pending:
            self._relay(self._pending.pop(0))

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        old = {s: signal.signal(s, self._handle) for s in (*_RELAYED, *_IGNORED)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class PrivateMount:
    """The daemon and its temporary mountpoint; :meth:`close` undoes everything."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="noatimefs-run-")
        os.chmod(self.workdir, 0o755)  # the presented owner may be another user
        self.mountpoint = os.path.join(self.workdir, "mnt")
        os.mkdir(self.mountpoint, 0o755)
        self.proc: subprocess.Popen[bytes] | None = None
        self.live = False
        # Bound until close(): the daemon's STOPPING=1 must find it.
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def start(self) -> None:
        """Start the daemon and return once the mount is live (it said ``READY=1``)."""
        sock_path = os.path.join(self.workdir, "notify")
        self.sock.bind(sock_path)
        os.chmod(sock_path, 0o600)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        env.pop("JOURNAL_STREAM", None)
        self.proc = subprocess.Popen(
            daemon_argv(self.args, self.mountpoint),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # COMMAND's stdout is not the daemon's
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # safe: no threads in this process
        )
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            self._wait_ready(self.sock, pidfd)
        finally:
            os.close(pidfd)
        self.live = True

    def _wait_ready(self, sock: socket.socket, pidfd: int) -> None:
        assert self.proc is not None
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        end = time.monotonic() + DEADLINE
        while True:
            events = dict(poller.poll(max(0.0, end - time.monotonic()) * 1000))
            if not events:
                raise QuietError(
                    f"the daemon did not mount {self.mountpoint} within {DEADLINE:.0f} s",
                    Exit.FUSE,
                )
            if sock.fileno() in events:
                message = sock.recv(4096).decode(errors="replace").split("\n")
                if "READY=1" in message and self._mounted():
                    return
            elif pidfd in events:
                code = self.proc.wait()
                exitcode = Exit(code) if 0 < code <= max(Exit) else Exit.INTERNAL
                raise QuietError(f"the daemon exited ({code}) before mounting SOURCE", exitcode)

    def _mounted(self) -> bool:
        entry = mountinfo.find(os.path.realpath(self.mountpoint))
        return entry is not None and entry.fstype == "fuse.noatimefs"

    def close(self) -> list[str]:
        """Stop the daemon, make sure nothing is mounted, remove the directory."""
        problems: list[str] = []
        if self.live and self.proc is not None and self.proc.poll() is not None:
            problems.append(f"the daemon died (exit {self.proc.returncode}) while COMMAND ran")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                problems.append(f"daemon pid {self.proc.pid} did not stop: killed")
                self.proc.kill()
                self.proc.wait()
            else:
                if code != 0:
                    problems.append(f"the daemon exited with {code}")
        self.sock.close()
        real = os.path.realpath(self.mountpoint)
        for cmd in (["fusermount3", "-u", "-q", real], ["umount", "-l", real]):
            if mountinfo.find(real) is None:
                break
            subprocess.run(cmd, capture_output=True, check=False)
        if mountinfo.find(real) is not None:
            problems.append(f"{real} is still mounted: not removed")
            return problems
        shutil.rmtree(self.workdir, ignore_errors=True)
        if os.path.exists(self.workdir):
            problems.append(f"cannot remove {self.workdir}")
        return problems


def run_command(command: list[str], mountpoint: str, signals: _Signals) -> int:
    """Run *command* to completion; its exit status as a shell reports it."""
    env = dict(os.environ, **{ENV_VAR: mountpoint})
    env.pop("NOTIFY_SOCKET", None)
    try:
        child = subprocess.Popen(command, env=env)
    except FileNotFoundError:
        print(f"noatimefs: error: {command[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as exc:
        print(f"noatimefs: error: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 126
    signals.adopt(child)
    code = child.wait()
    return 128 - code if code < 0 else code


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return list(argv), []
    i = list(argv).index("--")
    return list(argv[:i]), list(argv[i + 1 :])


def main(argv: Sequence[str]) -> int:
    from noatimefs import cli

    options, command = split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(options)
    if not command:
        parser.error("no COMMAND: give it after '--'")
    cli.apply_mount_options(args, parser)
    cli.setup_logging(args.debug)
    with _Signals().installed() as signals:
        private: PrivateMount | None = None
        try:
            private = PrivateMount(args)
            private.start()
            signals.phase = "command"
            code = run_command(substitute(command, private.mountpoint), private.mountpoint, signals)
        except _Interrupted as exc:
            log.info("interrupted by %s before COMMAND started", signal.Signals(exc.signum).name)
            code = 128 + exc.signum
        except QuietError as exc:
            print(f"noatimefs: error: {exc.message}", file=sys.stderr)
            code = int(exc.exitcode)
        finally:
            signals.phase = "cleanup"
            if private is not None:
                for problem in private.close():
                    log.error("cleaning up: %s", problem)
    return code
