"""One ``--per-user`` mount serves every Nix build user, inside Nix's build sandbox (issue 13).

Six sandboxed builds run at once (``--max-jobs 6``), each as its own build user
(``nixbld1…``); each opens every directory and file of a root-owned store
through ``/run/noatimefs/self`` -- the mount bound into the sandbox with
``sandbox-paths`` -- with ``O_RDONLY|O_NOATIME``, as QEMU's 9p server does.
Through the mount: no ``EPERM``, every byte equal to SOURCE's, entries shown
as owned by the build's own uid, and the daemon's status has one view per
build, the six distinct build users. The control: the same build with SOURCE
itself bound in gets ``EPERM``. How the builds are made: ``nixbuild.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nixbuild
import pytest
import util

from noatimefs import storegen

pytestmark = pytest.mark.mount

#: Builds at the same time, each as its own build user.
BUILDS = 6
#: Where the mount is bound in the sandbox (as in the README's builder recipe).
BOUND = "/run/noatimefs"
BARRIER = "/barrier"
#: How long a build waits at the barrier for the others (they start within a second).
BARRIER_SECONDS = 120


def build_store(root: Path) -> None:
    """A root-owned store of 40 paths (0444 files, 0555 executables and directories)."""
    storegen.generate(root / "nix", paths=40, files_per_path=8, seed=13)


@pytest.fixture(scope="module")
def store() -> Iterator[Path]:
    with util.unchanged_store("noatimefs-builders-store-", build_store) as root:
        yield root


@pytest.fixture(scope="module")
def reader() -> Iterator[Path]:
    nixbuild.ensure_nix()
    with util.world_tmpdir("noatimefs-reader-") as d:
        start = time.monotonic()
        path = nixbuild.compile_reader(d / "noatimefs-reader")
        print(f"gcc -static reader.c: {time.monotonic() - start:.2f} s")
        yield path


@pytest.fixture
def builds() -> Iterator[nixbuild.Builds]:
    yield from nixbuild.nix_builds()


def test_six_build_users_read_the_store_through_self(
    store: Path, reader: Path, builds: nixbuild.Builds, world_tmp: Path
) -> None:
    users = nixbuild.build_users()
    assert len(users) >= BUILDS, f"need {BUILDS} build users in group nixbld: {users}"
    barrier = world_tmp / "barrier"
    barrier.mkdir(mode=0o1777)
    barrier.chmod(0o1777)
    with util.mounted(store, None, "--per-user", "--owner", "@nixbld", allow_other=True) as m:
        start = time.monotonic()
        outs = builds.build(
            nixbuild.READERS_NIX,
            {
                "count": str(BUILDS),
                "nonce": nixbuild.nonce(),
                "dir": f"{BOUND}/self",
                "barrier": BARRIER,
                "timeout": str(BARRIER_SECONDS),
            },
            [
                f"{nixbuild.READER_IN_SANDBOX}={reader}",
                f"{BOUND}={m.path}",
                f"{BARRIER}={barrier}",
            ],
            max_jobs=BUILDS,
        )
        seconds = time.monotonic() - start
        status = m.status()
    print(f"{BUILDS} sandboxed builds through {BOUND}/self: {seconds:.1f} s")

    readings = [nixbuild.parse_reading(out.read_text()) for out in outs]
    files, dirs, links = nixbuild.read_natively(store)
    uids = [r.host_uid for r in readings]
    assert len(set(uids)) == BUILDS, f"builds shared a build user: {uids}"
    assert set(uids) <= set(users), (uids, users)
    for r in readings:
        who = f"build as uid {r.host_uid}"
        assert r.uid == nixbuild.SANDBOX_UID, who
        assert r.self_link == str(r.host_uid), f"{who}: self -> {r.self_link}"
        assert r.barrier == (BUILDS, BUILDS), f"{who}: {r.barrier}"
        assert r.eperm == 0, f"{who}: {[f for f in r.fails if f[0] == 'EPERM'][:10]}"
        assert r.fails == [], f"{who}: {r.fails[:10]}"
        assert {p: v[:2] for p, v in r.files.items()} == files, f"{who}: bytes differ"
        assert set(r.dirs) == dirs, who
        assert r.links == links, who
        # Presented as the build user's own, which the sandbox shows as its uid 1000.
        owners = {v[2] for v in r.files.values()} | {v[0] for v in r.dirs.values()}
        assert owners == {nixbuild.SANDBOX_UID}, f"{who}: owners {owners}"
    # They read at the same time: every build was ready before any finished.
    assert max(r.ready for r in readings) < min(r.end for r in readings)

    views = status["views"]
    assert set(views) == {str(u) for u in uids}, views
    for uid in uids:
        view = views[str(uid)]
        assert view["noatime_dropped"] >= len(files), (uid, view)
        assert view["noatime_kept"] == 0, (uid, view)
    print(f"per view: {views[str(uids[0])]}; {len(files)} files, {len(dirs)} directories each")


def test_the_same_build_on_the_source_itself_gets_eperm(
    store: Path, reader: Path, builds: nixbuild.Builds
) -> None:
    """The control: a build user's O_NOATIME open of the root-owned store is refused."""
    with pytest.raises(nixbuild.BuildFailed) as excinfo:
        builds.build(
            nixbuild.READERS_NIX,
            {"count": "1", "nonce": nixbuild.nonce(), "dir": BOUND},
            [f"{nixbuild.READER_IN_SANDBOX}={reader}", f"{BOUND}={store}"],
            max_jobs=1,
        )
    assert f"noatimefs-reader: {BOUND}: Operation not permitted" in str(excinfo.value)
