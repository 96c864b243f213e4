"""Facts about the processes that call the filesystem (psutil). Never raises."""

from __future__ import annotations

import psutil

_CACHE_MAX = 4096
_names: dict[int, str] = {}


def name(pid: int) -> str:
    """The process name of *pid* (``comm``), or ``"?"`` when it is gone.

    Cached per pid; the cache is dropped whole when it grows past a few
    thousand pids, which bounds both its size and the damage of pid reuse.
    """
    cached = _names.get(pid)
    if cached is not None:
        return cached
    try:
        found = str(psutil.Process(pid).name())
    except (psutil.Error, OSError, ValueError):
        return "?"
    if len(_names) >= _CACHE_MAX:
        _names.clear()
    _names[pid] = found
    return found


def describe(pid: int) -> str:
    """``"1234 (qemu-system-x86)"``: how a caller is named in the log.

    A process chooses its own name (``prctl(PR_SET_NAME)``, ``argv[0]``), so
    anything unprintable in it is escaped: a caller cannot split or forge a
    log line.
    """
    return f"{pid} ({printable(name(pid))})"


def printable(text: str) -> str:
    """*text* with every unprintable character escaped as in ``repr`` (``\\n``, ``\\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_tgids: dict[int, int] = {}


def process_of(tid: int) -> int:
    """The process (thread group) id of thread *tid*; FUSE names callers by thread.

    *tid* itself when it cannot be read (the thread is gone).
    """
    cached = _tgids.get(tid)
    if cached is not None:
        return cached
    tgid = tid
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    tgid = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        return tid
    if len(_tgids) >= _CACHE_MAX:
        _tgids.clear()
    _tgids[tid] = tgid
    return tgid


def groups(pid: int) -> frozenset[int]:
    """The supplementary groups of *pid*, empty when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()
