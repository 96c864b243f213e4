"""``--per-user``: one view per uid under the mount root, and ``self``, for real.

Callers are real processes (``setpriv``, some as root of their own user
namespace); the views are checked for what the kernel shows each caller, for
``O_NOATIME`` opens by several uids at once, and for what is refused.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from conftest import MANY

pytestmark = pytest.mark.mount

NOBODY_UID, NOBODY_GID = util.NOBODY
OTHER = (1000, 1000)


@pytest.fixture(scope="module")
def per_user(store: Path) -> Iterator[util.Mount]:
    with util.mounted(store, None, "--per-user", allow_other=True) as m:
        yield m


_SELF = """
emit({"text": os.readlink(DATA + "/self"),
      "a": read_file(DATA + "/self/data/a.txt", os.O_NOATIME).hex()})
"""


@pytest.mark.parametrize(
    ("uid", "gid", "userns"),
    [(0, 0, None), (*util.NOBODY, None), (*OTHER, None), (*OTHER, "user")],
    ids=["root", "nobody", "1000", "1000-userns-root"],
)
def test_self_reads_as_the_callers_host_uid(
    store: Path, per_user: util.Mount, uid: int, gid: int, userns: util.Userns
) -> None:
    r = util.run_as(uid, gid, _SELF, str(per_user.path), userns=userns)
    # Relative, the uid FUSE names (the host's, also from inside a user namespace).
    assert r["text"] == str(uid)
    assert bytes.fromhex(r["a"]) == (store / "data" / "a.txt").read_bytes()


def test_self_resolves_where_the_mount_is_bound_elsewhere(
    store: Path, per_user: util.Mount, world_tmp: Path
) -> None:
    """A build sandbox sees the mount at another path: ``self`` must still lead to the view."""
    bound = world_tmp / "bound"
    bound.mkdir()
    subprocess.run(["mount", "--bind", per_user.path, bound], check=True)
    try:
        r = util.run_as(*util.NOBODY, _SELF, str(bound))
    finally:
        assert not util.umount(bound, fuse=False)
    assert r["text"] == str(NOBODY_UID)
    assert bytes.fromhex(r["a"]) == (store / "data" / "a.txt").read_bytes()


_VIEW = """
p = DATA + "/self/noatime/file.txt"
st = os.stat(p)
emit({"ino": st.st_ino, "uid": st.st_uid, "data": read_file(p, os.O_NOATIME).hex(),
      "src": errno_of(read_file, DATA_SRC + "/noatime/file.txt", os.O_NOATIME)})
"""


def test_each_uid_has_its_own_view_of_the_same_file(store: Path, per_user: util.Mount) -> None:
    before = per_user.status()
    code = _VIEW.replace("DATA_SRC", repr(str(store)))
    seen = {
        uid: util.run_as(uid, gid, code, str(per_user.path)) for uid, gid in (util.NOBODY, OTHER)
    }
    after = per_user.status()
    want = (store / "noatime" / "file.txt").read_bytes()
    for uid, r in seen.items():
        assert r["src"] == errno.EPERM  # the problem, on SOURCE
        assert bytes.fromhex(r["data"]) == want  # solved, through the caller's own view
        assert r["uid"] == uid  # presented as the caller's, in its view
    # Two inodes for one backing file: each keeps its own owner in the kernel.
    assert seen[NOBODY_UID]["ino"] != seen[OTHER[0]]["ino"]
    assert after["owner"] is None
    assert after["per_user"] == "any uid"
    for uid in (NOBODY_UID, OTHER[0]):
        view_before = before["views"].get(str(uid), {"noatime_dropped": 0, "opens": 0})
        view = after["views"][str(uid)]
        assert view["noatime_dropped"] - view_before["noatime_dropped"] == 1, after
        assert view["opens"] - view_before["opens"] == 1, after
        assert view["inodes"] > 0
    listed = sorted(os.listdir(per_user.path))
    assert {"self", str(NOBODY_UID), str(OTHER[0])} <= set(listed), listed
    assert all(name == "self" or name.isdigit() for name in listed), listed


_OPENS = """
import time
root, rounds, n = DATA["root"], DATA["rounds"], DATA["n"]
ok = eperm = other = 0
errors = {}
for _ in range(rounds):
    for i in range(n):
        try:
            os.close(os.open(f"{root}/self/many/f{i:05d}", os.O_RDONLY | os.O_NOATIME))
            ok += 1
        except OSError as exc:
            if exc.errno == errno.EPERM:
                eperm += 1
            else:
                other += 1
                errors[exc.errno] = errors.get(exc.errno, 0) + 1
emit({"ok": ok, "eperm": eperm, "other": other, "errors": errors})
"""


def test_two_uids_open_the_same_files_at_once_without_eperm(per_user: util.Mount) -> None:
    """100,000 O_NOATIME opens each, by two uids at once, each through ``self``.

    With one tree presented to both, the kernel's one owner per inode would make
    one uid's opens fail with EPERM whenever the other's lookup came last.
    """
    rounds = 5
    data = {"root": str(per_user.path), "rounds": rounds, "n": MANY}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {
            uid: pool.submit(util.run_as, uid, gid, _OPENS, data, timeout=600)
            for uid, gid in (util.NOBODY, OTHER)
        }
        results = {uid: f.result() for uid, f in futures.items()}
    for uid, r in results.items():
        assert r == {"ok": rounds * MANY, "eperm": 0, "other": 0, "errors": {}}, (uid, r)
    util.trust_figures(
        "per_user_two_uids", {"opens_each": rounds * MANY, "eperm": 0, "uids": len(results)}
    )


_REFUSED = """
out = {}
for name in DATA["names"]:
    out[name] = errno_of(os.stat, DATA["root"] + "/" + name)
out["self-text"] = os.readlink(DATA["root"] + "/self")
out["self"] = errno_of(os.stat, DATA["root"] + "/self/data")
emit(out)
"""


def test_only_admitted_uids_get_a_view(store: Path) -> None:
    with util.mounted(
        store, None, "--per-user", "--owner", "nobody,1000-1001", allow_other=True
    ) as m:
        names = ["65534", "1000", "1001", "1002", "0", "abc", "065534", "4294967295", "self"]
        for name in ("65534", "1000", "1001"):
            os.stat(m.path / name)  # made by root; a view is made by its uid or root
        for name in ("1002", "0"):  # not admitted: not even root makes them
            with pytest.raises(FileNotFoundError):
                os.stat(m.path / name)
        r = util.run_as(4242, 4242, _REFUSED, {"root": str(m.path), "names": names})
        ok = util.run_as(*OTHER, _REFUSED, {"root": str(m.path), "names": []})
        listed = os.listdir(m.path)
        status = m.status()
    assert r["65534"] == r["1000"] == r["1001"] == 0
    assert r["1002"] == r["0"] == r["abc"] == r["065534"] == r["4294967295"] == errno.ENOENT
    assert r["self-text"] == "4242"
    assert r["self"] == errno.ENOENT  # 4242 has no view of its own
    assert ok["self"] == 0
    assert ok["self-text"] == "1000"
    assert "0" not in listed
    assert "4242" not in listed
    assert status["per_user"] == "65534,1000-1001"
    assert set(status["views"]) == {"65534", "1000", "1001"}


@pytest.mark.parametrize(
    ("owner", "words"),
    [
        ("no-such-user-xyz", "no user named"),
        ("1000,@no-such-group-xyz", "no group named"),
        ("9-3", "bad uid range"),
    ],
)
def test_bad_owner_list_exits_5_with_one_line_and_mounts_nothing(
    store: Path, world_tmp: Path, owner: str, words: str
) -> None:
    mnt = world_tmp / "mnt"
    mnt.mkdir()
    argv = util.daemon_argv(store, mnt, "--per-user", "--owner", owner, allow_other=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 5, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("noatimefs: error: "), done.stderr
    assert words in lines[0]
    assert util.mount_entry(mnt) is None
    assert os.listdir(mnt) == []


def test_a_view_is_made_by_its_own_uid_only(per_user: util.Mount) -> None:
    """Others may enter a view that exists, but cannot make the daemon hold views for them."""
    names = ["4243"]
    r = util.run_as(4242, 4242, _REFUSED, {"root": str(per_user.path), "names": names})
    assert r["4243"] == errno.ENOENT  # 4242 cannot make 4243's view
    assert r["self"] == 0  # but makes its own
    assert "4243" not in per_user.status()["views"]
    made = util.run_as(4243, 4243, _REFUSED, {"root": str(per_user.path), "names": []})
    assert made["self"] == 0
    entered = util.run_as(4242, 4242, _REFUSED, {"root": str(per_user.path), "names": names})
    assert entered["4243"] == 0  # once made, anyone may enter it, as any --owner mount


def test_o_per_user_is_the_same_as_the_flag(store: Path) -> None:
    with util.mounted(store, None, "-o", "per_user,owner=nobody:1000", allow_other=True) as m:
        r = util.run_as(*util.NOBODY, _SELF, str(m.path))
        refused = util.run_as(4242, 4242, _REFUSED, {"root": str(m.path), "names": []})
    assert r["text"] == str(NOBODY_UID)
    assert refused["self"] == errno.ENOENT
