"""Walk store paths ahead of a tree walk, in a helper process, to warm SOURCE's caches.

A walk of the store (``find``, ``tar`` of a closure, a VM's first boot) opens
its directories one after the other. With SOURCE's caches cold each listing
waits for the disk in the request loop: for the directory's inode and blocks,
and, where the listing carries attributes, for the inode of every entry; and
while the loop serves one directory, nothing asks the disk for the next.

When the daemon lists a store path (a directory at SOURCE's top level) that
its listing cache did not hold, it names it to a :class:`WalkAhead`, whose
helper process walks that path's tree, and then the store paths after it,
reading each directory, up to :data:`AHEAD` entries past the named path. Its
files' inodes (an ``lstat`` of each) are read only when the daemon says callers
stat them (:data:`INODES`: it lists with attributes, :mod:`noatimefs.listing`,
"Bare entries"), and for a path named alone (below). It walks in the order the daemon serves
listings, and so a walk of the mount visits them (:mod:`noatimefs.order`: by
cookie, with the daemon's key), not in SOURCE's own order; or, once the names it
is sent follow inode numbers, in that order (:meth:`Walker.follow`: GNU find
visits a directory of more than 10,000 entries so). By the time the walker asks
for them, the daemon finds the blocks and inodes in memory. A new name the
helper has not walked yet starts it over from there, so it follows a walker
that skips ahead; one it has walked already (the walker is behind it, as it
should be) lets it go on from where it is, topped up to :data:`AHEAD` entries
past that name (:meth:`Walker.named`).

A caller that opens files by path (a VM booting, ``open`` after ``open``) lists
nothing; it looks names up. When the daemon is asked to look up a store path
that SOURCE no longer holds in memory (``RESOLVE_CACHED`` says its lookup would
read the disk), it names that store path alone (``/NAME`` on the pipe): what
the caller opens next in it is cold too. Measured on the benchmark's tree, a
fresh daemon and cold caches: 20,000 opens 3.8 s → 3.1 s.

A caller that reads a store path's files (``tar`` of a closure, ``cp -r``, a
VM booting) waits for the disk at each file, one file at a time. When a read
of a small file finds its data not cached, the daemon names that file's store
path with :data:`DATA` before it: for the next :data:`TOP_LEVEL_KEEP` seconds
the helper's walks also ask the kernel to read each small regular file
(``posix_fadvise(WILLNEED)``, at most :data:`DATA_AHEAD` bytes past the named
path), so the disk reads them in parallel, ahead of the caller. Measured on
the benchmark's tree, a cold ``tar`` of every small file: see bench/README.md.
A walk of metadata alone (``find``) reads no file's data.

Why a process and not a thread: listing is a syscall per entry with a little
Python between, and a thread doing that beside the request loop passes the
GIL back and forth at every syscall; measured on the benchmark's tree, a
worker thread made a cold ``find`` slower (8 s to 11 s). The helper shares
nothing with the daemon but SOURCE's root descriptor and a pipe.

The helper only warms caches: nothing it reads reaches a caller, so it cannot
change an answer, only how soon it comes. It walks beneath SOURCE's root
descriptor one directory at a time (``openat2`` beneath the directory above, no
symlink followed, as the daemon resolves paths), with ``O_NOATIME``
where it may (a walk ahead is not an access), opens for reading only what is
still a regular file (never a device or a FIFO), at a lower CPU priority than
the daemon, and ends when the daemon closes the pipe (or dies). Names sent while
the pipe is full are dropped: walking ahead is a hint.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time

from noatimefs import order
from noatimefs.readahead import MAX_FILE, will_need
from noatimefs.source import O_PATH, openat2

log = logging.getLogger(__name__)

#: Entries the helper lists past the start of the named store path, at most.
AHEAD = 4096
#: The deepest directory the helper descends to, below a store path.
MAX_DEPTH = 32
#: How long the helper trusts its listing of SOURCE's top level (seconds).
TOP_LEVEL_KEEP = 30.0
#: Bytes of small files read ahead past the start of the named store path, at most,
#: while callers read file data (see Walker.read_data).
DATA_AHEAD = 64 << 20
_NICE = 5
#: On the pipe, between names: callers are reading file data; warm it too for a while.
DATA = b"/"
#: On the pipe, between names: callers stat the files they list; warm their inodes too
#: for a while (without it, a walk lists directories and ``lstat``-s none of their files:
#: a bare listing needs no inode, see :mod:`noatimefs.listing`).
INODES = b"//"
#: The orders a walk may visit SOURCE's top level in: the daemon's (by cookie), or by
#: inode number (GNU find, du and the rest of gnulib's fts sort a directory of more
#: than 10,000 entries by ``d_ino`` before they visit it, on every file system but a
#: few network ones and tmpfs; the mount presents SOURCE's inode numbers, so that is
#: SOURCE's inode order).
SERVED, INODE = "served", "inode"
#: A name within this many store paths after the one before, in one of the orders and
#: not in the other, tells the helper which order the walk goes in (Walker.follow).
FOLLOW_STEP = 256


class WalkAhead:
    """The daemon's side: a helper process, started on first use, fed store path names."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._helper: subprocess.Popen[bytes] | None = None
        self._pipe = -1
        self._failed = False  # the helper could not be started, or died: do without it
        self.named = 0  # store paths named to the helper
        self.dropped = 0  # names dropped, the pipe being full or the helper gone

    @property
    def pid(self) -> int | None:
        """The helper's pid, while it runs (its pipe is one of the daemon's descriptors)."""
        return self._helper.pid if self._helper is not None else None

    def want(
        self, name: bytes, onward: bool = True, data: bool = False, inodes: bool = True
    ) -> None:
        """Walk the store path *name* (an entry of SOURCE's top level), and, *onward*,
        the store paths served after it; *data*: read their small files ahead too,
        from now on for a while; *inodes*: their files' inodes too, for a while (a path
        walked alone always has them read)."""
        if self._helper is None and not self._start():
            self.dropped += 1
            return
        message = (
            (DATA + b"\0" if data else b"")
            + (INODES + b"\0" if inodes else b"")
            + (b"" if onward else b"/")
            + name
            + b"\0"
        )
        try:
            os.write(self._pipe, message)
        except BlockingIOError:
            self.dropped += 1  # the helper is behind: this walk was only a hint
            return
        except BrokenPipeError:
            assert self._helper is not None
            log.warning(
                "the walk-ahead helper (pid %d) ended with %s: walks are not helped",
                self._helper.pid,
                self._helper.wait(),
            )
            self.close()
            self._failed = True
            self.dropped += 1
            return
        self.named += 1

    def _start(self) -> bool:
        if self._failed:
            return False  # not tried again on every request
        try:
            self._helper = subprocess.Popen(
                [sys.executable, "-m", "noatimefs.walkahead", str(self.root_fd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                pass_fds=(self.root_fd,),
                close_fds=True,
                env=order.environment(),  # the daemon's order
            )
        except OSError as exc:
            log.warning("cannot start the walk-ahead helper (%s): walks are not helped", exc)
            self._failed = True
            return False
        assert self._helper.stdin is not None
        self._pipe = self._helper.stdin.fileno()
        os.set_blocking(self._pipe, False)
        return True

    def close(self) -> None:
        """End the helper (closing its pipe ends it; it is killed if it lingers)."""
        if self._helper is None:
            return
        helper, self._helper, self._pipe = self._helper, None, -1
        with contextlib.suppress(OSError):
            helper.stdin.close()  # type: ignore[union-attr]
        try:
            helper.wait(timeout=2)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


# -- the helper's side -------------------------------------------------------


class Walker:
    """Walks store paths beneath the directory open on *root_fd* (see the module docstring)."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._noatime = os.O_NOATIME
        self._top: list[bytes] = []  # SOURCE's top level in the order walked (self.order)
        self._top_index: dict[bytes, int] = {}
        self._top_at = -TOP_LEVEL_KEEP
        self._orders: dict[str, tuple[list[bytes], dict[bytes, int]]] = {}
        self.order = SERVED  # the order the walk of the mount goes in, as far as seen
        self._followed: dict[str, int] = {}  # the newest name's index in each order
        self.switched = 0  # times the order walked changed
        #: name -> (when, entries, whether with data, whether with inodes)
        self._walked: dict[bytes, tuple[float, int, bool, bool]] = {}
        # The run: the top-level paths walked one after the other from index _run_first.
        # _ahead[k]: the entries walked from there up to (not with) the path at _run_first + k;
        # the next path to walk is at _run_first + len(_ahead) - 1.
        self._run_first = 0
        self._ahead = array.array("q", [0])
        self._alone: bytes | None = None  # a path to walk alone (named ``/NAME``, or not listed)
        self._running = False  # whether the run goes on for the newest name
        self.cut = False  # the last walk stopped at its budget
        self._data_until = -1.0  # read small files ahead until then (monotonic)
        self._inodes_until = -1.0  # lstat files until then (monotonic)
        self.data_left = 0  # bytes still to read ahead for the newest name
        self.listed = 0  # entries listed, over all walks
        self.read_ahead = 0  # files read ahead, over all walks
        self.inodes_read = 0  # files lstat-ed, over all walks

    def read_data(self, seconds: float = TOP_LEVEL_KEEP) -> None:
        """From now on for *seconds*, walks read each small regular file ahead too."""
        self._data_until = time.monotonic() + seconds
        self._new_run(0)  # what the run walked, it walked without the data

    def read_inodes(self, seconds: float = TOP_LEVEL_KEEP) -> None:
        """From now on for *seconds*, walks ``lstat`` every file too."""
        if time.monotonic() >= self._inodes_until:
            self._new_run(0)  # what the run walked, it walked without the inodes
        self._inodes_until = time.monotonic() + seconds

    def _open_dir(self, name: bytes, dir_fd: int) -> int:
        """Open the directory *name* in *dir_fd*: beneath it, through no symlink."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        if self._noatime:
            try:
                return openat2(dir_fd, name, flags | self._noatime)
            except PermissionError:
                self._noatime = 0  # the daemon owns none of it and lacks CAP_FOWNER
        return openat2(dir_fd, name, flags)

    def top_level(self) -> list[bytes]:
        """SOURCE's top-level names in the order walked (kept :data:`TOP_LEVEL_KEEP` seconds)."""
        now = time.monotonic()
        if now - self._top_at > TOP_LEVEL_KEEP:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
            try:
                with os.scandir(fd) as it:
                    listed = [(entry.inode(), os.fsencode(entry.name)) for entry in it]
            finally:
                os.close(fd)
            listed.sort()
            by_inode = [name for _, name in listed]
            for kind, names in ((INODE, by_inode), (SERVED, order.ordered(list(by_inode)))):
                self._orders[kind] = (names, {n: i for i, n in enumerate(names)})
            self._top, self._top_index = self._orders[self.order]
            self._followed = {}
            self._new_run(0)  # the run's indexes were into the listing before
            self._top_at = now
        return self._top

    def follow(self, name: bytes) -> None:
        """The daemon listed the store path *name*: learn the order the walk goes in.

        A walk names each store path it lists that the daemon did not hold, one
        after the other in its order. A name a few paths after the one before in
        one order, and not in the other, says that order is the walk's; from then
        on the helper walks ahead in it.
        """
        self.top_level()
        indexes = {o: index[name] for o, (_, index) in self._orders.items() if name in index}
        if len(indexes) < len(self._orders):
            return  # new since the top level was listed
        followed = [
            o
            for o, i in indexes.items()
            if o in self._followed and 0 < i - self._followed[o] <= FOLLOW_STEP
        ]
        self._followed = indexes
        if len(followed) == 1 and followed[0] != self.order:
            self.order = followed[0]
            self._top, self._top_index = self._orders[self.order]
            self._new_run(0)  # the run's plan was in the other order
            self.switched += 1

    def named(self, name: bytes) -> int:
        """The daemon's newest name: how many entries to walk for it now.

        ``/NAME``: NAME alone. A top-level name walks it and the paths after it,
        :data:`AHEAD` entries in all. When the name is one the run has already
        walked (the caller is behind the helper), the run goes on from where it
        is, topped up to :data:`AHEAD` entries past the name: starting it over
        would step again through every path walked since, for each name the
        daemon sends (a walk of a top level of 10⁵ small paths names each one).
        """
        self._alone, self._running = None, False
        if name[:1] == b"/":
            self._alone = name[1:]
            return AHEAD
        self.top_level()
        index = self._top_index.get(name)
        if index is None:
            self._alone = name  # new since the top level was listed
            return AHEAD
        self._running = True
        walked = index - self._run_first
        if 0 <= walked < len(self._ahead):
            return AHEAD - (self._ahead[-1] - self._ahead[walked])
        self._new_run(index)
        return AHEAD

    def _new_run(self, index: int) -> None:
        self._run_first = index
        self._ahead = array.array("q", [0])

    def step(self, budget: int) -> int | None:
        """Walk the next store path, at most *budget* entries: how many; None when none is left."""
        if self._alone is not None:
            name, self._alone = self._alone, None
            return self.walk(name, budget, alone=True)
        index = self._run_first + len(self._ahead) - 1
        if not self._running or index >= len(self._top):
            return None
        count = self.walk(self._top[index], budget)
        if not self.cut:  # a cut path is walked again, whole, by the next step
            self._ahead.append(self._ahead[-1] + count)
        return count

    def walk(self, name: bytes, budget: int, alone: bool = False) -> int:
        """Warm the tree of the top-level entry *name*, at most *budget* entries; how many.

        Its files' inodes are read only for a path walked *alone* (its files are
        opened by path next) or while :meth:`read_inodes` asks; their data while
        :meth:`read_data` asks. A tree walked so in the last :data:`TOP_LEVEL_KEEP`
        seconds is not walked again; it counts as many entries as it had.
        """
        now = time.monotonic()
        data = now < self._data_until
        inodes = data or alone or now < self._inodes_until
        done = self._walked.get(name)
        self.cut = False
        if (
            done is not None
            and now - done[0] < TOP_LEVEL_KEEP
            and (done[2] or not data)
            and (done[3] or not inodes)
        ):
            return done[1]
        try:
            fd = self._open_dir(name, self.root_fd)
        except OSError:
            count = 1  # not a directory (or gone): nothing more to warm
        else:
            left = self._walk_open(fd, budget, MAX_DEPTH, data, inodes)
            count = budget - left
            if left <= 0:
                self.cut = True
                return count  # cut short: walked again from the start when named again
        if len(self._walked) >= 100_000:
            self._walked.clear()
        self._walked[name] = (now, count, data, inodes)
        return count

    def _walk_open(self, fd: int, budget: int, depth: int, data: bool, inodes: bool) -> int:
        subdirs: list[bytes] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if budget <= 0:
                        break
                    budget -= 1
                    self.listed += 1
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(os.fsencode(entry.name))
                            continue
                        if not inodes:
                            continue
                        st = entry.stat(follow_symlinks=False)  # the inode: a stat needs it
                        self.inodes_read += 1
                        size = st.st_size
                        small = 0 < size <= min(MAX_FILE, self.data_left)
                        if data and small and stat.S_ISREG(st.st_mode):
                            self.data_left -= size
                            self._read_file_ahead(fd, os.fsencode(entry.name))
            for sub in order.ordered(subdirs):  # as a walk of the mount goes into them
                if budget <= 0 or depth <= 0:
                    break
                try:
                    child = self._open_dir(sub, fd)
                    budget = self._walk_open(child, budget, depth - 1, data, inodes)
                except OSError:
                    continue  # unreadable or gone: only a guess was lost
        finally:
            os.close(fd)
        return budget

    def _read_file_ahead(self, dir_fd: int, name: bytes) -> None:
        """Ask the kernel to read the regular file *name* in *dir_fd* into the page cache."""
        path_fd = openat2(dir_fd, name, O_PATH | os.O_NOFOLLOW)
        try:
            try:
                done = will_need(path_fd, self._noatime)
            except PermissionError:
                if not self._noatime:
                    raise
                self._noatime = 0  # the daemon owns none of it and lacks CAP_FOWNER
                done = will_need(path_fd, 0)
        finally:
            os.close(path_fd)
        self.read_ahead += done >= 0


def _names(pipe: int, pending: bytes) -> tuple[list[bytes], bytes, bool]:
    """Names readable on *pipe* now: (names, the rest of a partial one, whether it ended)."""
    try:
        data = os.read(pipe, 65536)
    except BlockingIOError:
        return [], pending, False
    if not data:
        return [], pending, True
    *names, rest = (pending + data).split(b"\0")
    return names, rest, False


def serve(walker: Walker, pipe: int) -> None:
    """The helper's loop: walk ahead from the newest name read on *pipe*, until it ends."""
    os.set_blocking(pipe, False)
    pending = b""
    budget = 0
    while True:
        # Between two store paths: a newer name, if any, starts the walk over from it.
        if budget <= 0:
            select.select([pipe], [], [])
        names, pending, ended = _names(pipe, pending)
        if ended:
            return
        try:
            if DATA in names:
                walker.read_data()
            if INODES in names:
                walker.read_inodes()
            names = [name for name in names if name not in (DATA, INODES)]
            for name in names:
                if name[:1] != b"/":
                    walker.follow(name)
            if names:
                budget = walker.named(names[-1])
                walker.data_left = DATA_AHEAD
            if budget > 0:
                walked = walker.step(budget)
                budget = 0 if walked is None else budget - walked
        except OSError as exc:  # SOURCE's top level unreadable: wait for the next name
            log.debug("walk ahead stopped: %s", exc)
            budget = 0


def main(argv: list[str]) -> int:
    root_fd = int(argv[1])
    order.use_environment()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon ends it, by closing the pipe
    with contextlib.suppress(OSError):
        os.nice(_NICE)
    serve(Walker(root_fd), sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
