"""noatimefs.loop's reader/spares protocol, driven the way pyfuse3 drives it.

A non-blocking pipe stands in for ``/dev/fuse``: one byte is one request, and
a read of an empty pipe raises ``BlockingIOError``, so a task that reads with
nothing queued (which on ``/dev/fuse`` would block the whole daemon) fails the
test. :func:`session` is pyfuse3's session loop reduced to what the protocol
sees: wait, read one request, run its handler; :func:`serve` runs a few of
them beside a test's script.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing

from noatimefs import loop

Handler = Callable[[bytes], Awaitable[None]]
Script = Callable[[trio.Nursery], Awaitable[None]]


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe2(os.O_NONBLOCK)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


async def session(rl: loop.RequestLoop, handle: Handler, log: list[str]) -> None:
    while await rl.wait_fuse_readable():
        request = os.read(rl.fd, 1)  # BlockingIOError: read with nothing queued
        if not request:
            log.append("eof")
            return
        await handle(request)
    log.append("left")


async def ignore(request: bytes) -> None:
    """A handler with nothing to do."""


def stop(rl: loop.RequestLoop) -> None:
    """What :func:`noatimefs.loop.terminate` does, pyfuse3's part being ``notify_closing``."""
    rl.close()
    trio.lowlevel.notify_closing(rl.fd)


def serve(rl: loop.RequestLoop, handle: Handler, tasks: int, script: Script) -> list[str]:
    """Run *tasks* sessions on *rl* while *script* runs; how each session ended."""
    log: list[str] = []

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(tasks):
                    nursery.start_soon(session, rl, handle, log)
                await script(nursery)

    trio.run(main)
    return log


def test_every_request_is_read_once_by_the_reader(pipe: tuple[int, int]) -> None:
    r, w = pipe
    rl = loop.RequestLoop(r)
    served: list[bytes] = []
    tasks: set[trio.lowlevel.Task] = set()

    async def handle(request: bytes) -> None:
        served.append(request)
        tasks.add(trio.lowlevel.current_task())

    async def script(_: trio.Nursery) -> None:
        for burst in (b"abc", b"d", b"efghijklmnopqrstuvwxyz" * 4, b"!"):
            os.write(w, burst)
            # every task blocked: the burst served, the reader parked on the pipe
            await trio.testing.wait_all_tasks_blocked()
        stop(rl)

    assert serve(rl, handle, 4, script) == ["left"] * 4
    assert b"".join(served) == b"abcd" + b"efghijklmnopqrstuvwxyz" * 4 + b"!"
    assert len(tasks) == 1  # no handler waited: one task served them all


def test_a_handler_that_hands_off_lets_the_next_requests_through(pipe: tuple[int, int]) -> None:
    r, w = pipe
    rl = loop.RequestLoop(r)
    release = trio.Event()
    order: list[str] = []

    async def handle(request: bytes) -> None:
        if request == b"s":  # slow: waits on something that is not a request
            rl.hand_off()
            order.append("slow waits")
            await release.wait()
            order.append("slow done")
        else:
            order.append(request.decode())
            if request == b"3":
                release.set()

    async def script(_: trio.Nursery) -> None:
        os.write(w, b"s123")
        await trio.testing.wait_all_tasks_blocked()
        stop(rl)

    serve(rl, handle, 3, script)
    assert rl.hand_offs == 1
    assert order == ["slow waits", "1", "2", "3", "slow done"]


def test_without_a_hand_off_a_waiting_handler_holds_the_next_requests(
    pipe: tuple[int, int],
) -> None:
    """The contract's other side: what hand_off() is for."""
    r, w = pipe
    rl = loop.RequestLoop(r)
    release = trio.Event()
    order: list[str] = []

    async def handle(request: bytes) -> None:
        if request == b"s":
            order.append("slow waits")
            await release.wait()
            order.append("slow done")
        else:
            order.append(request.decode())

    async def script(_: trio.Nursery) -> None:
        os.write(w, b"s1")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["slow waits"]  # "1" waits, queued, behind the slow handler
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        stop(rl)

    serve(rl, handle, 3, script)
    assert order == ["slow waits", "slow done", "1"]


def test_the_end_of_the_connection_ends_every_task(pipe: tuple[int, int]) -> None:
    """The kernel ends the connection (unmount): poll reports it, spares leave too."""
    r, w = pipe

    async def script(_: trio.Nursery) -> None:
        os.write(w, b"xy")
        await trio.testing.wait_all_tasks_blocked()  # both served
        os.close(w)  # POLLHUP on the read end

    assert sorted(serve(loop.RequestLoop(r), ignore, 3, script)) == ["eof", "left", "left"]


def test_terminate_ends_a_parked_reader_and_the_spares(pipe: tuple[int, int]) -> None:
    rl = loop.RequestLoop(pipe[0])

    async def script(_: trio.Nursery) -> None:
        await trio.testing.wait_all_tasks_blocked()  # the reader on the fd, two spares
        stop(rl)

    assert serve(rl, ignore, 3, script) == ["left"] * 3


def test_the_reader_stops_spinning_after_a_long_gap(pipe: tuple[int, int]) -> None:
    r, w = pipe
    rl = loop.RequestLoop(r)
    seen = trio.Event()

    async def handle(request: bytes) -> None:
        seen.set()

    async def script(_: trio.Nursery) -> None:
        await trio.testing.wait_all_tasks_blocked()  # the reader parked
        await trio.sleep(0.02)  # a gap far longer than loop.SPIN
        os.write(w, b"x")
        await seen.wait()
        assert not rl.spinning  # an idle mount does not poll
        stop(rl)

    assert rl.spinning
    serve(rl, handle, 1, script)


def test_a_descriptor_named_with_wake_on_is_served_during_a_stream(pipe: tuple[int, int]) -> None:
    """A queued stream of requests never parks the reader; the watcher still runs early."""
    r, w = pipe
    other_r, other_w = os.pipe2(os.O_NONBLOCK)
    rl = loop.RequestLoop(r)
    rl.wake_on(other_r)
    served: list[bytes] = []
    ran_at: list[int] = []

    async def handle(request: bytes) -> None:
        served.append(request)

    async def watcher() -> None:
        await trio.lowlevel.wait_readable(other_r)
        os.read(other_r, 1)
        ran_at.append(len(served))

    async def script(nursery: trio.Nursery) -> None:
        nursery.start_soon(watcher)
        await trio.testing.wait_all_tasks_blocked()
        rl.forget(other_r)
        stop(rl)

    os.write(w, b"x" * 500)
    os.write(other_w, b"!")
    try:
        serve(rl, handle, 1, script)
    finally:
        os.close(other_r)
        os.close(other_w)
    assert len(served) == 500
    assert ran_at, "the watcher never ran"
    assert ran_at[0] < 50, ran_at
