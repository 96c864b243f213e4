"""The walk-ahead helper (noatimefs.walkahead), without a mount: what it walks, in what order."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import pytest

from noatimefs import listing, order, readahead, walkahead
from noatimefs.source import COLD, Source, identify, identify_open
from noatimefs.walkahead import WalkAhead, Walker


class Store(NamedTuple):
    src: Path
    fd: int  # SOURCE's root, open
    order: list[bytes]  # SOURCE's top-level names, in the order the daemon serves them


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """Five store paths of 6 entries each: lib/, lib/a, lib/b, bin/, bin/x, a link."""
    src = tmp_path / "store"
    for i in range(5):
        p = src / f"p{i}"
        (p / "lib").mkdir(parents=True)
        (p / "bin").mkdir()
        (p / "lib" / "a").write_bytes(b"a")
        (p / "lib" / "b").write_bytes(b"b")
        (p / "bin" / "x").write_bytes(b"x")
        (p / "link").symlink_to("lib")
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    yield Store(src, fd, order.ordered([os.fsencode(n) for n in os.listdir(src)]))
    os.close(fd)


def _steps(walker: Walker, budget: int) -> list[bytes]:
    """The paths *walker* walks for *budget* entries (as serve() steps it), in order."""
    with mock.patch.object(walker, "walk", wraps=walker.walk) as walk:
        while budget > 0:
            count = walker.step(budget)
            if count is None:
                break
            budget -= count
        return [call.args[0] for call in walk.call_args_list]


def test_a_name_walks_it_then_the_paths_served_after_it(store: Store) -> None:
    served = [entry[0] for entry in listing.list_dir(store.fd, 300.0)]
    assert served == store.order
    walker = Walker(store.fd)
    assert _steps(walker, walker.named(served[2])) == served[2:]
    walker = Walker(store.fd)
    assert _steps(walker, walker.named(b"new-since")) == [b"new-since"]  # alone (and gone)
    walker = Walker(store.fd)
    assert _steps(walker, walker.named(b"/" + served[2])) == [served[2]]  # onward=False


def test_a_name_the_helper_walked_already_goes_on_from_where_it_is(store: Store) -> None:
    """A caller behind the helper: the run is topped up, not stepped through again."""
    order = store.order
    walker = Walker(store.fd)
    assert _steps(walker, walker.named(order[0])) == order  # 30 entries, all within AHEAD
    budget = walker.named(order[1])
    assert budget == walkahead.AHEAD - 4 * 6  # order[1..4] are ahead of the caller already
    assert walker.step(budget) is None  # nothing left, nothing walked again
    assert walker.listed == 30
    walker._walked.clear()  # (as if 30 s had passed)
    assert _steps(walker, walker.named(b"/" + order[3])) == [order[3]]  # alone, run kept
    assert walker.named(order[2]) == walkahead.AHEAD - 3 * 6
    walker = Walker(store.fd)
    walker.named(order[0])
    assert _steps(walker, 6 + 3) == order[:2]  # the second path cut at its budget
    assert walker.cut
    assert _steps(walker, walker.named(order[0])) == order[1:]  # ... walked again, whole


def test_the_helper_orders_as_the_daemon_that_starts_it() -> None:
    """The key goes to the helper in its environment; a fresh interpreter draws another."""
    names = [os.fsencode(f"{i:02d}-pkg") for i in range(40)]
    ours = order.ordered(list(names))
    script = (
        "import sys; from noatimefs import order; order.use_environment(); "
        "names = [n.encode() for n in sys.argv[1:]]; "
        "print(' '.join(n.decode() for n in order.ordered(names)))"
    )
    argv = [sys.executable, "-c", script, *map(os.fsdecode, names)]
    helper = subprocess.run(argv, env=order.environment(), capture_output=True, check=True)
    assert helper.stdout.split() == ours
    env = {k: v for k, v in os.environ.items() if k != order.KEY_VARIABLE}
    other = subprocess.run(argv, env=env, capture_output=True, check=True)
    assert other.stdout.split() != ours  # 40! orders: equal only by a broken key


def test_walk_lists_a_store_path_whole_once(store: Store) -> None:
    walker = Walker(store.fd)
    assert walker.walk(b"p0", 100) == 6
    assert walker.listed == 6
    assert walker.walk(b"p0", 100) == 6  # counted, not walked again
    assert walker.listed == 6


def test_walk_stops_at_its_budget_and_walks_a_cut_tree_again(store: Store) -> None:
    walker = Walker(store.fd)
    assert walker.walk(b"p0", 4) == 4
    assert walker.listed == 4
    assert walker.walk(b"p0", 100) == 6  # not remembered as walked: walked whole now
    assert walker.listed == 10


def test_walk_never_follows_a_symlink_out_of_source(store: Store) -> None:
    src = store.src
    outside = src.parent / "outside"
    (outside / "deep").mkdir(parents=True)
    for i in range(50):
        (outside / "deep" / f"f{i}").write_bytes(b"")
    (src / "p0" / "lib" / "escape").symlink_to(outside)
    (src / "top-link").symlink_to(outside)
    walker = Walker(store.fd)
    assert walker.walk(b"p0", 1000) == 7  # the link itself is listed, not what it names
    assert walker.walk(b"top-link", 1000) == 1
    assert walker.walk(b"../outside", 1000) == 1  # not a name readdir gives, and refused
    assert walker.listed == 7


def test_walk_reads_small_files_ahead_only_while_callers_read_data(store: Store) -> None:
    os.mkfifo(store.src / "p0" / "lib" / "fifo")
    (store.src / "p0" / "lib" / "big").write_bytes(b"x" * (readahead.MAX_FILE + 1))
    walker = Walker(store.fd)
    walker.data_left = 1 << 30
    assert walker.walk(b"p0", 100) == 8
    assert walker.read_ahead == 0  # a walk of metadata only
    walker.read_data()
    assert walker.walk(b"p0", 100) == 8  # walked again, for its data this time
    assert walker.read_ahead == 3  # lib/a, lib/b, bin/x: not the link, the FIFO, the big file
    assert walker.walk(b"p0", 100) == 8
    assert walker.read_ahead == 3  # walked with its data: not again
    walker.data_left = 1
    walker.walk(b"p1", 100)
    assert walker.read_ahead == 4  # within the byte budget: one 1-byte file
    assert walker.data_left == 0


def test_walk_reads_files_inodes_only_alone_or_while_callers_stat_them(store: Store) -> None:
    walker = Walker(store.fd)
    assert walker.walk(b"p0", 100) == 6
    assert walker.inodes_read == 0  # a walk of names: bare listings need no inode
    assert walker.walk(b"p1", 100, alone=True) == 6
    assert walker.inodes_read == 4  # a path opened by name next: lib/a, lib/b, bin/x, link
    walker.read_inodes()
    assert walker.walk(b"p0", 100) == 6  # walked again, for its inodes this time
    assert walker.inodes_read == 8
    assert walker.walk(b"p0", 100) == 6
    assert walker.inodes_read == 8  # walked with its inodes: not again


def test_serve_reads_inodes_once_told_callers_stat_files(store: Store) -> None:
    walker = Walker(store.fd)
    r, w = os.pipe()
    os.write(w, walkahead.INODES + b"\0" + store.order[1] + b"\0")  # want(name, inodes=True)
    os.close(w)
    walkahead.serve(walker, r)
    os.close(r)
    assert walker.inodes_read == 4


def test_serve_walks_from_the_newest_name_until_the_pipe_closes(
    store: Store,
) -> None:
    order = store.order
    walker = Walker(store.fd)
    r, w = os.pipe()
    os.write(w, order[0] + b"\0" + order[3] + b"\0")
    os.close(w)
    walkahead.serve(walker, r)  # returns: the pipe ended
    os.close(r)
    # order[3] was the newest name; the end of the pipe was seen after its first path.
    assert set(walker._walked) == {order[3]}
    assert walker.listed == 6


def test_serve_reads_data_ahead_once_told_callers_read_data(store: Store) -> None:
    walker = Walker(store.fd)
    r, w = os.pipe()
    os.write(w, walkahead.DATA + b"\0/" + store.order[1] + b"\0")  # want(name, False, data=True)
    os.close(w)
    walkahead.serve(walker, r)
    os.close(r)
    assert set(walker._walked) == {store.order[1]}
    assert walker.read_ahead == 3


def test_names_keeps_a_partial_name_for_the_next_read() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.write(w, b"ab\0cd")
    assert walkahead._names(r, b"") == ([b"ab"], b"cd", False)
    os.write(w, b"e\0")
    assert walkahead._names(r, b"cd") == ([b"cde"], b"", False)
    assert walkahead._names(r, b"") == ([], b"", False)  # nothing to read: not the end
    os.close(w)
    assert walkahead._names(r, b"") == ([], b"", True)
    os.close(r)


def test_the_helper_starts_on_first_use_and_ends_with_its_pipe(store: Store) -> None:
    ahead = WalkAhead(store.fd)
    assert ahead._helper is None  # nothing started before a walk is asked for
    ahead.want(b"p0")
    helper = ahead._helper
    assert helper is not None
    assert helper.poll() is None  # running
    assert ahead.named == 1
    ahead.close()
    assert helper.returncode == 0  # ended by the closed pipe, not killed


def test_the_helper_ends_when_the_daemon_dies(store: Store) -> None:
    ahead = WalkAhead(store.fd)
    ahead.want(b"p0")
    helper = ahead._helper
    assert helper is not None
    assert helper.stdin is not None
    helper.stdin.close()  # what the kernel does to the pipe of a daemon that died
    deadline = time.monotonic() + 20
    while helper.poll() is None:
        assert time.monotonic() < deadline, "the helper outlived its daemon"
        time.sleep(0.01)
    assert helper.returncode == 0


def test_a_dead_helper_is_done_without_not_restarted(store: Store) -> None:
    ahead = WalkAhead(store.fd)
    ahead.want(store.order[0])
    helper = ahead._helper
    assert helper is not None
    helper.kill()
    helper.wait()
    ahead.want(store.order[1])  # the broken pipe is noticed: no exception reaches the daemon
    ahead.want(store.order[2])
    assert (ahead.named, ahead.dropped, ahead.pid) == (1, 2, None)


def test_source_tells_a_name_it_must_look_up_on_disk(tmp_path: Path) -> None:
    (tmp_path / "seen").mkdir()
    source = Source(str(tmp_path))
    try:
        assert source.in_memory(b"seen")
        assert not source.in_memory(b"never-looked-up")  # no dentry: the lookup reads the disk
        assert not (tmp_path / "never-looked-up").exists()  # leaves a negative dentry
        assert source.in_memory(b"never-looked-up")
        # What a lookup at the top level uses: the probe's own descriptor, when it has one.
        fd = source.open_cached(b"seen")
        assert fd >= 0
        assert identify_open(fd) == identify(source.root_fd, b"seen")
        assert source.open_cached(b"also-never-looked-up") == COLD
        assert source.open_cached(b"never-looked-up") == -errno.ENOENT
    finally:
        source.close()


def test_the_helper_walks_ahead_in_the_order_the_walk_goes(tmp_path: Path) -> None:
    """GNU find sorts a directory of more than 10,000 entries by inode number before it
    visits them: a walk of a big top level names store paths in inode order, not served
    order. Two names a step apart in one order, and not in the other, switch the helper to
    it; its run then goes on in that order."""
    src = tmp_path / "store"
    for i in range(40):
        (src / f"p{i:02d}").mkdir(parents=True)
    by_inode = [os.fsencode(p.name) for p in sorted(src.iterdir(), key=lambda p: p.stat().st_ino)]
    served = order.ordered(list(by_inode))
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walker = Walker(fd)
        assert walker.order == walkahead.SERVED
        # An inode-order step that goes back in served order: the walk is in inode order.
        i = next(i for i in range(39) if served.index(by_inode[i + 1]) < served.index(by_inode[i]))
        walker.follow(by_inode[i])
        walker.follow(by_inode[i + 1])
        assert (walker.order, walker.switched) == (walkahead.INODE, 1)
        assert _steps(walker, walker.named(by_inode[i + 1])) == by_inode[i + 1 :]
        walker.follow(by_inode[i + 2])  # on in the same order: no change
        assert walker.switched == 1
        # A served-order step that goes back in inode order: back to served order.
        j = next(j for j in range(39) if by_inode.index(served[j + 1]) < by_inode.index(served[j]))
        walker.follow(served[j])
        walker.follow(served[j + 1])
        assert (walker.order, walker.switched) == (walkahead.SERVED, 2)
        assert _steps(walker, walker.named(served[j + 1])) == served[j + 1 :]
        walker.follow(b"new-since")  # not in the top level as listed: no vote
        assert walker.order == walkahead.SERVED
    finally:
        os.close(fd)
