"""Views: one presentation of SOURCE per consumer uid (``--per-user``).

The kernel keeps one owner per inode (DESIGN.md, fact 10), so presenting one
tree to two consumers at once races. A *view* is a whole tree of its own: the
same backing file seen in two views is two inodes, each with its own presented
owner. A mount with ``--owner`` has exactly one view, its root the mount's
root. A mount with ``--per-user`` has a synthetic root holding ``self`` (a
symlink whose text is the caller's uid) and one directory per uid, made on the
first lookup of its name, each presenting SOURCE exactly as a mount with
``--owner <uid>`` would.

Who may have a view is an :class:`Allow`: with ``--per-user``, ``--owner``
takes a comma-separated list of user names, uids, ranges ``A-B`` and
``@group``; without it any uid has one. Everything that names a user or group
is resolved when the daemon starts (an unknown one is an error before the
mount); group membership of a uid is read when its view is made.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass
from typing import TYPE_CHECKING

from noatimefs import policy
from noatimefs.consumers import consumer_for_uid
from noatimefs.errors import Exit, QuietError

if TYPE_CHECKING:
    from noatimefs.inodes import Node

#: The largest uid the kernel has (``(uid_t)-1`` is "no uid").
MAX_UID = (1 << 32) - 2


def resolve_user(spec: str) -> int:
    """The uid a user name or decimal uid names; :class:`QuietError` (exit 5) if none."""
    if spec.isdigit():
        uid = int(spec)
        if uid > MAX_UID:
            raise QuietError(f"unknown owner: uid {spec} is out of range", Exit.OWNER)
        return uid
    try:
        return pwd.getpwnam(spec).pw_uid
    except KeyError:
        raise QuietError(f"unknown owner: no user named {spec!r}", Exit.OWNER) from None


@dataclass(frozen=True)
class Allow:
    """Which uids may have a view; empty sets and no ranges with ``anyone``: all."""

    anyone: bool = True
    uids: frozenset[int] = frozenset()
    ranges: tuple[tuple[int, int], ...] = ()
    gids: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, spec: str | None) -> Allow:
        """Parse ``--owner`` for ``--per-user``: names, uids, ``A-B``, ``@group``."""
        if spec is None:
            return cls()
        uids: set[int] = set()
        ranges: list[tuple[int, int]] = []
        gids: set[int] = set()
        for item in (part.strip() for part in spec.replace(":", ",").split(",")):
            if not item:
                continue
            if item.startswith("@"):
                gids.add(_resolve_group(item[1:]))
            elif "-" in item and all(p.isdigit() for p in item.split("-", 1)):
                low, high = (int(p) for p in item.split("-", 1))
                if low > high or high > MAX_UID:
                    raise QuietError(f"unknown owner: bad uid range {item!r}", Exit.OWNER)
                ranges.append((low, high))
            else:
                uids.add(resolve_user(item))
        if not (uids or ranges or gids):
            raise QuietError(f"unknown owner: {spec!r} names nobody", Exit.OWNER)
        return cls(False, frozenset(uids), tuple(ranges), frozenset(gids))

    def admits(self, uid: int, consumer: policy.Consumer | None = None) -> bool:
        """Whether *uid* may have a view (*consumer*: its groups, for ``@group``)."""
        if self.anyone or uid in self.uids:
            return True
        if any(low <= uid <= high for low, high in self.ranges):
            return True
        if not self.gids:
            return False
        consumer = consumer or consumer_for_uid(uid)
        return bool(self.gids & (consumer.groups | {consumer.gid}))

    def describe(self) -> str:
        if self.anyone:
            return "any uid"
        parts = [str(u) for u in sorted(self.uids)]
        parts += [f"{low}-{high}" for low, high in self.ranges]
        parts += [f"@{gid}" for gid in sorted(self.gids)]
        return ",".join(parts)


def _resolve_group(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise QuietError(f"unknown owner: no group named {name!r}", Exit.OWNER) from None


def parse_uid(name: bytes) -> int | None:
    """The uid a root entry's name spells (canonical decimal only), else None."""
    if not name.isdigit() or (len(name) > 1 and name.startswith(b"0")) or len(name) > 10:
        return None
    uid = int(name)
    return uid if uid <= MAX_UID else None


@dataclass(eq=False)
class View:
    """SOURCE as presented to one consumer; *tag* numbers it in node ids (0: ``--owner``)."""

    consumer: policy.Consumer
    tag: int
    root: Node | None = None  # SOURCE's root in this view, once known
    opens: int = 0
    noatime_kept: int = 0
    noatime_dropped: int = 0

    @property
    def uid(self) -> int:
        return self.consumer.uid

    def as_dict(self, inodes: int) -> dict[str, int]:
        return {
            "inodes": inodes,
            "opens": self.opens,
            "noatime_kept": self.noatime_kept,
            "noatime_dropped": self.noatime_dropped,
        }
