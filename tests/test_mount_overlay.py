"""An overlay with the mount as its lowerdir: as root on the host, and as 65534 in ``unshare -rm``.

Files read back intact, binaries in SOURCE execute, writes land in the upper
directory, and SOURCE is unchanged. Overlayfs opens lower files with
O_NOATIME, so these also exercise the flag for real. (Every kind of write by an
unprivileged user, also with fuse-overlayfs and a rootless daemon:
test_mount_overlay_write.py.)
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount

NOBODY_UID, NOBODY_GID = util.NOBODY
#: Files compared by content through the overlay (relative to SOURCE).
FILES = ("data/a.txt", "data/big.bin", "data/empty", "data/hard.txt", "links/rel", "bin/hello.sh")


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@dataclass
class Layers:
    upper: Path
    work: Path
    merged: Path


@pytest.fixture
def layers(world_tmp: Path) -> Layers:
    parts = {}
    for part in ("upper", "work", "merged"):
        (world_tmp / part).mkdir()
        parts[part] = world_tmp / part
    return Layers(**parts)


@pytest.fixture
def root_overlay(store_mount: util.Mount, layers: Layers) -> Iterator[Layers]:
    opts = f"lowerdir={store_mount.path},upperdir={layers.upper},workdir={layers.work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, layers.merged], check=True)
    try:
        yield layers
    finally:
        problems = util.umount(layers.merged, fuse=False)
        assert not problems, problems


def test_root_overlay_reads_execs_and_writes_to_upper(
    store: Path, store_mount: util.Mount, root_overlay: Layers
) -> None:
    merged, upper = root_overlay.merged, root_overlay.upper
    before = store_mount.status()
    for rel in FILES:
        assert sha256(merged / rel) == sha256(store / rel), rel
    # Overlayfs opened the lower files with O_NOATIME as root: kept, not dropped.
    after = store_mount.status()
    assert after["noatime_kept"] > before["noatime_kept"], (before, after)
    assert after["noatime_dropped"] == before["noatime_dropped"], (before, after)
    assert os.readlink(merged / "links" / "abs") == os.readlink(store / "links" / "abs")
    assert sorted(os.listdir(merged / "many")) == sorted(os.listdir(store / "many"))
    # Binaries from SOURCE run: an ELF (mmap'd by the kernel) and a script.
    subprocess.run([merged / "bin" / "true"], check=True)
    out = subprocess.run(
        [merged / "bin" / "hello.sh", "root"], check=True, capture_output=True, text=True
    )
    assert out.stdout == "hello-from-store root\n"
    # Writes: a new file, a modified file (copy-up), a deletion (whiteout).
    (merged / "new.txt").write_bytes(b"new\n")
    with open(merged / "data" / "a.txt", "ab") as f:
        f.write(b"appended\n")
    os.unlink(merged / "data" / "empty")
    assert (upper / "new.txt").read_bytes() == b"new\n"
    assert (upper / "data" / "a.txt").read_bytes() == (store / "data" / "a.txt").read_bytes() + (
        b"appended\n"
    )
    assert not (merged / "data" / "empty").exists()
    assert (store / "data" / "empty").exists()
    assert not (store / "new.txt").exists()


# Two overlays in one user namespace: over SOURCE itself and over the mount, so the
# outcomes of the same operations can be compared. The owner's namespace root has
# no capabilities over root-owned inodes of SOURCE; through the mount, public
# entries are presented with its uid and primary gid, so it has them there (and
# uses them to write, into the upper layer: tests/test_mount_overlay_write.py).
_USERNS_OVERLAYS = """
out = {}
for label, lower in DATA["lowers"].items():
    ov = DATA["layers"][label]
    mount_overlay(lower, ov["upper"], ov["work"], ov["merged"])
    m = ov["merged"]
    r = out[label] = {}
    r["sha"] = {rel: sha256_file(m + "/" + rel) for rel in DATA["files"]}
    r["hello"] = subprocess.run([m + "/bin/hello.sh", "nobody"], capture_output=True,
                                text=True).stdout
    r["many"] = len(os.listdir(m + "/many"))
    def write(p, data=b"new\\n", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL):
        fd = os.open(m + "/" + p, flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    ops = r["ops"] = {}
    ops["exec bin/true"] = errno_of(run_file, m + "/bin/true")
    ops["read private/secret"] = errno_of(read_file, m + "/private/secret")
    ops["create new.txt"] = errno_of(write, "new.txt")
    ops["mkdir newdir"] = errno_of(os.mkdir, m + "/newdir")
    ops["create data/new.txt"] = errno_of(write, "data/new.txt")
    ops["mkdir data/newdir"] = errno_of(os.mkdir, m + "/data/newdir")
    ops["unlink data/empty"] = errno_of(os.unlink, m + "/data/empty")
    ops["rename data/hard.txt"] = errno_of(os.rename, m + "/data/hard.txt", m + "/moved")
    for f in ("data/a.txt", "data/nobody.txt"):
        ops["chmod " + f] = errno_of(os.chmod, m + "/" + f, 0o644)
        ops["append " + f] = errno_of(write, f, b"appended\\n", os.O_WRONLY | os.O_APPEND)
        ops["setxattr " + f] = errno_of(os.setxattr, m + "/" + f, "user.new", b"1")
emit(out)
"""


def test_userns_overlay_as_presented_owner(
    store: Path, store_mount: util.Mount, world_tmp: Path
) -> None:
    """What a guest does: 65534 (QEMU's user) stacks an overlay on the mount, unprivileged.

    The same overlay over SOURCE is the reference: through the mount the owner's
    namespace root reads and executes exactly as through SOURCE's overlay, and
    may do every write that overlay may; unlike it, it may also write over
    public lower entries (create in lower-only directories, copy up, rename,
    delete), since they are presented with its uid and primary gid. The private
    file stays unreadable.
    """
    layers: dict[str, dict[str, str]] = {}
    for label in ("src", "mnt"):
        layers[label] = {}
        for part in ("upper", "work", "merged"):
            p = world_tmp / label / part
            p.mkdir(parents=True)
            os.chown(p, NOBODY_UID, NOBODY_GID)
            layers[label][part] = str(p)
    data = {
        "lowers": {"src": str(store), "mnt": str(store_mount.path)},
        "layers": layers,
        "files": FILES,
    }
    before = store_mount.status()
    r = util.run_as(NOBODY_UID, NOBODY_GID, _USERNS_OVERLAYS, data, userns="mount")
    after = store_mount.status()
    src, mnt = r["src"], r["mnt"]

    # Reads and execs through the mount's overlay: intact, as through SOURCE's.
    assert mnt["sha"] == {rel: sha256(store / rel) for rel in FILES}
    assert mnt["hello"] == "hello-from-store nobody\n"
    assert mnt["many"] == len(os.listdir(store / "many"))
    assert mnt["ops"]["exec bin/true"] == 0
    assert mnt["ops"]["read private/secret"] != 0
    # Writes land in upper.
    upper = world_tmp / "mnt" / "upper"
    assert mnt["ops"]["create new.txt"] == 0
    assert (upper / "new.txt").read_bytes() == b"new\n"
    assert mnt["ops"]["mkdir newdir"] == 0
    assert (upper / "newdir").is_dir()
    # Reads and execs: as through SOURCE. Writes: every one works, all into upper;
    # through SOURCE's overlay the writes below its root-owned lower dirs fail.
    for op in ("exec bin/true", "read private/secret"):
        assert (mnt["ops"][op] == 0) == (src["ops"][op] == 0), (op, src["ops"][op], mnt["ops"][op])
    refused = {
        op: errno.errorcode.get(e, e)
        for op, e in mnt["ops"].items()
        if e != 0 and op != "read private/secret"
    }
    assert not refused, f"refused through the mount's overlay: {refused}"
    assert src["ops"]["create data/new.txt"] == errno.EACCES  # the reference is not vacuous
    assert (upper / "data" / "new.txt").read_bytes() == b"new\n"
    assert (upper / "data" / "a.txt").read_bytes().endswith(b"appended\n")
    assert (upper / "data" / "nobody.txt").read_bytes() == b"owned by nobody\nappended\n"
    # The overlay asked for O_NOATIME on root-owned files; the daemon dropped it.
    assert after["noatime_dropped"] > before["noatime_dropped"], (before, after)
    assert not (store / "new.txt").exists()
