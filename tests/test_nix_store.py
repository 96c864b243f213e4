"""A real Nix store behind the mount: paths added, walked, deleted, collected and optimised.

Debian's ``nix-bin`` (Nix 2.8) runs as root without a daemon on ``/nix/store``
(``NIX_REMOTE`` empty: the local store; nothing is fetched, only local files are
added). It is installed with apt-get when missing; that also creates ``/nix``
(owned by the package, left in place). Every store path a test adds has a
random name part, is tracked, and is deleted at the end; nothing else in the
store is touched (``nix-store --gc`` runs for real only when every dead path in
the store is one of ours; otherwise the test collects with ``--delete``).

Nix's garbage collector treats every file any process holds open as a runtime
root (it scans ``/proc/*/fd``). The point of these tests: a daemon that kept a
descriptor per remembered inode would make every path ever looked up through
the mount uncollectable. noatimefs holds descriptors only for open handles, so
a walked path is collectable while mounted; a path held open through the mount
is pinned (the positive control), and unpinned once closed.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.mount

STORE = Path("/nix/store")
NIX_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "NIX_REMOTE": "",
    "LANG": "C.UTF-8",
}
#: The inotify invalidation of a removed store path is asynchronous.
GONE_DEADLINE = 10.0


def _nix(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        ["nix-store", *args], capture_output=True, text=True, env=NIX_ENV, timeout=600, check=False
    )
    if check and r.returncode != 0:
        raise AssertionError(f"nix-store {' '.join(args)}: exit {r.returncode}\n{r.stderr}")
    return r


def _ensure_nix() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("nix-store") is None:
        r = subprocess.run(
            ["apt-get", "install", "-y", "-q", "nix-bin"],
            capture_output=True,
            text=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=900,
            check=False,
        )
        if r.returncode != 0 or shutil.which("nix-store") is None:
            msg = f"cannot install nix-bin: {r.stderr.strip()[-500:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(msg)
            pytest.skip(msg)


class Store:
    """Adds store paths made of local files and deletes them again."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.added: list[Path] = []

    def make_tree(self, name: str, shared: bytes | None = None) -> Path:
        """A small package tree with unique contents (plus *shared* bytes in share/shared)."""
        token = secrets.token_hex(8)
        top = self.scratch / f"{name}-{token}"
        (top / "bin").mkdir(parents=True)
        (top / "share" / "doc").mkdir(parents=True)
        (top / "bin" / "tool").write_text(f"#!/bin/sh\necho {token}\n")
        (top / "bin" / "tool").chmod(0o755)
        (top / "share" / "doc" / "README").write_text(f"{name} {token}\n" * 100)
        os.symlink("../bin/tool", top / "share" / "tool-link")
        if shared is not None:
            (top / "share" / "shared").write_bytes(shared)
        return top

    def fixed_path(self, tree: Path) -> Path:
        """The store path ``nix-store --add tree`` will give, computed before adding it."""
        h = subprocess.run(
            ["nix-hash", "--type", "sha256", "--base32", str(tree)],
            capture_output=True,
            text=True,
            env=NIX_ENV,
            check=True,
        ).stdout.strip()
        out = _nix("--print-fixed-path", "--recursive", "sha256", h, tree.name).stdout
        return Path(out.strip())

    def add(self, tree: Path) -> Path:
        path = Path(_nix("--add", str(tree)).stdout.strip())
        assert path.parent == STORE, path
        self.added.append(path)
        return path

    def delete(self, path: Path) -> subprocess.CompletedProcess[str]:
        return _nix("--delete", str(path), check=False)

    def cleanup(self) -> list[str]:
        problems = []
        for path in self.added:
            if os.path.lexists(path):
                r = self.delete(path)
                if r.returncode != 0:
                    problems.append(f"cannot delete {path}: {r.stderr.strip()}")
        return problems


@pytest.fixture
def nix_store(world_tmp: Path) -> Iterator[Store]:
    _ensure_nix()
    util.fuse_available()
    store = Store(world_tmp)
    try:
        yield store
    finally:
        problems = store.cleanup()
        assert not problems, problems


@pytest.fixture
def nix_mount(nix_store: Store) -> Iterator[util.Mount]:
    STORE.mkdir(parents=True, exist_ok=True)  # a fresh nix-bin has no store yet
    with util.mounted(STORE, owner=util.NOBODY[0], allow_other=True) as m:
        yield m


def _through(m: util.Mount, path: Path) -> Path:
    return m.path / path.relative_to(STORE)


def _walk(root: Path) -> dict[str, object]:
    """Relative path -> bytes / link target / None (directory), read through *root*."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = p.read_bytes()
            else:
                out[rel] = None
    return out


def _poll(check: Callable[[], bool], what: str, deadline: float = GONE_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, f"{what}: not after {deadline} s"
        time.sleep(0.02)


def _no_handles(m: util.Mount) -> None:
    """No caller's handle open, and nothing in the store held by the daemon or its helper.

    Nix finds GC roots in every process's descriptors: the walk-ahead helper
    (walking the store paths after a walked one) and the read-ahead workers hold
    theirs for a moment, and a collection run just then keeps that path.
    """
    _poll(lambda: m.status()["handles"] == 0, "the daemon still holds handles")
    _poll(lambda: not _holding(m), "the daemon or its helper still holds store paths")


def _roots(path: Path) -> str:
    """What Nix says keeps *path* alive (for a failure's message)."""
    return "roots: " + _nix("--query", "--roots", str(path), check=False).stdout


def _holding(m: util.Mount) -> list[str]:
    """What the daemon and its walk-ahead helper hold open below SOURCE."""
    inside = str(m.source) + "/"
    pids = [m.pid, m.status().get("walk_ahead_pid")]
    held = []
    for pid in (p for p in pids if p):
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except FileNotFoundError:
                continue
            if target.startswith(inside):
                held.append(target)
    return held


def _gone(p: Path) -> bool:
    try:
        os.lstat(p)
    except FileNotFoundError:
        return True
    return False


def test_walked_path_can_be_deleted_while_mounted(nix_store: Store, nix_mount: util.Mount) -> None:
    m = nix_mount
    tree = nix_store.make_tree("walked")
    expected = nix_store.fixed_path(tree)
    assert _gone(_through(m, expected)), "a failed lookup first"
    path = nix_store.add(tree)
    assert path == expected
    # Visible at once, and identical to what was added.
    assert _walk(_through(m, path)) == _walk(tree)
    _no_handles(m)
    fds = m.status()["fds"]

    r = nix_store.delete(path)
    assert r.returncode == 0, (
        f"the mount pinned a walked path:\n{r.stderr}{_roots(path)}; held: {_holding(m)}"
    )
    assert not path.exists()
    _poll(lambda: _gone(_through(m, path)), "the deleted path is still visible")
    with pytest.raises(FileNotFoundError):
        (_through(m, path) / "bin" / "tool").read_bytes()
    assert path.name not in os.listdir(m.path)
    status = m.status()
    assert status["fds"] == fds, status
    assert m.proc.poll() is None


def test_open_handle_pins_the_path_until_closed(nix_store: Store, nix_mount: util.Mount) -> None:
    """The positive control: Nix does see the daemon's descriptors."""
    m = nix_mount
    path = nix_store.add(nix_store.make_tree("pinned"))
    fd = os.open(_through(m, path) / "share" / "doc" / "README", os.O_RDONLY)
    try:
        roots = _nix("--query", "--roots", str(path)).stdout
        assert f"/proc/{m.pid}/fd/" in roots, roots
        r = nix_store.delete(path)
        assert r.returncode != 0, "deleted a path held open through the mount"
        assert "still alive" in r.stderr, r.stderr
        assert os.read(fd, 7) == b"pinned "
    finally:
        os.close(fd)
    _no_handles(m)
    r = nix_store.delete(path)
    assert r.returncode == 0, r.stderr
    _poll(lambda: _gone(_through(m, path)), "the deleted path is still visible")


def test_gc_collects_walked_paths(nix_store: Store, nix_mount: util.Mount) -> None:
    m = nix_mount
    paths = [nix_store.add(nix_store.make_tree(f"gc{i}")) for i in range(3)]
    for p in paths:
        assert _walk(_through(m, p))
    _no_handles(m)
    dead = {Path(line) for line in _nix("--gc", "--print-dead").stdout.split()}
    assert set(paths) <= dead, "a walked path is kept alive: " + "".join(
        _roots(p) for p in set(paths) - dead
    )
    if dead <= set(nix_store.added):
        out = _nix("--gc").stdout  # only our own paths are dead: collect for real
        print(f"nix-store --gc while mounted: {out.strip()}")
    else:
        for p in paths:
            assert nix_store.delete(p).returncode == 0
    for p in paths:
        assert not p.exists()
        _poll(functools.partial(_gone, _through(m, p)), f"{p} is still visible")
    assert m.proc.poll() is None


def test_optimise_hard_links_show_as_one_inode(nix_store: Store, nix_mount: util.Mount) -> None:
    m = nix_mount
    shared = f"identical contents {secrets.token_hex(8)}\n".encode() * 200
    early = nix_store.add(nix_store.make_tree("early", shared))
    # Walked before the optimisation, so the kernel remembers its file.
    assert (_through(m, early) / "share" / "shared").read_bytes() == shared
    a = nix_store.add(nix_store.make_tree("opt-a", shared))
    b = nix_store.add(nix_store.make_tree("opt-b", shared))
    _no_handles(m)

    _nix("--optimise")

    native = {p: (p / "share" / "shared").stat() for p in (early, a, b)}
    assert len({st.st_ino for st in native.values()}) == 1, "nix-store --optimise did not link"
    ino = native[a].st_ino
    mounted = {p: (_through(m, p) / "share" / "shared").stat() for p in (a, b)}
    for st in mounted.values():
        assert st.st_ino == ino
        assert st.st_nlink == native[a].st_nlink >= 3
    for p in (early, a, b):
        assert (_through(m, p) / "share" / "shared").read_bytes() == shared
    assert m.proc.poll() is None


def test_deleted_store_path_gives_enoent_at_every_depth(
    nix_store: Store, nix_mount: util.Mount
) -> None:
    m = nix_mount
    path = nix_store.add(nix_store.make_tree("depth"))
    inside = [_through(m, path) / rel for rel in ("bin", "bin/tool", "share/doc/README")]
    for p in inside:
        p.lstat()
    _no_handles(m)
    assert nix_store.delete(path).returncode == 0
    _poll(lambda: _gone(_through(m, path)), "the deleted path is still visible")
    for p in inside:
        try:
            p.lstat()
        except OSError as exc:
            got = exc.errno
        else:
            got = 0
        assert got == errno.ENOENT, (p, got)
