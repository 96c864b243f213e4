"""No escalation, as a differential test: through the mount nobody gets more than on SOURCE.

A table of files and directories (every mode below, owned by root, by another
user, and by the presented owner itself) is probed by real processes as several
callers; each caller tries every entry on SOURCE and through the mount in the
same process, so the two outcomes are comparable:

- read (a file: open + read), execute (a file: exec of a copy of /usr/bin/true),
- list (a directory: readdir), search (a directory: stat of ``entry`` inside it).

For every caller an operation that fails on SOURCE must fail through the mount;
for the presented owner (65534, no namespace) the outcomes must be exactly
SOURCE's. The table is probed three ways: a mount with ``--owner 65534``; the
view ``MNT/65534`` of a ``--per-user`` mount (every other caller is then in
another uid's view); and ``MNT/self`` of that mount, where every caller is in
its own view. The callers include the presented owner as root of its own user
namespace (``unshare -r``, which has CAP_DAC_OVERRIDE over every inode whose uid
and gid map into it) and an overlay that owner mounts there over the mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import util

pytestmark = pytest.mark.mount

MODES = (
    0o400,
    0o440,
    0o404,
    0o600,
    0o640,
    0o604,
    0o644,
    0o700,
    0o750,
    0o705,
    0o711,
    0o111,
    0o000,
    # public (every class grants 65534's r-x): presented with 65534's primary gid
    0o444,
    0o555,
    0o755,
    0o754,
    0o1777,
)
OTHER = (1000, 1000)  # "another user": owns files, and is a caller
#: Owner classes of the table: root, another user, the presented owner itself, and
#: root with the presented owner's group (group bits then decide what 65534 may do).
OWNERS = {
    "root": (0, 0),
    "other": OTHER,
    "owner": util.NOBODY,
    "root-nogroup": (0, util.NOBODY[1]),
}


@dataclass(frozen=True)
class Caller:
    name: str
    uid: int
    gid: int
    userns: util.Userns = None
    groups: tuple[int, ...] | None = None
    overlay: bool = False
    exact: bool = False  # must see exactly SOURCE's outcomes, not just no more


CALLERS = (
    Caller("presented-owner", *util.NOBODY, exact=True),
    Caller("presented-owner-userns-root", *util.NOBODY, userns="user"),
    Caller("presented-owner-userns-overlay", *util.NOBODY, userns="mount", overlay=True),
    Caller("other-user-1000", *OTHER),
    Caller("other-user-1000-userns-root", *OTHER, userns="user"),
    Caller("group-member-4242-in-1000", 4242, 4242, groups=(4242, OTHER[1])),
    # public entries are shown with 65534's gid: its members, and a namespace that maps it
    Caller("group-member-4242-in-65534", 4242, 4242, groups=(4242, util.NOBODY[1])),
    Caller("gid-65534-userns-root", 4242, util.NOBODY[1], userns="user"),
    Caller("stranger-4242", 4242, 4242),
    Caller("root", 0, 0),
)

_PROBE = """
roots = dict(DATA["roots"])
if DATA.get("overlay"):
    ov = DATA["overlay"]
    mount_overlay(roots["mnt"], ov["upper"], ov["work"], ov["merged"])
    roots["mnt"] = ov["merged"]
out = {}
for label, root in roots.items():
    res = out[label] = {}
    for rel in DATA["files"]:
        p = root + "/" + rel
        res[rel] = {"read": errno_of(read_file, p), "exec": errno_of(run_file, p)}
    for rel in DATA["dirs"]:
        p = root + "/" + rel
        res[rel] = {"list": errno_of(list_dir, p), "search": errno_of(os.stat, p + "/entry")}
emit(out)
"""


@dataclass
class Table:
    src: Path
    mount: util.Mount
    work: Path
    files: list[str]
    dirs: list[str]
    root: Path  # where the table is probed: the mount, a view, or self
    presented: Path  # where it is presented as 65534's: the mount, or the view MNT/65534


def build_table(src: Path) -> tuple[list[str], list[str]]:
    files, dirs = [], []
    for owner, (uid, gid) in OWNERS.items():
        (src / "f" / owner).mkdir(parents=True)
        (src / "d" / owner).mkdir(parents=True)
        for mode in MODES:
            f = src / "f" / owner / f"m{mode:04o}"
            shutil.copyfile("/usr/bin/true", f)
            os.chown(f, uid, gid)
            f.chmod(mode)
            files.append(str(f.relative_to(src)))
            d = src / "d" / owner / f"m{mode:04o}"
            d.mkdir()
            (d / "entry").write_bytes(b"entry\n")
            (d / "entry").chmod(0o444)
            os.chown(d, uid, gid)
            d.chmod(mode)
            dirs.append(str(d.relative_to(src)))
    return files, dirs


#: How the table is presented: --owner 65534, the per-user view of 65534, MNT/self.
PRESENTATIONS = ("owner", "view")


@pytest.fixture(scope="module", params=PRESENTATIONS)
def table(request: pytest.FixtureRequest) -> Iterator[Table]:
    how = request.param
    with util.world_tmpdir("noatimefs-escalation-") as base:
        src = base / "src"
        src.mkdir(mode=0o755)
        files, dirs = build_table(src)
        before = util.manifest(src)
        if how == "owner":
            mount = util.mounted(src, owner=util.NOBODY[0], allow_other=True)
        else:
            mount = util.mounted(src, None, "--per-user", allow_other=True)
        with mount as m:
            presented = m.path if how == "owner" else m.path / str(util.NOBODY[0])
            root = m.path / "self" if how == "self" else presented
            yield Table(src, m, base, files, dirs, root=root, presented=presented)
        after = util.manifest(src)
        assert after == before, util.manifest_diff(before, after)


def _name(e: int) -> str:
    return "ok" if e == 0 else errno.errorcode.get(e, str(e))


def compare(caller: Caller, result: dict[str, Any]) -> list[str]:
    """The violations: more through the mount than on SOURCE (or, if exact, any difference)."""
    bad = []
    for rel, ops in result["src"].items():
        for op, src_errno in ops.items():
            mnt_errno = result["mnt"][rel][op]
            more = mnt_errno == 0 and src_errno != 0
            differs = (mnt_errno == 0) != (src_errno == 0)
            if more or (caller.exact and differs):
                kind = "MORE than source" if more else "differs from source"
                bad.append(
                    f"{caller.name}: {op} {rel}: source {_name(src_errno)}, "
                    f"mount {_name(mnt_errno)} ({kind})"
                )
    return bad


@pytest.mark.parametrize("caller", CALLERS, ids=[c.name for c in CALLERS])
def test_never_more_than_source(table: Table, caller: Caller) -> None:
    data: dict[str, Any] = {
        "roots": {"src": str(table.src), "mnt": str(table.root)},
        "files": table.files,
        "dirs": table.dirs,
    }
    ov_base = None
    if caller.overlay:
        ov_base = table.work / f"overlay-{caller.name}"
        ov_base.mkdir()
        data["overlay"] = {}
        for part in ("upper", "work", "merged"):
            (ov_base / part).mkdir()
            os.chown(ov_base / part, caller.uid, caller.gid)
            data["overlay"][part] = str(ov_base / part)
    try:
        result = util.run_as(
            caller.uid, caller.gid, _PROBE, data, userns=caller.userns, groups=caller.groups
        )
    finally:
        if ov_base is not None:
            shutil.rmtree(ov_base)
    # Sanity: the probe saw what it should on SOURCE (the table is not vacuous).
    src_ok = sum(1 for ops in result["src"].values() for e in ops.values() if e == 0)
    src_denied = sum(1 for ops in result["src"].values() for e in ops.values() if e != 0)
    assert src_ok > 0
    if caller.uid == 0 and caller.userns is None:
        assert result["src"]["f/root/m0000"]["read"] == 0  # root reads anything
    else:
        assert src_denied > 0
    violations = compare(caller, result)
    assert not violations, "\n".join(violations)


def test_presented_owner_sees_everything_it_can_use(table: Table) -> None:
    """Not vacuous for the owner: it reads and lists through the mount what it may on SOURCE."""
    code = """
emit({"read": errno_of(read_file, DATA + "/f/root/m0404"),
      "list": errno_of(list_dir, DATA + "/d/root/m0705")})
"""
    r = util.run_as(*util.NOBODY, code, str(table.root))
    assert r == {"read": 0, "list": 0}


_ACCESS = """
out = {}
for rel in DATA["rels"]:
    p = DATA["src"] + "/" + rel
    out[rel] = [os.access(p, os.R_OK), os.access(p, os.W_OK), os.access(p, os.X_OK)]
emit(out)
"""


def test_presentation_rule_on_the_table(table: Table) -> None:
    """Presented as 65534's exactly when 65534 can use it; owner bits = its access.

    An entry 65534 can use (read a file; read and search a directory) is shown
    with uid 65534 and owner bits equal to 65534's access on SOURCE; with gid
    65534 and group = other bits = that access's r-x if every class of the source
    mode grants that much (public), else with the real gid. Anything else keeps
    its real uid, gid and mode.
    """
    rels = table.files + table.dirs
    access = util.run_as(*util.NOBODY, _ACCESS, {"src": str(table.src), "rels": rels})
    wrong = []
    for rel in rels:
        s, m = os.lstat(table.src / rel), os.lstat(table.presented / rel)
        r, w, x = access[rel]
        usable = r and (x or rel in table.files)
        got = (m.st_uid, m.st_gid, oct(m.st_mode))
        if usable:
            bits = (4 if r else 0) | (2 if w else 0) | (1 if x else 0)
            shared = bits & 5
            public = all((s.st_mode >> shift) & shared == shared for shift in (6, 3, 0))
            gid = util.NOBODY[1] if public else s.st_gid
            ok = (
                m.st_uid == util.NOBODY[0]
                and m.st_gid == gid
                and (m.st_mode >> 6) & 7 == bits
                and stat.S_IFMT(m.st_mode) == stat.S_IFMT(s.st_mode)
                and (not public or m.st_mode & 0o077 == shared << 3 | shared)
            )
            want = f"uid 65534, gid {gid}, owner bits {bits:o}" + (
                f", group and other bits {shared:o}" if public else ""
            )
        else:
            ok = (m.st_uid, m.st_gid, m.st_mode) == (s.st_uid, s.st_gid, s.st_mode)
            want = f"as on SOURCE: {(s.st_uid, s.st_gid, oct(s.st_mode))}"
        if not ok:
            wrong.append(f"{rel}: got {got}, want {want}")
        if (m.st_size, m.st_nlink, m.st_mtime_ns) != (s.st_size, s.st_nlink, s.st_mtime_ns):
            wrong.append(f"{rel}: size/nlink/mtime differ")
    assert not wrong, "\n".join(wrong)
