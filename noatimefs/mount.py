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

from noatimefs import loop, notify, policy
from noatimefs.errors import Exit, QuietError
from noatimefs.fs import NoatimeFS
from noatimefs.source import Source

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Config:
    source: str  # absolute
    mountpoint: str  # absolute
    consumer: policy.Consumer
    allow_other: bool = False
    timeout: float = 300.0
    debug: bool = False
    fast_loop: bool = True  # noatimefs.loop: no parking while requests are queued
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


async def _serve(ops: NoatimeFS) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal)
        nursery.start_soon(ops.background)
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


def run(config: Config, ready: Callable[[], None] | None = None) -> int:
    """Mount, serve, unmount; the exit status of the daemon."""
    _raise_nofile_limit()
    source = Source(config.source)
    # A signal between the mount and trio's handlers would otherwise kill the
    # daemon with the mount left dead: hold them until _stop_on_signal.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        ops = NoatimeFS(source, config.consumer, timeout=config.timeout)
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
            "mounted %s at %s (presented owner uid %d%s), pid %d",
            config.source,
            config.mountpoint,
            config.consumer.uid,
            ", allow_other" if config.allow_other else "",
            os.getpid(),
        )
        clean = False
        try:
            if ready is not None:
                ready()
            trio.run(_serve, ops)
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
