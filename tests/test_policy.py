"""Pure policy: presented owner/mode and the O_NOATIME decision (no mount)."""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noatimefs import policy
from noatimefs.consumers import consumer_for_uid
from noatimefs.policy import Consumer, Noatime

OWNER = Consumer(uid=1000, groups=frozenset({1000, 100}), gid=1000)
FILE, DIR, LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
R, W, X = policy.R_OK, policy.W_OK, policy.X_OK


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "expected"),
    [
        # 1a. public (every class grants O's r-x): O's uid and primary gid, group = other = O's r-x
        (FILE | 0o444, 0, 0, (1000, 1000, FILE | 0o444)),
        (FILE | 0o555, 0, 0, (1000, 1000, FILE | 0o555)),
        (DIR | 0o555, 0, 0, (1000, 1000, DIR | 0o555)),
        (FILE | 0o644, 0, 0, (1000, 1000, FILE | 0o444)),
        (DIR | 0o755, 0, 0, (1000, 1000, DIR | 0o555)),
        # O in the group by the database: only what group AND other give (its processes
        # may lack the group), so the group's w is not O's
        (DIR | 0o775, 0, 100, (1000, 1000, DIR | 0o555)),
        (FILE | 0o644, 1000, 1000, (1000, 1000, FILE | 0o644)),  # O owns it
        (FILE | 0o644, 1000, 2000, (1000, 1000, FILE | 0o644)),  # ... in another group
        (FILE | 0o744, 0, 0, (1000, 1000, FILE | 0o444)),  # O may not execute: no x bit
        (FILE | 0o4755, 0, 0, (1000, 1000, FILE | 0o555)),  # setuid dropped
        (DIR | 0o1777, 0, 0, (1000, 1000, DIR | 0o1755)),  # sticky kept, w for O only
        (DIR | 0o1775, 0, 30000, (1000, 1000, DIR | 0o1555)),  # /nix/store itself
        (LNK | 0o777, 0, 0, (1000, 1000, LNK | 0o777)),  # symlinks are always public
        # 2. O cannot use them: real owner, group and mode kept
        (FILE | 0o600, 0, 0, (0, 0, FILE | 0o600)),
        (FILE | 0o640, 0, 0, (0, 0, FILE | 0o640)),
        (FILE | 0o711, 0, 0, (0, 0, FILE | 0o711)),
        (FILE | 0o000, 1000, 1000, (1000, 1000, FILE | 0o000)),
        (DIR | 0o700, 0, 0, (0, 0, DIR | 0o700)),
        (DIR | 0o711, 0, 0, (0, 0, DIR | 0o711)),
        (DIR | 0o704, 0, 0, (0, 0, DIR | 0o704)),  # readable, not searchable
        (DIR | 0o705, 0, 100, (0, 100, DIR | 0o705)),  # O's group has nothing, other r-x
        # ... nor what O may use only through a group: its processes may not have it
        (FILE | 0o640, 0, 100, (0, 100, FILE | 0o640)),
        (DIR | 0o750, 0, 100, (0, 100, DIR | 0o750)),
        (FILE | 0o714, 0, 0, (0, 0, FILE | 0o714)),  # r only for others, and a process may be in 0
        (FILE | 0o004, 1001, 0, (1001, 0, FILE | 0o004)),  # likewise: group 0 has nothing
        (FILE | 0o754, 0, 0, (0, 0, FILE | 0o754)),  # x by group 0 only: as on the source
        (FILE | 0o445, 0, 0, (0, 0, FILE | 0o445)),  # x for others, not group 0: likewise
        # 1b. usable, not public: O's uid, the REAL gid, O's bits as owner bits
        (FILE | 0o600, 1000, 1000, (1000, 1000, FILE | 0o600)),  # O owns it, private
        (FILE | 0o400, 1000, 1000, (1000, 1000, FILE | 0o400)),
        # ... the real owner (not in the group) would fall into "other": clamp to its bits
        (FILE | 0o044, 1001, 0, (1000, 0, FILE | 0o400)),
        (DIR | 0o155, 1001, 0, (1000, 0, DIR | 0o511)),
        # other file types keep everything
        (stat.S_IFIFO | 0o666, 0, 0, (0, 0, stat.S_IFIFO | 0o666)),
    ],
)
def test_present(mode: int, uid: int, gid: int, expected: tuple[int, int, int]) -> None:
    assert policy.present(mode, uid, gid, OWNER) == expected


#: A uid with no passwd entry (consumers.consumer_for_uid): gid = uid, no known groups.
NO_PASSWD = Consumer(uid=4321, groups=frozenset(), gid=4321)


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "expected"),
    [
        (FILE | 0o444, 0, 0, (4321, 4321, FILE | 0o444)),
        # its own gid: the lesser of group and other (it may or may not run with it)
        (FILE | 0o604, 0, 4321, (0, 4321, FILE | 0o604)),
        (FILE | 0o640, 0, 4321, (0, 4321, FILE | 0o640)),
        (FILE | 0o644, 0, 4321, (4321, 4321, FILE | 0o444)),
    ],
)
def test_present_without_passwd_entry(
    mode: int, uid: int, gid: int, expected: tuple[int, int, int]
) -> None:
    assert policy.present(mode, uid, gid, NO_PASSWD) == expected


MODES = [0o400, 0o440, 0o404, 0o600, 0o640, 0o604, 0o644, 0o700, 0o750, 0o705, 0o711, 0o111, 0]
USERS = [
    Consumer(0, frozenset({0}), 0),
    Consumer(1000, frozenset({1000, 100}), 1000),
    Consumer(1001, frozenset({1001, 100}), 1001),
    Consumer(2000, frozenset({2000, 1000}), 2000),  # a member of O's primary group
    Consumer(2001, frozenset({2001}), 2001),
]


@pytest.mark.parametrize("fmt", [FILE, DIR])
@pytest.mark.parametrize("perm", MODES)
@pytest.mark.parametrize(
    ("owner", "group"), [(0, 0), (1001, 1001), (1001, 100), (1000, 1000), (2001, 0), (2001, 100)]
)
def test_presented_never_grants_more(fmt: int, perm: int, owner: int, group: int) -> None:
    """For every caller, the presented bits give at most the source's; O gets exactly its own."""
    mode = fmt | perm
    p_uid, p_gid, p_mode = policy.present(mode, owner, group, OWNER)
    for user in USERS:
        real = policy.class_bits(mode, owner, group, user.uid, user.groups)
        shown = policy.class_bits(p_mode, p_uid, p_gid, user.uid, user.groups)
        assert shown & ~real == 0, (oct(mode), owner, group, user)
        if user.uid == OWNER.uid:
            assert shown == real
    # Fact 8: presented as O's only where O may already use it; O's gid only where public.
    if p_uid == OWNER.uid and p_uid != owner:
        assert policy.usable(mode, policy.class_bits(mode, owner, group, OWNER.uid, OWNER.groups))
    if p_gid == OWNER.gid != group:
        assert (p_mode >> 3) & 7 == p_mode & 7


# --------------------------------------------------------------------------- the kernel's view


@dataclass(frozen=True)
class Caller:
    """A process as generic_permission() sees it: fsuid, groups, and namespace capabilities.

    *maps* (when not None): the caller is root of a user namespace it made, which
    maps its own uid and these gids (``unshare -r`` maps the egid; ``sg`` lets a
    user pick any of its groups as egid). It holds CAP_DAC_OVERRIDE over an inode
    whose uid and gid both map. uid 0 with *maps* None is root on the host.
    """

    uid: int
    groups: frozenset[int]
    maps: frozenset[int] | None = None

    def privileged_over(self, file_uid: int, file_gid: int) -> bool:
        if self.maps is None:
            return self.uid == 0
        return file_uid == self.uid and file_gid in self.maps


def kernel_access(mode: int, file_uid: int, file_gid: int, caller: Caller) -> int:
    """The rwx bits the kernel grants *caller* on an inode (no ACLs)."""
    if caller.privileged_over(file_uid, file_gid):
        x = X if stat.S_ISDIR(mode) or mode & 0o111 else 0
        return R | W | x
    return policy.class_bits(mode, file_uid, file_gid, caller.uid, caller.groups)


IDS = st.sampled_from([0, 100, 1000, 1001, 2000, 30000, 65534])
NONROOT = IDS.filter(bool)


@st.composite
def entries(draw: st.DrawFn) -> tuple[int, int, int]:
    fmt = draw(st.sampled_from([FILE, DIR, LNK, stat.S_IFIFO]))
    perm = 0o777 if fmt == LNK else draw(st.integers(0, 0o7777))
    return fmt | perm, draw(IDS), draw(IDS)


@st.composite
def consumers(draw: st.DrawFn) -> Consumer:
    uid, gid = draw(NONROOT), draw(IDS)
    groups = draw(st.frozensets(IDS, max_size=3))
    if draw(st.booleans()):  # a passwd entry: its primary gid is among its groups
        groups |= {gid}
    return Consumer(uid, groups, gid)


def callers(consumer: Consumer, file_uid: int, file_gid: int) -> Iterator[Caller]:
    """Everyone who matters: root, any user in any of the groups at stake, O, namespace roots.

    O's processes may be in any of the groups at stake, whatever the group
    database says (a sandbox or ``setpriv --groups`` gives a process others).
    """
    at_stake = {file_gid, consumer.gid}
    group_sets = {frozenset(), *(frozenset({g}) for g in at_stake), frozenset(at_stake)}
    own_with_gid = consumer.groups | {consumer.gid}
    group_sets |= {consumer.groups, own_with_gid}
    for uid in {0, 2001, file_uid, consumer.uid}:
        for groups in group_sets:
            yield Caller(uid, groups)
            if uid != 0:
                for maps in {*(frozenset({g}) for g in groups), groups} - {frozenset()}:
                    yield Caller(uid, groups, maps)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(entry=entries(), consumer=consumers())
def test_presented_never_grants_more_to_anyone(
    entry: tuple[int, int, int], consumer: Consumer
) -> None:
    """Through the presented entry nobody reads or executes more than on the source.

    Only O's namespace root may gain write access (refused: the mount is ``ro``;
    an overlay writes to its upper layer). O itself, in whatever groups, gets
    exactly its source access.
    """
    mode, file_uid, file_gid = entry
    p_uid, p_gid, p_mode = policy.present(mode, file_uid, file_gid, consumer)
    shown = (oct(p_mode), p_uid, p_gid)
    for caller in callers(consumer, file_uid, file_gid):
        src = kernel_access(mode, file_uid, file_gid, caller)
        mnt = kernel_access(p_mode, p_uid, p_gid, caller)
        assert mnt & (R | X) & ~src == 0, (caller, shown)
        if not (caller.uid == consumer.uid and caller.maps is not None):
            assert mnt & ~src == 0, (caller, shown)
        if caller.uid == consumer.uid and caller.maps is None:
            assert mnt & (R | X) == src & (R | X), (caller, shown)
    assert not p_mode & (stat.S_ISUID | stat.S_ISGID) or (p_uid, p_gid) == (file_uid, file_gid)


def test_presentation_is_cached() -> None:
    policy.present.cache_clear()
    policy.present(FILE | 0o444, 0, 0, OWNER)
    policy.present(FILE | 0o444, 0, 0, Consumer(1000, frozenset({1000, 100}), 1000))
    assert policy.present.cache_info().hits == 1


def test_consumer_for_uid() -> None:
    """The primary gid from passwd; a uid with no passwd entry: gid = uid, no groups known."""
    entry = pwd.getpwnam("nobody")
    nobody = consumer_for_uid(entry.pw_uid)
    assert (nobody.uid, nobody.gid) == (entry.pw_uid, entry.pw_gid)
    assert entry.pw_gid in nobody.groups
    unused = next(u for u in range(4_000_000, 4_001_000) if not _has_passwd(u))
    assert consumer_for_uid(unused) == Consumer(unused, frozenset(), unused)


def _has_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize(
    ("flags", "caller", "file_uid", "daemon", "expected"),
    [
        (os.O_RDONLY, 65534, 0, 0, Noatime.ABSENT),
        (os.O_RDONLY | os.O_NOATIME, 65534, 0, 0, Noatime.DROPPED),
        (os.O_RDONLY | os.O_NOATIME, 0, 0, 0, Noatime.KEPT),
        (os.O_RDONLY | os.O_NOATIME, 0, 1000, 0, Noatime.KEPT),
        (os.O_RDONLY | os.O_NOATIME, 1000, 1000, 0, Noatime.KEPT),
        (os.O_RDONLY | os.O_NOATIME, 1000, 1000, 1000, Noatime.KEPT),
        # the daemon cannot honour it on a file it does not own
        (os.O_RDONLY | os.O_NOATIME, 1000, 1000, 2000, Noatime.DROPPED),
        (os.O_RDONLY | os.O_NOATIME, 0, 0, 1000, Noatime.DROPPED),
    ],
)
def test_decide_open_noatime(
    flags: int, caller: int, file_uid: int, daemon: int, expected: Noatime
) -> None:
    decision = policy.decide_open(flags, caller, file_uid, daemon)
    assert decision.noatime is expected
    assert bool(decision.flags & os.O_NOATIME) == (expected is Noatime.KEPT)
    assert decision.flags & os.O_ACCMODE == os.O_RDONLY


def test_decide_open_strips_other_flags() -> None:
    flags = os.O_RDONLY | os.O_DIRECT | os.O_SYNC | os.O_NONBLOCK | os.O_APPEND
    assert policy.decide_open(flags, 0, 0, 0).flags == os.O_RDONLY | os.O_CLOEXEC


@pytest.mark.parametrize(
    ("noatime", "reads_ignore_nonblock", "expected"),
    [
        (Noatime.KEPT, True, os.O_RDONLY | os.O_NOATIME),
        (Noatime.KEPT, False, os.O_RDONLY | os.O_NOATIME),
        (Noatime.DROPPED, True, None),
        (Noatime.ABSENT, True, None),
        (Noatime.DROPPED, False, os.O_RDONLY),
        (Noatime.ABSENT, False, os.O_RDONLY),
    ],
)
def test_status_flags_clear_nonblock_only_where_reads_see_it(
    noatime: Noatime, reads_ignore_nonblock: bool, expected: int | None
) -> None:
    assert policy.status_flags(noatime, reads_ignore_nonblock) == expected


def test_exec_open_requires_x() -> None:
    assert policy.decide_open(os.O_RDONLY | policy.FMODE_EXEC, 1, 0, 0).required == policy.X_OK
    assert policy.decide_open(os.O_RDONLY, 1, 0, 0).required == policy.R_OK


@pytest.mark.parametrize(
    ("flags", "write"),
    [
        (os.O_RDONLY, False),
        (os.O_RDONLY | os.O_NOATIME | os.O_NONBLOCK, False),
        (os.O_WRONLY, True),
        (os.O_RDWR, True),
        (os.O_RDONLY | os.O_TRUNC, True),
        (os.O_RDONLY | os.O_CREAT, True),
    ],
)
def test_is_write(flags: int, write: bool) -> None:
    assert policy.is_write(flags) is write


@pytest.mark.parametrize(
    ("required", "mode", "uid", "groups", "allowed"),
    [
        (policy.R_OK, FILE | 0o600, 0, {0}, True),  # root reads anything
        (policy.X_OK, FILE | 0o600, 0, {0}, False),  # but executes only with some x bit
        (policy.X_OK, FILE | 0o100, 0, {0}, True),
        (policy.X_OK, DIR | 0o000, 0, {0}, True),
        (policy.R_OK, FILE | 0o604, 1000, {1000}, True),
        (policy.R_OK, FILE | 0o640, 1000, {1000}, False),
        (policy.R_OK, FILE | 0o640, 1000, {1000, 100}, True),
        (policy.R_OK, FILE | 0o604, 1000, {1000, 100}, False),  # group class wins
    ],
)
def test_may_access(required: int, mode: int, uid: int, groups: set[int], allowed: bool) -> None:
    assert policy.may_access(required, mode, 0, 100, uid, frozenset(groups)) is allowed


def test_needs_groups_only_when_it_matters() -> None:
    assert not policy.needs_groups(FILE | 0o644, 0, 100, 0, 0)  # root
    assert not policy.needs_groups(FILE | 0o644, 5, 100, 5, 5)  # owner
    assert not policy.needs_groups(FILE | 0o644, 0, 100, 5, 100)  # primary group
    assert not policy.needs_groups(FILE | 0o644, 0, 100, 5, 5)  # group bits == other bits
    assert policy.needs_groups(FILE | 0o640, 0, 100, 5, 5)
