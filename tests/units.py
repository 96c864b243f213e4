"""The systemd unit as systemd would run it, for tests on machines where systemd is not PID 1.

- :func:`service_section`, :func:`exec_lines`, :func:`read_env_file`,
  :func:`expand`: a unit's ``[Service]`` keys, an ``EnvironmentFile=`` and an
  ``Exec*=`` line expanded the way systemd does (``%f``, ``$OPTIONS`` split,
  ``${SOURCE}`` whole).
- :class:`NotifySocket`: an ``AF_UNIX`` datagram socket standing in for
  systemd's ``NOTIFY_SOCKET``.
- As a script, a stand-in for the few ``systemctl`` commands the README's
  recipes use, put first on ``PATH`` by a test when systemd does not run::

      python tests/units.py systemctl enable --now noatimefs@run-noatimefs.service
      python tests/units.py systemctl disable --now noatimefs@run-noatimefs.service

  ``start`` runs the installed unit's ``ExecStartPre=`` lines, then its
  ``ExecStart=`` in the background under a notify socket, and returns once
  ``READY=1`` came (failing if the daemon exits first); ``stop`` sends SIGTERM,
  waits for the daemon to exit, then runs ``ExecStopPost=``. ``enable`` and
  ``disable`` alone do nothing here (there is no boot to enable for);
  ``daemon-reload`` does nothing. State (pid, log) is kept in
  ``$NOATIMEFS_UNITS_STATE``.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: How long a daemon may take to say READY=1, or to exit after SIGTERM.
DEADLINE = 30.0
UNIT_DIR = Path("/etc/systemd/system")


def systemd_running() -> bool:
    """Whether systemd is the init system here (sd_booted(3))."""
    return os.path.isdir("/run/systemd/system")


def _parser(unit: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, dict_type=_MultiDict)  # type: ignore[arg-type]
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser


class _MultiDict(dict):  # type: ignore[type-arg]
    """Keeps every value of a repeated key (as systemd does for Exec*= lines), newline-joined."""

    def __setitem__(self, key: str, value: object) -> None:
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def exec_lines(unit: Path, key: str) -> list[str]:
    """Every value of *key* in the unit's ``[Service]`` section, in order."""
    raw = _parser(unit)["Service"].get(key)
    return [line for line in (raw or "").split("\n") if line.strip()]


def service_section(unit: Path) -> Mapping[str, str]:
    """The ``[Service]`` keys; for a repeated key, its last value."""
    section = _parser(unit)["Service"]
    return {key: value.split("\n")[-1] for key, value in section.items()}


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def expand(line: str, env: Mapping[str, str], specifiers: Mapping[str, str]) -> list[str]:
    """An Exec line as systemd runs it: prefixes off, ``%x``, ``${VAR}``, ``$VAR`` (split)."""
    words = shlex.split(line.lstrip("-@+!:"))
    argv: list[str] = []
    for word in words:
        word = re.sub(r"%([a-zA-Z%])", lambda m: specifiers[m.group(1)], word)
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return argv


def systemd_tool(name: str) -> str:
    """*name* (systemd-analyze, systemd-escape), installing Debian's systemd if missing."""
    path = shutil.which(name)
    if path is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "systemd"], env=env, check=True)
        path = shutil.which(name)
    assert path is not None, f"no {name} even after installing systemd"
    return path


def escape_path(path: Path) -> str:
    """``systemd-escape --path``: /run/noatimefs -> run-noatimefs."""
    r = subprocess.run(
        [systemd_tool("systemd-escape"), "--path", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.strip()


def unescape_path(instance: str) -> str:
    """``systemd-escape --unescape --path``: run-noatimefs -> /run/noatimefs."""
    r = subprocess.run(
        [systemd_tool("systemd-escape"), "--unescape", "--path", instance],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.strip()


class NotifySocket:
    """An ``AF_UNIX`` datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, proc: subprocess.Popen[bytes], describe: str) -> list[str]:
        """The next message's lines; fail if *proc* exits first or at the deadline."""
        end = time.monotonic() + DEADLINE
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no notification in {DEADLINE} s\n{describe}")
            # The short cap re-checks that the daemon is alive; a message wakes us at once.
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if ready:
                return self.sock.recv(4096).decode().split("\n")
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode} first\n{describe}")

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- systemctl stand-in


class UnitError(Exception):
    pass


class Instance:
    """One instance of an installed template unit, run without systemd."""

    def __init__(self, name: str, state: Path) -> None:
        m = re.fullmatch(r"([^@]+)@(.+)\.service", name)
        if not m:
            raise UnitError(f"not a template instance: {name}")
        self.name, self.instance = name, m.group(2)
        self.unit = UNIT_DIR / f"{m.group(1)}@.service"
        if not self.unit.is_file():
            raise UnitError(f"Unit {self.unit.name} not found.")
        self.state = state
        self.pidfile = state / f"{name}.pid"
        self.log = state / f"{name}.log"
        path = unescape_path(self.instance)
        self.specifiers = {"f": path, "i": self.instance, "I": path.lstrip("/"), "%": "%"}

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for line in exec_lines(self.unit, "EnvironmentFile"):
            path = Path(expand(line, {}, self.specifiers)[0])
            if path.exists() or not line.startswith("-"):
                env.update(read_env_file(path))
        return env

    def _run_lines(self, key: str, env: Mapping[str, str]) -> None:
        for line in exec_lines(self.unit, key):
            argv = expand(line, env, self.specifiers)
            r = subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")
            if r.returncode != 0 and not line.startswith("-"):
                raise UnitError(f"{key}={line}: exit {r.returncode}: {r.stderr.strip()}")

    def start(self) -> None:
        if self.pidfile.exists():
            return  # already started
        env = self.env()
        self._run_lines("ExecStartPre", env)
        (line,) = exec_lines(self.unit, "ExecStart")
        argv = expand(line, env, self.specifiers)
        notify = NotifySocket(self.state / "notify")
        try:
            with open(self.log, "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
                    cwd="/",
                    start_new_session=True,
                )
            describe = f"{argv}; log {self.log}"
            while "READY=1" not in notify.receive(proc, describe):
                pass
        except AssertionError as exc:
            raise UnitError(f"{self.name} failed to start: {exc}\n{self.log.read_text()}") from exc
        finally:
            notify.close()
            os.unlink(notify.path)
        self.pidfile.write_text(f"{proc.pid}\n")

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text())
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            try:
                signal.pidfd_send_signal(fd, signal.SIGTERM)
                if not select.select([fd], [], [], DEADLINE)[0]:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    raise UnitError(
                        f"{self.name}: pid {pid} still running {DEADLINE} s after SIGTERM"
                    )
            finally:
                os.close(fd)
        self.pidfile.unlink()
        self._run_lines("ExecStopPost", self.env())

    def is_active(self) -> bool:
        if not self.pidfile.exists():
            return False
        return os.path.exists(f"/proc/{int(self.pidfile.read_text())}")


def systemctl(args: Sequence[str], state: Path) -> int:
    """The stand-in: ``[enable|disable] [--now] NAME...``, ``start``, ``stop``, ``is-active``."""
    words = [a for a in args if not a.startswith("-")]
    now = "--now" in args
    if not words:
        raise UnitError("no command")
    verb, names = words[0], words[1:]
    if verb == "daemon-reload":
        return 0
    code = 0
    for name in names:
        inst = Instance(name, state)
        if verb == "start" or (verb == "enable" and now):
            inst.start()
        elif verb == "stop" or (verb == "disable" and now):
            inst.stop()
        elif verb == "is-active":
            active = inst.is_active()
            print("active" if active else "inactive")
            code = code or (0 if active else 3)
        elif verb not in ("enable", "disable"):
            raise UnitError(f"unsupported: systemctl {verb}")
    return code


def shim(directory: Path, state: Path) -> Path:
    """A directory with a ``systemctl`` that runs this stand-in (put it first on PATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "systemctl"
    exe.write_text(
        "#!/bin/sh\n"
        f"NOATIMEFS_UNITS_STATE={shlex.quote(str(state))} "
        f'exec {shlex.quote(sys.executable)} {shlex.quote(__file__)} systemctl "$@"\n'
    )
    exe.chmod(0o755)
    return directory


def stop_all(state: Path) -> list[str]:
    """Stop every instance the stand-in started in *state*; the problems met."""
    problems = []
    for pidfile in sorted(state.glob("*.service.pid")):
        name = pidfile.name.removesuffix(".pid")
        try:
            Instance(name, state).stop()
        except UnitError as exc:
            problems.append(str(exc))
    return problems


def main(argv: Sequence[str]) -> int:
    if len(argv) < 1 or argv[0] != "systemctl":
        print("usage: units.py systemctl ARGS...", file=sys.stderr)
        return 2
    state = Path(os.environ.get("NOATIMEFS_UNITS_STATE", "/run/noatimefs-test-units"))
    state.mkdir(parents=True, exist_ok=True)
    try:
        return systemctl(argv[1:], state)
    except UnitError as exc:
        print(f"systemctl (test stand-in): {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
