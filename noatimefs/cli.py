"""The ``noatimefs`` command: arguments, validation, exit codes. No FUSE calls here.

Everything that can be checked is checked before anything is mounted, and a
problem the user can fix ends the command with one line
``noatimefs: error: ...`` and an exit code from :class:`noatimefs.errors.Exit`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence

from noatimefs import __version__, consumers, mountinfo, notify, policy
from noatimefs.errors import Exit, QuietError
from noatimefs.mount import Config
from noatimefs.views import Allow, resolve_user

log = logging.getLogger("noatimefs")

#: The type noatimefs mounts have in /proc/self/mountinfo.
FSTYPE = "fuse.noatimefs"

#: ``-o`` options that belong to mount(8), fstab or systemd, not to the kernel.
IGNORED_OPTIONS = frozenset(
    {"ro", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser"}
    | {"dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime"}
    | {"rw"}
)
_IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noatimefs",
        description=(
            "Mount SOURCE read-only at MOUNTPOINT, presented as owned by OWNER, and drop "
            "O_NOATIME from opens by callers who do not own the file."
        ),
        epilog=(
            "Also: 'noatimefs run [options] SOURCE -- COMMAND [ARGS...]' (mount at a private "
            "directory for the duration of COMMAND) and 'noatimefs status MOUNTPOINT'."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help="the store directory to re-export")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    add_mount_options(parser)
    parser.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="never fork into the background (the default, except when run by mount.fuse3)",
    )
    parser.add_argument(
        "--systemd",
        action="store_true",
        help="prefix log lines with journald priorities <N> (automatic when stderr is the journal)",
    )
    parser.add_argument("--version", action="version", version=f"noatimefs {__version__}")
    return parser


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape the mount (shared with ``noatimefs run``)."""
    parser.add_argument(
        "--owner",
        metavar="USER|UID",
        help="the consumer the mount is for; entries it can use are shown as its own "
        "(default: the user running noatimefs); with --per-user, who may have a view: "
        "a comma-separated list of users, uids, ranges A-B and @group (default: any uid)",
    )
    parser.add_argument(
        "--per-user",
        action="store_true",
        help="one view per uid: MOUNTPOINT/<uid>/ presents SOURCE as --owner <uid> would, "
        "and MOUNTPOINT/self is a symlink to the caller's own view",
    )
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let users other than the daemon's reach the mount (needed when --owner is "
        "another user)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long the kernel may cache entries and attributes (default: 300)",
    )
    parser.add_argument("--debug", action="store_true", help="log every request (slow)")
    parser.add_argument(
        "--plain-loop",
        action="store_true",
        help="use pyfuse3's own request loop, without noatimefs's reader (noatimefs/loop.py)",
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount(8)-style options: owner=USER, per_user, allow_other, timeout=SECONDS, debug; "
        "fstab-only options (nofail, noauto, _netdev, x-systemd.*, ...) are ignored",
    )


def apply_mount_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fold ``-o`` options into *args* (command-line flags win)."""
    for group in args.options:
        for option in filter(None, group.split(",")):
            key, _, value = option.partition("=")
            if key == "owner" and value:
                args.owner = args.owner or value
            elif key == "allow_other" and not value:
                args.allow_other = True
            elif key == "per_user" and not value:
                args.per_user = True
            elif key == "debug" and not value:
                args.debug = True
            elif key == "timeout" and value:
                try:
                    args.timeout = args.timeout if args.timeout is not None else float(value)
                except ValueError:
                    parser.error(f"bad value in -o {option}")
            elif option in IGNORED_OPTIONS or option.startswith(_IGNORED_PREFIXES):
                continue
            else:
                parser.error(f"unknown mount option: {option}")


def resolve_owner(spec: str | None) -> policy.Consumer:
    """The presented owner named by *spec* (a user name or uid; None: ourselves)."""
    uid = os.geteuid() if spec is None else resolve_user(spec)
    return consumers.consumer_for_uid(uid)


def check_source(source: str) -> None:
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise QuietError(f"SOURCE {source} does not exist", Exit.SOURCE) from None
    except OSError as exc:
        raise QuietError(f"SOURCE {source}: {exc.strerror}", Exit.SOURCE) from None
    if not stat.S_ISDIR(st.st_mode):
        raise QuietError(f"SOURCE {source} is not a directory", Exit.SOURCE)
    if not os.access(source, os.R_OK | os.X_OK):
        raise QuietError(f"SOURCE {source} cannot be read by uid {os.geteuid()}", Exit.SOURCE)


def clear_dead_mount(mountpoint: str) -> None:
    """Unmount the dead noatimefs mount on *mountpoint* (crash recovery).

    Only a mount that is dead (``ENOTCONN``) *and* whose mountinfo type is
    ``fuse.noatimefs`` is cleared; anything else is left alone and reported.
    """
    path = os.path.realpath(mountpoint)
    entry = mountinfo.find(path)
    if entry is None or entry.fstype != FSTYPE:
        what = f"{entry.fstype} from {entry.source}" if entry else "not in mountinfo"
        raise QuietError(
            f"MOUNTPOINT {mountpoint} is a dead FUSE mount ({what}) that is not noatimefs's; "
            f"clear it with: fusermount3 -u {mountpoint}",
            Exit.MOUNTPOINT,
        )
    problems = []
    for cmd in (["fusermount3", "-u", path], ["umount", "-l", path]):
        top = mountinfo.find(path)
        if top is None or top.mount_id != entry.mount_id:
            break
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            problems.append(f"{cmd[0]}: {done.stderr.strip() or done.returncode}")
    top = mountinfo.find(path)
    if top is not None and top.mount_id == entry.mount_id:
        raise QuietError(
            f"MOUNTPOINT {mountpoint} is a dead noatimefs mount that cannot be cleared "
            f"({'; '.join(problems)})",
            Exit.MOUNTPOINT,
        )
    log.warning(
        "cleared a dead noatimefs mount of %s at %s (its daemon is gone; mount id %d)",
        entry.source,
        path,
        entry.mount_id,
    )


def check_mountpoint(mountpoint: str, source: str, *, _recover: bool = True) -> None:
    try:
        st = os.stat(mountpoint)
        # statfs always reaches a FUSE daemon; stat may be answered from the kernel's
        # attribute cache for a while after the daemon died.
        os.statvfs(mountpoint)
    except FileNotFoundError:
        raise QuietError(f"MOUNTPOINT {mountpoint} does not exist", Exit.MOUNTPOINT) from None
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED) and _recover:
            clear_dead_mount(mountpoint)
            return check_mountpoint(mountpoint, source, _recover=False)
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise QuietError(
                f"MOUNTPOINT {mountpoint} is a dead FUSE mount (its daemon is gone); "
                f"clear it with: fusermount3 -u {mountpoint}",
                Exit.MOUNTPOINT,
            ) from None
        raise QuietError(f"MOUNTPOINT {mountpoint}: {exc.strerror}", Exit.MOUNTPOINT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise QuietError(f"MOUNTPOINT {mountpoint} is not a directory", Exit.MOUNTPOINT)
    real_mp, real_src = os.path.realpath(mountpoint), os.path.realpath(source)
    if real_mp == real_src or real_mp.startswith(real_src.rstrip("/") + "/"):
        raise QuietError(
            f"MOUNTPOINT {mountpoint} is inside SOURCE {source}: the mount would contain itself",
            Exit.MOUNTPOINT,
        )
    mounted = mountinfo.find(real_mp)
    if mounted is not None:
        raise QuietError(
            f"MOUNTPOINT {mountpoint} is already mounted ({mounted.fstype} from "
            f"{mounted.source}); unmount it first",
            Exit.MOUNTPOINT,
        )
    if os.listdir(mountpoint):
        raise QuietError(f"MOUNTPOINT {mountpoint} is not empty", Exit.MOUNTPOINT)


def check_fuse(allow_other: bool) -> None:
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        raise QuietError(
            "no /dev/fuse: load the fuse module (modprobe fuse) or give the container the device",
            Exit.FUSE,
        ) from None
    if not stat.S_ISCHR(st.st_mode):
        raise QuietError("/dev/fuse is not a character device", Exit.FUSE)
    if os.geteuid() == 0:
        return
    if shutil.which("fusermount3") is None:
        raise QuietError("fusermount3 not found: install fuse3", Exit.FUSE)
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise QuietError(
            f"/dev/fuse cannot be opened by uid {os.geteuid()} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); Debian's default is 0666, or run as root",
            Exit.FUSE,
        )
    if allow_other and not _fuse_conf_allows_other():
        raise QuietError(
            "--allow-other needs 'user_allow_other' in /etc/fuse.conf when not run as root",
            Exit.FUSE,
        )


def _fuse_conf_allows_other(path: str = "/etc/fuse.conf") -> bool:
    try:
        with open(path) as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_openat2(source: str) -> None:
    from noatimefs.source import Source

    try:
        src = Source(source)
    except OSError as exc:
        raise QuietError(f"SOURCE {source}: {exc.strerror}", Exit.SOURCE) from None
    try:
        src.check_openat2()
    except OSError as exc:
        raise QuietError(
            f"openat2 is not available ({exc.strerror}): Linux 5.6 or newer is needed", Exit.FUSE
        ) from None
    finally:
        src.close()


def make_config(args: argparse.Namespace) -> Config:
    source = os.path.abspath(args.source)
    mountpoint = os.path.abspath(args.mountpoint)
    check_source(source)
    check_mountpoint(mountpoint, source)
    if args.per_user:
        per_user: Allow | None = Allow.parse(args.owner)
        consumer = resolve_owner(None)
    else:
        per_user = None
        consumer = resolve_owner(args.owner)
    check_fuse(args.allow_other)
    check_openat2(source)
    if per_user is not None and not args.allow_other:
        log.warning(
            "--per-user without --allow-other: only uid %d can reach the mount", os.geteuid()
        )
    elif consumer.uid != os.geteuid() and not args.allow_other:
        log.warning(
            "owner uid %d is not the daemon's user: "
            "without --allow-other it cannot reach the mount",
            consumer.uid,
        )
    return Config(
        source=source,
        mountpoint=mountpoint,
        consumer=consumer,
        per_user=per_user,
        allow_other=args.allow_other,
        timeout=300.0 if args.timeout is None else args.timeout,
        debug=args.debug,
        fast_loop=not args.plain_loop,
    )


class JournalFormatter(logging.Formatter):
    """``<N>`` journald priority prefixes (sd-daemon(3)) on every line of a record."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (3 err, 4 warning, 6 info, 7 debug)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def stderr_is_journal() -> bool:
    """Whether stderr is the journal (systemd sets ``JOURNAL_STREAM=dev:inode``)."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(debug: bool, journal: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("noatimefs[%(process)d] %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def started_by_mount_helper(options: Sequence[str]) -> bool:
    """Whether ``mount.fuse3`` ran us (from mount(8) or fstab).

    mount.fuse3 runs ``noatimefs SOURCE MOUNTPOINT -o OPTIONS`` and always ends
    OPTIONS with ``dev`` (or passes ``nodev``) and ``suid`` (or ``nosuid``):
    options nobody gives a read-only FUSE mount by hand.
    """
    given = {o for group in options for o in group.split(",")}
    return bool(given & {"dev", "nodev"}) and bool(given & {"suid", "nosuid"})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        from noatimefs import runcmd

        return runcmd.main(argv[1:])
    if argv[:1] == ["status"]:
        from noatimefs import status

        return status.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_mount_options(args, parser)
    journal = args.systemd or stderr_is_journal()
    setup_logging(args.debug, journal)
    background = (
        started_by_mount_helper(args.options)
        and not args.foreground
        and not os.environ.get("NOTIFY_SOCKET")
    )
    try:
        config = make_config(args)
        from noatimefs import mount

        helper = notify.Background()
        if background:
            code = helper.fork()
            if code is not None:
                return code

        def ready() -> None:
            notify.ready(f"serving {config.source} at {config.mountpoint}")
            helper.ready()

        return mount.run(config, ready=ready)
    except QuietError as exc:
        print(f"{'<3>' if journal else ''}noatimefs: error: {exc.message}", file=sys.stderr)
        return int(exc.exitcode)
    except Exception:
        log.exception("internal error")
        return int(Exit.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
