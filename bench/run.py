#!/usr/bin/env python3
"""Benchmark noatimefs against the native tree, bindfs (plain and tuned) and the floor server.

Run as root (it mounts, and drops the page cache for the cold runs)::

    .venv/bin/python bench/run.py --small     # minutes; what `make bench` runs
    .venv/bin/python bench/run.py             # the full run (`make bench-full`)
    git worktree add /tmp/base HEAD~1          # an A/B of a change, in one interleaved run:
    .venv/bin/python bench/run.py --base /tmp/base --modes native,noatimefs,noatimefs-base

It generates (and caches) a store-like tree with ``noatimefs.storegen``,
mounts every mode at once, then runs each workload cold (after ``sync; echo 3
> /proc/sys/vm/drop_caches``) and warm, as the consumer user, interleaving the
modes (A B C A B C …) for ``--reps`` repetitions.  For each workload and mode
it reports the median wall time, the ratio to native and to the floor server,
and the daemon's CPU seconds (user+system, psutil, per run, median), and it
checks every run's output against native's (listings, byte counts).  The table
is printed and written to ``bench/results/<timestamp>.md``; ``--json`` writes
the raw numbers.  The exit status is 1 if any output differed from native's
(or a required mode did not mount), else 0.  Timings are reported, never
judged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import pwd
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from noatimefs import storegen  # noqa: E402

MODES = ("native", "noatimefs", "bindfs", "bindfs-tuned", "floor")
# Experiments on the floor, run only when named in --modes: one pyfuse3 worker task;
# one task and a request loop that does not park between queued requests.
EXTRA_MODES = (
    "floor-t1",
    "floor-fast",
    "floor-loop",
    "floor-pass",
    "noatimefs-plain",
    "noatimefs-base",
    "noatimefs-view",
)
OPTIONAL_MODES = frozenset({"noatimefs"})  # skipped with a note if it does not mount
WORKLOADS = ("find", "stat", "small_read", "big_seq", "big_par2", "open20k")
#: The big top level's workloads (--big-top); ls, glob and lookup also run on the other tree.
TOP_WORKLOADS = ("ls", "glob", "lookup", "find")
ALL_WORKLOADS = (*WORKLOADS, "ls", "glob", "lookup")
TOP_MODES = ("native", "noatimefs", "bindfs-tuned")
MOUNT_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0

# lstat()s each name of a list (relative to the cwd); prints the count, a digest of
# (name, type, size) and the loop's own time.  Run with Debian's python3.
LOOKUP_SCRIPT = """
import hashlib, os, stat, sys, time
names = open(sys.argv[1]).read().split("\\n")[:-1]
t0 = time.perf_counter()
seen = [(n, stat.S_IFMT(st.st_mode), st.st_size) for n in names for st in (os.lstat(n),)]
dt = time.perf_counter() - t0
print(len(seen), hashlib.sha256(repr(sorted(seen)).encode()).hexdigest()[:16], dt)
"""

# Opens N files (cycling through a list of paths relative to the cwd) and closes
# them; prints the count and the loop's own time.  Run with Debian's python3.
OPENS_SCRIPT = """
import os, sys, time
names = open(sys.argv[1]).read().split("\\n")[:-1]
n = int(sys.argv[2])
t0 = time.perf_counter()
for i in range(n):
    os.close(os.open(names[i % len(names)], os.O_RDONLY))
print(n, time.perf_counter() - t0)
"""


@dataclasses.dataclass(frozen=True)
class Scale:
    paths: int
    files_per_path: int
    big_files: int
    big_size: int
    opens: int
    reps: int


FULL = Scale(paths=3000, files_per_path=12, big_files=2, big_size=512 << 20, opens=20000, reps=3)
SMALL = Scale(paths=120, files_per_path=8, big_files=2, big_size=8 << 20, opens=2000, reps=3)
#: --big-top: store paths of one directory with two empty files each (5% are a single file).
TOP_FULL_PATHS, TOP_SMALL_PATHS = 200_000, 2_000
TOP_SHAPE = (1, 2)
#: Store paths the lookup workload stats by name (fewer if the tree has fewer).
LOOKUPS = 10_000


# ---------------------------------------------------------------- mounts


def mounted(mountpoint: str) -> bool:
    """Is ``mountpoint`` in /proc/self/mountinfo (without asking the filesystem)?"""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            field = line.split(" ", 5)[4]
            if field.replace("\\040", " ") == mountpoint:
                return True
    return False


@dataclasses.dataclass
class Mount:
    mode: str
    root: str  # where the workloads run
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    mnt: str = ""  # the mountpoint, when the workloads run below it (a per-user view)

    @property
    def mountpoint(self) -> str:
        return self.mnt or self.root

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def cpu(self) -> float:
        if self.proc is None:
            return 0.0
        # The daemon and its helpers (noatimefs's walk-ahead process lives as long as it).
        daemon = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [daemon, *daemon.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def log_tail(self, n: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class MountError(RuntimeError):
    pass


def daemon_command(mode: str, source: str, mnt: str, owner: str) -> list[str]:
    uid = str(pwd.getpwnam(owner).pw_uid)
    if mode in ("noatimefs", "noatimefs-base"):  # the latter started in --base (daemon_cwd)
        return [sys.executable, "-m", "noatimefs", "--owner", owner, "--allow-other", source, mnt]
    if mode == "noatimefs-view":  # --per-user; the workloads run in MNT/<owner's uid>
        return [sys.executable, "-m", "noatimefs", "--per-user", "--allow-other", source, mnt]
    if mode == "noatimefs-plain":  # pyfuse3's own request loop (noatimefs/loop.py off)
        plain = ["--plain-loop", "--owner", owner, "--allow-other"]
        return [sys.executable, "-m", "noatimefs", *plain, source, mnt]
    if mode == "bindfs":
        return ["bindfs", "-f", "-o", "ro", f"--force-user={owner}", source, mnt]
    if mode == "bindfs-tuned":
        opts = "ro,kernel_cache,entry_timeout=300,attr_timeout=300,negative_timeout=300"
        return ["bindfs", "-f", "--multithreaded", "-o", opts, f"--force-user={owner}", source, mnt]
    if mode == "floor":
        return [sys.executable, str(HERE / "floorfs.py"), "--owner", uid, source, mnt]
    if mode == "floor-t1":
        return [
            sys.executable,
            str(HERE / "floorfs.py"),
            "--max-tasks=1",
            "--owner",
            uid,
            source,
            mnt,
        ]
    if mode == "floor-loop":  # the floor with noatimefs's request loop (noatimefs/loop.py)
        return [
            sys.executable,
            str(HERE / "floorfs.py"),
            "--noatimefs-loop",
            "--owner",
            uid,
            source,
            mnt,
        ]
    if mode == "floor-pass":  # floor-loop touching SOURCE as a passthrough must (as bindfs does)
        return [
            sys.executable,
            str(HERE / "floorfs.py"),
            "--noatimefs-loop",
            "--passthrough",
            "--owner",
            uid,
            source,
            mnt,
        ]
    if mode == "floor-fast":
        return [
            sys.executable,
            str(HERE / "floorfs.py"),
            "--fast-loop",
            "--owner",
            uid,
            source,
            mnt,
        ]
    raise ValueError(mode)


def daemon_cwd(mode: str, base: Path | None) -> Path:
    """Where a mode's daemon starts: ``python -m`` imports the package of that directory first."""
    if mode != "noatimefs-base":
        return REPO
    if base is None:
        raise MountError("noatimefs-base needs --base DIR (another checkout of noatimefs)")
    probe = [sys.executable, "-c", "import noatimefs; print(noatimefs.__file__)"]
    found = subprocess.run(probe, capture_output=True, text=True, cwd=base).stdout.strip()
    if not found.startswith(str(base.resolve()) + os.sep):
        raise MountError(f"--base {base}: python -m there imports noatimefs from {found or '?'}")
    return base


#: --pin: the CPUs (taskset lists) of the daemons and of the workloads. Where the scheduler
#: puts a caller and the daemon that answers it decides much of a round trip's cost on a
#: small virtual machine (bench/README.md, "Where the caller runs"): pinned, an A/B of a
#: handler sees its change with less noise. Not how a mount is used: the default is unpinned.
PLACEMENTS = {"apart": ("1", "0"), "together": ("0", "0")}


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    """*argv* run on the CPUs *cpus* (a taskset list) and its children too; as is for None."""
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def start_mount(
    mode: str,
    source: str,
    workdir: Path,
    owner: str,
    base: Path | None = None,
    cpus: str | None = None,
) -> Mount:
    if mode == "native":
        return Mount(mode, source)
    mnt = workdir / f"mnt-{mode}"
    mnt.mkdir(mode=0o755)
    log = workdir / f"{mode}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            pinned(daemon_command(mode, source, str(mnt), owner), cpus),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=daemon_cwd(mode, base),
        )
    m = Mount(mode, str(mnt), proc, log)
    if mode == "noatimefs-view":
        m.mnt, m.root = str(mnt), str(mnt / str(pwd.getpwnam(owner).pw_uid))
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not mounted(m.mountpoint):
        if proc.poll() is not None:
            stop_mount(m)
            raise MountError(f"{mode} exited with {proc.returncode}:\n{m.log_tail()}")
        if time.monotonic() > deadline:
            stop_mount(m)
            raise MountError(f"{mode} did not mount in {MOUNT_TIMEOUT:.0f}s:\n{m.log_tail()}")
        time.sleep(0.05)
    return m


def stop_mount(m: Mount) -> None:
    """Unmount (fusermount3 -u, then umount -l), then stop the daemon by its pid."""
    if m.proc is None:
        return
    try:
        if mounted(m.mountpoint):
            r = subprocess.run(["fusermount3", "-u", m.mountpoint], capture_output=True)
            if r.returncode != 0 and mounted(m.mountpoint):
                subprocess.run(["umount", "-l", m.mountpoint], capture_output=True)
    finally:
        try:
            m.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        with contextlib.suppress(OSError):
            os.rmdir(m.mountpoint)


# ---------------------------------------------------------------- workloads


@dataclasses.dataclass
class Outcome:
    seconds: float
    signature: str  # compared with native's
    shown: str  # human-readable form of the output (counts)
    lines: frozenset[bytes] = frozenset()  # listings, to say what differed


class Workloads:
    """Each workload runs as the consumer in the mount root and returns an Outcome."""

    def __init__(
        self,
        summary: storegen.Summary,
        owner: str,
        opens: int,
        listfile: str,
        lookupfile: str = "",
        glob: str = "*",
        cpus: str | None = None,
    ) -> None:
        pw = pwd.getpwnam(owner)
        self.as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        self.big = summary.big_files
        self.big_top = "./" + summary.big_files[0].split("/")[0] if summary.big_files else ""
        self.opens = opens
        self.listfile = listfile
        self.lookupfile = lookupfile
        self.pattern = glob
        self.cpus = cpus

    def _run(self, root: str, argv: list[str]) -> tuple[float, bytes, bytes]:
        t0 = time.perf_counter()
        cmd = pinned([*self.as_user, "--", *argv], self.cpus)
        r = subprocess.run(cmd, cwd=root, capture_output=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{argv!r} in {root} failed ({r.returncode}): {r.stderr[-2000:]!r}")
        return dt, r.stdout, r.stderr

    @staticmethod
    def _listing(dt: float, out: bytes) -> Outcome:
        lines = sorted(out.splitlines())
        digest = hashlib.sha256(b"\n".join(lines)).hexdigest()
        return Outcome(dt, digest, f"{len(lines)} lines", frozenset(lines))

    def find(self, root: str) -> Outcome:
        dt, out, _ = self._run(root, ["find", "."])
        return self._listing(dt, out)

    def stat(self, root: str) -> Outcome:
        # Not the root itself: its mode is SOURCE's own, which a mount may present differently
        # (noatimefs shows a 0755 root as 0555 to a consumer who may only read and search it).
        fmt = r"%y %m %s %T@ %p %l\n"
        dt, out, _ = self._run(root, ["find", ".", "-mindepth", "1", "-printf", fmt])
        return self._listing(dt, out)

    def small_read(self, root: str) -> Outcome:
        excl = f"--exclude={self.big_top}" if self.big_top else ""
        dt, out, _ = self._run(root, ["sh", "-c", f"tar -cf - {excl} . | wc -c"])
        n = out.decode().strip()
        return Outcome(dt, n, f"{n} B")

    def _dd(self, root: str, files: list[str]) -> Outcome:
        # Each dd's summary is printed by one printf (one write of less than
        # PIPE_BUF, so atomic): parallel dds cannot interleave their lines.
        script = (
            " ".join(
                f'{{ r=$(dd if={f} of=/dev/null bs=1M 2>&1); printf "%s\\n" "$r"; }} &'
                for f in files
            )
            + " wait"
        )
        dt, out, _ = self._run(root, ["sh", "-c", script])
        sizes = sorted(int(ln.split()[0]) for ln in out.decode().splitlines() if "bytes" in ln)
        return Outcome(dt, ",".join(map(str, sizes)), "+".join(map(str, sizes)) + " B")

    def big_seq(self, root: str) -> Outcome:
        return self._dd(root, self.big[:1])

    def big_par2(self, root: str) -> Outcome:
        return self._dd(root, self.big[:2])

    def open20k(self, root: str) -> Outcome:
        # The loop's own time: the interpreter's start-up is not the filesystem's.
        # -I: the interpreter must not list the cwd (the mount root) looking for modules: a
        # readdirplus through noatimefs would hand the kernel every top-level entry first.
        cmd = ["/usr/bin/python3", "-I", "-c", OPENS_SCRIPT, self.listfile, str(self.opens)]
        _, out, _ = self._run(root, cmd)
        n, dt = out.split()
        return Outcome(float(dt), n.decode(), f"{n.decode()} opens")

    def ls(self, root: str) -> Outcome:
        # -U: in directory order, nothing sorted; -A: not . and .. (a FUSE mount may omit them).
        dt, out, _ = self._run(root, ["ls", "-A", "-U"])
        return self._listing(dt, out)

    def glob(self, root: str) -> Outcome:
        dt, out, _ = self._run(root, ["sh", "-c", f"printf '%s\\n' {self.pattern}"])
        return self._listing(dt, out)

    def lookup(self, root: str) -> Outcome:
        cmd = ["/usr/bin/python3", "-I", "-c", LOOKUP_SCRIPT, self.lookupfile]  # -I: open20k
        _, out, _ = self._run(root, cmd)
        n, digest, dt = out.split()
        return Outcome(float(dt), f"{n.decode()} {digest.decode()}", f"{n.decode()} lstat")

    def get(self, name: str) -> Callable[[str], Outcome]:
        fn: Callable[[str], Outcome] = getattr(self, name)
        return fn


def difference(want: Outcome, got: Outcome) -> str:
    """One line saying how ``got`` differs from ``want``."""
    if want.lines or got.lines:
        missing = sorted(want.lines - got.lines)[:2]
        extra = sorted(got.lines - want.lines)[:2]
        text = f"{got.shown}; missing {missing!r}; unexpected {extra!r}"
    else:
        text = f"{got.shown}, expected {want.shown}: {got.signature[:300]}"
    return text.replace("|", "\\|").replace("\n", " ")


def drops() -> int:
    """How many times anyone dropped the caches since boot (``drop_slab`` in /proc/vmstat)."""
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "drop_slab":
                return int(value)
    return 0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ---------------------------------------------------------------- results


@dataclasses.dataclass
class Run:
    rep: int
    workload: str
    cache: str
    mode: str
    seconds: float
    cpu: float | None
    shown: str
    ok: bool
    note: str = ""
    #: drop_caches by other processes during the run: a "warm" run was partly cold
    disturbed: int = 0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(runs: list[Run], modes: Sequence[str], workloads: Sequence[str]) -> str:
    def med(w: str, c: str, m: str, key: str) -> float:
        xs = [getattr(r, key) for r in runs if (r.workload, r.cache, r.mode) == (w, c, m)]
        return median([x for x in xs if x is not None])

    caches = [c for c in ("cold", "warm") if any(r.cache == c for r in runs)]
    lines = ["| workload | cache | mode | median s | × native | × floor | daemon CPU s | output |"]
    lines.append("|---|---|---|---:|---:|---:|---:|---|")
    for w in workloads:
        for c in caches:
            base = med(w, c, "native", "seconds") if "native" in modes else float("nan")
            floor = med(w, c, "floor", "seconds") if "floor" in modes else float("nan")
            for m in modes:
                mine = [r for r in runs if (r.workload, r.cache, r.mode) == (w, c, m)]
                if not mine:
                    continue
                s = med(w, c, m, "seconds")
                cpu = med(w, c, m, "cpu")
                bad = [r for r in mine if not r.ok]
                check = f"MISMATCH: {bad[0].note}" if bad else f"ok ({mine[0].shown})"
                disturbed = sum(1 for r in mine if r.disturbed)
                if disturbed:
                    check += f"; {disturbed} of {len(mine)} runs saw another drop_caches"
                lines.append(
                    f"| {w} | {c} | {m} | {s:.3f} | {s / base:.2f} | {s / floor:.2f} | "
                    f"{'-' if cpu != cpu else f'{cpu:.2f}'} | {check} |"
                )
    return "\n".join(lines)


def ratio_matrix(runs: list[Run], modes: Sequence[str], workloads: Sequence[str]) -> str:
    """Compact view: median seconds per mode, with the ratio to native."""
    head = "| workload | cache | " + " | ".join(modes) + " |"
    lines = [head, "|---|---|" + "---:|" * len(modes)]
    for w in workloads:
        for c in ("cold", "warm"):
            cells = []
            base = median(
                [r.seconds for r in runs if (r.workload, r.cache, r.mode) == (w, c, "native")]
            )
            for m in modes:
                xs = [r.seconds for r in runs if (r.workload, r.cache, r.mode) == (w, c, m)]
                if not xs:
                    cells.append("")
                    continue
                s = median(xs)
                cells.append(f"{s:.3f} ({s / base:.2f}×)" if base == base else f"{s:.3f}")
            if any(cells):
                lines.append(f"| {w} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(runs: list[Run], modes: Sequence[str]) -> str:
    """Issue 4's targets for noatimefs, each with the measured ratio (informational)."""
    if "noatimefs" not in modes:
        return "- noatimefs did not run"

    def med(w: str, c: str, m: str) -> float:
        return median([r.seconds for r in runs if (r.workload, r.cache, r.mode) == (w, c, m)])

    lines = []
    for w, c, ref, limit in [
        *(
            (w, c, "bindfs-tuned", 1.0)
            for w in ("big_seq", "big_par2", "small_read")
            for c in ("cold", "warm")
        ),
        *((w, "warm", "native", 1.1) for w in ("big_seq", "big_par2")),
        *((w, c, "floor", 1.2) for w in ("find", "stat", "open20k") for c in ("cold", "warm")),
        *(
            (w, c, "bindfs-tuned", 1.0)
            for w in ("find", "stat", "open20k")
            for c in ("cold", "warm")
        ),
        # issue 15's (a big top level)
        *((w, "warm", "bindfs-tuned", 1.5) for w in ("ls", "glob")),
        *(("lookup", c, "bindfs-tuned", 1.2) for c in ("cold", "warm")),
    ]:
        if ref not in modes:
            continue
        if not any(r.workload == w for r in runs):
            continue
        mine, theirs = med(w, c, "noatimefs"), med(w, c, ref)
        if mine != mine or theirs != theirs:
            continue
        ratio = mine / theirs
        verdict = "met" if ratio <= limit else "NOT met"
        what = "faster than" if limit == 1.0 else f"within {limit}× of"
        lines.append(f"- {w} {c}: {ratio:.2f}× {ref} (target: {what} {ref}): {verdict}")
    return "\n".join(lines)


def shape(args: argparse.Namespace) -> str:
    if args.dirs_per_path is None:
        return f" (storegen's layout, about {args.files_per_path} files each)"
    return f" of {args.dirs_per_path} directories × {args.files_per_dir} entries"


def environment(
    summary: storegen.Summary, args: argparse.Namespace, modes: Sequence[str], load: str
) -> str:
    def out(cmd: list[str], cwd: Path = REPO) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    import pyfuse3

    describe = ["git", "describe", "--always", "--dirty"]
    base = []
    if "noatimefs-base" in modes:
        base = [f"- noatimefs-base: git {out(describe, args.base)} ({args.base})"]
    return "\n".join(
        [
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- host: {platform.node()}, kernel {platform.release()}, {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total >> 30} GiB",
            f"- noatimefs: git {out(describe)}; "
            f"pyfuse3 {pyfuse3.__version__}; {out(['bindfs', '--version'])}",
            *base,
            f"- tree: {summary.paths} store paths{shape(args)}, {summary.entries} entries "
            f"({summary.files} files, {summary.dirs} dirs, {summary.symlinks} symlinks), "
            f"{summary.bytes >> 20} MiB; big files {len(summary.big_files)} × "
            f"{summary.big_size >> 20} MiB; seed {summary.seed}",
            f"- runs: {args.reps} repetitions, modes interleaved {' '.join(modes)}; "
            f"workloads as user {args.owner}; open20k = {args.opens} open/close calls "
            "(timed inside the caller, start-up excluded); "
            + (
                f"pinned {args.pin}: daemons on CPU {PLACEMENTS[args.pin][0]}, "
                f"workloads on CPU {PLACEMENTS[args.pin][1]}"
                if args.pin
                else "unpinned"
            ),
            "- daemon CPU s: user+system of the daemon process and its helpers per run (median); "
            "native has no daemon",
            f"- load average (1 min) at start and end: {load} (other work on the machine "
            "shows up as noise in every mode alike, the modes being interleaved)",
        ]
    )


# ---------------------------------------------------------------- main


def progress(i: int, total: int, t0: float, text: str) -> None:
    elapsed = time.monotonic() - t0
    eta = elapsed / i * (total - i) if i else 0.0
    width = 24
    bar = "#" * (width * i // total) + "." * (width - width * i // total)
    print(f"[{bar}] {i:4d}/{total} eta {eta:5.0f}s  {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def mounts(
    modes: Sequence[str],
    source: str,
    workdir: Path,
    owner: str,
    base: Path | None = None,
    cpus: str | None = None,
) -> Iterator[dict[str, Mount]]:
    active: dict[str, Mount] = {}
    try:
        for mode in modes:
            try:
                active[mode] = start_mount(mode, source, workdir, owner, base, cpus)
                print(f"mounted {mode}: {active[mode].root}", file=sys.stderr)
            except (MountError, OSError) as e:
                if mode in OPTIONAL_MODES:
                    print(f"skipping {mode}: {e}", file=sys.stderr)
                    continue
                raise
        yield active
    finally:
        for m in reversed(active.values()):
            stop_mount(m)


def tree_key(gen: dict[str, int]) -> str:
    """The cache key of a tree made by ``storegen.generate(**gen)``."""
    return hashlib.sha256(json.dumps(gen, sort_keys=True).encode()).hexdigest()[:12]


def file_list(summary: storegen.Summary, listfile: Path) -> Path:
    """Write (once) the sorted relative paths of the tree's small regular files."""
    if not listfile.exists():
        big = set(summary.big_files)
        names = sorted(
            os.path.relpath(os.path.join(d, f), summary.dest)
            for d, _, fs in os.walk(summary.dest)
            for f in fs
            if not os.path.islink(os.path.join(d, f))
        )
        tmp = listfile.with_suffix(".tmp")
        tmp.write_text("".join(n + "\n" for n in names if n not in big))
        tmp.replace(listfile)
    listfile.chmod(0o644)
    return listfile


def top_level(summary: storegen.Summary, lookupfile: Path, seed: int) -> tuple[Path, str]:
    """Write (once) the store paths the lookup workload stats; and the glob's pattern.

    The pattern matches one store path whatever its name: ``*`` and the rest of
    its name after the first 8 characters of the hash.
    """
    top = sorted(os.listdir(summary.dest))
    if not lookupfile.exists():
        chosen = random.Random(seed).sample(top, min(LOOKUPS, len(top)))
        tmp = lookupfile.with_suffix(".tmp")
        tmp.write_text("".join(n + "\n" for n in chosen))
        tmp.replace(lookupfile)
    lookupfile.chmod(0o644)
    return lookupfile, "*" + top[len(top) // 2][8:]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="small scale (what `make bench` runs)")
    p.add_argument(
        "--big-top",
        action="store_true",
        help="the big top-level tree (200,000 store paths; --small: 2,000) and its workloads "
        f"({','.join(TOP_WORKLOADS)}), modes {','.join(TOP_MODES)} unless --modes",
    )
    p.add_argument("--modes", help=f"comma-separated, native first (default {','.join(MODES)})")
    p.add_argument(
        "--workloads",
        help=f"default {','.join(WORKLOADS)}; also ls,glob,lookup",
    )
    p.add_argument(
        "--require", default="", help="modes that must mount (default: all but noatimefs)"
    )
    p.add_argument("--reps", type=int, help="repetitions (default 3)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold runs")
    p.add_argument(
        "--pin",
        choices=sorted(PLACEMENTS),
        help="run the daemons and the workloads on fixed CPUs: apart (daemons on CPU 1, "
        "workloads on CPU 0) or together (both on CPU 0); default: unpinned",
    )
    p.add_argument("--owner", default="nobody", help="consumer user (default nobody)")
    p.add_argument("--paths", type=int)
    p.add_argument("--files-per-path", type=int)
    p.add_argument(
        "--dirs-per-path",
        type=int,
        help="the tree's shape: directories per store path (with --files-per-dir; "
        "default: storegen's own layout, --files-per-path files per path)",
    )
    p.add_argument("--files-per-dir", type=int, help="the tree's shape: entries per directory")
    p.add_argument("--big-size", type=int, help="bytes per big file")
    p.add_argument("--opens", type=int, help="open/close calls (default 20000; small: 2000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cache", default="/var/tmp/noatimefs-bench", help="where trees are kept")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for the .md report")
    p.add_argument("--json", help="also write the raw runs here")
    p.add_argument(
        "--base",
        type=Path,
        help="another checkout of noatimefs, run as mode noatimefs-base (an A/B in one run)",
    )
    args = p.parse_args(argv)
    scale = SMALL if args.small else FULL
    if args.pin == "apart" and (os.cpu_count() or 1) < 2:
        p.error("--pin apart needs two CPUs")
    if (args.dirs_per_path is None) != (args.files_per_dir is None):
        p.error("--dirs-per-path and --files-per-dir go together")
    if args.big_top:
        args.modes = args.modes or ",".join(TOP_MODES)
        args.workloads = args.workloads or ",".join(TOP_WORKLOADS)
        args.paths = args.paths or (TOP_SMALL_PATHS if args.small else TOP_FULL_PATHS)
        if args.dirs_per_path is None:
            args.dirs_per_path, args.files_per_dir = TOP_SHAPE
        scale = dataclasses.replace(scale, big_files=0)
    args.modes = args.modes or ",".join(MODES)
    args.workloads = args.workloads or ",".join(WORKLOADS)
    args.paths = args.paths or scale.paths
    args.files_per_path = args.files_per_path or scale.files_per_path
    args.big_size = args.big_size or scale.big_size
    args.opens = args.opens or scale.opens
    args.reps = args.reps or scale.reps
    args.big_files = scale.big_files
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: error: run as root (mounts, drop_caches)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(modes) - set(MODES) - set(EXTRA_MODES) | set(workloads) - set(ALL_WORKLOADS)
    if unknown:
        print(f"bench: error: unknown mode or workload: {sorted(unknown)}", file=sys.stderr)
        return 2
    required = set(args.require.split(",")) - {""} if args.require else set(modes) - OPTIONAL_MODES

    gen: dict[str, int] = {
        "paths": args.paths,
        "files_per_path": args.files_per_path,
        "big_files": args.big_files,
        "big_size": args.big_size,
        "seed": args.seed,
    }
    if args.dirs_per_path is not None:  # (the default layout's trees keep their cache key)
        gen |= {"dirs_per_path": args.dirs_per_path, "files_per_dir": args.files_per_dir}
    if args.big_top:
        gen["max_file_size"] = 0  # metadata only
    key = tree_key(gen)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)
    t = time.monotonic()
    summary = storegen.ensure_tree(cache / f"tree-{key}", **gen)
    print(
        f"tree: {summary.dest} ({summary.entries} entries, {time.monotonic() - t:.1f}s)",
        file=sys.stderr,
    )
    listfile = cache / f"tree-{key}.files"
    if "open20k" in workloads:
        file_list(summary, listfile)
    lookupfile, pattern = top_level(summary, cache / f"tree-{key}.lookup", args.seed)

    daemon_cpus, workload_cpus = PLACEMENTS[args.pin] if args.pin else (None, None)
    wl = Workloads(
        summary, args.owner, args.opens, str(listfile), str(lookupfile), pattern, workload_cpus
    )
    caches = ["warm"] if args.no_cold else ["cold", "warm"]
    runs: list[Run] = []
    expected: dict[str, Outcome] = {}
    failed_mounts: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="mnt.", dir=cache))
    workdir.chmod(0o755)
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    try:
        with mounts(modes, summary.dest, workdir, args.owner, args.base, daemon_cpus) as active:
            failed_mounts = [m for m in modes if m not in active]
            live = [m for m in modes if m in active]
            total = args.reps * len(workloads) * len(live) * len(caches)
            i = 0
            for rep in range(1, args.reps + 1):
                for w in workloads:
                    for mode in live:
                        m = active[mode]
                        for c in caches:
                            drops0 = drops()
                            if c == "cold":
                                drop_caches()
                            cpu0 = m.cpu()
                            try:
                                o = wl.get(w)(m.root)
                            except RuntimeError as e:
                                o = Outcome(float("nan"), f"error: {e}", "error")
                            cpu = m.cpu() - cpu0 if m.proc else None
                            ref = expected.setdefault(w, o)
                            ok = o.signature == ref.signature and o.shown != "error"
                            note = "" if ok else difference(ref, o)
                            foreign = drops() - drops0 - (c == "cold")
                            runs.append(
                                Run(rep, w, c, mode, o.seconds, cpu, o.shown, ok, note, foreign)
                            )
                            i += 1
                            progress(
                                i,
                                total,
                                t0,
                                f"rep {rep} {w:10s} {c} {mode:12s} "
                                f"{o.seconds:8.3f}s {'ok' if ok else 'MISMATCH'}",
                            )
                            if m.proc and m.proc.poll() is not None:
                                raise MountError(f"{mode} died:\n{m.log_tail()}")
    except MountError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    live = [m for m in modes if m not in failed_mounts]
    report = "\n".join(
        [
            f"# noatimefs benchmark ({'small' if args.small else 'full'}"
            f"{', big top level' if args.big_top else ''})",
            "",
            environment(summary, args, live, f"{load0:.1f}, {os.getloadavg()[0]:.1f}"),
            *(f"- {m}: did not mount; skipped" for m in failed_mounts),
            "",
            "## Median seconds (ratio to native)",
            "",
            ratio_matrix(runs, live, workloads),
            "",
            "## Issues 4 and 15's targets for noatimefs",
            "",
            targets(runs, live),
            "",
            "## Per workload and mode",
            "",
            table(runs, live, workloads),
            "",
        ]
    )
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"{stamp}{'-small' if args.small else ''}.md"
    path.write_text(report)
    print(f"written: {path}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "summary": summary.to_json(),
                    "modes": live,
                    "skipped": failed_mounts,
                    "runs": [dataclasses.asdict(r) for r in runs],
                },
                indent=1,
            )
        )
    bad = [r for r in runs if not r.ok]
    missing = sorted(required & set(failed_mounts))
    if bad:
        print(f"bench: {len(bad)} runs differ from native", file=sys.stderr)
    if missing:
        print(f"bench: required modes did not mount: {missing}", file=sys.stderr)
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
