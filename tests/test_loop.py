"""noatimefs.loop's reader/spares protocol, driven the way pyfuse3 drives it.

A non-blocking pipe stands in for ``/dev/fuse``: one byte is one request, and
a read of an empty pipe raises ``BlockingIOError``, so a task that reads with
nothing queued (which on ``/dev/fuse`` would block the whole daemon) fails the
test. :func:`session` is pyfuse3's session loop reduced to what the protocol
sees: wait, read one request, run its handler.
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


def start(
    nursery: trio.Nursery, rl: loop.RequestLoop, handle: Handler, log: list[str], n: int
) -> None:
    for _ in range(n):
        nursery.start_soon(session, rl, handle, log)


def test_every_request_is_read_once_by_the_reader(pipe: tuple[int, int]) -> None:
    r, w = pipe
    served: list[bytes] = []
    tasks: set[trio.lowlevel.Task] = set()

    async def handle(request: bytes) -> None:
        served.append(request)
        tasks.add(trio.lowlevel.current_task())

    async def main() -> None:
        rl = loop.RequestLoop(r)
        log: list[str] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                start(nursery, rl, handle, log, 4)
                for burst in (b"abc", b"d", b"efghijklmnopqrstuvwxyz" * 4):
                    os.write(w, burst)
                    # every task blocked: the burst served, the reader parked on the pipe
                    await trio.testing.wait_all_tasks_blocked()
                os.write(w, b"!")
                await trio.testing.wait_all_tasks_blocked()
                rl.close()
                trio.lowlevel.notify_closing(r)
        assert log == ["left"] * 4

    trio.run(main)
    assert b"".join(served) == b"abcd" + b"efghijklmnopqrstuvwxyz" * 4 + b"!"
    assert len(tasks) == 1  # no handler waited: one task served them all


def test_a_handler_that_hands_off_lets_the_next_requests_through(pipe: tuple[int, int]) -> None:
    r, w = pipe
    order: list[str] = []

    async def main() -> None:
        rl = loop.RequestLoop(r)
        release = trio.Event()
        log: list[str] = []

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

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                start(nursery, rl, handle, log, 3)
                os.write(w, b"s123")
                await trio.testing.wait_all_tasks_blocked()
                rl.close()
                trio.lowlevel.notify_closing(r)
        assert rl.hand_offs == 1

    trio.run(main)
    assert order == ["slow waits", "1", "2", "3", "slow done"]


def test_without_a_hand_off_a_waiting_handler_holds_the_next_requests(
    pipe: tuple[int, int],
) -> None:
    """The contract's other side: what hand_off() is for."""
    r, w = pipe
    order: list[str] = []

    async def main() -> None:
        rl = loop.RequestLoop(r)
        log: list[str] = []

        release = trio.Event()

        async def handle(request: bytes) -> None:
            if request == b"s":
                order.append("slow waits")
                await release.wait()
                order.append("slow done")
            else:
                order.append(request.decode())

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                start(nursery, rl, handle, log, 3)
                os.write(w, b"s1")
                await trio.testing.wait_all_tasks_blocked()
                assert order == ["slow waits"]  # "1" waits, queued, behind the slow handler
                release.set()
                await trio.testing.wait_all_tasks_blocked()
                rl.close()
                trio.lowlevel.notify_closing(r)

    trio.run(main)
    assert order == ["slow waits", "slow done", "1"]


def test_the_end_of_the_connection_ends_every_task(pipe: tuple[int, int]) -> None:
    """The kernel ends the connection (unmount): poll reports it, spares leave too."""
    r, w = pipe

    async def main() -> list[str]:
        rl = loop.RequestLoop(r)
        log: list[str] = []

        async def handle(request: bytes) -> None:
            pass

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                start(nursery, rl, handle, log, 3)
                os.write(w, b"xy")
                await trio.testing.wait_all_tasks_blocked()  # both served
                os.close(w)  # POLLHUP on the read end
        return log

    log = trio.run(main)
    assert sorted(log) == ["eof", "left", "left"]


def test_terminate_ends_a_parked_reader_and_the_spares(pipe: tuple[int, int]) -> None:
    r, _ = pipe

    async def main() -> list[str]:
        rl = loop.RequestLoop(r)
        log: list[str] = []

        async def handle(request: bytes) -> None:
            pass

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                start(nursery, rl, handle, log, 3)
                await trio.testing.wait_all_tasks_blocked()  # the reader on the fd, two spares
                rl.close()
                trio.lowlevel.notify_closing(r)  # what pyfuse3.terminate() does
        return log

    assert trio.run(main) == ["left"] * 3


def test_the_reader_stops_spinning_after_a_long_gap(pipe: tuple[int, int]) -> None:
    r, w = pipe

    async def main() -> None:
        rl = loop.RequestLoop(r)
        log: list[str] = []
        seen = trio.Event()

        async def handle(request: bytes) -> None:
            seen.set()

        assert rl.spinning
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                start(nursery, rl, handle, log, 1)
                await trio.testing.wait_all_tasks_blocked()  # the reader parked
                await trio.sleep(0.02)  # a gap far longer than loop.SPIN
                os.write(w, b"x")
                await seen.wait()
                assert not rl.spinning  # an idle mount does not poll
                rl.close()
                trio.lowlevel.notify_closing(r)

    trio.run(main)


def test_a_descriptor_named_with_wake_on_is_served_during_a_stream(pipe: tuple[int, int]) -> None:
    """A queued stream of requests never parks the reader; the watcher still runs early."""
    r, w = pipe
    other_r, other_w = os.pipe2(os.O_NONBLOCK)
    served: list[bytes] = []
    ran_at: list[int] = []

    async def handle(request: bytes) -> None:
        served.append(request)

    async def watcher() -> None:
        await trio.lowlevel.wait_readable(other_r)
        os.read(other_r, 1)
        ran_at.append(len(served))

    async def main() -> None:
        rl = loop.RequestLoop(r)
        rl.wake_on(other_r)
        log: list[str] = []
        os.write(w, b"x" * 500)
        os.write(other_w, b"!")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher)
                start(nursery, rl, handle, log, 1)
                await trio.testing.wait_all_tasks_blocked()
                rl.forget(other_r)
                rl.close()
                trio.lowlevel.notify_closing(r)

    try:
        trio.run(main)
    finally:
        os.close(other_r)
        os.close(other_w)
    assert len(served) == 500
    assert ran_at, "the watcher never ran"
    assert ran_at[0] < 50, ran_at
