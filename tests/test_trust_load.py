"""Load and faults: many concurrent readers, a subtree deleted mid-read, SIGSTOP/SIGCONT, SIGKILL.

SOURCE is a storegen tree plus a few multi-MiB random files. Every reader is
a real process (root or 65534, the presented owner) that verifies every
64 KiB chunk it reads against the chunk's sha256 computed from SOURCE here;
half of its opens use ``O_DIRECT`` (through FUSE that bypasses the page
cache, so the read reaches the daemon every time) and half ``O_NOATIME``.

- **Load**: 32 readers for a bounded time read random files (whole, or random
  chunks); zero errors, zero wrong bytes; afterwards, once every handle is
  released, the daemon's descriptor count is back to where it was after a
  warm-up pass and its RSS within a small bound of it.
- **Subtree deleted mid-read**: readers hold files of a store path open (first
  chunk read), the store path is deleted from SOURCE, then the readers finish:
  what was open reads the right bytes to the end; new opens of the deleted
  files fail; nothing wrong is returned.
- **SIGSTOP/SIGCONT**: with readers mid-load, the daemon is stopped; every
  reader is then seen blocked in the kernel waiting for a FUSE answer
  (``/proc/PID/wchan``); after SIGCONT all complete with every chunk right.
- **SIGKILL**: with readers mid-load the daemon is killed; readers get an error
  (``ENOTCONN``...), never a wrong byte; the dead mount answers ``ENOTCONN``
  and is cleared by the harness (``fusermount3 -u``, then ``umount -l``).

Readers and the test meet at two rendezvous, no sleeps: each reader writes its
pid to a FIFO when it has started, and (where the test must act first) then
waits on a shared lock the test holds until it has acted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import random
import select
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import util

from noatimefs import storegen

pytestmark = pytest.mark.mount

CHUNK = 1 << 16
READERS = 32
LOAD_SECONDS = 10.0
LOAD_SECONDS_SLOW = 60.0
#: How far the daemon's RSS may be above its post-warm-up level once the load is over.
RSS_BOUND = 24 << 20
DEADLINE = 60.0

FIGURES: Counter[str] = Counter()


@dataclass
class Store:
    root: Path
    files: dict[str, list[str]]  # relative path -> chunk hashes
    doomed: list[str]  # files of the store path the fault test deletes


def chunk_hashes(path: Path) -> list[str]:
    out = []
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            out.append(hashlib.sha256(chunk).hexdigest()[:20])
    return out or [hashlib.sha256(b"").hexdigest()[:20]]


def build_store(root: Path) -> Store:
    storegen.generate(root, paths=40, files_per_path=8, seed=11)
    rng = random.Random(5)
    big = root / "big"
    big.mkdir(mode=0o755)
    for i in range(8):
        (big / f"blob{i}").write_bytes(rng.randbytes(rng.randrange(1 << 20, 6 << 20)))
        (big / f"blob{i}").chmod(0o444)
    doomed_dir = root / "doomed-1.0"
    doomed_dir.mkdir(mode=0o755)
    for i in range(6):
        (doomed_dir / f"part{i}").write_bytes(rng.randbytes(3 << 20))
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                files[str(p.relative_to(root))] = chunk_hashes(p)
    doomed = sorted(k for k in files if k.startswith("doomed-1.0/"))
    return Store(root, files, doomed)


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    with util.world_tmpdir("noatimefs-trust-load-") as base:
        root = base / "store"
        root.mkdir(mode=0o755)
        yield build_store(root)


# --------------------------------------------------------------------------- the reader

_READER = r"""
import fcntl, mmap, random, time
rng = random.Random(DATA["seed"])
mnt, files = DATA["mnt"], DATA["files"]
CHUNK = DATA["chunk"]
names = sorted(files)
buf = mmap.mmap(-1, CHUNK)  # page-aligned, for O_DIRECT
out = {"chunks": 0, "files": 0, "bytes": 0, "wrong": [], "errors": {}, "opens": 0}

def error(e, where):
    k = errno.errorcode.get(e.errno, str(e.errno))
    out["errors"][k] = out["errors"].get(k, 0) + 1
    if not DATA["tolerate"]:
        raise SystemExit("%s: %s (%s)" % (where, e, k))

def read_chunk(fd, name, i):
    n = os.preadv(fd, [buf], i * CHUNK)
    got = hashlib.sha256(buf[:n]).hexdigest()[:20]
    want = files[name][i]
    if got != want:
        out["wrong"].append("%s chunk %d: %d bytes, %s != %s" % (name, i, n, got, want))
    else:
        out["chunks"] += 1
        out["bytes"] += n

def close(fd):
    try:
        os.close(fd)  # through FUSE a close is a flush, which a dead daemon fails
    except OSError as e:
        error(e, "close")

def open_file(name):
    flags = os.O_RDONLY
    if rng.random() < 0.5:
        flags |= os.O_DIRECT
    if rng.random() < 0.5:
        flags |= os.O_NOATIME
    fd = os.open(mnt + "/" + name, flags)
    out["opens"] += 1
    return fd

held = {}
for name in DATA["hold"]:
    fd = open_file(name)
    read_chunk(fd, name, 0)
    held[name] = fd

if DATA.get("ready"):
    with open(DATA["ready"], "w") as f:
        f.write("%d\n" % os.getpid())
if DATA.get("lock"):
    lk = os.open(DATA["lock"], os.O_RDONLY)
    fcntl.flock(lk, fcntl.LOCK_SH)  # the test holds LOCK_EX until it has acted
    os.close(lk)

for name, fd in held.items():
    try:
        for i in range(1, len(files[name])):
            read_chunk(fd, name, i)
        out["files"] += 1
    except OSError as e:
        error(e, "held " + name)
    finally:
        close(fd)
if DATA.get("reopen"):
    out["reopen"] = {}
    for name in DATA["hold"]:
        try:
            os.close(os.open(mnt + "/" + name, os.O_RDONLY))
            out["reopen"][name] = 0
        except OSError as e:
            out["reopen"][name] = e.errno

end = time.monotonic() + (DATA["seconds"] or 0)
todo = DATA["count"] or 0
while todo > 0 or (DATA["seconds"] and time.monotonic() < end):
    todo -= 1
    name = rng.choice(names)
    try:
        fd = open_file(name)
    except OSError as e:
        error(e, "open " + name)
        if DATA["stop_on_error"]:
            break
        continue
    try:
        n = len(files[name])
        order = range(n) if rng.random() < 0.5 else [rng.randrange(n) for _ in range(min(n, 4))]
        for i in order:
            read_chunk(fd, name, i)
        out["files"] += 1
    except OSError as e:
        error(e, "read " + name)
        if DATA["stop_on_error"]:
            break
    finally:
        close(fd)
out["wrong_count"] = len(out["wrong"])
out["wrong"] = out["wrong"][:20]
emit(out)
"""


@dataclass
class ReaderSpec:
    uid: int = 0
    gid: int = 0
    seconds: float | None = None
    count: int | None = None
    hold: tuple[str, ...] = ()
    tolerate: bool = False
    stop_on_error: bool = False
    reopen: bool = False


def start_readers(
    pool: ThreadPoolExecutor,
    mount: util.Mount,
    store: Store,
    specs: list[ReaderSpec],
    ready: Path | None = None,
    lock: Path | None = None,
) -> list[Future[Any]]:
    futures = []
    for i, spec in enumerate(specs):
        data = {
            "mnt": str(mount.path),
            "files": store.files,
            "chunk": CHUNK,
            "seed": i,
            "seconds": spec.seconds,
            "count": spec.count,
            "hold": list(spec.hold),
            "tolerate": spec.tolerate,
            "stop_on_error": spec.stop_on_error,
            "reopen": spec.reopen,
            "ready": str(ready) if ready else None,
            "lock": str(lock) if lock else None,
        }
        futures.append(pool.submit(util.run_as, spec.uid, spec.gid, _READER, data, timeout=600))
    return futures


def mixed(n: int, **kwargs: Any) -> list[ReaderSpec]:
    """*n* readers, alternately root and the presented owner."""
    return [ReaderSpec(*((0, 0) if i % 2 else util.NOBODY), **kwargs) for i in range(n)]


def total(results: list[dict[str, Any]]) -> dict[str, Any]:
    t: dict[str, Any] = {"chunks": 0, "files": 0, "bytes": 0, "opens": 0, "wrong_count": 0}
    errors: Counter[str] = Counter()
    wrong: list[str] = []
    for r in results:
        for k in ("chunks", "files", "bytes", "opens", "wrong_count"):
            t[k] += r[k]
        errors.update(r["errors"])
        wrong += r["wrong"]
    t["errors"] = dict(errors)
    t["wrong"] = wrong[:20]
    return t


class Rendezvous:
    """A FIFO readers write their pid to once started, and a lock the test holds until ``go()``.

    Readers that were given the lock wait on it (``flock(LOCK_SH)``) after signalling; the
    test acts, then calls ``go()``. ``close()`` (always, in ``finally``) releases both.
    """

    def __init__(self, base: Path, hold_lock: bool) -> None:
        self.ready = base / "ready.fifo"
        os.mkfifo(self.ready, 0o666)
        os.chmod(self.ready, 0o666)
        self.lock: Path | None = None
        self._lock_fd = -1
        if hold_lock:
            self.lock = base / "go.lock"
            self.lock.write_bytes(b"")
            self.lock.chmod(0o644)
            self._lock_fd = os.open(self.lock, os.O_RDONLY)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._rfd = os.open(self.ready, os.O_RDWR | os.O_NONBLOCK)  # never EOF between writers

    def wait_ready(self, n: int) -> list[int]:
        """The pids of the first *n* readers to start (deadline: DEADLINE)."""
        data = b""
        end = time.monotonic() + DEADLINE
        while len(data.split()) < n:
            left = end - time.monotonic()
            assert left > 0, f"only {len(data.split())} of {n} readers started"
            r, _, _ = select.select([self._rfd], [], [], left)
            if r:
                data += os.read(self._rfd, 4096)
        return [int(x) for x in data.split()]

    def go(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases LOCK_EX: the waiting readers go on
            self._lock_fd = -1

    def close(self) -> None:
        self.go()
        os.close(self._rfd)


@contextlib.contextmanager
def rendezvous(base: Path, hold_lock: bool) -> Iterator[Rendezvous]:
    rv = Rendezvous(base, hold_lock)
    try:
        yield rv
    finally:
        rv.close()


def daemon_usage(pid: int) -> tuple[int, int]:
    p = psutil.Process(pid)
    return p.memory_info().rss, p.num_fds()


def wait_handles_released(mount: util.Mount) -> dict[str, Any]:
    """Poll the status xattr until the kernel has sent every release (they are asynchronous)."""
    end = time.monotonic() + DEADLINE
    while True:
        status = mount.status()
        if status["handles"] == 0:
            return status
        assert time.monotonic() < end, f"handles still open: {status}"
        time.sleep(0.01)  # polling the daemon's own report, with a deadline


# --------------------------------------------------------------------------- load


def run_load(store: Store, seconds: float) -> None:
    with util.mounted(store.root, owner=util.NOBODY[0], allow_other=True) as m:
        # warm-up: every file once, so the inode table and the caches are at their size
        warm = util.run_as(0, 0, _READER, _warm_data(m, store))
        assert warm["wrong_count"] == 0, warm
        assert not warm["errors"], warm
        wait_handles_released(m)
        rss0, fds0 = daemon_usage(m.pid)
        with ThreadPoolExecutor(READERS) as pool:
            futures = start_readers(pool, m, store, mixed(READERS, seconds=seconds))
            results = [f.result() for f in futures]
        t = total(results)
        status = wait_handles_released(m)
        rss1, fds1 = daemon_usage(m.pid)
        row = {
            **{k: v for k, v in t.items() if k != "wrong"},
            "seconds": seconds,
            "readers": READERS,
            "rss_before": rss0,
            "rss_after": rss1,
            "fds_before": fds0,
            "fds_after": fds1,
            "daemon_opens": status["opens"],
        }
        util.trust_figures("load", row)
        assert m.proc.poll() is None, "the daemon died:\n" + m.describe()
        assert t["wrong_count"] == 0, t["wrong"]
        assert not t["errors"], t["errors"]
        assert t["chunks"] > 0
        assert fds1 <= fds0 + 2, row
        assert rss1 <= rss0 + RSS_BOUND, row


def _warm_data(m: util.Mount, store: Store) -> dict[str, Any]:
    return {
        "mnt": str(m.path),
        "files": store.files,
        "chunk": CHUNK,
        "seed": 99,
        "seconds": None,
        "count": None,
        "hold": sorted(store.files),
        "tolerate": False,
        "stop_on_error": False,
        "reopen": False,
        "ready": None,
        "lock": None,
    }


def test_load_32_readers_verified(store: Store) -> None:
    run_load(store, LOAD_SECONDS)


@pytest.mark.slow
def test_load_32_readers_verified_long(store: Store) -> None:
    run_load(store, LOAD_SECONDS_SLOW)


# --------------------------------------------------------------------------- faults


def test_subtree_deleted_mid_read(store: Store, world_tmp: Path) -> None:
    """Readers hold files of a store path open; the path is deleted; they read on, correctly."""
    doomed = store.root / "doomed-1.0"
    n = 4
    kept = {f: (store.root / f).read_bytes() for f in store.doomed}
    with util.mounted(store.root, owner=util.NOBODY[0], allow_other=True) as m:
        try:
            with ThreadPoolExecutor(n) as pool, rendezvous(world_tmp, hold_lock=True) as rv:
                specs = mixed(n, hold=tuple(store.doomed), reopen=True, count=20)
                futures = start_readers(pool, m, store, specs, rv.ready, rv.lock)
                rv.wait_ready(n)  # every reader holds every doomed file open, chunk 0 read
                subprocess.run(["rm", "-rf", "--", str(doomed)], check=True)
                FIGURES["faults: subtree deleted"] += 1
                rv.go()
                results = [f.result() for f in futures]
        finally:
            if not doomed.exists():
                _restore(doomed, kept)
        t = total(results)
        reopen = Counter(
            errno.errorcode.get(e, str(e)) for r in results for e in r["reopen"].values()
        )
        util.trust_figures(
            "fault: subtree deleted mid-read", {**t, "reopen after delete": dict(reopen)}
        )
        assert m.proc.poll() is None, "the daemon died:\n" + m.describe()
        assert t["wrong_count"] == 0, t["wrong"]
        assert not t["errors"], t["errors"]  # open files read on to the end
        assert t["files"] >= n * len(store.doomed)
        assert set(reopen) <= {"ENOENT", "ESTALE"}, reopen  # gone files do not open ("0")
        assert wait_handles_released(m)["handles"] == 0


def _restore(doomed: Path, kept: dict[str, bytes]) -> None:
    """Put the deleted store path back (the module's store is shared by the other tests)."""
    doomed.mkdir(mode=0o755)
    for rel, data in kept.items():
        (doomed.parent / rel).write_bytes(data)


def _in_fuse_wait(pid: int) -> bool:
    """Whether *pid* (or one of its threads) sleeps in the kernel waiting for a FUSE answer."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read()
            if "fuse" in wchan or wchan == "request_wait_answer":
                return True
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            if state == "D":
                return True
    except OSError:
        return False
    return False


def test_sigstop_sigcont_during_load(store: Store, world_tmp: Path) -> None:
    """Readers stall while the daemon is stopped, then all complete, every byte right."""
    n = 8
    with util.mounted(store.root, owner=util.NOBODY[0], allow_other=True) as m:
        daemon = psutil.Process(m.pid)
        with ThreadPoolExecutor(n) as pool, rendezvous(world_tmp, hold_lock=True) as rv:
            # O_DIRECT on every other open: reads keep reaching the daemon.
            futures = start_readers(pool, m, store, mixed(n, count=60), rv.ready, rv.lock)
            pids = rv.wait_ready(n)
            os.kill(m.pid, signal.SIGSTOP)
            try:  # SIGCONT before the pool waits for its readers, whatever happens
                end = time.monotonic() + DEADLINE
                while daemon.status() != psutil.STATUS_STOPPED and time.monotonic() < end:
                    time.sleep(0.01)  # polling the daemon's state, with a deadline
                assert daemon.status() == psutil.STATUS_STOPPED
                rv.go()  # the readers start their load against the stopped daemon
                FIGURES["faults: SIGSTOP/SIGCONT"] += 1
                waiting: set[int] = set()
                while len(waiting) < n and time.monotonic() < end:
                    waiting = {p for p in pids if _in_fuse_wait(p)}
                    time.sleep(0.01)  # polling the readers' state, with a deadline
                still_running = [f for f in futures if not f.done()]
                assert daemon.status() == psutil.STATUS_STOPPED
            finally:
                os.kill(m.pid, signal.SIGCONT)
            results = [f.result() for f in futures]
        t = total(results)
        util.trust_figures(
            "fault: SIGSTOP/SIGCONT",
            {
                **t,
                "readers": n,
                "seen stalled": len(waiting),
                "unfinished at SIGCONT": len(still_running),
            },
        )
        assert len(waiting) == n, f"readers not all stalled in FUSE: {sorted(set(pids) - waiting)}"
        assert len(still_running) == n
        assert m.proc.poll() is None, "the daemon died:\n" + m.describe()
        assert t["wrong_count"] == 0, t["wrong"]
        assert not t["errors"], t["errors"]
        assert t["files"] == n * 60


def test_sigkill_mid_read(store: Store, world_tmp: Path) -> None:
    """Readers get an error once the daemon is killed, never a wrong byte; the mount is dead."""
    n = 8
    with util.mounted(
        store.root, owner=util.NOBODY[0], allow_other=True, expect_clean_exit=False
    ) as m:
        big = sorted(f for f in store.files if f.startswith("big/"))
        with ThreadPoolExecutor(n) as pool, rendezvous(world_tmp, hold_lock=True) as rv:
            # Half hold two big files open mid-read and wait for the kill; half read freely.
            held = mixed(n // 2, hold=tuple(big[:2]), seconds=DEADLINE, tolerate=True)
            free = mixed(n - n // 2, seconds=DEADLINE, tolerate=True, stop_on_error=True)
            for spec in held:
                spec.stop_on_error = True
            futures = start_readers(pool, m, store, held, rv.ready, rv.lock)
            futures += start_readers(pool, m, store, free, rv.ready)
            rv.wait_ready(n)
            os.kill(m.pid, signal.SIGKILL)  # while the free readers read
            FIGURES["faults: SIGKILL"] += 1
            m.proc.wait(timeout=DEADLINE)
            rv.go()
            results = [f.result() for f in futures]
        t = total(results)
        try:
            os.listdir(m.path)  # opendir is never answered from the kernel's caches
            dead_errno = 0
        except OSError as e:
            dead_errno = e.errno or 0
        util.trust_figures(
            "fault: SIGKILL mid-read", {**t, "readers": n, "stat of the dead mount": dead_errno}
        )
        assert m.proc.returncode == -signal.SIGKILL
        assert t["wrong_count"] == 0, t["wrong"]
        assert all(r["errors"] for r in results), [r["errors"] for r in results]
        assert set(t["errors"]) <= {"ENOTCONN", "ECONNABORTED", "EIO"}, t["errors"]
        assert dead_errno == errno.ENOTCONN
    assert util.mount_entry(m.path) is None


_HOG = r"""
import fcntl
fds, refused = [], {}
for name in DATA["names"]:
    try:
        fds.append(os.open(DATA["mnt"] + "/" + name, os.O_RDONLY))
    except OSError as e:
        k = errno.errorcode.get(e.errno, str(e.errno))
        refused[k] = refused.get(k, 0) + 1
with open(DATA["ready"], "w") as f:
    f.write("%d\n" % os.getpid())
lk = os.open(DATA["lock"], os.O_RDONLY)
fcntl.flock(lk, fcntl.LOCK_SH)
for fd in fds:
    os.close(fd)
emit({"held": len(fds), "refused": refused})
"""

#: The daemon's descriptor limit in the exhaustion test (systemd's default soft limit is 1024).
NOFILE = 64


def _try(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def test_descriptors_exhausted_by_a_caller(store: Store, world_tmp: Path) -> None:
    """An unprivileged caller holds more files open than the daemon may: others get an error
    (EMFILE), never a crash, and all is well once the files are closed."""
    names = sorted(store.files)[: NOFILE * 2]
    wrapper = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"]
    with util.mounted(store.root, owner=util.NOBODY[0], allow_other=True, wrapper=wrapper) as m:
        other = m.path / names[-1]
        with ThreadPoolExecutor(1) as pool, rendezvous(world_tmp, hold_lock=True) as rv:
            data = {"mnt": str(m.path), "names": names, "ready": str(rv.ready)}
            data["lock"] = str(rv.lock)
            hog = pool.submit(util.run_as, *util.NOBODY, _HOG, data)
            rv.wait_ready(1)
            FIGURES["faults: descriptors exhausted"] += 1
            during = {
                "open": _try(other.read_bytes),
                "list": _try(lambda: os.listdir(m.path / names[0].split("/")[0])),
                "status": _try(m.status),
                "statfs": _try(lambda: os.statvfs(m.path)),
                "lookup": _try(lambda: os.stat(m.path / "no-such-name")),
            }
            alive_during = m.proc.poll() is None
            rv.go()
            held = hog.result()
        after = {"open": _try(other.read_bytes), "status": _try(m.status)}
        util.trust_figures(
            "fault: descriptors exhausted", {**held, "during": during, "after": after}
        )
        assert held["refused"], held  # the caller did run the daemon out of descriptors
        assert alive_during, "the daemon died:\n" + m.describe()
        assert set(during.values()) <= {"ok", "EMFILE", "ENFILE", "ENOENT"}, during
        assert after == {"open": "ok", "status": "ok"}, after
        assert wait_handles_released(m)["handles"] == 0
