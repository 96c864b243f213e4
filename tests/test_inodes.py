"""The inode table's decisions, without a mount: identities, node ids, generations."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio

import noatimefs.fs as fsmod
from noatimefs import policy
from noatimefs.inodes import ROOT_ID, SETTLE_NS, Identity, InodeTable, Node, clock, settled
from noatimefs.source import Source, identify, incarnation
from noatimefs.views import View

REG = stat.S_IFREG | 0o444
LNK = stat.S_IFLNK | 0o777
DIR = stat.S_IFDIR | 0o555
SPILL = 1 << 63


@pytest.fixture
def table(tmp_path: Path) -> InodeTable:
    st = os.stat(tmp_path)
    return InodeTable(st, View(policy.Consumer(0, frozenset(), 0), tag=0), b"root")


def dev(table: InodeTable) -> int:
    return table.root.key[0]


def remember(
    table: InodeTable, name: bytes, key: Identity, mode: int = REG, ctime: int = 1
) -> Node:
    return table.remember_key(table.root, name, key, mode, ctime)


def test_a_recycled_number_is_another_node_while_the_old_one_is_remembered(
    table: InodeTable,
) -> None:
    old = remember(table, b"l1", (dev(table), 77, b"gen-1"), LNK)
    assert old.id == 77  # the preferred id: SOURCE's own inode number
    new = remember(table, b"l2", (dev(table), 77, b"gen-2"), LNK)
    assert new.id >= SPILL
    assert new is not old
    # the old node keeps its name: its requests go to the old path, never to l2
    assert (old.name, new.name) == (b"l1", b"l2")
    assert table.get(77) is old
    # looked up again, each incarnation finds its own node
    assert remember(table, b"l1", (dev(table), 77, b"gen-1"), LNK) is old
    assert remember(table, b"l2", (dev(table), 77, b"gen-2"), LNK) is new


def test_the_preferred_id_is_free_again_once_forgotten(table: InodeTable) -> None:
    old = remember(table, b"a", (dev(table), 9, b"x"))
    new = remember(table, b"b", (dev(table), 9, b"y"))
    table.forget(old.id, 1)
    assert table.get(new.id) is new  # the new file keeps its spill id while remembered
    table.forget(new.id, 1)
    again = remember(table, b"b", (dev(table), 9, b"y"))
    assert again.id == 9
    assert len(table) == 2  # root and b


def test_peek_gives_what_remember_will_give_and_changes_nothing(table: InodeTable) -> None:
    remember(table, b"a", (dev(table), 5, b"x"))
    key = (dev(table), 5, b"y")
    before = len(table)
    peeked = table.peek(key, REG, 1)
    assert table.peek(key, REG, 1) == peeked  # nothing taken by a peek
    assert table.node_id(key) == peeked[0]
    assert len(table) == before
    node = remember(table, b"b", key)
    assert (node.id, node.gen) == peeked
    assert table.peek((dev(table), 6, b"z"), REG, 1) == (6, 0)


def test_remember_takes_the_id_a_peek_gave(table: InodeTable) -> None:
    """readdir passes on the id it peeked: a preferred one is taken as it is, a spill id
    is worked out (and taken) again, so the next spill id is another."""
    key = (dev(table), 8, b"x")
    peeked, _ = table.peek(key, REG, 1)
    assert table.remember_key(table.root, b"a", key, REG, 1, peeked).id == peeked == 8
    again = (dev(table), 8, b"y")  # a recycled number: a spill id
    peeked, _ = table.peek(again, REG, 1)
    node = table.remember_key(table.root, b"b", again, REG, 1, peeked)
    assert node.id == peeked >= SPILL
    assert remember(table, b"c", (dev(table), 8, b"z")).id == peeked + 1


def test_spill_ids_are_never_reused(table: InodeTable) -> None:
    remember(table, b"a", (dev(table), 5, b"x"))
    first = remember(table, b"b", (dev(table), 5, b"y"))
    table.forget(first.id, 1)
    second = remember(table, b"c", (dev(table), 5, b"z"))
    assert SPILL <= first.id < second.id


def test_identities_no_preferred_id_can_hold_keep_one_spill_id(table: InodeTable) -> None:
    huge = (dev(table), 1 << 50, b"x")
    node = remember(table, b"h", huge)
    assert node.id >= SPILL
    table.forget(node.id, 1)
    assert remember(table, b"h", huge).id == node.id  # for the daemon's life
    one = remember(table, b"one", (dev(table), 1, b"x"))  # would be the root's id
    assert one.id >= SPILL
    assert one.id != node.id


def test_another_device_gets_the_next_tag(table: InodeTable) -> None:
    node = remember(table, b"m", (dev(table) + 1, 5, b"x"), DIR)
    assert node.id == (1 << 48) | 5
    assert table.preferred_id(table.tag_key(node.key, 0), 5) == node.id
    # Another view numbers its own tags: the same backing file is another node id there.
    assert table.preferred_id(table.tag_key(node.key, 3), 5) == (2 << 48) | 5


def test_a_bare_entry_lists_the_id_its_lookup_gives(table: InodeTable) -> None:
    """listed_ino: the preferred id (SOURCE's number with one view), whatever the
    incarnation turns out to be; another device's tag, another view's tags; the
    number itself where no preferred id can be."""
    bare = (dev(table), 42, None)
    assert table.listed_ino(bare) == 42 == remember(table, b"f", (dev(table), 42, b"x")).id
    other = (dev(table) + 1, 42, None)
    assert table.listed_ino(other) == (1 << 48) | 42
    assert remember(table, b"g", (dev(table) + 1, 42, b"x")).id == table.listed_ino(other)
    assert table.listed_ino(bare, 3) == table.preferred_id(table.tag_key(bare, 3), 42)
    assert table.listed_ino((dev(table), 1 << 50, None)) == 1 << 50
    assert len(table) == 3  # root, f, g: listing changed nothing


def test_root_is_one_and_never_forgotten(table: InodeTable) -> None:
    assert table.node_id(table.root.key) == ROOT_ID
    table.forget(ROOT_ID, 10)
    assert table.get(ROOT_ID) is table.root


def test_without_incarnation_a_new_ctime_bumps_the_generation(table: InodeTable) -> None:
    """The fallback: the same identity, told apart only by its ctime or type."""
    key = (dev(table), 12, None)
    node = remember(table, b"l1", key, LNK, ctime=100)
    assert table.peek(key, LNK, 200) == (12, 1)
    again = remember(table, b"l2", key, LNK, ctime=200)
    assert again is node
    assert node.gen == 1
    assert node.name == b"l2"
    assert remember(table, b"l2", key, LNK, ctime=150).gen == 1  # older news: nothing
    assert remember(table, b"l2", key, REG, ctime=150).gen == 2  # another type


def test_a_new_ctime_of_the_same_incarnation_drops_cached_pages(table: InodeTable) -> None:
    """A file changed in place keeps its node, with a new generation (the kernel drops pages)."""
    node = remember(table, b"f", (dev(table), 3, b"x"), REG, ctime=1)
    node.opens = 1
    assert not table.refresh_from(node, REG, 2)  # not while open
    node.opens = 0
    assert table.refresh_from(node, REG, 3)
    assert node.gen == 1
    assert node.id == 3


def test_identify_tells_a_recycled_number_apart(tmp_path: Path) -> None:
    """A real filesystem: a new file with the old one's inode number has another incarnation."""
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        os.symlink("T1", tmp_path / "l1")
        st1, inc1 = identify(fd, b"l1")
        if inc1 is None:
            pytest.skip("this filesystem gives no file handles")
        assert inc1 == incarnation(fd, b"l1")
        link = os.open("l1", os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
        try:
            assert incarnation(link) == inc1  # by descriptor, the symlink itself
        finally:
            os.close(link)
        for i in range(2, 200):
            os.unlink(tmp_path / f"l{i - 1}")
            os.symlink(f"T{i}", tmp_path / f"l{i}")
            st, inc = identify(fd, b"l%d" % i)
            if st.st_ino == st1.st_ino:
                assert inc != inc1
                break
        else:
            pytest.skip("this filesystem did not reuse the inode number")
    finally:
        os.close(fd)


def test_identify_missing_name_raises(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileNotFoundError):
            identify(fd, b"nope")
    finally:
        os.close(fd)


# -- in the daemon, without a mount ----------------------------------------


def _reuse_number(d: Path, old: str, new: str) -> bool:
    """Replace *old* by a new file *new*; whether it got the old inode number."""
    ino = (d / old).stat().st_ino
    (d / old).unlink()
    (d / new).write_bytes(b"new")
    return (d / new).stat().st_ino == ino


class _Root:
    """A request's context: root, in this process."""

    uid = gid = 0
    pid = os.getpid()
    umask = 0o022


def _daemon(src: Path) -> tuple[Source, fsmod.NoatimeFS]:
    """SOURCE *src* and a daemon over it, presented to root (close both)."""
    source = Source(str(src))
    return source, fsmod.NoatimeFS(source, policy.Consumer(0, frozenset({0}), 0), daemon_uid=0)


def _identify_without_handle(fd: int) -> tuple[os.stat_result, None]:
    try:
        return os.fstat(fd), None
    finally:
        os.close(fd)


@pytest.mark.parametrize("handles", [True, False], ids=["handles", "no-handles"])
def test_daemon_gives_a_recycled_number_another_node_or_a_new_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handles: bool
) -> None:
    if not handles:  # a filesystem without file handles: the ctime heuristic alone
        monkeypatch.setattr(fsmod, "incarnation", lambda fd, name=b"": None)
        monkeypatch.setattr(
            fsmod,
            "identify",
            lambda dirfd, name: (os.stat(name, dir_fd=dirfd, follow_symlinks=False), None),
        )
        monkeypatch.setattr(fsmod, "identify_open", _identify_without_handle)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(b"old")
    source, ops = _daemon(src)

    async def lookup(parent: int, name: bytes) -> tuple[int, int]:
        attr = await ops.lookup(parent, name, _Root())  # type: ignore[arg-type]
        return attr.st_ino, attr.generation

    async def main() -> None:
        d, _ = await lookup(ROOT_ID, b"d")
        a, a_gen = await lookup(d, b"a")
        assert (ops.inodes.get(a).key[2] is None) is not handles
        if not _reuse_number(src / "d", "a", "b"):
            pytest.skip("this filesystem did not reuse the inode number")
        b, b_gen = await lookup(d, b"b")
        if handles:
            assert b != a  # another node: the old one still answers for a, gone
            assert ops.inodes.get(a).name == b"a"
            with pytest.raises(pyfuse3.FUSEError):
                await ops.getattr(a, _Root())  # type: ignore[arg-type]
        else:
            assert (b, b_gen) == (a, a_gen + 1)  # the same node, a new generation
            assert ops.inodes.get(a).name == b"b"

    try:
        trio.run(main)
    finally:
        ops.close()
        source.close()


# -- settled files: the incarnation not asked again ---------------------------


def test_settled_needs_a_ctime_two_seconds_older_than_the_clock() -> None:
    now = 1_700_000_000_000_000_000
    assert settled(now - SETTLE_NS, now)
    assert settled(now - 3 * SETTLE_NS, now)
    assert not settled(now - SETTLE_NS + 1, now)
    assert not settled(now, now)
    assert not settled(now + SETTLE_NS, now)  # a ctime in the future (a clock set back)


def _stat(ino: int, device: int, ctime_ns: int) -> os.stat_result:
    return os.stat_result((REG, ino, device, 1, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, ctime_ns))


def test_a_node_is_settled_as_its_number_with_the_settled_ctime(table: InodeTable) -> None:
    node = remember(table, b"f", (dev(table), 3, b"x"), REG, ctime=5)
    st = _stat(3, dev(table), 5)
    assert not node.is_settled_as(st)  # never seen yet
    node.seen(5, 5 + SETTLE_NS - 1)
    assert not node.is_settled_as(st)  # seen, but too recent a ctime
    node.seen(5, 5 + SETTLE_NS)
    assert node.is_settled_as(st)
    others = (_stat(3, dev(table), 6), _stat(4, dev(table), 5), _stat(3, dev(table) + 1, 5))
    assert not any(map(node.is_settled_as, others))  # another ctime, number or device


def _reuse_dir_number(d: Path, old: str, tries: int = 300) -> bool:
    """Replace directory *old* by a new one that got its inode number; whether one did."""
    ino = (d / old).stat().st_ino
    (d / old).rmdir()
    made = []
    for i in range(tries):
        made.append(d / f"candidate{i}")
        made[-1].mkdir()
        if made[-1].stat().st_ino == ino:
            made.pop().rename(d / old)
            break
    for m in made:
        m.rmdir()
    return (d / old).exists()


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_settled_file_is_not_asked_its_incarnation_but_a_recycled_number_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """In the daemon: the clock moved on (patched), so the file is settled; its
    replacement under the same inode number has another ctime and is caught. (For a
    file a new ctime alone means ESTALE; a directory's changes with its entries.)"""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    if kind == "dir":
        (src / "d" / "a").mkdir()
    else:
        (src / "d" / "a").write_bytes(b"old")
    asked: list[int] = []

    def counted(fd: int, name: bytes = b"") -> bytes | None:
        asked.append(fd)
        return incarnation(fd, name)

    later = clock() + 10 * SETTLE_NS
    monkeypatch.setattr(fsmod, "clock", lambda: later)
    monkeypatch.setattr(fsmod, "incarnation", counted)
    source, ops = _daemon(src)

    async def open_close(node_id: int) -> None:
        if kind == "dir":
            fh = await ops.opendir(node_id, _Root())  # type: ignore[arg-type]
            await ops.releasedir(fh)
        else:
            info = await ops.open(node_id, os.O_RDONLY, _Root())  # type: ignore[arg-type]
            await ops.release(info.fh)

    async def main() -> None:
        d = (await ops.lookup(ROOT_ID, b"d", _Root())).st_ino  # type: ignore[arg-type]
        a = (await ops.lookup(d, b"a", _Root())).st_ino  # type: ignore[arg-type]
        if ops.inodes.get(a).key[2] is None:
            pytest.skip("this filesystem gives no file handles")
        assert ops.inodes.get(a).settled == (src / "d" / "a").stat().st_ctime_ns
        asked.clear()
        for _ in range(3):
            await open_close(a)
        assert asked == []  # checked by inode number and settled ctime alone
        assert ops.stats.checks_settled == 1 + 3  # d, at the lookup of a in it; a three times
        if kind == "dir":
            reused = _reuse_dir_number(src / "d", "a")
        elif reused := _reuse_number(src / "d", "a", "a.new"):
            os.rename(src / "d" / "a.new", src / "d" / "a")  # where the old one was
        if not reused:
            pytest.skip("this filesystem did not reuse the inode number")
        with pytest.raises(pyfuse3.FUSEError) as err:
            await open_close(a)
        assert err.value.errno == errno.ESTALE
        assert len(asked) == 1

    try:
        trio.run(main)
    finally:
        ops.close()
        source.close()
