"""Differential property test: the mount returns what SOURCE returns, up to the presentation rule.

Hypothesis draws small random trees -- regular files (random bytes, some of
several pages), directories, symlinks (to entries, out of SOURCE, dangling,
loops), hard links; random permission bits incl. setuid/setgid/sticky; owners
root, 65534 (the presented owner) and 1000 (another user) with mixed groups;
random mtimes; ``user.*`` xattrs. Each tree is generated into a fresh
directory of one SOURCE that is mounted once for the module
(``noatimefs --owner 65534 --allow-other``, daemon as root). Then three
callers, each a real process -- root, 65534 and 1000 -- do the same operations
on every entry of the tree on SOURCE and through the mount, in one process:
``lstat``, ``stat``, ``access(R/W/X)``, read (sha256), read with
``O_NOATIME``, ``listdir``, ``readlink``, ``listxattr``, ``getxattr``; each
outcome is the result or the errno. The outcomes are compared here:

- attributes: the mount shows exactly ``policy.present()`` of the source's
  uid/gid/mode and the source's size, nlink, mtime, ctime, type and st_ino;
- root and the presented owner get exactly the source's outcome for every
  operation (bytes, listings, link targets, xattrs, errno), except that
  nothing is writable through the mount, ``O_NOATIME`` never fails through the
  mount, and root may execute only what the presented mode lets it
  (the x bits are cleared when the presented owner may not execute);
- 1000 (not the presented owner, but the real owner of some entries) never
  gets more through the mount than on SOURCE: anything that works through
  the mount works on SOURCE with the same result; it may get less.

Set ``NOATIMEFS_TRUST_FIGURES=/path/file`` to have the figures (trees,
entries, comparisons, violations) appended there as a JSON line.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noatimefs import policy
from noatimefs.consumers import consumer_for_uid

pytestmark = pytest.mark.mount

OWNER_UID, OWNER_GID = util.NOBODY
OTHER_UID, OTHER_GID = 1000, 1000
#: (uid, gid) pairs for entries: root, the presented owner, another user, and mixes.
OWNERS = (
    (0, 0),
    (OWNER_UID, OWNER_GID),
    (OTHER_UID, OTHER_GID),
    (0, OWNER_GID),
    (OWNER_UID, 0),
    (OTHER_UID, 0),
    (0, OTHER_GID),
)
NAMES = ("a", "b", "bin", "lib", "x y", "-dash", ".hidden", "é", "long" * 20)
XATTR_NAMES = ("user.a", "user.b", "user.nix.hash")
SPECIAL = (0, 0, 0, stat.S_ISUID, stat.S_ISGID, stat.S_ISVTX)
EXAMPLES = 40
EXAMPLES_SLOW = int(os.environ.get("NOATIMEFS_TRUST_EXAMPLES", "600"))

FIGURES: Counter[str] = Counter()


def consumer() -> policy.Consumer:
    """The presented owner the daemon resolves for ``--owner 65534`` (cli.resolve_owner)."""
    return consumer_for_uid(OWNER_UID)


# --------------------------------------------------------------------------- trees


@dataclass
class Entry:
    kind: str  # file, dir, symlink, hardlink
    rel: str  # path relative to the tree's root
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    target: str = ""  # symlink text, or the rel of the file a hard link links to
    mtime_ns: int = 0


@st.composite
def trees(draw: st.DrawFn) -> list[Entry]:
    """A list of entries, parents before children; names are unique by construction."""
    n = draw(st.integers(min_value=1, max_value=16))
    dirs = [""]
    files: list[str] = []
    entries: list[Entry] = []
    for i in range(n):
        kinds = ["file", "file", "dir", "symlink"] + (["hardlink"] if files else [])
        kind = draw(st.sampled_from(kinds))
        parent = draw(st.sampled_from(dirs))
        rel = (parent + "/" if parent else "") + f"{draw(st.sampled_from(NAMES))}-{i}"
        mode = draw(st.integers(min_value=0, max_value=0o777)) | draw(st.sampled_from(SPECIAL))
        uid, gid = draw(st.sampled_from(OWNERS))
        e = Entry(kind, rel, mode, uid, gid, mtime_ns=draw(st.integers(0, 2**40)) * 1000)
        if kind == "file":
            if draw(st.integers(0, 9)) == 0:  # now and then several pages
                e.data = random.Random(draw(st.integers(0, 2**32))).randbytes(
                    draw(st.integers(4096, 300_000))
                )
            else:
                e.data = draw(st.binary(max_size=3000))
            files.append(rel)
        elif kind == "dir":
            dirs.append(rel)
        elif kind == "hardlink":
            e.target = draw(st.sampled_from(files))
        else:
            up = "../" * rel.count("/")
            others = [x.rel for x in entries] or ["nothing"]
            e.target = draw(
                st.one_of(
                    st.sampled_from([up + r for r in others]),  # inside the tree
                    st.sampled_from(others).map(lambda r: "./" + r.rsplit("/", 1)[-1]),
                    st.just(rel.rsplit("/", 1)[-1]),  # itself: a loop
                    st.just(up + "../../.."),  # climbing out of SOURCE
                    st.just("/etc/passwd"),  # absolute, out of SOURCE
                    st.just("/"),
                    st.just("no/such/entry"),  # dangling
                    st.just("SRC"),  # absolute, into SOURCE itself (filled in at build time)
                )
            )
        if kind in ("file", "dir"):
            e.xattrs = draw(
                st.dictionaries(st.sampled_from(XATTR_NAMES), st.binary(max_size=80), max_size=3)
            )
        entries.append(e)
    return entries


def build(root: Path, entries: list[Entry]) -> None:
    """Create *entries* under *root* (root-owned 0755), then set owners and modes, deepest first."""
    root.mkdir(mode=0o755)
    for e in entries:
        p = root / e.rel
        if e.kind == "dir":
            p.mkdir()
        elif e.kind == "file":
            p.write_bytes(e.data)
        elif e.kind == "hardlink":
            os.link(root / e.target, p)
        else:
            target = str(root / entries[0].rel) if e.target == "SRC" else e.target
            e.target = target
            os.symlink(target, p)
        if e.kind in ("file", "dir"):
            for name, value in e.xattrs.items():
                os.setxattr(p, name, value)
    for e in reversed(entries):
        if e.kind == "hardlink":
            continue  # the linked file's owner and mode are the hard link's
        p = root / e.rel
        os.chown(p, e.uid, e.gid, follow_symlinks=False)
        if e.kind != "symlink":
            os.chmod(p, e.mode)  # after chown, which clears setuid/setgid
        os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


# --------------------------------------------------------------------------- the probe

_PROBE = r"""
import stat

def outcome(fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        return {"errno": e.errno}

def lstat(p):
    s = os.lstat(p)
    return [s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_nlink, s.st_mtime_ns,
            s.st_ctime_ns, s.st_ino]

def fstat_follow(p):
    s = os.stat(p)
    return [stat.S_IFMT(s.st_mode), s.st_size, s.st_ino]

def xattr_names(p):
    return sorted(n for n in os.listxattr(p, follow_symlinks=False) if n.startswith("user."))

def xattr(p, n):
    return os.getxattr(p, n, follow_symlinks=False).hex()

def probe(p, kind, names):
    r = {"lstat": outcome(lstat, p), "stat": outcome(fstat_follow, p),
         "xattrs": outcome(xattr_names, p)}
    for n in names:
        r["xattr " + n] = outcome(xattr, p, n)
    if kind != "symlink":
        r["access"] = [os.access(p, m) for m in (os.R_OK, os.W_OK, os.X_OK)]
    if kind in ("file", "hardlink"):
        r["read"] = outcome(sha256_file, p)
        r["read O_NOATIME"] = outcome(sha256_file, p, os.O_NOATIME)
    elif kind == "dir":
        r["list"] = outcome(list_dir, p)
    else:
        r["readlink"] = outcome(os.readlink, p)
    return r

out = {}
for label, root in DATA["roots"].items():
    out[label] = {e["rel"]: probe(root + "/" + e["rel"], e["kind"], e["xattrs"])
                  for e in DATA["entries"]}
    out[label]["."] = {"list": outcome(list_dir, root)}
emit(out)
"""


@dataclass(frozen=True)
class Caller:
    name: str
    uid: int
    gid: int
    exact: bool  # root and the presented owner: exactly the source's outcomes
    groups: tuple[int, ...] | None = None  # supplementary groups (None: cleared)


CALLERS = (
    Caller("root", 0, 0, exact=True),
    Caller("owner-65534", OWNER_UID, OWNER_GID, exact=True),
    Caller("other-1000", OTHER_UID, OTHER_GID, exact=False),
    # the same user, also in the groups of root and of the presented owner
    Caller("other-1000+groups-0-65534", OTHER_UID, OTHER_GID, False, (OTHER_GID, 0, OWNER_GID)),
    Caller("stranger-4242", 4242, 4242, exact=False),
)


def _is_err(v: Any) -> bool:
    return isinstance(v, dict) and "errno" in v


def _show(v: Any) -> str:
    if _is_err(v):
        return errno.errorcode.get(v["errno"], str(v["errno"]))
    return repr(v)[:120]


def presented(lst: list[int], who: policy.Consumer) -> list[int]:
    """The lstat the mount must show for a source lstat: only uid, gid and mode differ."""
    mode, uid, gid = lst[0], lst[1], lst[2]
    p_uid, p_gid, p_mode = policy.present(mode, uid, gid, who)
    return [p_mode, p_uid, p_gid, *lst[3:]]


def compare(caller: Caller, rel: str, src: dict[str, Any], mnt: dict[str, Any]) -> list[str]:
    """Violations of the contract for one entry and one caller."""
    who = consumer()
    bad: list[str] = []

    def fail(op: str, s: Any, m: Any, why: str) -> None:
        bad.append(f"{caller.name} {op} {rel!r}: source {_show(s)}, mount {_show(m)}: {why}")

    for op, s in src.items():
        m: Any = mnt[op]
        FIGURES["comparisons"] += 1
        FIGURES["mount_failed" if _is_err(m) else "mount_succeeded"] += 1
        expect = s
        if op == "lstat" and not _is_err(s):
            expect = presented(s, who)
        elif op == "read O_NOATIME":
            expect = src["read"]  # through the mount the flag never costs an EPERM
        elif op == "access":
            if _is_err(mnt.get("lstat")) or _is_err(src.get("lstat")):
                expect = s if caller.exact else m
            else:
                p_mode = presented(src["lstat"], who)[0]
                r_ok, _, x_ok = s
                if caller.uid == 0 and stat.S_ISREG(p_mode):
                    x_ok = bool(p_mode & 0o111)  # root executes what some x bit allows
                expect = [r_ok, False, x_ok]  # nothing is writable through the mount
                if m[1]:
                    fail(op, s, m, "writable through a read-only mount")
                    continue
        if caller.exact:
            if m != expect:
                fail(op, s, m, "differs from the source")
            continue
        # Not the presented owner: never more than on the source.
        if op == "access":
            if any(mv and not sv for mv, sv in zip(m, s, strict=True)):
                fail(op, s, m, "MORE access than on the source")
        elif op == "read O_NOATIME":
            if not _is_err(m) and m != src["read"]:
                fail(op, s, m, "MORE than (or different from) a plain read of the source")
        elif not _is_err(m):
            if m != expect:
                fail(op, s, m, "succeeds through the mount with another result (or MORE)")
        elif not (_is_err(s) and s == m) and m["errno"] not in (errno.EACCES, errno.EPERM):
            fail(op, s, m, "fails through the mount with an unexpected errno")
    return bad


# --------------------------------------------------------------------------- the test


@dataclass
class Rig:
    src: Path
    mount: util.Mount
    trees: int = 0


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with util.world_tmpdir("noatimefs-trust-diff-") as base:
        src = base / "src"
        src.mkdir(mode=0o755)
        with util.mounted(src, owner=OWNER_UID, allow_other=True) as m:
            yield Rig(src=src, mount=m)
            pid_alive = m.proc.poll() is None
        assert pid_alive, "the daemon died during the differential test"
    util.trust_figures("differential", FIGURES)


def check_tree(rig: Rig, entries: list[Entry]) -> None:
    name = f"t{rig.trees}"
    rig.trees += 1
    FIGURES["trees"] += 1
    FIGURES["entries"] += len(entries)
    build(rig.src / name, entries)
    data = {
        "roots": {"src": f"{rig.src}/{name}", "mnt": f"{rig.mount.path}/{name}"},
        "entries": [
            {
                "rel": e.rel,
                "kind": e.kind,
                "xattrs": [*XATTR_NAMES, "user.missing"] if e.kind != "symlink" else ["user.a"],
            }
            for e in entries
        ],
    }
    violations: list[str] = []
    for caller in CALLERS:
        out = util.run_as(caller.uid, caller.gid, _PROBE, data, groups=caller.groups)
        FIGURES["probes"] += 1
        for rel, s in out["src"].items():
            violations += compare(caller, rel, s, out["mnt"][rel])
    assert rig.mount.proc.poll() is None, "daemon died:\n" + rig.mount.describe()
    FIGURES["violations"] += len(violations)
    assert not violations, "\n".join(violations[:30])


_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@settings(max_examples=EXAMPLES, derandomize=True, **_COMMON)  # type: ignore[arg-type]
@given(entries=trees())
def test_mount_equals_source_up_to_presentation(rig: Rig, entries: list[Entry]) -> None:
    check_tree(rig, entries)


@pytest.mark.slow
@settings(max_examples=EXAMPLES_SLOW, **_COMMON)  # type: ignore[arg-type]
@given(entries=trees())
def test_mount_equals_source_up_to_presentation_many(rig: Rig, entries: list[Entry]) -> None:
    check_tree(rig, entries)


def test_mount_root_lists_as_source(rig: Rig) -> None:
    """The mount root lists what SOURCE lists, and its status xattr is hidden from listxattr."""
    assert sorted(os.listdir(rig.mount.path)) == sorted(os.listdir(rig.src))
    assert util.STATUS_XATTR not in os.listxattr(rig.mount.path)
    assert os.listxattr(rig.mount.path) == os.listxattr(rig.src)


#: Found by the slow run of the property test: modes that exclude their owner.
OWNER_EXCLUDED = [
    Entry("file", "f-0", 0o004, OTHER_UID, 0, data=b"other may read, the owner may not"),
    Entry("dir", "d-1", 0o005, OTHER_UID, 0),
    Entry("file", "d-1/below-2", 0o444, 0, 0, data=b"below a dir its owner may not search"),
    Entry("dir", "e-3", 0o055, OTHER_UID, OTHER_GID),
    Entry("file", "e-3/below-4", 0o444, 0, 0, data=b"below"),
    Entry("file", "g-5", 0o044, 0, OWNER_GID, data=b"root-owned, owner-excluded"),
]


def test_owner_excluded_modes_give_their_owner_nothing_more(rig: Rig) -> None:
    """1000 owns f-0 (0004) and d-1 (0005): on SOURCE it may neither read f-0 nor search d-1,
    so it must not read f-0's xattrs or d-1/below-2 through the mount either."""
    check_tree(rig, [dataclasses.replace(e) for e in OWNER_EXCLUDED])
