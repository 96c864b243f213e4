"""Pure policy: what to do with an open's flags, which owner and mode to present.

Nothing here touches the filesystem; every decision is a function of numbers so
it can be read and unit-tested without a mount (tests/test_policy.py).

The presentation rule
---------------------
The kernel refuses ``O_NOATIME`` (``EPERM``) before the daemon hears of the
open unless the caller owns the inode *as presented*. So entries must be
presented as owned by the consumer (``--owner``, called O below) for the daemon
ever to see, and drop, the flag. Presenting ownership must never grant access
the source would refuse (DESIGN.md, "What follows"), and fact 8 of DESIGN.md
says ownership itself is a grant: the root of a user namespace that O makes
with ``unshare -r`` holds ``CAP_DAC_OVERRIDE`` (and ``CAP_DAC_READ_SEARCH``)
over every inode whose uid *and* gid map into that namespace. Fact 11 says
what an overlay stacked on the mount needs to write: that capability over the
lower directories it creates in, and a gid it can map for the files it copies
up. Hence, per entry, with ``a`` the permission bits O has on the source
whatever groups its processes are in: the owner bits if O owns the entry,
else the group and other bits where they agree on read and search/execute,
else none (:func:`consumer_bits`: the kernel keeps one presentation for all of
O's processes, and they need not all have the groups the group database gives
O -- found by the escalation table run through ``--per-user``'s
``MNT/self``, where a caller with a group the database does not list became a
presented owner and could search what its group may not):

1a. A *public* entry -- one O can *use* on the source (a regular file O may
    read, a directory O may read and search, or a symlink) and whose every
    class (owner, group and other) grants at least ``a & r-x`` -- is
    presented as

    * uid: O (so O's ``O_NOATIME`` opens reach the daemon);
    * gid: O's primary gid (:attr:`Consumer.gid`), so that O's user namespaces
      map it and an overlay O stacks on the mount can create and copy up;
    * mode: owner bits ``a``; group and other bits ``a & r-x``; sticky kept,
      setuid/setgid dropped. Symlinks are always public (their mode is not
      used) and keep their mode.

    Every user already had ``a & r-x`` on the source, whatever class it fell
    in, and through the mount it falls in the group or other class, which give
    exactly that. So the group is only a name: members of O's gid gain nothing
    over anyone else. O's namespace root holds the capabilities over the entry;
    they give it reading and searching, which O had; executing, only where
    some x bit is set, and x bits are set only when ``a`` has x, so only where
    O may execute; and writing, which the read-only mount refuses with
    ``EROFS`` and an overlay sends to its upper layer. Nobody else holds them:
    they need the uid mapped as well, and an unprivileged user can map only
    its own uid (or what ``/etc/subuid`` gives it, an administrator's grant to
    act as that uid) -- and one who did would gain only the same write
    access, every class granting ``a & r-x`` already. A store is public
    throughout: 0444/0555 files, 0555 directories, all root's.

1b. An entry O can use but that is not public (some class grants less than
    ``a & r-x``) is presented with uid O and the **real gid**:

    * mode: owner bits exactly ``a``; group and other bits as on the source,
      but never more than the source's owner bits (the real owner now falls
      into the group or other class, and must not gain by it); setuid/setgid
      dropped; for a file O may not execute, every x bit cleared, so that
      neither O nor O's namespace root (whose ``CAP_DAC_OVERRIDE`` executes
      anything with some x bit) can execute what O could not.

    The group class must keep the real gid here: its bits are the source's
    group bits, which only the source's group may have (showing O's gid with
    them would hand them to O's group). Whatever O's namespace root gains over
    such an entry, if it can map the real gid (a group O is a member of), is
    again read and search access that O already had, execution where O had it,
    and write access that is refused. An overlay O stacks can create in such
    a directory only if O's namespace maps its gid.

2.  Anything else keeps its real uid, gid and mode. O's access to it is then
    decided by the same bits as on the source, and O's namespace root gets no
    capability over it that it would not have over the source (the uid and gid
    are the source's).

O's gid is its passwd entry's primary gid: the gid O's processes run with,
hence the one ``unshare -r`` maps. A uid with no passwd entry (systemd's
``DynamicUser=``, Nix's ``auto-allocate-uids``) runs with gid = uid by
convention, and is given that, with no group memberships known (they do not
decide its presentation anyway: ``a`` does not depend on groups). The choice
cannot grant anything, whichever gid
it is: in a public entry the group bits equal the other bits, so membership of
the gid is worth nothing; and the capabilities of a namespace root need the
entry's uid *and* gid mapped, and only O (or whoever the administrator lets map
O's uid) maps O's uid. A wrong guess only costs O's overlays their writes, as
before this rule.

Consequences: O sees exactly its access on the source. Any other user U falls
into the group or other class of the presented entry, which carry at most the
bits of U's class on the source; so U never gets more than on the source, and
the real owner of an entry presented as O's may get *less* through the mount
(it loses its owner bits; root loses nothing but execution where O may not
execute). Compared with rule 1b, rule 1a takes from other users only write
bits, which the read-only mount never honours anyway. POSIX ACLs of the source
are not consulted (a store has none): a caller granted access only by an ACL
entry is refused through the mount, never the reverse.

The daemon re-checks a caller's real access to the source on every open and
opendir (:func:`may_access`), so even a presentation bug could not hand out bytes
the source would refuse.

The O_NOATIME rule
------------------
It mirrors overlayfs's own later fix (``ovl_open_realfile`` drops the flag when
``!inode_owner_or_capable``): the backing open keeps ``O_NOATIME`` only when the
caller could have used it on the source (it owns the backing file, or is root)
*and* the daemon can honour it (it owns the file, or is privileged). Otherwise
the flag is dropped silently; an open never fails because of it.
"""

from __future__ import annotations

import enum
import functools
import os
import stat
from dataclasses import dataclass

R_OK, W_OK, X_OK = 4, 2, 1

#: The kernel's ``__FMODE_EXEC``, set in the flags of the open done by execve().
FMODE_EXEC = 0o40

#: Open flags that ask for a write, or for a change to the file.
_WRITE_FLAGS = os.O_CREAT | os.O_TRUNC | os.O_EXCL | getattr(os, "O_TMPFILE", 0)


@dataclass(frozen=True)
class Consumer:
    """The presented owner O: its uid, the groups it is a member of, its primary gid.

    *groups* (from the group database; they include *gid*) are O's groups as
    far as the database knows (``--per-user --owner @group`` admits by them);
    they do not decide its presentation (:func:`consumer_bits`). *gid* is O's
    primary group (the one its processes run with, so the one its user
    namespaces map): the presented group of public entries. Made by
    :func:`noatimefs.consumers.consumer_for_uid`.
    """

    uid: int
    groups: frozenset[int]
    gid: int


def class_bits(mode: int, file_uid: int, file_gid: int, uid: int, groups: frozenset[int]) -> int:
    """The rwx bits (0-7) of the class *uid* falls in, as the kernel picks it.

    Owner if the uid matches, else group if any of *groups* matches, else other.
    Capabilities are not considered: root's bits are its class's bits too.
    """
    if uid == file_uid:
        return (mode >> 6) & 7
    if file_gid in groups:
        return (mode >> 3) & 7
    return mode & 7


def usable(mode: int, bits: int) -> bool:
    """Whether *bits* let their holder use the entry: read a file, list+search a dir."""
    if stat.S_ISDIR(mode):
        return bits & (R_OK | X_OK) == R_OK | X_OK
    if stat.S_ISREG(mode):
        return bool(bits & R_OK)
    return stat.S_ISLNK(mode)


def public(mode: int, bits: int) -> bool:
    """Whether every class of *mode* grants at least the read and search/execute in *bits*."""
    shared = bits & (R_OK | X_OK)
    return all((mode >> shift) & shared == shared for shift in (6, 3, 0))


def consumer_bits(mode: int, file_uid: int, file_gid: int, consumer: Consumer) -> int:
    """The bits ``a`` O has on the source whatever groups its processes are in; 0 if none.

    The owner bits if O owns the entry. Otherwise the group and other bits, if
    they give the same read and search/execute (a store: 0444, 0555, 1775):
    then O's class does not matter. Where they differ, O's access depends on
    the groups each of its processes is in -- and the group database cannot
    say: a process may run with others (``setpriv --groups``, a sandbox,
    systemd's ``SupplementaryGroups=``) or without some -- while the kernel
    keeps one presentation for all of them. Such an entry is not shown as O's
    (0: rule 2), so the kernel decides with each process's own groups on the
    source's own bits, exactly as on the source.
    """
    if consumer.uid == file_uid:
        return (mode >> 6) & 7
    group, other = (mode >> 3) & 7, mode & 7
    if (group ^ other) & (R_OK | X_OK):
        return 0
    return group & other


@functools.lru_cache(maxsize=4096)
def present(mode: int, file_uid: int, file_gid: int, consumer: Consumer) -> tuple[int, int, int]:
    """The (uid, gid, mode) an entry is presented with; see the module docstring."""
    bits = consumer_bits(mode, file_uid, file_gid, consumer)
    if not usable(mode, bits):
        return file_uid, file_gid, mode  # 2. unusable
    if stat.S_ISLNK(mode):
        return consumer.uid, consumer.gid, mode  # 1a. a symlink is public
    if public(mode, bits):  # 1a. public: everyone already has O's read/search/execute
        shared = bits & (R_OK | X_OK)
        perm = (bits << 6) | (shared << 3) | shared | (mode & stat.S_ISVTX)
        return consumer.uid, consumer.gid, stat.S_IFMT(mode) | perm
    # 1b. usable, not public. The real owner loses its owner class: nobody may get
    # more than it had.
    owner_bits = (mode >> 6) & 7
    group_other = mode & 0o077 & ((owner_bits << 3) | owner_bits)
    if stat.S_ISREG(mode) and not bits & X_OK:
        group_other &= ~0o011
    perm = (bits << 6) | group_other | (mode & stat.S_ISVTX)
    return consumer.uid, file_gid, stat.S_IFMT(mode) | perm


class Noatime(enum.Enum):
    """What became of an open's ``O_NOATIME``."""

    ABSENT = "absent"  # the caller did not ask for it
    KEPT = "kept"  # passed on to the backing open
    DROPPED = "dropped"  # silently removed


@dataclass(frozen=True)
class OpenDecision:
    flags: int  # the flags for the backing open
    noatime: Noatime
    required: int  # the access (R_OK or X_OK) the caller needs on the source


def is_write(flags: int) -> bool:
    """Whether an open with *flags* would write or change the file."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & _WRITE_FLAGS)


def decide_open(flags: int, caller_uid: int, file_uid: int, daemon_uid: int) -> OpenDecision:
    """The backing open for a (read-only) open request with *flags*.

    The backing open is always ``O_RDONLY | O_CLOEXEC``: nothing else a reader
    may ask for (``O_DIRECT``, ``O_SYNC``, ``O_NONBLOCK``, ``O_APPEND``) changes
    what a read of a regular file returns, and ``O_DIRECT`` would impose
    alignment on the daemon's buffers. ``O_NOATIME`` is kept only when both the
    caller and the daemon may use it on the backing file.
    """
    required = X_OK if flags & FMODE_EXEC else R_OK
    if not flags & os.O_NOATIME:
        return _DECISIONS[Noatime.ABSENT, required]
    caller_may = caller_uid in (0, file_uid)
    daemon_may = daemon_uid in (0, file_uid)
    if caller_may and daemon_may:
        return _DECISIONS[Noatime.KEPT, required]
    return _DECISIONS[Noatime.DROPPED, required]


def status_flags(noatime: Noatime, reads_ignore_nonblock: bool) -> int | None:
    """The status flags to set (``F_SETFL``) on the daemon's backing descriptor of an
    open, opened ``O_RDONLY | O_NONBLOCK``; None when it may stay as it is.

    ``O_NONBLOCK`` is there only so that the open itself never waits (on a FIFO
    put where the file was). It changes nothing for a regular file's reads on a
    filesystem whose reads ignore it, and is cleared elsewhere (a FUSE
    filesystem as SOURCE sees it in each read). ``O_NOATIME`` is set when kept.
    """
    if noatime is Noatime.KEPT:
        return os.O_RDONLY | os.O_NOATIME
    return None if reads_ignore_nonblock else os.O_RDONLY


#: Every decision :func:`decide_open` can make, made once (an open is a hot path).
_DECISIONS = {
    (noatime, required): OpenDecision(
        os.O_RDONLY | os.O_CLOEXEC | (os.O_NOATIME if noatime is Noatime.KEPT else 0),
        noatime,
        required,
    )
    for noatime in Noatime
    for required in (R_OK, X_OK)
}


def may_access(
    required: int, mode: int, file_uid: int, file_gid: int, uid: int, groups: frozenset[int]
) -> bool:
    """Whether a caller (*uid*, *groups*) has *required* access to a source entry.

    Root may do anything except execute a file no x bit allows, as in the
    kernel's ``generic_permission``.
    """
    if uid == 0:
        if required & X_OK and not stat.S_ISDIR(mode):
            return bool(mode & 0o111)
        return True
    bits = class_bits(mode, file_uid, file_gid, uid, groups)
    return bits & required == required


def needs_groups(mode: int, file_uid: int, file_gid: int, uid: int, gid: int) -> bool:
    """Whether deciding access needs the caller's supplementary groups.

    Only when the caller is neither root, the owner, nor in the file's group by
    its primary gid, *and* the group bits differ from the other bits.
    """
    if uid in (0, file_uid) or gid == file_gid:
        return False
    return (mode >> 3) & 7 != mode & 7
