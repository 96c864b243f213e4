"""Hostile names and shapes: nothing escapes SOURCE, nothing crashes the daemon, nothing is mangled.

One SOURCE (root-owned, 0755 dirs, 0644 files) holds, for every hostile name
(newlines, spaces, tabs, 255 bytes, bytes that are not UTF-8, escape
sequences, printf/brace patterns, shell metacharacters, mountinfo-style
escapes, right-to-left marks, the status xattr's own name...):
a file, a directory holding a file, and a symlink whose *text* is hostile;
``user.*`` xattrs with hostile names and values; symlink loops and a chain
longer than the kernel follows; symlinks out of SOURCE (``/etc``,
``../../..``, ``/proc/self/root``); directories 64 levels deep, with short and
with 200-byte names (a path far longer than ``PATH_MAX``).

Callers (root, and 65534 the presented owner) walk everything with bytes
names, by absolute path and, for the deep trees, one ``openat`` per level, on
SOURCE and through the mount, and the outcomes must be equal. Beyond that:
``..`` at the mount root is the mountpoint's parent (the kernel's, never
SOURCE's parent); ``RESOLVE_BENEATH`` from the mount root refuses ``..``;
a forged file handle naming a backing inode outside SOURCE gives no bytes;
a caller process whose name holds a newline cannot forge a line in the
daemon's log.
"""

from __future__ import annotations

import errno
import hashlib
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

HOSTILE_NAMES: tuple[bytes, ...] = (
    b"new\nline",
    b"\n",
    b"\n\n",
    b" ",
    b"  leading",
    b"trailing  ",
    b"tab\there",
    b"x" * 255,
    "é".encode() * 127 + b"x",  # 255 bytes, multi-byte UTF-8
    b"\xff\xfe\xfd",
    b"\x80abc",
    b"caf\xe9",  # latin-1
    b"\xed\xa0\x80",  # a UTF-16 surrogate in "UTF-8"
    b"\x1b[31mred\x1b[0m",
    b"\x01\x02\x7f",
    b"%s%n%x%d",
    b"{}{0}{name}",
    b"a\\012b\\040c",  # how mountinfo escapes
    b"\\",
    b"-rf",
    b"--",
    b"...",
    b"..\n",
    b"*?[a]",
    b"$(id)`id`;|&<>",
    b"'\"",
    "\u202egnp.exe".encode(),  # right-to-left override
    b"user.noatimefs.status",
    b"\xc0\xaf",  # overlong '/'
)
HOSTILE_LINK_TEXTS: tuple[bytes, ...] = (
    b"../\xff\n/x",
    b"/etc/\n",
    b"x" * 4000,
    b"..",
    b"/",
    b"%s%n",
    b"\x1b]0;title\x07",
)
HOSTILE_XATTRS: dict[bytes, bytes] = {
    b"user.new\nline": b"v\n",
    b"user.\xff\xfe": b"\x00\x01\x02",
    b"user." + b"n" * 200: b"\x00" * 1000,
    b"user.empty": b"",
    b"user.big": bytes(range(256)) * 4,
}
DEPTH = 64
OUT_MARKER = b"OUTSIDE-SOURCE-MARKER-7f3a\n"


def hx(b: bytes) -> str:
    return b.hex()


@dataclass
class Rig:
    base: Path
    src: Path
    outside: Path
    mount: util.Mount
    names: list[bytes]
    links: list[bytes]
    deep: list[list[bytes]]


def build(src: Path, outside: Path) -> tuple[list[bytes], list[bytes], list[list[bytes]]]:
    """The hostile SOURCE; returns the names, the symlink names and the deep chains."""
    s = os.fsencode(src)
    names: list[bytes] = []
    links: list[bytes] = []
    for i, name in enumerate(HOSTILE_NAMES):
        f = s + b"/f/" + name
        os.makedirs(s + b"/f", exist_ok=True)
        with open(f, "wb") as fh:
            fh.write(name * 3 + b"\n" + str(i).encode())
        names.append(b"f/" + name)
        d = s + b"/d/" + name
        os.makedirs(d)
        with open(d + b"/inside", "wb") as fh:
            fh.write(b"inside " + name)
        names += [b"d/" + name, b"d/" + name + b"/inside"]
        os.makedirs(s + b"/l", exist_ok=True)
        os.symlink(name, s + b"/l/" + name)  # a link whose text is the hostile name
        links.append(b"l/" + name)
    os.makedirs(s + b"/t")
    for i, text in enumerate(HOSTILE_LINK_TEXTS):
        os.symlink(text, s + b"/t/%d" % i)
        links.append(b"t/%d" % i)
    # xattrs with hostile names and values
    with open(s + b"/x", "wb") as fh:
        fh.write(b"x")
    for k, v in HOSTILE_XATTRS.items():
        os.setxattr(s + b"/x", k, v)
    names.append(b"x")
    # xattrs of other namespaces: trusted.* names are listed by ext4 to CAP_SYS_ADMIN only
    with open(s + b"/tx", "wb") as fh:
        fh.write(b"tx")
    os.setxattr(s + b"/tx", b"trusted.overlay.secret", b"t")
    os.setxattr(s + b"/tx", b"security.noatimefs-test", b"s")
    os.setxattr(s + b"/tx", b"user.plain", b"u")
    # loops and a chain longer than the kernel follows (40)
    os.makedirs(s + b"/loop")
    os.symlink(b"b", s + b"/loop/a")
    os.symlink(b"a", s + b"/loop/b")
    os.symlink(b"self", s + b"/loop/self")
    os.symlink(b"../loop/dir/../self", s + b"/loop/dotdot")
    os.makedirs(s + b"/loop/dir")
    for i in range(45):
        os.symlink(b"c%d" % (i + 1) if i < 44 else b"../x", s + b"/loop/c%d" % i)
    links += [b"loop/a", b"loop/b", b"loop/self", b"loop/dotdot", b"loop/c0", b"loop/c40"]
    # out of SOURCE
    os.makedirs(s + b"/out")
    for name, text in (
        (b"etc", b"/etc"),
        (b"shadow", b"/etc/shadow"),
        (b"up", b"../" * 12 + b"etc/passwd"),
        (b"procroot", b"/proc/self/root"),
        (b"marker", os.fsencode(outside) + b"/marker"),
        (b"markerdir", os.fsencode(outside)),
    ):
        os.symlink(text, s + b"/out/" + name)
        links.append(b"out/" + name)
    # deep trees: short names, and 200-byte names (a path of 64 * 201 bytes > PATH_MAX)
    deep = []
    for top, width in ((b"deep", 1), (b"deeplong", 200)):
        chain = [top] + [(b"%d" % level).rjust(width, b"d") for level in range(DEPTH)]
        fd = os.open(s, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in chain:
                os.mkdir(part, dir_fd=fd)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            leaf = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(leaf, b"the bottom of " + top)
            os.close(leaf)
        finally:
            os.close(fd)
        deep.append([*chain, b"leaf"])
    return names, links, deep


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with util.world_tmpdir("noatimefs-trust-hostile-") as base:
        src, outside = base / "src", base / "outside"
        src.mkdir(mode=0o755)
        outside.mkdir(mode=0o755)
        (outside / "marker").write_bytes(OUT_MARKER)
        os.setxattr(outside / "marker", "user.outside", OUT_MARKER)
        os.setxattr(outside, "user.outside", OUT_MARKER)
        old = os.umask(0o022)
        try:
            names, links, deep = build(src, outside)
        finally:
            os.umask(old)
        before = fd_manifest(src)
        with util.mounted(src, owner=util.NOBODY[0], allow_other=True) as m:
            yield Rig(base, src, outside, m, names, links, deep)
            assert m.proc.poll() is None, "the daemon died:\n" + m.describe()
        assert fd_manifest(src) == before, "SOURCE changed"


def fd_manifest(top: Path) -> dict[bytes, tuple[Any, ...]]:
    """Like util.manifest, but by directory descriptors, so paths longer than PATH_MAX work."""
    out: dict[bytes, tuple[Any, ...]] = {}
    for root, dirs, files, rootfd in os.fwalk(os.fsencode(top)):
        for name in dirs + files:
            st = os.stat(name, dir_fd=rootfd, follow_symlinks=False)
            extra: Any = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(name, dir_fd=rootfd)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY, dir_fd=rootfd)
                try:
                    extra = hashlib.sha256(os.read(fd, 1 << 20)).hexdigest()
                    extra = (extra, sorted(os.listxattr(fd)))
                finally:
                    os.close(fd)
            key = root + b"/" + name
            out[key] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, extra)
    return out


_PROBE = r"""
import ctypes, stat

def hexs(b):
    return b.hex()

def outcome(fn, *a):
    try:
        return fn(*a)
    except OSError as e:
        return {"errno": e.errno}

def lstat(p):
    s = os.lstat(p)
    return [stat.S_IFMT(s.st_mode), s.st_size, s.st_nlink, s.st_ino, s.st_mtime_ns]

def read(p):
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.read(fd, 1 << 20).hex()
    finally:
        os.close(fd)

def follow(p):
    s = os.stat(p)
    return [stat.S_IFMT(s.st_mode), s.st_ino]

def xattrs(p):
    names = sorted(n for n in os.listxattr(p, follow_symlinks=False)
                   if os.fsencode(n).startswith(b"user."))
    return {hexs(os.fsencode(n)): outcome(lambda: os.getxattr(p, n, follow_symlinks=False).hex())
            for n in names}

def walk(root, parts):
    # one openat per level, as deep as PATH_MAX does not allow
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            return os.read(leaf, 4096).hex()
        finally:
            os.close(leaf)
    finally:
        os.close(fd)

out = {}
for label, root in DATA["roots"].items():
    r = out[label] = {}
    rb = os.fsencode(root)
    for n in DATA["names"]:
        p = rb + b"/" + bytes.fromhex(n)
        e = r[n] = {"lstat": outcome(lstat, p), "xattrs": outcome(xattrs, p)}
        if stat.S_ISDIR(os.lstat(p).st_mode) if not isinstance(e["lstat"], dict) else False:
            e["list"] = outcome(lambda: sorted(x.hex() for x in os.listdir(p)))
        else:
            e["read"] = outcome(read, p)
    for n in DATA["links"]:
        p = rb + b"/" + bytes.fromhex(n)
        r[n] = {"lstat": outcome(lstat, p), "readlink": outcome(lambda: os.readlink(p).hex()),
                "follow": outcome(follow, p), "xattrs": outcome(xattrs, p),
                "read": outcome(read, p)}
    for top in ("f", "d", "l", "t", "loop", "out", "deep", "deeplong"):
        d = rb + b"/" + top.encode()
        r["list " + top] = outcome(lambda: sorted(x.hex() for x in os.listdir(d)))
    for i, chain in enumerate(DATA["deep"]):
        parts = [bytes.fromhex(x) for x in chain]
        r["walk %d" % i] = outcome(walk, rb, parts)
        r["path %d" % i] = outcome(read, rb + b"/" + b"/".join(parts))
emit(out)
"""


def run_probe(rig: Rig, uid: int, gid: int) -> dict[str, Any]:
    data = {
        "roots": {"src": str(rig.src), "mnt": str(rig.mount.path)},
        "names": [hx(n) for n in rig.names],
        "links": [hx(n) for n in rig.links],
        "deep": [[hx(p) for p in chain] for chain in rig.deep],
    }
    result: dict[str, Any] = util.run_as(uid, gid, _PROBE, data)
    return result


def differences(result: dict[str, Any], src_root_ino: int) -> list[str]:
    bad = []
    for key, s in result["src"].items():
        m = result["mnt"][key]
        for op in s if isinstance(s, dict) and "errno" not in s else [None]:
            sv = s if op is None else s[op]
            mv = m if op is None else m.get(op)
            if op == "follow" and isinstance(sv, list) and sv[1] == src_root_ino:
                # A link resolving to the mount root: FUSE numbers its root 1, always.
                sv = [sv[0], 1]
            if sv != mv:
                name = key if " " in key else repr(bytes.fromhex(key))
                bad.append(f"{name} {op or ''}: source {str(sv)[:100]}, mount {str(mv)[:100]}")
    return bad


@pytest.mark.parametrize(("uid", "gid"), [(0, 0), util.NOBODY], ids=["root", "owner-65534"])
def test_hostile_names_and_shapes_same_as_source(rig: Rig, uid: int, gid: int) -> None:
    result = run_probe(rig, uid, gid)
    bad = differences(result, os.stat(rig.src).st_ino)
    cases = len(result["src"])
    util.trust_figures(f"hostile uid {uid}", {"cases": cases, "differences": len(bad)})
    assert rig.mount.proc.poll() is None, "daemon died:\n" + rig.mount.describe()
    assert not bad, f"{len(bad)} of {cases} cases differ:\n" + "\n".join(bad[:40])
    # Not vacuous: the hostile files were read, the deep leaves reached.
    mnt = result["mnt"]
    assert bytes.fromhex(mnt[hx(b"f/new\nline")]["read"]).startswith(b"new\nline")
    assert bytes.fromhex(mnt["walk 0"]) == b"the bottom of deep"
    assert bytes.fromhex(mnt["walk 1"]) == b"the bottom of deeplong"
    assert bytes.fromhex(mnt["path 0"]) == b"the bottom of deep"
    assert result["src"]["path 1"] == {"errno": errno.ENAMETOOLONG}  # longer than PATH_MAX


def test_path_longer_than_path_max_walked_by_openat(rig: Rig) -> None:
    """64 levels of 200-byte names: reachable on SOURCE one openat at a time, so also through
    the mount."""
    result = run_probe(rig, *util.NOBODY)
    assert result["src"]["walk 1"] == b"the bottom of deeplong".hex()
    assert result["mnt"]["walk 1"] == result["src"]["walk 1"]


def test_links_out_of_source_are_text_never_followed_by_the_daemon(rig: Rig) -> None:
    mnt = rig.mount.path
    for name, src_link in (("marker", rig.outside / "marker"), ("markerdir", rig.outside)):
        link = mnt / "out" / name
        assert os.readlink(link) == str(src_link)
        # An xattr call on the link itself is answered for the link, never its target.
        with pytest.raises(OSError, match="No data available"):
            os.getxattr(link, "user.outside", follow_symlinks=False)
        assert os.listxattr(link, follow_symlinks=False) == []
    # A resolution that refuses symlinks cannot leave the mount through them.
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rel in (b"out/marker", b"out/markerdir/marker", b"out/etc/passwd", b"out/up"):
            assert _openat2_errno(fd, rel) == errno.ELOOP, rel
    finally:
        os.close(fd)


def test_dotdot_at_the_mount_root_is_the_mountpoints_parent(rig: Rig) -> None:
    mnt = rig.mount.path
    parent = mnt.parent
    assert os.stat(mnt / "..").st_ino == os.stat(parent).st_ino
    assert os.stat(mnt / "..").st_ino != os.stat(rig.src.parent / "..").st_ino or (
        rig.src.parent == parent
    )
    assert sorted(os.listdir(mnt / "..")) == sorted(os.listdir(parent))
    assert os.stat(mnt / "d" / ".." / "..").st_ino == os.stat(parent).st_ino
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _openat2_errno(fd, b"..", resolve=_RESOLVE_BENEATH) == errno.EXDEV
        assert _openat2_errno(fd, b"d/../..", resolve=_RESOLVE_BENEATH) == errno.EXDEV
    finally:
        os.close(fd)
    assert rig.mount.proc.poll() is None


def test_forged_file_handles_give_no_bytes(rig: Rig) -> None:
    """A FUSE file handle names a node id, and ids are backing inode numbers. Without export
    support the kernel decodes a handle only to an inode it already holds, so a handle forged
    for a file outside SOURCE (same filesystem) must fail -- the daemon never handed the kernel
    such a node -- and one for a known file inside SOURCE opens that file (or nothing), needing
    the right generation (and CAP_DAC_READ_SEARCH, like any open_by_handle_at)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    outside = rig.outside / "marker"
    inside = rig.src / "x"
    mfd = os.open(rig.mount.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.stat(rig.mount.path / "x")  # make sure the kernel holds the inside node
        for target in (outside, inside):
            st = os.stat(target)
            for gen in (0, 1, 7):
                # struct file_handle { u32 handle_bytes; int handle_type; u32 f_handle[3]; }
                words = (ctypes.c_uint32 * 5)(
                    12, 0x81, st.st_ino >> 32, st.st_ino & 0xFFFFFFFF, gen
                )
                fd = libc.open_by_handle_at(mfd, ctypes.byref(words), os.O_RDONLY)
                if fd >= 0:
                    try:
                        data = os.read(fd, 4096)
                    finally:
                        os.close(fd)
                    assert OUT_MARKER not in data, "a forged handle read a file outside SOURCE"
                    assert (target, gen) == (inside, 0), f"a forged handle opened {target}"
                    assert data == inside.read_bytes()
                else:
                    err = ctypes.get_errno()
                    assert err in (errno.ESTALE, errno.EINVAL, errno.EOPNOTSUPP), err
    finally:
        os.close(mfd)
    assert rig.mount.proc.poll() is None


_ALL_XATTR_NAMES = r"""
emit({label: sorted(os.listxattr(root + "/tx")) for label, root in DATA.items()})
"""


def test_xattr_names_of_all_namespaces_listed_as_on_source(rig: Rig) -> None:
    """Not only user.*: listxattr through the mount lists what SOURCE lists to the caller."""
    roots = {"src": str(rig.src), "mnt": str(rig.mount.path)}
    as_root = util.run_as(0, 0, _ALL_XATTR_NAMES, roots)
    assert "trusted.overlay.secret" in as_root["src"]
    assert as_root["mnt"] == as_root["src"]
    as_owner = util.run_as(*util.NOBODY, _ALL_XATTR_NAMES, roots)
    assert as_owner["mnt"] == as_owner["src"]


_FORGE_LOG = r"""
import ctypes
libc = ctypes.CDLL(None)
libc.prctl(15, ctypes.c_char_p(b"z\nFORGED LINE"), 0, 0, 0)  # PR_SET_NAME
fd = os.open(DATA, os.O_RDONLY | os.O_NOATIME)
os.close(fd)
emit(open("/proc/self/comm", "rb").read().hex())
"""


def test_caller_names_cannot_forge_daemon_log_lines(rig: Rig) -> None:
    """The once-per-process drop line names the caller; a newline in its name must not split it."""
    target = rig.mount.path / "f" / "new\nline"
    comm = bytes.fromhex(util.run_as(*util.NOBODY, _FORGE_LOG, str(target)))
    assert b"\n" in comm[:-1], comm  # the kernel took the name as given
    log = rig.mount.log_text()
    assert "O_NOATIME dropped" in log
    forged = [line for line in log.splitlines() if line.startswith("FORGED")]
    assert not forged, "a caller forged a daemon log line:\n" + log[-2000:]


_RESOLVE_BENEATH = 0x08
_RESOLVE_NO_SYMLINKS = 0x04


def _openat2_errno(dirfd: int, path: bytes, resolve: int = _RESOLVE_NO_SYMLINKS) -> int:
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [
            ("flags", ctypes.c_uint64),
            ("mode", ctypes.c_uint64),
            ("resolve", ctypes.c_uint64),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    how = OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, resolve | _RESOLVE_BENEATH)
    fd = libc.syscall(437, dirfd, ctypes.c_char_p(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        os.close(fd)
        return 0
    return ctypes.get_errno()


def test_the_daemon_survived_and_reports(rig: Rig) -> None:
    status = rig.mount.status()
    assert status["pid"] == rig.mount.pid
    assert shutil.which("fusermount3")
