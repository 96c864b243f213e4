"""Life cycle: mount, serve until unmounted or signalled, clean up.

Validation happens before this module is reached (:mod:`noatimefs.cli`).
A clean stop -- SIGTERM, SIGINT, SIGHUP, or an external ``fusermount3 -u`` /
``umount`` -- unmounts and returns 0. A crash (an exception escaping a handler
ends ``pyfuse3.main()``) deliberately leaves the mount *dead*: callers get
``ENOTCONN`` instead of an empty directory where a store should be, and the log
names the one command that clears it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyfuse3
import trio

from noatimefs import loop, mountinfo, notify, policy
from noatimefs.errors import Exit, QuietError
from noatimefs.fs import NoatimeFS
from noatimefs.source import Source
from noatimefs.views import Allow

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Readahead the daemon gives its mount, in KiB (see _raise_readahead).
READAHEAD_KB = 1024

#: The cyclic garbage collector's thresholds while the daemon serves (Python's: 700, 10, 10).
#: A walk leaves several objects per entry that live on (a node, a kept entry and its
#: attributes), and at 700 allocations per young collection the collector ran about 500
#: times in one cold ``find`` of 87,000 entries, 0.27 s of the daemon's CPU; at these,
#: 3 times, 0.07 s (bench/README.md). The daemon makes little cyclic garbage.
GC_THRESHOLDS = (100_000, 20, 20)


@dataclass
class Config:
    source: str  # absolute
    mountpoint: str  # absolute
    consumer: policy.Consumer
    per_user: Allow | None = None  # --per-user: who may have a view
    allow_other: bool = False
    timeout: float = 300.0
    debug: bool = False
    fast_loop: bool = True  # noatimefs.loop's reader; False: pyfuse3's own loop (--plain-loop)
    extra_options: frozenset[str] = field(default_factory=frozenset)


def _escape(value: str) -> str:
    """Escape a value for libfuse's comma-separated option list."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(config: Config) -> set[str]:
    options = {
        f"fsname={_escape(config.source)}",
        "subtype=noatimefs",
        "ro",
        "default_permissions",
        *config.extra_options,
    }
    if config.allow_other:
        options.add("allow_other")
    if config.debug:
        options.add("debug")
    return options


async def _stop_on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        # Blocked since before the mount (run()): one that came meanwhile is
        # pending and arrives now, handled like any other.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        task_status.started()
        async for signum in signals:
            log.info("got %s: unmounting", signal.Signals(signum).name)
            notify.stopping()
            loop.terminate()
            return


async def _serve(ops: NoatimeFS, real_mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal)
        nursery.start_soon(ops.background)
        nursery.start_soon(_raise_readahead_after_init, ops, real_mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], list[str]]]:
    """Catch what libfuse writes to fd 2, so that a failed mount is still one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:

        def lines() -> list[str]:
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            return [line.strip() for line in text.splitlines() if line.strip()]

        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one.

    Every file a caller holds open through the mount holds a descriptor here,
    and systemd's default soft limit (1024) is one user's reach.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return
        log.debug("open-files limit raised from %d to %d", soft, hard)


async def _raise_readahead_after_init(ops: NoatimeFS, real_mountpoint: str) -> None:
    # The kernel sets the mount's readahead when it takes the answer to FUSE's INIT
    # request (to no more than it offered), so only a figure set after that stays.
    await ops.initialized.wait()
    _raise_readahead(real_mountpoint)


def _raise_readahead(real_mountpoint: str) -> None:
    """Let the kernel read ahead :data:`READAHEAD_KB` on the new mount (root only).

    The kernel gives a FUSE mount 128 KiB of readahead, so a big sequential
    read reaches the daemon as 128 KiB requests: 4,096 of them for 512 MiB,
    each a round trip through pyfuse3. With 1 MiB, eight times fewer. (libfuse's
    ``max_readahead`` option can only lower the figure; the backing device's
    own readahead is usually larger still, 8 MiB on the benchmark's disk.)
    Reads only mountinfo and sysfs: a ``stat`` of the mount from the daemon's
    own loop would wait for the loop.
    """
    entry = mountinfo.find(real_mountpoint)
    if entry is None or not entry.fstype.startswith("fuse"):
        return
    knob = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    try:
        with open(knob, encoding="ascii") as f:
            current = int(f.read())
        if current < READAHEAD_KB:
            with open(knob, "w", encoding="ascii") as f:
                f.write(str(READAHEAD_KB))
    except (OSError, ValueError) as exc:
        log.debug("readahead left as it is (%s): %s", knob, exc)


def run(config: Config, ready: Callable[[], None] | None = None) -> int:
    """Mount, serve, unmount; the exit status of the daemon."""
    _raise_nofile_limit()
    gc.set_threshold(*GC_THRESHOLDS)
    source = Source(config.source)
    # A signal between the mount and trio's handlers would otherwise kill the
    # daemon with the mount left dead: hold them until _stop_on_signal. One the
    # daemon inherited as ignored (a shell starts background commands with SIGINT
    # ignored) would be discarded even while held: they stop the daemon from the start.
    for signum in _SIGNALS:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        ops = NoatimeFS(source, config.consumer, timeout=config.timeout, per_user=config.per_user)
        real_mountpoint = os.path.realpath(config.mountpoint)  # once mounted, only we could answer
        with _captured_stderr() as libfuse_said:
            try:
                pyfuse3.init(ops, config.mountpoint, fuse_options(config))
            except RuntimeError as exc:
                said = "; ".join(libfuse_said()) or str(exc)
                raise QuietError(f"cannot mount {config.mountpoint}: {said}", Exit.FUSE) from None
            noise = libfuse_said()
        for line in noise:
            log.warning("libfuse: %s", line)
        if config.fast_loop:
            loop.install()
        log.info(
            "mounted %s at %s (%s%s), pid %d",
            config.source,
            config.mountpoint,
            f"presented owner uid {config.consumer.uid}, gid {config.consumer.gid} for public "
            "entries"
            if config.per_user is None
            else f"a view per uid: {config.per_user.describe()}",
            ", allow_other" if config.allow_other else "",
            os.getpid(),
        )
        clean = False
        try:
            if ready is not None:
                ready()
            trio.run(_serve, ops, real_mountpoint)
            clean = True
            notify.stopping()
        except Exception:
            log.exception("noatimefs crashed; the mount at %s is left dead", config.mountpoint)
            log.error(
                "recover by starting noatimefs on %s again (it clears its own dead mount), "
                "or with: fusermount3 -u %s",
                config.mountpoint,
                config.mountpoint,
            )
            return Exit.INTERNAL
        finally:
            pyfuse3.close(unmount=clean)
            ops.close()
        stats = ops.stats
        log.info(
            "unmounted %s; %d opens, O_NOATIME kept %d, dropped %d",
            config.mountpoint,
            stats.opens,
            stats.noatime_kept,
            stats.noatime_dropped,
        )
        return Exit.OK
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        source.close()
