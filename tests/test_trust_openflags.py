"""Open-flag matrix: every combination of flags, through the mount and on SOURCE, compared.

Every access mode (``O_RDONLY``, ``O_WRONLY``, ``O_RDWR``) is combined with
every subset of the 13 flags below (3 x 2**13 = 24576 combinations), and each
combination is opened on a regular file, a directory and a symlink (to the
file), as root and as the presented owner (65534, a real process), through
the mount and on an identical copy of SOURCE (the copy, because root's
``O_TRUNC`` really truncates it; the mounted SOURCE is checked unchanged). An
outcome is the errno, or the file type of what was opened and, when it can be
read, the first page read through it (an aligned buffer, for ``O_DIRECT``).

The outcome through the mount must be the source's, except that:

- an open that would write gives ``EROFS`` through the mount, where the source
  lets it through or refuses it for lack of permission;
- ``O_NOATIME`` never causes ``EPERM`` through the mount: where the source
  refuses it, the mount gives the outcome of the same open without the flag.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import util

pytestmark = pytest.mark.mount

O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
O_PATH = getattr(os, "O_PATH", 0o10000000)
FLAGS = {
    "O_NOATIME": os.O_NOATIME,
    "O_DIRECTORY": os.O_DIRECTORY,
    "O_NOFOLLOW": os.O_NOFOLLOW,
    "O_PATH": O_PATH,
    "O_TRUNC": os.O_TRUNC,
    "O_APPEND": os.O_APPEND,
    "O_CREAT": os.O_CREAT,
    "O_EXCL": os.O_EXCL,
    "O_DIRECT": os.O_DIRECT,
    "O_SYNC": os.O_SYNC,
    "O_NONBLOCK": os.O_NONBLOCK,
    "O_TMPFILE": O_TMPFILE,
    "O_CLOEXEC": os.O_CLOEXEC,
}
ACCESS = {"O_RDONLY": os.O_RDONLY, "O_WRONLY": os.O_WRONLY, "O_RDWR": os.O_RDWR}
TARGETS = ("file", "dir", "link")
CONTENT = bytes(range(256)) * 40  # 10 KiB, more than a page
#: Errors on SOURCE that a write-open through the read-only mount may turn into EROFS.
PREEMPTED_BY_EROFS = frozenset({errno.EACCES, errno.EPERM, errno.ETXTBSY})

_PROBE = r"""
import mmap, stat

def outcome(path, flags):
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        return -e.errno
    try:
        st = os.fstat(fd)
        kind = stat.S_IFMT(st.st_mode)
        data = ""
        if stat.S_ISREG(st.st_mode) and not flags & DATA["O_PATH"] \
                and flags & os.O_ACCMODE != os.O_WRONLY:
            buf = mmap.mmap(-1, 4096)
            try:
                n = os.preadv(fd, [buf], 0)
                data = hashlib.sha256(buf[:n]).hexdigest()[:16]
            except OSError as e:
                data = "E%d" % e.errno
        return "%o:%s" % (kind, data)
    finally:
        os.close(fd)

out = {}
for label, root in DATA["roots"].items():
    res = out[label] = {}
    for target in DATA["targets"]:
        path = root + "/" + target
        res[target] = r = []
        for flags in DATA["combos"]:
            r.append(outcome(path, flags))
            if label == "src" and flags & os.O_TRUNC and os.getuid() == 0 \
                    and os.stat(root + "/file").st_size != DATA["size"]:
                with open(root + "/file", "wb") as f:  # root really truncated the copy
                    f.write(bytes.fromhex(DATA["content"]))
emit(out)
"""


def combos() -> list[int]:
    values = list(FLAGS.values())
    out = []
    for acc in ACCESS.values():
        for bits in range(1 << len(values)):
            flags = acc
            for i, v in enumerate(values):
                if bits >> i & 1:
                    flags |= v
            out.append(flags)
    return out


def describe(flags: int) -> str:
    names = [n for n, v in ACCESS.items() if flags & os.O_ACCMODE == v][:1]
    names += [n for n, v in FLAGS.items() if flags & v == v]
    return "|".join(names)


def wants_write(flags: int) -> bool:
    if flags & O_PATH:
        return False
    return flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & (os.O_TRUNC | os.O_CREAT))


def show(o: int | str) -> str:
    return errno.errorcode.get(-o, str(o)) if isinstance(o, int) else f"ok({o})"


@dataclass(frozen=True)
class Caller:
    name: str
    uid: int
    gid: int


CALLERS = (Caller("root", 0, 0), Caller("owner-65534", *util.NOBODY))


def check(results: dict[str, Any], flag_list: list[int], tally: Counter[str]) -> list[str]:
    """Violations, and a tally of how each combination came out."""
    bad = []
    index = {f: i for i, f in enumerate(flag_list)}
    for target in TARGETS:
        src, mnt = results["src"][target], results["mnt"][target]
        for i, flags in enumerate(flag_list):
            s, m = src[i], mnt[i]
            tally["combinations"] += 1
            if m == s:
                tally["same"] += 1
                continue
            if flags & os.O_NOATIME and s == -errno.EPERM:
                # Through the mount the flag never costs an EPERM: the open without it.
                s = src[index[flags & ~os.O_NOATIME]]
                if m == s:
                    tally["O_NOATIME EPERM on source, same as without it through the mount"] += 1
                    continue
            preempted = isinstance(s, str) or -s in PREEMPTED_BY_EROFS
            if m == -errno.EROFS and wants_write(flags) and preempted:
                tally["EROFS through the mount for a write"] += 1
                continue
            bad.append(f"{target} {describe(flags)}: source {show(s)}, mount {show(m)}")
    return bad


@dataclass
class Rig:
    base: Path
    src: Path
    mirror: Path
    mount: util.Mount


def _fill(root: Path) -> None:
    root.mkdir(mode=0o755)
    (root / "file").write_bytes(CONTENT)
    (root / "file").chmod(0o444)
    (root / "dir").mkdir(mode=0o555)
    os.symlink("file", root / "link")


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with util.world_tmpdir("noatimefs-trust-flags-") as base:
        src, mirror = base / "src", base / "mirror"
        _fill(src)
        _fill(mirror)
        before = util.manifest(src)
        try:
            with util.mounted(src, owner=util.NOBODY[0], allow_other=True) as m:
                yield Rig(base, src, mirror, m)
                assert m.proc.poll() is None, "the daemon died"
        finally:
            shutil.rmtree(mirror)
        after = util.manifest(src)
        assert after == before, util.manifest_diff(before, after)


@pytest.mark.parametrize("caller", CALLERS, ids=[c.name for c in CALLERS])
def test_open_flag_matrix(rig: Rig, caller: Caller) -> None:
    flag_list = combos()
    assert len(flag_list) == 3 * 2**13
    data = {
        "roots": {"src": str(rig.mirror), "mnt": str(rig.mount.path)},
        "targets": TARGETS,
        "combos": flag_list,
        "O_PATH": O_PATH,
        "size": len(CONTENT),
        "content": CONTENT.hex(),
    }
    before = rig.mount.status()
    results = util.run_as(caller.uid, caller.gid, _PROBE, data, timeout=600)
    after = rig.mount.status()
    tally: Counter[str] = Counter()
    bad = check(results, flag_list, tally)
    _figures(caller.name, tally, len(bad), before, after)
    assert rig.mount.proc.poll() is None, "daemon died:\n" + rig.mount.describe()
    assert not bad, f"{len(bad)} of {tally['combinations']} differ:\n" + "\n".join(bad[:40])
    # Not vacuous: the interesting cases happened.
    assert tally["EROFS through the mount for a write"] > 0
    if caller.uid != 0:
        assert tally["O_NOATIME EPERM on source, same as without it through the mount"] > 0
        assert after["noatime_dropped"] > before["noatime_dropped"]
    ok_reads = sum(
        1 for o in results["mnt"]["file"] if isinstance(o, str) and len(o.split(":")[1]) == 16
    )
    assert ok_reads > 0


def _figures(
    name: str, tally: Counter[str], bad: int, before: dict[str, Any], after: dict[str, Any]
) -> None:
    util.trust_figures(
        f"openflags {name}",
        {
            **tally,
            "violations": bad,
            "daemon opens": after["opens"] - before["opens"],
            "noatime dropped": after["noatime_dropped"] - before["noatime_dropped"],
            "noatime kept": after["noatime_kept"] - before["noatime_kept"],
        },
    )
