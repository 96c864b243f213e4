"""Views without a mount: who may have one (``--per-user --owner``), and root entry names."""

from __future__ import annotations

import grp
import pwd

import pytest

from noatimefs.consumers import consumer_for_uid
from noatimefs.errors import Exit, QuietError
from noatimefs.views import MAX_UID, Allow, parse_uid


@pytest.mark.parametrize(
    ("name", "uid"),
    [
        (b"0", 0),
        (b"1000", 1000),
        (b"65534", 65534),
        (str(MAX_UID).encode(), MAX_UID),
        (str(MAX_UID + 1).encode(), None),  # (uid_t)-1 is no uid
        (b"00", None),
        (b"01000", None),
        (b"+1", None),
        (b"-1", None),
        (b" 1", None),
        (b"self", None),
        (b"", None),
        (b"1e3", None),
        (b"99999999999", None),
    ],
)
def test_parse_uid_takes_canonical_decimal_only(name: bytes, uid: int | None) -> None:
    assert parse_uid(name) == uid


def test_no_owner_admits_anyone() -> None:
    allow = Allow.parse(None)
    assert all(allow.admits(uid) for uid in (0, 1, 1000, 65534, MAX_UID))


def test_owner_list_admits_names_uids_ranges_and_groups() -> None:
    nogroup = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    allow = Allow.parse(f"nobody,1000,30001-30010,@{nogroup}")
    assert allow.admits(65534)  # by name
    assert allow.admits(1000)
    assert allow.admits(30001)
    assert allow.admits(30010)
    assert not allow.admits(30011)
    assert not allow.admits(0)
    assert not allow.admits(1001)
    # A colon separates too (a comma ends an -o option).
    assert Allow.parse("1000:2000").admits(2000)


def test_group_admits_its_members_by_their_groups() -> None:
    root_group = grp.getgrgid(0).gr_name
    allow = Allow.parse(f"@{root_group}")
    assert allow.admits(0)
    assert not allow.admits(65534)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("no-such-user-xyz", "no user named 'no-such-user-xyz'"),
        ("@no-such-group-xyz", "no group named 'no-such-group-xyz'"),
        ("5-3", "bad uid range '5-3'"),
        (f"1-{MAX_UID + 1}", "bad uid range"),
        (",", "names nobody"),
    ],
)
def test_bad_owner_lists_are_exit_5(spec: str, words: str) -> None:
    with pytest.raises(QuietError) as err:
        Allow.parse(spec)
    assert err.value.exitcode == Exit.OWNER
    assert words in err.value.message


def test_consumer_of_a_uid_without_passwd_entry_has_no_groups() -> None:
    uid = 4242
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    assert consumer_for_uid(uid).groups == frozenset()
    nobody = pwd.getpwnam("nobody")
    assert nobody.pw_gid in consumer_for_uid(nobody.pw_uid).groups
