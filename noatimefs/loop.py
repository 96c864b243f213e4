"""A cheaper wait for the next FUSE request in pyfuse3's request loop.

pyfuse3 runs its request loop in trio tasks that each, before *every* request,
queue on a trio lock and park in ``wait_readable`` on ``/dev/fuse`` (two
``epoll_ctl`` calls and a scheduler pass), and after every request it starts a
spare task when none is parked. Measured with the benchmark's floor server
(``bench/floorfs.py``), that costs more than half of the CPU of a warm
``find``: the kernel usually has the next request queued by the time a handler
has replied.

:func:`install` replaces pyfuse3's (private) ``_wait_fuse_readable`` with one
that first asks ``poll(fd, 0)`` whether a request is queued, and if so lets the
calling task read it at once, parking only when nothing is queued. Correctness
rests on two facts:

* pyfuse3 reads the request right after this coroutine returns, with no
  ``await`` in between, so no other task can take the request that ``poll``
  saw;
* a task woken from parking may find that another task took the request
  meanwhile, so it polls again, and parks again if nothing is queued: no task
  ever reads ``/dev/fuse`` with nothing queued (which would block the thread).

Concurrency is kept: a handler that awaits (a read handed to a worker thread)
lets a parked task take the following requests, exactly as before. A trio
checkpoint every few requests keeps signals and other tasks served under a
steady stream of requests.

pyfuse3 exposes no hook for this; :func:`install` checks that the private name
exists and falls back to pyfuse3's own loop (with a log line) if it does not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

log = logging.getLogger(__name__)

#: Requests read back to back between two trio checkpoints.
CHECKPOINT_EVERY = 64


def fuse_fd() -> int | None:
    """The descriptor this process holds on ``/dev/fuse`` (pyfuse3 keeps it private)."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
    return None


def install() -> bool:
    """Patch pyfuse3's request wait (after ``pyfuse3.init``); False if it cannot be."""
    parked: Callable[[], Awaitable[bool]] | None = getattr(pyfuse3, "_wait_fuse_readable", None)
    fd = fuse_fd()
    if parked is None or fd is None:
        log.warning("pyfuse3's request wait cannot be replaced here: using pyfuse3's own loop")
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    served = 0

    async def wait_fuse_readable() -> bool:
        nonlocal served
        served += 1
        if served % CHECKPOINT_EVERY == 0:
            await trio.lowlevel.checkpoint()
        while True:
            if poller.poll(0):
                return True  # the caller reads it now, before any other task runs
            if not await parked():
                return False
            # Woken: another task may have taken the request meanwhile; poll again.

    pyfuse3._wait_fuse_readable = wait_fuse_readable  # type: ignore[attr-defined]
    return True
