"""Shared fixtures: a root-owned store-like SOURCE checked unchanged at the end, and its mount.

- ``store`` (session): a root-owned tree under a world-traversable temp dir
  (see :func:`build_store` for what is in it); at the end of the session its
  manifest must equal the one taken when it was built.
- ``store_mount`` (session): ``noatimefs --owner 65534 --allow-other store MNT``.
- ``world_tmp``: a 0755 temp dir every user can traverse (pytest's ``tmp_path``
  is below a 0700 directory).

Tests marked ``mount`` are skipped (failed with ``CI=true``) before their
fixtures run when FUSE or root is missing. Failed tests get the logs of the
daemons that were running during them attached (a report section per mount).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import util

from noatimefs import storegen

#: Names in the big directory of the store.
MANY = 20_000
#: user.* xattrs set on store/data/xattr.txt and on store/data/xdir.
XATTRS = {"user.color": b"blue", "user.binary": bytes([0, 1, 2, 255]), "user.empty": b""}


def build_store(root: Path) -> None:
    """Fill *root* (an empty root-owned directory) with the test store.

    ::

        data/a.txt            0444  text          data/hard.txt  hard link to a.txt
        data/big.bin          0444  3 MiB random  data/empty     0444, 0 bytes
        data/xattr.txt        0444  user.* xattrs data/xdir/     0755, user.* xattrs
        data/nobody.txt       0444  owned by 65534:65534 (the presented owner, for real)
        links/rel -> ../data/a.txt   links/abs -> ROOT/data/a.txt
        links/dangling -> ../no/such/file   links/dirlink -> ../data
        bin/true              0555  a copy of /usr/bin/true (a dynamic ELF)
        bin/hello.sh          0555  #!/bin/sh script
        noatime/file.txt      0444  noatime/dir/{one,two,three}
        private/              0700  private/secret 0600
        many/f00000 … f19999  (MANY empty files)
        nix/                  a small storegen tree (0555 dirs, 0444/0555 files)
    """
    old_umask = os.umask(0o022)
    try:
        data = root / "data"
        data.mkdir()
        (data / "a.txt").write_bytes(b"hello from the store\n" * 100)
        os.link(data / "a.txt", data / "hard.txt")
        (data / "big.bin").write_bytes(random.Random(1).randbytes(3 << 20))
        (data / "empty").write_bytes(b"")
        (data / "xattr.txt").write_bytes(b"has xattrs\n")
        (data / "xdir").mkdir()
        (data / "xdir" / "inside").write_bytes(b"x\n")
        for target in (data / "xattr.txt", data / "xdir"):
            for name, value in XATTRS.items():
                os.setxattr(target, name, value)
        (data / "nobody.txt").write_bytes(b"owned by nobody\n")
        os.chown(data / "nobody.txt", *util.NOBODY)
        for name in ("a.txt", "big.bin", "empty", "xattr.txt", "nobody.txt"):
            (data / name).chmod(0o444)

        links = root / "links"
        links.mkdir()
        os.symlink("../data/a.txt", links / "rel")
        os.symlink(str(data / "a.txt"), links / "abs")
        os.symlink("../no/such/file", links / "dangling")
        os.symlink("../data", links / "dirlink")

        bindir = root / "bin"
        bindir.mkdir()
        shutil.copyfile("/usr/bin/true", bindir / "true")
        (bindir / "hello.sh").write_text('#!/bin/sh\necho hello-from-store "$@"\n')
        for name in ("true", "hello.sh"):
            (bindir / name).chmod(0o555)

        noatime = root / "noatime"
        noatime.mkdir()
        (noatime / "file.txt").write_bytes(b"read me with O_NOATIME\n" * 10)
        (noatime / "file.txt").chmod(0o444)
        (noatime / "dir").mkdir()
        for name in ("one", "two", "three"):
            (noatime / "dir" / name).write_bytes(name.encode())

        private = root / "private"
        private.mkdir(mode=0o700)
        (private / "secret").write_bytes(b"root only\n")
        (private / "secret").chmod(0o600)

        many = root / "many"
        many.mkdir()
        for i in range(MANY):
            os.close(os.open(many / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))

        storegen.generate(root / "nix", paths=30, files_per_path=6, seed=7)
    finally:
        os.umask(old_umask)


@pytest.fixture(scope="session")
def store() -> Iterator[Path]:
    """The session's SOURCE; its manifest must be the same at the end of the session."""
    with util.unchanged_store("noatimefs-store-", build_store) as root:
        yield root


@pytest.fixture(scope="session")
def store_mount(store: Path) -> Iterator[util.Mount]:
    """``noatimefs --owner 65534 --allow-other STORE MNT`` for the whole session."""
    with util.mounted(store, owner=util.NOBODY[0], allow_other=True) as m:
        yield m


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    with util.world_tmpdir() as d:
        yield d


# --------------------------------------------------------------------------- daemon logs on failure

_TEST_START = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_TEST_START] = util.current_seq()
    # Before any fixture (even module-scoped ones that build root-owned trees):
    # skip mount tests where FUSE or root is missing, fail them if CI=true.
    if item.get_closest_marker("mount") is not None:
        util.fuse_available()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    start = item.stash.get(_TEST_START, 0)
    for m in util.REGISTRY:
        if m.finished_seq is None or m.finished_seq >= start:
            text = m.log_text()
            if len(text) > 20_000:
                text = "…\n" + text[-20_000:]
            report.sections.append((f"noatimefs daemon log ({m.path}, pid {m.pid})", text))
