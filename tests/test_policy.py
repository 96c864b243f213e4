"""Pure policy: presented owner/mode and the O_NOATIME decision (no mount)."""

from __future__ import annotations

import os
import stat

import pytest

from noatimefs import policy
from noatimefs.policy import Consumer, Noatime

OWNER = Consumer(uid=1000, groups=frozenset({1000, 100}))
FILE, DIR, LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "expected"),
    [
        # root-owned store files: presented as O's, group kept, O's bits as owner bits
        (FILE | 0o444, 0, 0, (1000, 0, FILE | 0o444)),
        (FILE | 0o555, 0, 0, (1000, 0, FILE | 0o555)),
        (DIR | 0o555, 0, 0, (1000, 0, DIR | 0o555)),
        (FILE | 0o644, 0, 0, (1000, 0, FILE | 0o444)),
        (DIR | 0o755, 0, 0, (1000, 0, DIR | 0o555)),
        # O cannot use them: real owner, group and mode kept
        (FILE | 0o600, 0, 0, (0, 0, FILE | 0o600)),
        (FILE | 0o640, 0, 0, (0, 0, FILE | 0o640)),
        (FILE | 0o711, 0, 0, (0, 0, FILE | 0o711)),
        (FILE | 0o000, 1000, 1000, (1000, 1000, FILE | 0o000)),
        (DIR | 0o700, 0, 0, (0, 0, DIR | 0o700)),
        (DIR | 0o711, 0, 0, (0, 0, DIR | 0o711)),
        (DIR | 0o704, 0, 0, (0, 0, DIR | 0o704)),  # readable, not searchable
        # O is in the file's group: the group bits are O's
        (FILE | 0o640, 0, 100, (1000, 100, FILE | 0o440)),
        (DIR | 0o750, 0, 100, (1000, 100, DIR | 0o550)),
        (DIR | 0o705, 0, 100, (0, 100, DIR | 0o705)),  # group has nothing, other r-x
        # O owns it
        (FILE | 0o600, 1000, 1000, (1000, 1000, FILE | 0o600)),
        (FILE | 0o400, 1000, 1000, (1000, 1000, FILE | 0o400)),
        # O may read but not execute: no x bit is shown to anyone
        (FILE | 0o754, 0, 0, (1000, 0, FILE | 0o444)),
        (FILE | 0o714, 0, 0, (1000, 0, FILE | 0o404)),
        # the real owner (not in the group) would fall into "other": clamp to its bits
        (FILE | 0o004, 1001, 0, (1000, 0, FILE | 0o400)),
        (FILE | 0o044, 1001, 0, (1000, 0, FILE | 0o400)),
        (DIR | 0o155, 1001, 0, (1000, 0, DIR | 0o511)),
        # setuid/setgid dropped, sticky kept
        (FILE | 0o4755, 0, 0, (1000, 0, FILE | 0o555)),
        (DIR | 0o1777, 0, 0, (1000, 0, DIR | 0o1777)),
        # symlinks are always presented as O's
        (LNK | 0o777, 0, 0, (1000, 0, LNK | 0o777)),
        # other file types keep everything
        (stat.S_IFIFO | 0o666, 0, 0, (0, 0, stat.S_IFIFO | 0o666)),
    ],
)
def test_present(mode: int, uid: int, gid: int, expected: tuple[int, int, int]) -> None:
    assert policy.present(mode, uid, gid, OWNER) == expected


MODES = [0o400, 0o440, 0o404, 0o600, 0o640, 0o604, 0o644, 0o700, 0o750, 0o705, 0o711, 0o111, 0]
USERS = [
    Consumer(0, frozenset({0})),
    Consumer(1000, frozenset({1000, 100})),
    Consumer(1001, frozenset({1001, 100})),
    Consumer(2000, frozenset({2000})),
]


@pytest.mark.parametrize("fmt", [FILE, DIR])
@pytest.mark.parametrize("perm", MODES)
@pytest.mark.parametrize(
    ("owner", "group"), [(0, 0), (1001, 1001), (1001, 100), (1000, 1000), (2000, 0), (2000, 100)]
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
            expected = real
            if fmt == FILE and p_uid == OWNER.uid and not real & policy.X_OK:
                expected &= ~policy.X_OK
            assert shown == expected
    # Fact 8: presented as O's only where O may already use it.
    if p_uid == OWNER.uid and p_uid != owner:
        assert policy.usable(mode, policy.class_bits(mode, owner, group, OWNER.uid, OWNER.groups))
        assert p_gid == group


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
