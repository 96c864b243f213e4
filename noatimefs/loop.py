"""One reader for pyfuse3's request loop, and a cheaper wait for its next request.

pyfuse3 runs its request loop in trio tasks that each, before *every* request,
queue on a trio lock and park in ``wait_readable`` on ``/dev/fuse`` (two
``epoll_ctl`` calls and a scheduler pass). With more than one task, the lock
passes from task to task: every request wakes two tasks, the one that reads it
and the next one in the queue. Measured with the benchmark's floor server
(``bench/floorfs.py``), that costs more than half of the CPU of a warm
``find``.

:func:`install` replaces pyfuse3's (private) ``_wait_fuse_readable`` with a
:class:`RequestLoop` in which one task at a time, *the reader*, reads requests
and runs their handlers:

* it asks ``poll(fd, 0)`` whether a request is queued, and if so reads it at
  once; when none is, it keeps polling for up to :data:`SPIN` (100 µs) before
  it parks in ``wait_readable``. A caller that walks a tree (``find``, ``tar``)
  sends its next request a few tens of microseconds after our reply; parking
  for it costs an ``epoll`` round, a trio scheduler pass and the kernel's
  wake-up of a sleeping thread (an inter-processor interrupt, dear in a
  virtual machine). Measured on the benchmark's tree (2 vCPUs): a warm
  ``find`` 6.7 s → 2.9 s, and the daemon's CPU *fell* (4.0 s → 2.9 s). The
  spin is adaptive: after a request that a spin would not have caught (it
  came after more than :data:`SPIN` parked), the next wait parks at once, so
  an idle or sparsely used mount costs no polling; a request that came
  within :data:`SPIN` of parking turns it back on;
* every other task pyfuse3 starts waits, off the descriptor, as a *spare*;
* a handler about to wait (a read handed to a worker thread) calls
  :func:`hand_off` first: a spare becomes the reader and takes the following
  requests meanwhile, so concurrency is kept where a request waits, and no
  task hand-over is paid where none does. Handlers that never ``await`` need
  nothing.

Correctness rests on three facts:

* pyfuse3 reads the request right after this coroutine returns, with no
  ``await`` in between, so no other task can take the request that ``poll``
  saw; and only the reader ever reads, so no task reads an empty
  ``/dev/fuse`` (which would block the thread);
* the daemon's other tasks stay served under a steady stream of requests:
  the reader lets trio run at least every :data:`YIELD_EVERY` (1 ms), and at
  once when a descriptor named with :meth:`RequestLoop.wake_on` (the SOURCE
  watcher's inotify descriptor) has something to read;
* the loop ends for every task: on :func:`terminate` and when the kernel ends
  the connection (``poll`` reports an error), the spares are woken and leave.

pyfuse3 exposes no hook for this; :func:`install` checks that the private name
exists and falls back to pyfuse3's own loop (with a log line) if it does not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time

import pyfuse3
import trio

log = logging.getLogger(__name__)

#: The longest the reader serves requests without letting trio run its other tasks (seconds).
YIELD_EVERY = 1e-3

#: How long the reader polls for the next request before it parks (seconds).
SPIN = 100e-6

_ENDED = select.POLLERR | select.POLLHUP | select.POLLNVAL


class RequestLoop:
    """The reader/spares protocol above, for the pyfuse3 session on *fd*."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._reader: trio.lowlevel.Task | None = None
        self._spares = trio.lowlevel.ParkingLot()
        self._closed = False
        self._others: set[int] = set()
        self._yielded = time.perf_counter()
        self._spin = SPIN
        self.hand_offs = 0

    async def wait_fuse_readable(self) -> bool:
        """pyfuse3's wait: True when the caller may read one request now, False to end."""
        me = trio.lowlevel.current_task()
        if time.perf_counter() - self._yielded > YIELD_EVERY:
            await self._let_others_run()
        while not self._closed:
            if self._reader is None:
                self._reader = me
            if self._reader is not me:
                await self._spares.park()
                continue
            events = self._poller.poll(0)
            if not events and self._spin:
                deadline = time.perf_counter() + self._spin
                while not events and time.perf_counter() < deadline:
                    events = self._poller.poll(0)
            fuse_events = 0
            for fd, mask in events:
                if fd == self.fd:
                    fuse_events = mask
                else:
                    await self._let_others_run()  # another task has something to read
            if fuse_events:
                if fuse_events & _ENDED:
                    self.close()  # the caller's read reports it and ends its loop
                return True
            if events:
                continue  # only another descriptor was ready: poll again
            parked = time.perf_counter()
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except trio.ClosedResourceError:
                self.close()
            now = time.perf_counter()
            self._yielded = now  # trio ran its other tasks while the reader was parked
            # Spin before the next wait only if a spin would have caught this request.
            self._spin = SPIN if now - parked < SPIN else 0.0
        return False

    async def _let_others_run(self) -> None:
        self._yielded = time.perf_counter()
        await trio.lowlevel.checkpoint()

    def wake_on(self, fd: int) -> None:
        """Let trio run at once when *fd* has something to read, however busy the reader."""
        self._others.add(fd)
        self._poller.register(fd, select.POLLIN)

    def forget(self, fd: int) -> None:
        """Undo :meth:`wake_on` (before *fd* is closed)."""
        if fd in self._others:
            self._others.discard(fd)
            self._poller.unregister(fd)

    @property
    def spinning(self) -> bool:
        """Whether the reader polls a while before it parks (see :data:`SPIN`)."""
        return self._spin > 0

    def hand_off(self) -> None:
        """The running handler is about to wait: let a spare read the next requests."""
        if self._reader is trio.lowlevel.current_task():
            self._reader = None
            self.hand_offs += 1
            self._spares.unpark(count=1)

    def close(self) -> None:
        """End the loop for every task: the spares wake up and leave."""
        self._closed = True
        self._spares.unpark_all()


_installed: RequestLoop | None = None


def fuse_fd() -> int | None:
    """The descriptor this process holds on ``/dev/fuse`` (pyfuse3 keeps it private)."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
    return None


def install() -> bool:
    """Replace pyfuse3's request wait (after ``pyfuse3.init``); False if it cannot be."""
    global _installed
    fd = fuse_fd()
    if not hasattr(pyfuse3, "_wait_fuse_readable") or fd is None:
        log.warning("pyfuse3's request wait cannot be replaced here: using pyfuse3's own loop")
        return False
    _installed = RequestLoop(fd)
    pyfuse3._wait_fuse_readable = _installed.wait_fuse_readable  # type: ignore[attr-defined]
    return True


def wake_on(fd: int) -> None:
    """:meth:`RequestLoop.wake_on`; a no-op without :func:`install`."""
    if _installed is not None:
        _installed.wake_on(fd)


def forget(fd: int) -> None:
    """:meth:`RequestLoop.forget`; a no-op without :func:`install`."""
    if _installed is not None:
        _installed.forget(fd)


def hand_off() -> None:
    """Call before a handler awaits (see the module docstring); a no-op without :func:`install`."""
    if _installed is not None:
        _installed.hand_off()


def terminate() -> None:
    """``pyfuse3.terminate()``, and the loop's spares released."""
    pyfuse3.terminate()
    if _installed is not None:
        _installed.close()
