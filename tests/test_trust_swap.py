"""Swapped under its feet: a directory of SOURCE becomes a symlink out of SOURCE, and back.

The daemon runs as root, so the one thing it must never do is follow such a
symlink itself. While readers (root and 65534, real processes) hammer the
mount, a swapper in this process, for a bounded time:

- exchanges ``SOURCE/sw`` (a directory) with ``SOURCE/sw.alt``, a symlink to a
  directory *outside* SOURCE holding files of the same names with unique
  marker bytes and xattrs, or to ``/etc`` (``renameat2(RENAME_EXCHANGE)``,
  atomic, and back);
- exchanges the file ``sw/passwd`` with a symlink to ``/etc/passwd`` and back;
- renames ``sw`` away, puts a symlink in its place, and undoes it (not atomic).

The readers open ``sw/<name>`` and ``sw.alt/<name>`` through the mount in
every way a caller can: by path (when the mount shows a symlink, the
*caller's* kernel follows it, which ``fstat``'s ``st_dev`` tells apart: that
is counted, not an escape), by ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS)`` from the mount root, and through a directory
descriptor on ``sw`` opened before a swap (the daemon then resolves a node
whose path is now a symlink). Anything read through the FUSE device must be
the SOURCE file's own bytes; listings must hold only SOURCE's names; xattrs
and inode numbers of the outside files must never appear. Run with the
default cache timeout and with ``--timeout 0`` (every lookup reaches the
daemon).

The churn test does what a store does while garbage collection and new
builds overlap: symlinks ``l<i> -> T<i>`` and files ``f<i>`` are created and
removed in a loop (ext4 hands each freed inode number to the next new file at
once) while readers read the newest names through the mount, and names they
read before, still cached: every answer must be the name's own text or bytes,
or an error saying it is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import util

pytestmark = pytest.mark.mount

SECONDS = 4.0
SECONDS_SLOW = 30.0
CHURN_SECONDS_SLOW = 120.0
#: How many of the newest names exist at once in the churn test.
CHURN_WINDOW = 8
READERS = ((0, 0), (0, 0), util.NOBODY, util.NOBODY)
NAMES = ("passwd", "hostname", "marker", "sub/marker")
OUT_MARKER = b"OUTSIDE-SOURCE-NEVER-THROUGH-THE-MOUNT"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(_AT_FDCWD, bytes(a), _AT_FDCWD, bytes(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def inside_bytes(name: str) -> bytes:
    return f"INSIDE:{name}:".encode() * 50


@dataclass
class Rig:
    src: Path
    outside: Path
    mount: util.Mount


def build(src: Path, outside: Path) -> None:
    for root, content in ((src / "sw", inside_bytes), (outside, None)):
        (root / "sub").mkdir(parents=True)
        for name in NAMES:
            data = content(name) if content else OUT_MARKER + name.encode()
            (root / name).write_bytes(data)
            if content is None:
                os.setxattr(root / name, "user.outside", OUT_MARKER)
    (outside / "outside-only").write_bytes(OUT_MARKER)
    os.setxattr(outside, "user.outside", OUT_MARKER)
    os.symlink(outside, src / "sw.alt")


@pytest.fixture(params=["cached", "timeout0"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    args = ("--timeout", "0") if request.param == "timeout0" else ()
    with util.world_tmpdir("noatimefs-trust-swap-") as base:
        src, outside = base / "src", base / "outside"
        src.mkdir(mode=0o755)
        outside.mkdir(mode=0o755)
        build(src, outside)
        with util.mounted(src, None, *args, owner=util.NOBODY[0], allow_other=True) as m:
            yield Rig(src, outside, m)


class Swapper(threading.Thread):
    def __init__(self, rig: Rig) -> None:
        super().__init__(daemon=True)
        self.rig = rig
        self.stop = threading.Event()
        self.swaps: Counter[str] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        src, outside = self.rig.src, self.rig.outside
        sw, alt = src / "sw", src / "sw.alt"
        i = 0
        try:
            while not self.stop.is_set():
                i += 1
                # the symlink's target alternates between the outside dir and /etc
                os.unlink(alt)
                os.symlink(outside if i % 2 else "/etc", alt)
                exchange(sw, alt)  # sw is now the symlink
                exchange(sw, alt)  # and back
                self.swaps["dir <-> symlink (RENAME_EXCHANGE)"] += 2
                link = sw / "passwd.alt"
                os.symlink("/etc/passwd", link)
                exchange(sw / "passwd", link)
                exchange(sw / "passwd", link)
                os.unlink(link)
                self.swaps["file <-> symlink to /etc/passwd"] += 2
                if i % 4 == 0:
                    os.rename(sw, src / "sw.away")
                    os.symlink(outside, sw)
                    os.unlink(sw)
                    os.rename(src / "sw.away", sw)
                    self.swaps["rename away, symlink, undo"] += 2
        except BaseException as e:  # reported by the test
            self.error = e


_READER = r"""
import ctypes, random, time, stat
libc = ctypes.CDLL(None, use_errno=True)

class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]

def openat2(dirfd, path, flags):
    how = OpenHow(flags | os.O_CLOEXEC, 0, 0x08 | 0x04)  # BENEATH | NO_SYMLINKS
    fd = libc.syscall(437, dirfd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd

mnt, expect = DATA["mnt"], {k: bytes.fromhex(v) for k, v in DATA["expect"].items()}
inside_names = set(DATA["inside_names"])
bad_inos = set(DATA["outside_inos"])
marker = DATA["marker"].encode()
mdev = os.stat(mnt).st_dev
rootfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
rng = random.Random(DATA["seed"])
tally, escapes, errors, wrong_links = {}, [], {}, []

def count(k):
    tally[k] = tally.get(k, 0) + 1

def check_fd(fd, name, how):
    st = os.fstat(fd)
    data = os.pread(fd, 1 << 16, 0)
    if st.st_dev != mdev:
        count("followed by the caller's own kernel (not through the daemon)")
        return
    if st.st_ino in bad_inos or marker in data or data != expect[name]:
        escapes.append("%s %s: ino %d, %r" % (how, name, st.st_ino, data[:60]))
    else:
        count("reads verified")

def held_dir():
    try:
        return openat2(rootfd, "sw", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None

OPS = ["open by path", "openat2", "open by held dirfd", "list+lstat by held dirfd",
       "getxattr by held dirfd", "list by openat2"]
dirfd = None
end = time.monotonic() + DATA["seconds"]
while time.monotonic() < end:
    name = rng.choice(DATA["names"])
    top = rng.choice(["sw", "sw.alt"])
    op = rng.randrange(6)
    try:
        if op == 0:
            fd = os.open("%s/%s/%s" % (mnt, top, name), os.O_RDONLY)
            try:
                check_fd(fd, name, "path")
            finally:
                os.close(fd)
        elif op == 1:
            fd = openat2(rootfd, "%s/%s" % (top, name), os.O_RDONLY)
            try:
                check_fd(fd, name, "openat2")
            finally:
                os.close(fd)
        elif op in (2, 3, 4):
            if dirfd is None:
                dirfd = held_dir()
                if dirfd is None:
                    count("held dir not available")
                    continue
            if op == 2:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
                try:
                    check_fd(fd, name, "held dirfd")
                finally:
                    os.close(fd)
            elif op == 3:
                names = set(os.listdir(dirfd))
                if not names <= inside_names:
                    extra = sorted(names - inside_names)[:5]
                    escapes.append("listing through held dirfd: %r" % extra)
                else:
                    count("listings verified")
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if st.st_ino in bad_inos:
                    escapes.append("lstat by held dirfd %s: outside ino %d" % (name, st.st_ino))
                else:
                    count("lstats verified")
            else:
                # The daemon's own answer for the entry (no symlink followed by the caller).
                p = "/proc/self/fd/%d/%s" % (dirfd, name)
                try:
                    v = os.getxattr(p, "user.outside", follow_symlinks=False)
                    escapes.append("xattr of an outside file under %s: %r" % (name, v[:40]))
                except OSError:
                    count("xattrs verified absent")
                # A link text under this name must be one SOURCE ever had there.
                try:
                    text = os.readlink(name, dir_fd=dirfd)
                except OSError:
                    text = None
                if text is not None:
                    if text in DATA["link_texts"].get(name, []):
                        count("link texts verified")
                    else:
                        wrong_links.append("%s -> %r" % (name, text))
            if rng.randrange(8) == 0:
                os.close(dirfd)
                dirfd = None
        else:
            fd = openat2(rootfd, top, os.O_RDONLY | os.O_DIRECTORY)
            try:
                names = set(os.listdir(fd))
            finally:
                os.close(fd)
            if not names <= inside_names:
                escapes.append("listing of %s: %r" % (top, sorted(names - inside_names)[:5]))
            else:
                count("listings verified")
    except OSError as e:
        key = "%s (%s)" % (errno.errorcode.get(e.errno, str(e.errno)), OPS[op])
        errors[key] = errors.get(key, 0) + 1
        if dirfd is not None and rng.randrange(4) == 0:
            os.close(dirfd)
            dirfd = None
emit({"tally": tally, "escapes": escapes[:50], "n_escapes": len(escapes),
      "wrong_links": wrong_links[:20], "n_wrong_links": len(wrong_links),
      "errors": errors})
"""


def run_swap(rig: Rig, seconds: float) -> None:
    outside_inos = [os.stat(rig.outside / n).st_ino for n in NAMES]
    outside_inos += [os.stat(rig.outside).st_ino, os.stat(rig.outside / "sub").st_ino]
    outside_inos += [os.stat(p).st_ino for p in ("/etc", "/etc/passwd", "/etc/hostname")]
    inside_names = ["sub", "passwd.alt", *[n for n in NAMES if "/" not in n]]
    swapper = Swapper(rig)
    swapper.start()
    try:
        with ThreadPoolExecutor(len(READERS)) as pool:
            futures = [
                pool.submit(
                    util.run_as,
                    uid,
                    gid,
                    _READER,
                    {
                        "mnt": str(rig.mount.path),
                        "names": list(NAMES),
                        "expect": {n: inside_bytes(n).hex() for n in NAMES},
                        "inside_names": inside_names,
                        "outside_inos": outside_inos,
                        "marker": OUT_MARKER.decode(),
                        "link_texts": {"passwd": ["/etc/passwd"]},
                        "seconds": seconds,
                        "seed": i,
                    },
                    timeout=seconds + 120,
                )
                for i, (uid, gid) in enumerate(READERS)
            ]
            results = [f.result() for f in futures]
    finally:
        swapper.stop.set()
        swapper.join()
    assert swapper.error is None, f"the swapper failed: {swapper.error!r}"
    tally: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    escapes: list[str] = []
    for r in results:
        tally.update(r["tally"])
        errors.update(r["errors"])
        escapes += r["escapes"]
    n_escapes = sum(r["n_escapes"] for r in results)
    n_wrong = sum(r["n_wrong_links"] for r in results)
    wrong_links = [w for r in results for w in r["wrong_links"]]
    row = {**swapper.swaps, **tally, "errors": dict(errors), "escapes": n_escapes}
    _figures(rig, {**row, "wrong link texts": n_wrong})
    assert rig.mount.proc.poll() is None, "the daemon died:\n" + rig.mount.describe()
    assert n_escapes == 0, "bytes from outside SOURCE through the mount:\n" + "\n".join(escapes)
    assert tally["reads verified"] > 0, (tally, errors)
    assert sum(swapper.swaps.values()) > 0
    # Back in shape, the mount serves SOURCE again (a fresh lookup: the kernel may hold stale
    # dentries for up to the cache timeout, so go through a name it has not seen).
    (rig.src / "after").mkdir()
    (rig.src / "after" / "f").write_bytes(b"after the storm")
    assert (rig.mount.path / "after" / "f").read_bytes() == b"after the storm"
    status = rig.mount.status()
    assert status["handles"] == 0, status
    assert n_wrong == 0, "link texts SOURCE never had under the name:\n" + "\n".join(wrong_links)


def _figures(rig: Rig, row: dict[str, Any]) -> None:
    label = "timeout 0" if "--timeout" in rig.mount.argv else "cached"
    util.trust_figures(f"swap {label}", row)


def test_swapped_under_its_feet_never_leaves_source(rig: Rig) -> None:
    run_swap(rig, SECONDS)


@pytest.mark.slow
def test_swapped_under_its_feet_never_leaves_source_long(rig: Rig) -> None:
    run_swap(rig, SECONDS_SLOW)


def test_swap_helpers_are_sane(tmp_path: Path) -> None:
    """RENAME_EXCHANGE really exchanges a directory and a symlink (else the test proves nothing)."""
    (tmp_path / "d").mkdir()
    os.symlink("/etc", tmp_path / "l")
    exchange(tmp_path / "d", tmp_path / "l")
    assert (tmp_path / "d").is_symlink()
    assert (tmp_path / "l").is_dir()


def _daemon_waits_on_a_fifo(pid: int) -> bool:
    """Whether a thread of *pid* sleeps in a FIFO open, waiting for a writer."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/wchan") as f:
            if f.read() == "wait_for_partner":
                return True
    return False


def test_file_swapped_for_a_fifo_does_not_wedge_the_daemon(world_tmp: Path) -> None:
    src = world_tmp / "src"
    src.mkdir(mode=0o755)
    (src / "p").write_bytes(b"a file, for now\n")
    (src / "other").write_bytes(b"still served\n")
    with util.mounted(src, owner=util.NOBODY[0], allow_other=True) as m:
        assert (m.path / "p").read_bytes() == b"a file, for now\n"  # the kernel caches p
        os.mkfifo(src / "p.new")
        os.rename(src / "p.new", src / "p")
        with ThreadPoolExecutor(1) as pool:
            # O_NONBLOCK: once the kernel sees the FIFO, opening it must not wait either
            opened = pool.submit(_open_nonblocking, m.path / "p")
            wedged = False
            end = time.monotonic() + 60
            while not opened.done() and time.monotonic() < end:
                if _daemon_waits_on_a_fifo(m.pid):
                    wedged = True
                    # let the daemon go: a writer (that will not write) completes its open
                    fd = os.open(src / "p", os.O_WRONLY | os.O_NONBLOCK)
                    os.close(fd)
                    break
                time.sleep(0.01)  # polling the daemon's and the caller's state, with a deadline
            result = opened.result(timeout=60)
        assert not wedged, "the daemon waited in a FIFO open: every caller waited with it"
        # the kernel looked the name up again and opened the FIFO itself, or an error
        assert result in ("fifo", errno.ESTALE, errno.ENOENT, errno.EIO), result
        assert (m.path / "other").read_bytes() == b"still served\n"


def _open_nonblocking(path: Path) -> str | int:
    """ "fifo" if *path* opens as a FIFO, the bytes it reads if it opens as a file, or the errno."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return e.errno or -1
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return "fifo"
        return repr(os.read(fd, 100))
    finally:
        os.close(fd)


def test_recycled_inode_numbers_never_serve_old_bytes(world_tmp: Path) -> None:
    """A store path collected and another written: ext4 hands the freed inode number to the new
    file at once, while the kernel may still hold the old inode and its page cache under that
    number. Reading the new file through the mount must give the new bytes, every time."""
    src = world_tmp / "src"
    src.mkdir(mode=0o755)
    recycled = wrong = tries = 0
    with util.mounted(src, owner=util.NOBODY[0], allow_other=True) as m:
        while recycled < 20 and tries < 3000:
            tries += 1
            old, new = (b"old %06d\n" % tries) * 100, (b"new %06d\n" % tries) * 100
            (src / f"a{tries}").write_bytes(old)
            assert (m.path / f"a{tries}").read_bytes() == old  # in the kernel's page cache now
            ino = os.stat(src / f"a{tries}").st_ino
            os.unlink(src / f"a{tries}")
            (src / f"b{tries}").write_bytes(new)  # same size, often the same inode number
            recycled += os.stat(src / f"b{tries}").st_ino == ino
            wrong += (m.path / f"b{tries}").read_bytes() != new
            os.unlink(src / f"b{tries}")
        util.trust_figures("recycled inode numbers", {"tries": tries, "recycled": recycled})
        assert m.proc.poll() is None, "the daemon died:\n" + m.describe()
    assert wrong == 0, f"{wrong} of {tries} new files read with other bytes ({recycled} recycled)"
    if recycled == 0:
        pytest.skip("this filesystem never reused an inode number: nothing was tested")


# --------------------------------------------------------------------------- churn


def churn_bytes(i: int) -> bytes:
    return f"F{i}:".encode() * 300


class Churner(threading.Thread):
    """Creates ``l<i> -> T<i>`` and ``f<i>`` in SOURCE/c, removes those :data:`CHURN_WINDOW` older.

    The newest *i* is published in the 8 bytes of *counter* (outside SOURCE) for the readers.
    """

    def __init__(self, c: Path, counter: Path) -> None:
        super().__init__(daemon=True)
        self.c = c
        self.counter = counter
        self.stop = threading.Event()
        self.created = 0
        self.recycled = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        c = self.c
        freed: set[int] = set()
        fd = os.open(self.counter, os.O_WRONLY)
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                os.symlink(f"T{i}", c / f"l{i}")
                tmp = c / f"f{i}.tmp"
                tmp.write_bytes(churn_bytes(i))
                tmp.rename(c / f"f{i}")  # readers never see a file half written
                for name in (f"l{i}", f"f{i}"):
                    self.recycled += os.lstat(c / name).st_ino in freed
                self.created += 2
                os.pwrite(fd, i.to_bytes(8, "little"), 0)
                if i > CHURN_WINDOW:
                    for name in (f"l{i - CHURN_WINDOW}", f"f{i - CHURN_WINDOW}"):
                        freed.add(os.lstat(c / name).st_ino)
                        os.unlink(c / name)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            os.close(fd)


_CHURN_READER = r"""
import random, time
mnt, W = DATA["mnt"], DATA["window"]
cfd = os.open(DATA["counter"], os.O_RDONLY)
rng = random.Random(DATA["seed"])
tally, wrong = {}, []

def count(k):
    tally[k] = tally.get(k, 0) + 1

end = time.monotonic() + DATA["seconds"]
while time.monotonic() < end:
    i = int.from_bytes(os.pread(cfd, 8, 0), "little")
    if i == 0:
        continue
    j = rng.randint(max(1, i - 2 * W), i)  # the newest names, and some gone but still cached
    link = rng.random() < 0.5
    try:
        if link:
            got = os.readlink("%s/c/l%d" % (mnt, j)).encode()
            expected = b"T%d" % j
        else:
            with open("%s/c/f%d" % (mnt, j), "rb") as f:
                got = f.read()
            expected = (b"F%d:" % j) * 300
    except OSError as e:
        count(errno.errorcode.get(e.errno, str(e.errno)))
        continue
    if got == expected:
        count("link texts verified" if link else "file reads verified")
    else:
        wrong.append("%s%d: %r" % ("l" if link else "f", j, got[:40]))
emit({"tally": tally, "wrong": wrong[:20], "n_wrong": len(wrong)})
"""


@pytest.fixture(params=["cached", "timeout0"])
def churn_rig(request: pytest.FixtureRequest) -> Iterator[tuple[Path, Path, util.Mount]]:
    args = ("--timeout", "0") if request.param == "timeout0" else ()
    with util.world_tmpdir("noatimefs-trust-churn-") as base:
        src = base / "src"
        (src / "c").mkdir(parents=True)
        src.chmod(0o755)
        (src / "c").chmod(0o755)
        counter = base / "counter"
        counter.write_bytes(bytes(8))
        counter.chmod(0o644)
        with util.mounted(src, None, *args, owner=util.NOBODY[0], allow_other=True) as m:
            yield src, counter, m


def run_churn(rig: tuple[Path, Path, util.Mount], seconds: float) -> None:
    src, counter, m = rig
    churner = Churner(src / "c", counter)
    churner.start()
    try:
        with ThreadPoolExecutor(len(READERS)) as pool:
            data = {"mnt": str(m.path), "counter": str(counter), "window": CHURN_WINDOW}
            futures = [
                pool.submit(
                    util.run_as,
                    uid,
                    gid,
                    _CHURN_READER,
                    {**data, "seconds": seconds, "seed": i},
                    timeout=seconds + 120,
                )
                for i, (uid, gid) in enumerate(READERS)
            ]
            results = [f.result() for f in futures]
    finally:
        churner.stop.set()
        churner.join()
    assert churner.error is None, f"the churner failed: {churner.error!r}"
    tally: Counter[str] = Counter()
    for r in results:
        tally.update(r["tally"])
    n_wrong = sum(r["n_wrong"] for r in results)
    wrong = [w for r in results for w in r["wrong"]]
    label = "timeout 0" if "--timeout" in m.argv else "cached"
    row = {
        "created": churner.created,
        "recycled inode numbers": churner.recycled,
        **tally,
        "wrong answers": n_wrong,
    }
    util.trust_figures(f"churn {label}", row)
    print(row)
    assert m.proc.poll() is None, "the daemon died:\n" + m.describe()
    assert n_wrong == 0, f"{n_wrong} answers of another name's file:\n" + "\n".join(wrong)
    assert tally["link texts verified"] > 0, tally
    assert tally["file reads verified"] > 0, tally


def test_churn_never_answers_another_names_file(
    churn_rig: tuple[Path, Path, util.Mount],
) -> None:
    run_churn(churn_rig, SECONDS)


@pytest.mark.slow
def test_churn_never_answers_another_names_file_long(
    churn_rig: tuple[Path, Path, util.Mount],
) -> None:
    run_churn(churn_rig, CHURN_SECONDS_SLOW)
