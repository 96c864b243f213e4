"""Read a directory's small files ahead, in worker threads, once one of them is read cold.

A store path is read whole or not at all (``tar`` of a closure, ``cp -r``, a
VM booting from it), one file at a time: cold, each file waits for the disk
in turn, and the disk sees one request at a time. When a read finds a small
file's data missing from the page cache, :class:`NoatimeFS` hands the
directory's other small regular files to a :class:`ReadAhead`, whose workers
ask the kernel to read them (``posix_fadvise(POSIX_FADV_WILLNEED)``, which
queues the reads and returns). By the time the consumer opens them, their
pages are in SOURCE's page cache, read in parallel.

Nothing a worker reads reaches a caller: it only warms SOURCE's caches, so it
cannot change an answer, only how soon it comes. A worker opens a path beneath
SOURCE as the daemon does (``openat2``, no symlinks followed, ``O_PATH``
first), reopens it for reading only if it is still a regular file (never a
device or a FIFO), with ``O_NOATIME`` (read-ahead is not an access), and
closes it at once. Jobs beyond :data:`PENDING` queued are dropped: read-ahead
is a hint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
from collections.abc import Sequence

from noatimefs.source import O_PATH, Source, proc_path

log = logging.getLogger(__name__)

#: Files no larger than this are read ahead (bytes).
MAX_FILE = 1 << 20
#: At most this many bytes, and files, read ahead for one directory.
MAX_PER_DIR = 16 << 20
MAX_FILES_PER_DIR = 256
#: Directories waiting for a worker; more are dropped.
PENDING = 256
WORKERS = 2


class ReadAhead:
    """Worker threads that read files of SOURCE ahead (see the module docstring)."""

    def __init__(self, source: Source, workers: int = WORKERS) -> None:
        self.source = source
        self.workers = workers
        self._jobs: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=PENDING)
        self._threads: list[threading.Thread] = []
        self.files = 0  # files queued for read-ahead
        self.dropped = 0  # directories dropped, the queue being full

    def want(self, paths: list[bytes]) -> None:
        """Queue *paths* (relative to SOURCE) for read-ahead; never blocks."""
        if not paths:
            return
        if not self._threads:
            self._start()
        try:
            self._jobs.put_nowait(paths)
        except queue.Full:
            self.dropped += 1
            return
        self.files += len(paths)

    def close(self) -> None:
        """Stop the workers once the queued jobs are done (waits at most a few seconds)."""
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._jobs.put(None, timeout=1)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def _start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"readahead-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while (paths := self._jobs.get()) is not None:
            budget = MAX_PER_DIR  # (siblings keeps to it by the sizes it knows; here, all)
            for path in paths:
                try:
                    budget -= max(0, self.read_ahead(path, min(budget, MAX_FILE)))
                except OSError as exc:  # gone, replaced, unreadable: it was only a hint
                    log.debug("read-ahead of %r skipped: %s", path, exc)

    def read_ahead(self, path: bytes, limit: int = MAX_FILE) -> int:
        """Ask the kernel to read the regular file at *path* into the page cache, if it
        holds at most *limit* bytes; the bytes asked for (-1: none, :func:`will_need`)."""
        fd = self.source.open(path, O_PATH | os.O_NOFOLLOW)
        try:
            return will_need(fd, limit=limit)
        finally:
            os.close(fd)


def will_need(path_fd: int, noatime: int = os.O_NOATIME, limit: int | None = None) -> int:
    """Ask the kernel to read the file open ``O_PATH`` on *path_fd* into the page cache.

    Only a regular file is opened for reading (a device's or a FIFO's open could
    have side effects, or wait), of at most *limit* bytes if given. The bytes
    asked for; -1 if none were asked for.
    """
    st = os.fstat(path_fd)
    if not stat.S_ISREG(st.st_mode) or (limit is not None and st.st_size > limit):
        return -1
    fd = os.open(proc_path(path_fd), os.O_RDONLY | noatime | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    return st.st_size


def siblings(
    entries: Sequence[tuple[bytes, int, int | None]], base: bytes, skip: bytes
) -> list[bytes]:
    """The paths to read ahead among a directory's *entries* ``(name, mode, size)``.

    Non-empty regular files up to :data:`MAX_FILE`, other than *skip* (the file
    being read), in listing order, within the per-directory budget. A size of None
    (a file listed bare, :mod:`noatimefs.listing`) is not known yet: such a file is
    picked too, and the worker keeps it to the limits (:meth:`ReadAhead.read_ahead`).
    *base* is the directory's path relative to SOURCE.
    """
    paths: list[bytes] = []
    budget = MAX_PER_DIR
    for name, mode, known in entries:
        size = 1 if known is None else known
        if name == skip or not stat.S_ISREG(mode) or not 0 < size <= MAX_FILE:
            continue
        if size > budget or len(paths) >= MAX_FILES_PER_DIR:
            break
        budget -= size
        paths.append(base + b"/" + name if base else name)
    return paths
