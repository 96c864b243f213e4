"""A file replaced by a new one that gets its inode number: never the other file's answer.

ext4 hands a freed inode number to the next new file at once; xfs to one of the
next few hundred (the test makes candidates until one gets it); tmpfs and
btrfs number new files from a counter and never do, and the test skips there,
saying so. Each round:

1. SOURCE/d/o<r> is created (a symlink, a regular file, or a directory with one
   entry), and a reader caches it through the mount: a symlink or directory is
   held by a descriptor (``O_PATH``, ``O_DIRECTORY``), a file by its cached name;
2. it is removed in SOURCE, and a prober thread starts asking for it through
   what the reader holds (``readlink`` of the held symlink, ``open`` + ``read``
   of the cached name, listing the held directory and looking up in it);
3. a new file of the same kind that got the old inode number is put at a new
   name n<r> or (every other round) at the old name (candidates are made
   under other names until one gets it, :data:`TRIES` at most);
4. the reader looks the new file up through the mount and reads it, while the
   prober still asks (every request the kernel had in flight when the daemon
   answered the lookup is one more chance for a wrong answer).

In the *settled* variant every round's old file is made before the mount and
has aged past :data:`noatimefs.inodes.SETTLE_NS` before the reader looks it up,
so the daemon checks it by inode number and ctime alone (no file handle) until
the new file comes: then the new ctime must send it to the full check.

Every answer the prober gets for what it holds must be the old file's content,
or the new file's when the new one took the old *name* and the prober asks by
name, or an error (``ENOENT``, ``ESTALE``, ``EIO``); never the other file's,
and never a mix. The reader's answers for the new name must be the new file's.
Before node ids included the file's incarnation, held directories listed the
new directory, and a held symlink could read the new link's text.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import util

from noatimefs.inodes import SETTLE_NS, clock

pytestmark = pytest.mark.mount

ROUNDS = 40
ROUNDS_SLOW = 400
KINDS = ("symlink", "file", "dir")
FILESYSTEMS = ("ext4", "xfs", "tmpfs", "btrfs")
#: New files made at most, per round, to get the old file's inode number.
TRIES = 300
#: Errors an answer about a file gone from SOURCE may be.
GONE = (errno.ENOENT, errno.ESTALE, errno.EIO)


@pytest.fixture(params=FILESYSTEMS)
def fs_src(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    with (
        util.world_tmpdir("noatimefs-recycled-") as base,
        util.scratch_fs(base, request.param) as src,
    ):
        yield request.param, src


def content(kind: str, tag: str) -> bytes:
    """What file *tag* ("A7": round 7's old file, "B7": its new one) answers: link text, bytes, or
    its one entry's name."""
    if kind == "file":
        return f"{tag}:".encode() * 3000  # several pages: a mix would show
    return f"T-{tag}".encode()


def make(kind: str, path: Path, tag: str) -> None:
    if kind == "symlink":
        os.symlink(content(kind, tag), path)
    elif kind == "file":
        path.write_bytes(content(kind, tag))
    else:
        path.mkdir()
        (path / content(kind, tag).decode()).write_bytes(b"")


def remove(kind: str, path: Path) -> None:
    if kind == "dir":
        shutil.rmtree(path)
    else:
        path.unlink()


def make_reusing(kind: str, d: Path, name: str, tag: str, ino: int) -> bool:
    """Put file *tag* at *d*/*name*, made under other names until one gets inode *ino*.

    Whether one did (the others are removed again).
    """
    others = []
    try:
        for k in range(TRIES):
            candidate = d / f".c{k}"
            make(kind, candidate, tag)
            if os.lstat(candidate).st_ino == ino:
                candidate.rename(d / name)
                return True
            others.append(candidate)
        return False
    finally:
        for candidate in others:
            remove(kind, candidate)


def answer(ask: Callable[[], bytes]) -> bytes | int:
    try:
        return ask()
    except OSError as e:
        return e.errno or -1


def read_new(kind: str, path: Path) -> bytes:
    """The reader's answer for the new file, by its name."""
    if kind == "symlink":
        return os.readlink(path).encode()
    if kind == "file":
        return path.read_bytes()
    return repr(sorted(os.listdir(path))).encode()


def new_expected(kind: str, tag: str) -> bytes:
    if kind == "dir":
        return repr([content(kind, tag).decode()]).encode()
    return content(kind, tag)


def probe_expected(kind: str, tag: str) -> bytes:
    """The prober's answer when it sees file *tag*."""
    if kind != "dir":
        return content(kind, tag)
    name = content(kind, tag).decode()
    return repr([name, "found:" + name]).encode()


def prober_for(kind: str, path: Path, held: int | None, r: int) -> Callable[[], bytes]:
    """What the prober asks for the old file, through what the reader holds."""
    if kind == "symlink":
        return lambda: os.readlink(b"", dir_fd=held)
    if kind == "file":
        return path.read_bytes  # by the cached name

    def listing() -> bytes:
        names = sorted(os.listdir(path))  # a new opendir, by the cached name
        for tag in (f"A{r}", f"B{r}"):
            try:
                os.stat(path / content(kind, tag).decode())
                names.append("found:" + content(kind, tag).decode())
            except FileNotFoundError:
                pass
        return repr(names).encode()

    return listing


@dataclass
class Tally:
    rounds: int = 0
    recycled: int = 0
    probes: int = 0
    probes_after_lookup: int = 0
    wrong: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)


class Prober(threading.Thread):
    """Asks *ask* again and again until stopped; keeps every answer."""

    def __init__(self, ask: Callable[[], bytes]) -> None:
        super().__init__(daemon=True)
        self.ask = ask
        self.stop = threading.Event()
        self.looked_up = threading.Event()
        self.answers: list[tuple[bool, bytes | int]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            self.answers.append((self.looked_up.is_set(), answer(self.ask)))


def one_round(kind: str, src: Path, mnt: Path, r: int, tally: Tally, made: bool = False) -> None:
    """One round; *made*: the old file is there already (the settled variant)."""
    d, md = src / "d", mnt / "d"
    same_name = r % 2 == 1
    old, new = f"o{r}", (f"o{r}" if same_name else f"n{r}")
    if not made:
        make(kind, d / old, f"A{r}")
    ino = os.lstat(d / old).st_ino
    # 1. the reader caches the old file
    held: int | None = None
    if kind == "symlink":
        assert os.readlink(md / old) == content(kind, f"A{r}").decode()
        held = os.open(md / old, os.O_PATH | os.O_NOFOLLOW)
    elif kind == "file":
        os.stat(md / old)  # the name and inode cached, not the pages: a read goes to the daemon
        if made:
            os.close(os.open(md / old, os.O_RDONLY))  # an open checks it (settled: no handle)
    else:
        # The name and inode cached, nothing held open: a directory open through the
        # mount is open in the daemon too, which keeps SOURCE's directory (and its
        # number) alive for as long.
        assert os.listdir(md / old) == [content(kind, f"A{r}").decode()]
    prober = Prober(prober_for(kind, md / old, held, r))
    try:
        # 2. gone from SOURCE; the prober asks
        remove(kind, d / old)
        prober.start()
        try:
            # 3. a new file of the same kind with the old number
            tally.rounds += 1
            if make_reusing(kind, d, new, f"B{r}", ino):
                tally.recycled += 1
                # 4. the reader looks the new file up and reads it
                prober.looked_up.set()
                for _ in range(3):
                    got = answer(lambda: read_new(kind, md / new))
                    if got != new_expected(kind, f"B{r}"):
                        tally.wrong.append(f"{kind} round {r}: new name {new}: {got!r:.80}")
        finally:
            prober.stop.set()
            prober.join()
    finally:
        if held is not None:
            os.close(held)
    if not prober.looked_up.is_set():
        return
    remove(kind, d / new)
    allowed = {probe_expected(kind, f"A{r}"): "old"}
    if same_name and kind != "symlink":  # asked by name: the new file took the name
        allowed[probe_expected(kind, f"B{r}")] = "new"
    tally.probes += len(prober.answers)
    for after, got in prober.answers:
        tally.probes_after_lookup += after
        if isinstance(got, int):
            tally.answers[errno.errorcode.get(got, str(got))] += 1
            if got not in GONE:
                tally.wrong.append(f"{kind} round {r}: held {old}: {os.strerror(got)}")
        elif got in allowed:
            tally.answers[allowed[got]] += 1
        else:
            tally.wrong.append(f"{kind} round {r}: held {old}, same name {same_name}: {got!r:.80}")


def _wait_settled(path: Path) -> None:
    """Until *path*'s ctime is settled by the kernel's clock (at most 2 s from now)."""
    settled_at = os.lstat(path).st_ctime_ns + SETTLE_NS
    while clock() < settled_at:
        time.sleep((settled_at - clock()) / 1e9 + 0.01)  # time itself is the condition


def run_rounds(
    fs_src: tuple[str, Path], kind: str, timeout: str | None, rounds: int, settled: bool = False
) -> None:
    fstype, src = fs_src
    (src / "d").mkdir()
    args = ("--timeout", timeout) if timeout else ()
    tally = Tally()
    if settled:
        for r in range(rounds):
            make(kind, src / "d" / f"o{r}", f"A{r}")
        _wait_settled(src / "d" / f"o{rounds - 1}")
    with util.mounted(src, None, *args) as m:
        for r in range(rounds):
            one_round(kind, src, m.path, r, tally, made=settled)
            if r == 9 and tally.recycled == 0:
                break  # this filesystem does not reuse numbers: nothing to test
        assert m.proc.poll() is None, "the daemon died:\n" + m.describe()
        status = m.status()
    row = {
        "fs": fstype,
        "kind": kind,
        "timeout": timeout or "default",
        "settled": settled,
        "settled checks": status["checks_settled"],
        "rounds": tally.rounds,
        "recycled": tally.recycled,
        "probes": tally.probes,
        "probes after the new lookup": tally.probes_after_lookup,
        "answers": dict(tally.answers),
        "wrong": len(tally.wrong),
        "inodes": status["inodes"],
    }
    util.trust_figures("recycled inode number", row)
    print(row)
    assert not tally.wrong, f"{len(tally.wrong)} wrong answers:\n" + "\n".join(tally.wrong[:20])
    if tally.recycled == 0:
        pytest.skip(f"{fstype} never gave a new file a freed inode number: nothing was tested")
    if settled:  # each round's old file was checked at least once without its handle
        assert status["checks_settled"] >= tally.rounds, "the settled path was not tested"


@pytest.mark.parametrize("timeout", [None, "0"], ids=["cached", "timeout0"])
@pytest.mark.parametrize("kind", KINDS)
def test_recycled_number_never_answers_for_the_old_file(
    fs_src: tuple[str, Path], kind: str, timeout: str | None
) -> None:
    run_rounds(fs_src, kind, timeout, ROUNDS)


@pytest.mark.parametrize("kind", KINDS)
def test_recycled_number_of_a_settled_file_never_answers_for_the_old_file(
    fs_src: tuple[str, Path], kind: str
) -> None:
    """The old file checked without its handle (settled) until the new one comes."""
    run_rounds(fs_src, kind, None, ROUNDS, settled=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_recycled_number_never_answers_for_the_old_file_long(
    fs_src: tuple[str, Path], kind: str
) -> None:
    run_rounds(fs_src, kind, None, ROUNDS_SLOW)
