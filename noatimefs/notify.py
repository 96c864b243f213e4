"""sd_notify(3) without libsystemd: readiness and stop notices over ``NOTIFY_SOCKET``.

Whenever the service manager set ``NOTIFY_SOCKET`` (a ``Type=notify`` unit, or
``noatimefs run`` waiting for its private daemon), the daemon sends ``READY=1``
once the mount is live and ``STOPPING=1`` when it starts to unmount. Without
``NOTIFY_SOCKET`` every function here does nothing. Sending never raises: a
service manager that went away must not take the mount down with it.

The other readiness channel is :class:`Background`: the pipe by which a daemon
started by ``mount.fuse3`` tells the waiting mount(8) that the mount is live.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys

log = logging.getLogger(__name__)

_state = {"stopping": False}


def _address(value: str) -> str | bytes | None:
    """The socket address named by ``NOTIFY_SOCKET`` (a path, or ``@name``: abstract)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def notify(message: str) -> bool:
    """Send *message* (``"READY=1"``, ...) to the service manager; whether it was sent."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a socket path or @abstract name: ignored", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", value, exc.strerror)
        return False
    return True


def ready(status: str = "") -> bool:
    """``READY=1`` (with a ``STATUS=`` line when given): the mount is live."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    """``STOPPING=1``, once per process: the daemon is unmounting."""
    if _state["stopping"]:
        return False
    _state["stopping"] = True
    return notify("STOPPING=1")


class Background:
    """Fork into the background once the mount is live, as FUSE mount helpers do.

    mount(8) runs ``mount.fuse3``, which runs ``noatimefs SOURCE MNT -o ...`` and
    waits for it to exit. :meth:`fork` returns the exit status for the parent
    (0 once the child reported the mount live, the child's own status when it
    failed first) and ``None`` in the child, which calls :meth:`ready` when the
    mount is live: the parent exits 0, the child detaches from the terminal and
    the caller's pipes (its log goes to syslog when ``/dev/log`` exists).
    """

    def __init__(self) -> None:
        self._w: int | None = None

    def fork(self) -> int | None:
        r, w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.setsid()
            os.chdir("/")
            self._w = w
            return None
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            live = pipe.read(1) == b"1"
        if live:
            return 0
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return code if code > 0 else 1

    def ready(self) -> None:
        if self._w is None:
            return
        _detach_logging()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.write(self._w, b"1")
        os.close(self._w)
        self._w = None


def _detach_logging() -> None:
    """Move the root logger from stderr to syslog (when there is one) before stderr goes."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, logging.StreamHandler):
            root.removeHandler(handler)
    if os.path.exists("/dev/log"):
        try:
            syslog = logging.handlers.SysLogHandler(
                "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
        except OSError:
            return
        syslog.ident = f"noatimefs[{os.getpid()}]: "
        root.addHandler(syslog)
    else:
        root.addHandler(logging.NullHandler())
