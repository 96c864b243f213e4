"""``noatimefs status MOUNTPOINT``: what a running daemon did, from its status xattr.

The channel is a read-only virtual extended attribute, ``user.noatimefs.status``,
on the mount root (served by :mod:`noatimefs.fs`, hidden from ``listxattr``).
It needs no socket or state file, reaches exactly the daemon serving that
mount, and anyone who may read the mount root may read it (``getfattr -n
user.noatimefs.status --only-values MOUNTPOINT`` shows the same JSON).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence

from noatimefs import mountinfo
from noatimefs.errors import Exit, QuietError

STATUS_XATTR = "user.noatimefs.status"


def read_status(mountpoint: str) -> dict[str, object]:
    """The daemon's status JSON for *mountpoint*; :class:`QuietError` when there is none."""
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise QuietError(
                f"{mountpoint} is a dead FUSE mount (its daemon is gone); start noatimefs on "
                f"it again to recover, or clear it with: fusermount3 -u {mountpoint}",
                Exit.MOUNTPOINT,
            ) from None
        entry = mountinfo.find(os.path.realpath(mountpoint))
        if entry is None:
            what = "not a mountpoint"
        elif entry.fstype != "fuse.noatimefs":
            what = f"a {entry.fstype} mount, not noatimefs"
        else:
            what = f"a noatimefs mount, but its status cannot be read ({exc.strerror})"
        raise QuietError(f"{mountpoint} is {what}", Exit.MOUNTPOINT) from None
    try:
        status = json.loads(raw)
    except ValueError:
        raise QuietError(
            f"{mountpoint}: the status is not JSON: {raw[:80]!r}", Exit.INTERNAL
        ) from None
    if not isinstance(status, dict):
        raise QuietError(f"{mountpoint}: the status is not a JSON object", Exit.INTERNAL)
    return status


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _by_process(counts: object) -> str:
    if not isinstance(counts, Mapping) or not counts:
        return "-"
    ranked = sorted(counts.items(), key=lambda kv: (-int(kv[1]), str(kv[0])))
    return ", ".join(f"{name} {count}" for name, count in ranked)


def _views(views: object) -> list[tuple[str, object]]:
    """One row per view of a ``--per-user`` mount: its counts."""
    if not isinstance(views, Mapping) or not views:
        return [("views", "-")]
    rows: list[tuple[str, object]] = [("views", len(views))]
    for uid, counts in sorted(views.items(), key=lambda kv: int(kv[0])):
        if isinstance(counts, Mapping):
            rows.append(
                (
                    f"  uid {uid}",
                    f"{counts.get('inodes', '?')} inodes, {counts.get('opens', '?')} opens, "
                    f"O_NOATIME kept {counts.get('noatime_kept', '?')}, "
                    f"dropped {counts.get('noatime_dropped', '?')}",
                )
            )
    return rows


def _on_off(value: object) -> str:
    return "?" if value is None else "on" if value else "off"


def render(mountpoint: str, status: Mapping[str, object]) -> str:
    """The human-readable report, one fact per line."""
    per_user = status.get("per_user")
    owner = ("views for", per_user) if per_user else ("presented owner uid", status.get("owner"))
    rows: list[tuple[str, object]] = [
        ("mountpoint", mountpoint),
        ("source", status.get("source", "?")),
        (owner[0], "?" if owner[1] is None else owner[1]),
        ("pid", status.get("pid", "?")),
    ]
    uptime = status.get("uptime")
    if isinstance(uptime, int | float):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - uptime))
        rows.append(("uptime", f"{_duration(uptime)} (since {started})"))
    rss = status.get("rss")
    if isinstance(rss, int | float):
        rows.append(("rss", _size(rss)))
    rows += [
        ("inodes remembered", status.get("inodes", "?")),
        ("open handles", status.get("handles", "?")),
        ("opens served", status.get("opens", "?")),
        ("O_NOATIME kept", status.get("noatime_kept", "?")),
        ("  by process", _by_process(status.get("kept_by_process"))),
        ("O_NOATIME dropped", status.get("noatime_dropped", "?")),
        ("  by process", _by_process(status.get("dropped_by_process"))),
        ("reads that waited", status.get("reads_waited", "?")),
        ("files read ahead", status.get("read_ahead_files", "?")),
        ("walks ahead started", status.get("walk_ahead_named", "?")),
        ("kernel listings", _on_off(status.get("kernel_listings"))),
        ("listings served", status.get("readdirs", "?")),
        ("kept-top lookups", status.get("lookups_kept", "?")),
        ("listing lookups", status.get("lookups_listed", "?")),
        ("bare lookups", status.get("lookups_bare", "?")),
        ("settled checks", status.get("checks_settled", "?")),
    ]
    if per_user:
        rows += _views(status.get("views"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noatimefs status",
        description="Show what the noatimefs daemon serving MOUNTPOINT has done.",
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("--json", action="store_true", help="print the raw status JSON")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = read_status(args.mountpoint)
    except QuietError as exc:
        print(f"noatimefs: error: {exc.message}", file=sys.stderr)
        return int(exc.exitcode)
    text = json.dumps(status, indent=2, sort_keys=True) if args.json else None
    try:
        print(text or render(os.path.abspath(args.mountpoint), status), flush=True)
    except BrokenPipeError:  # `noatimefs status MNT | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return int(Exit.OK)
