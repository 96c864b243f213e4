"""Writable overlays stacked on the mount by an unprivileged user (issue 14).

The user (65534, a real process) stacks an overlay with the mount as its
lowerdir and expects the merged tree to be writable, every write landing in its
upper directory -- as rootless container tools do:

- kernel overlayfs in its own user and mount namespace (``unshare -rm``, with
  ``userxattr`` as rootless tools mount it);
- fuse-overlayfs in the same kind of namespace (as rootless podman runs it),
  plain and with ``squash_to_uid=0,squash_to_gid=0``. (The squash variant
  worked before the public-entry rule too: fuse-overlayfs then shows and
  chowns the squashed ids. Without a namespace, fuse-overlayfs 1.10 cannot copy
  up a 0555 directory even over the user's own tree -- it renames the new
  directory into place, which needs write permission on it -- so a store
  cannot be its lower layer there, through noatimefs or not.)

over two daemons: root's (``--owner 65534 --allow-other``) and the user's own
(a rootless ``noatimefs SOURCE MNT``, on a machine whose ``/dev/fuse`` is 0666 as
Debian's default is; the test sets that mode and restores it).

In the merged tree, inside a store path that exists only in the lower layer:
create a file and a directory, append to a lower file (copy-up: content and
mode kept) and chmod it afterwards, rename a lower file, delete a lower file
and a whole lower subtree (whiteouts; the subtree's directory made again is
opaque), run a script and an ELF before and after their copy-up; a private
file stays unreadable. SOURCE (manifest) and the lower layer (as the user sees
it) are unchanged, and the upper directory holds the writes, owned by the user.

It works because public entries are presented with the consumer's primary gid
(``noatimefs.policy``, rule 1a): the namespace maps uid and gid, so its root
holds the capabilities overlayfs checks against the lower directories, and
copy-up can chown the new upper file to the lower file's owner.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import util

pytestmark = pytest.mark.mount

USER_UID, USER_GID = util.NOBODY
PKG = "0abc-pkg"  # the store path, present only in the lower layer
AS_USER = ["setpriv", f"--reuid={USER_UID}", f"--regid={USER_GID}", "--clear-groups"]


def build_store(root: Path) -> None:
    """A root-owned store: one package (0555 dirs, 0444/0555 files) and a private dir."""
    pkg = root / PKG
    for d in ("bin", "share/doc", "lib/sub/deep"):
        (pkg / d).mkdir(parents=True)
    (pkg / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    shutil.copyfile("/usr/bin/true", pkg / "bin" / "true")
    for name, data in {
        "share/data.txt": b"data\n",
        "share/old.txt": b"old\n",
        "share/gone.txt": b"gone\n",
        "share/doc/README": b"readme\n",
        "lib/a": b"a\n",
        "lib/sub/deep/f": b"f\n",
    }.items():
        (pkg / name).write_bytes(data)
    for p in pkg.rglob("*"):
        p.chmod(0o555 if p.is_dir() or p.parent.name == "bin" else 0o444)
    pkg.chmod(0o555)
    (root / "private").mkdir(mode=0o700)
    (root / "private" / "secret").write_bytes(b"secret\n")
    (root / "private" / "secret").chmod(0o600)


@pytest.fixture(scope="module")
def store() -> Iterator[Path]:
    with util.unchanged_store("noatimefs-overlay-write-", build_store) as root:
        yield root


# The user's side, in its own user and mount namespace: stack the overlay, write
# through it, report. The lower layer's manifest is taken before and after.
_PROBE = r"""
import select, shutil, stat, time

def manifest(top):
    out = {}
    for root, dirs, files in os.walk(top):
        for name in sorted(dirs + files):
            p = os.path.join(root, name)
            st = os.lstat(p)
            d = [st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns]
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o444:
                try:
                    d.append(sha256_file(p))
                except OSError as e:
                    d.append(e.errno)
            out[os.path.relpath(p, top)] = d
    return out

def mounted_on(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)

def wait_mounted(path, proc, deadline=20.0):
    # woken by mount-table changes (proc(5): POLLPRI on mountinfo)
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY)
    poll = select.poll()
    poll.register(fd, select.POLLPRI | select.POLLERR)
    end = time.monotonic() + deadline
    try:
        while not mounted_on(path):
            if proc.poll() is not None:
                raise RuntimeError("fuse-overlayfs exited %s" % proc.returncode)
            if time.monotonic() > end:
                raise RuntimeError("fuse-overlayfs did not mount %s" % path)
            poll.poll(200)
    finally:
        os.close(fd)

def out_of(p):
    r = subprocess.run([p], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else "exit %d: %s" % (r.returncode, r.stderr)

def write(p, data, flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL):
    fd = os.open(p, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)

def mode(p):
    return oct(os.lstat(p).st_mode)

lower, ov = DATA["lower"], DATA["overlay"]
res = {"lower before": manifest(lower)}
proc = None
if DATA["kind"] == "kernel":
    mount_overlay(lower, ov["upper"], ov["work"], ov["merged"], "userxattr,")
else:
    opts = "lowerdir=%s,upperdir=%s,workdir=%s" % (lower, ov["upper"], ov["work"])
    if DATA["kind"] == "fuse-overlayfs-squash":
        opts += ",squash_to_uid=0,squash_to_gid=0"
    proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", opts, ov["merged"]],
                            stdin=subprocess.DEVNULL)
    wait_mounted(ov["merged"], proc)
try:
    m = ov["merged"] + "/" + DATA["pkg"]
    ops = res["ops"] = {}
    ops["exec script before copy-up"] = out_of(m + "/bin/hello")
    ops["exec ELF before copy-up"] = errno_of(run_file, m + "/bin/true")
    res["data mode before"] = mode(m + "/share/data.txt")
    ops["create file"] = errno_of(write, m + "/new.txt", b"new\n")
    ops["create file in a lower subdir"] = errno_of(write, m + "/share/doc/new.txt", b"doc\n")
    ops["mkdir"] = errno_of(os.mkdir, m + "/newdir")
    ops["create file in the new dir"] = errno_of(write, m + "/newdir/f", b"in\n")
    ops["append to lower file"] = errno_of(write, m + "/share/data.txt", b"appended\n",
                                           os.O_WRONLY | os.O_APPEND)
    res["data mode after copy-up"] = mode(m + "/share/data.txt")
    res["data after copy-up"] = read_file(m + "/share/data.txt").decode()
    ops["chmod copied-up file"] = errno_of(os.chmod, m + "/share/data.txt", 0o600)
    res["data mode after chmod"] = mode(m + "/share/data.txt")
    ops["append to script"] = errno_of(write, m + "/bin/hello", b"echo appended\n",
                                       os.O_WRONLY | os.O_APPEND)
    ops["exec script after copy-up"] = out_of(m + "/bin/hello")
    ops["copy up ELF (open for writing)"] = errno_of(
        lambda: os.close(os.open(m + "/bin/true", os.O_WRONLY)))
    ops["exec ELF after copy-up"] = errno_of(run_file, m + "/bin/true")
    ops["rename lower file"] = errno_of(os.rename, m + "/share/old.txt",
                                        m + "/share/renamed.txt")
    ops["delete lower file"] = errno_of(os.unlink, m + "/share/gone.txt")
    ops["delete lower subtree"] = errno_of(shutil.rmtree, m + "/lib")
    ops["mkdir where the subtree was"] = errno_of(os.mkdir, m + "/lib")
    ops["read private/secret"] = errno_of(read_file, ov["merged"] + "/private/secret")
    res["renamed"] = read_file(m + "/share/renamed.txt").decode()
    res["listing"] = {d: sorted(os.listdir(m + "/" + d)) for d in ("", "share", "lib", "bin")}
finally:
    if proc is not None:
        subprocess.run(["fusermount3", "-u", ov["merged"]], check=True)
        proc.wait(timeout=60)
    else:
        subprocess.run(["umount", ov["merged"]], check=True)
res["lower after"] = manifest(lower)
emit(res)
"""

EXPECTED_OPS: dict[str, Any] = {
    "exec script before copy-up": "hello\n",
    "exec ELF before copy-up": 0,
    "create file": 0,
    "create file in a lower subdir": 0,
    "mkdir": 0,
    "create file in the new dir": 0,
    "append to lower file": 0,
    "chmod copied-up file": 0,
    "append to script": 0,
    "exec script after copy-up": "hello\nappended\n",
    "copy up ELF (open for writing)": 0,
    "exec ELF after copy-up": 0,
    "rename lower file": 0,
    "delete lower file": 0,
    "delete lower subtree": 0,
    "mkdir where the subtree was": 0,
}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def is_whiteout(p: Path) -> bool:
    """An overlay whiteout: a 0/0 character device, or fuse-overlayfs's ``.wh.NAME`` file."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return (p.parent / (".wh." + p.name)).exists()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@pytest.fixture
def user_overlay_dirs(world_tmp: Path) -> dict[str, str]:
    parts = {}
    for part in ("upper", "work", "merged"):
        p = world_tmp / "overlay" / part
        p.mkdir(parents=True)
        os.chown(p, USER_UID, USER_GID)
        parts[part] = str(p)
    return parts


@pytest.fixture(params=["root", "rootless"], ids=["root-daemon", "rootless-daemon"])
def lower(request: pytest.FixtureRequest, store: Path, world_tmp: Path) -> Iterator[Path]:
    """The mount: root's daemon for the user, or the user's own daemon (no --allow-other)."""
    if request.param == "root":
        with util.mounted(store, owner=USER_UID, allow_other=True) as m:
            yield m.path
        return
    user_can_run_daemon()
    mnt = world_tmp / "own-mnt"
    mnt.mkdir()
    os.chown(mnt, USER_UID, USER_GID)
    with contextlib.ExitStack() as stack:
        with util.dev_fuse_open_to_users():  # only until the daemon holds its descriptor
            m = stack.enter_context(util.mounted(store, mnt, wrapper=AS_USER))
        assert m.entry is not None
        assert "allow_other" not in m.entry.options
        yield m.path


def user_can_run_daemon() -> None:
    """The user must be able to import the package with this interpreter (the venv)."""
    r = util.run_as_argv(
        USER_UID, USER_GID, [sys.executable, "-c", "import noatimefs.mount, pyfuse3, trio"]
    )
    if r.returncode != 0:
        msg = f"{sys.executable} cannot import noatimefs as uid {USER_UID}: {r.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


@pytest.mark.parametrize("kind", ["kernel", "fuse-overlayfs", "fuse-overlayfs-squash"])
def test_user_overlay_writes_to_upper(
    store: Path, lower: Path, user_overlay_dirs: dict[str, str], kind: str
) -> None:
    if kind.startswith("fuse-overlayfs") and shutil.which("fuse-overlayfs") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("fuse-overlayfs is not installed (./dev deps)", pytrace=False)
        pytest.skip("fuse-overlayfs is not installed (./dev deps)")
    data = {"lower": str(lower), "overlay": user_overlay_dirs, "pkg": PKG, "kind": kind}
    if kind == "kernel":
        r = util.run_as(USER_UID, USER_GID, _PROBE, data, userns="mount")
    else:  # a FUSE daemon in the user's namespace opens /dev/fuse itself
        with util.dev_fuse_open_to_users():
            r = util.run_as(USER_UID, USER_GID, _PROBE, data, userns="mount")

    # Private stays private (EACCES from overlayfs, ENOENT from fuse-overlayfs).
    assert r["ops"].pop("read private/secret") != 0
    assert r["ops"] == EXPECTED_OPS
    # Copy-up kept content and mode; chmod then changed the copy only.
    assert r["data mode before"] == r["data mode after copy-up"] == oct(stat.S_IFREG | 0o444)
    assert r["data after copy-up"] == "data\nappended\n"
    assert r["data mode after chmod"] == oct(stat.S_IFREG | 0o600)
    assert r["renamed"] == "old\n"
    assert r["listing"] == {
        "": ["bin", "lib", "new.txt", "newdir", "share"],
        "share": ["data.txt", "doc", "renamed.txt"],
        "lib": [],  # made again over a deleted lower subtree: opaque
        "bin": ["hello", "true"],
    }
    # The lower layer, as the user sees it, did not change (SOURCE: the fixture).
    assert r["lower after"] == r["lower before"]
    assert len(r["lower before"]) > 10
    # The writes are in the upper directory, owned by the user.
    upper = Path(user_overlay_dirs["upper"]) / PKG
    assert (upper / "new.txt").read_bytes() == b"new\n"
    assert (upper / "newdir" / "f").read_bytes() == b"in\n"
    assert (upper / "share" / "doc" / "new.txt").read_bytes() == b"doc\n"
    assert (upper / "share" / "data.txt").read_bytes() == b"data\nappended\n"
    assert stat.S_IMODE(os.stat(upper / "share" / "data.txt").st_mode) == 0o600
    assert (upper / "share" / "renamed.txt").read_bytes() == b"old\n"
    assert sha256(upper / "bin" / "true") == sha256(store / PKG / "bin" / "true")
    for gone in ("share/gone.txt", "share/old.txt", "lib"):
        p = upper / gone
        assert is_whiteout(p) or (gone == "lib" and p.is_dir()), gone
    owners = {(st.st_uid, st.st_gid) for st in map(os.lstat, upper.rglob("*"))}
    assert owners == {util.NOBODY}, owners
