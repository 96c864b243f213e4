"""One ``--per-user`` mount serves every Nix build user, inside Nix's build sandbox (issue 13).

Six sandboxed builds run at once (``--max-jobs 6``), each as its own build user
(``nixbld1…``); each opens every directory and file of a root-owned store
through ``/run/noatimefs/self`` -- the mount bound into the sandbox with
``sandbox-paths`` -- with ``O_RDONLY|O_NOATIME``, as QEMU's 9p server does.
Through the mount: no ``EPERM``, every byte equal to SOURCE's, entries shown
as owned by the build's own uid, and the daemon's status has one view per
build, the six distinct build users. The control: the same build with SOURCE
itself bound in gets ``EPERM``. How the builds are made: ``nixbuild.py``.

The README's builder recipe (section "Builders: one mount for every build
user") is run as it is written: its shell block by bash from this clone
(``./dev install``, the unit instance at ``/run/noatimefs`` over the real
``/nix/store``, ``nix.conf``), with two changes only: ``/etc/nix/nix.conf`` is
a copy in a directory of the test's own (``NIX_CONF_DIR``), and where systemd
is not PID 1, ``systemctl`` is ``units.py``'s stand-in, which runs the
installed unit's Exec lines as systemd would. The builds then read a store
path the test adds, through the path the recipe's QEMU line exports, with
``/run/noatimefs`` bound only by ``nix.conf``. At the end: the unit stopped,
``./dev uninstall``, nothing left.

The end-to-end scenario (marker ``qemu``): a QEMU guest booted *inside* a
sandboxed build, as the build user, exporting ``/run/noatimefs/self`` over 9p
(Debian's QEMU, sh and strace bound into the sandbox with ``/usr``, ``/lib``,
... in place of nixpkgs'; the guest of ``tests/qemu/``, its checks and the
strace analysis of ``test_qemu.py``): every check passes, every ``O_NOATIME``
open QEMU makes succeeds at once, in the build user's view. Its control boots
the same build on the store itself: every file is first refused with ``EPERM``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import nixbuild
import pytest
import test_qemu
import units
import util
from qemu import guest

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
def nix() -> None:
    """nix-build, gcc -static and the build users (installed if missing)."""
    nixbuild.ensure_nix()


@pytest.fixture(scope="module")
def reader(nix: None) -> Iterator[Path]:
    with util.world_tmpdir("noatimefs-reader-") as d:
        start = time.monotonic()
        path = nixbuild.compile_reader(d / "noatimefs-reader")
        print(f"gcc -static reader.c: {time.monotonic() - start:.2f} s")
        yield path


def make_barrier(parent: Path) -> Path:
    """A directory every build user can create its entry in."""
    barrier = parent / "barrier"
    barrier.mkdir()
    barrier.chmod(0o1777)
    return barrier


@pytest.fixture
def builds(nix: None) -> Iterator[nixbuild.Builds]:
    yield from nixbuild.nix_builds()


def check_readings(readings: Sequence[nixbuild.Reading], source: Path) -> list[int]:
    """Each build read all of *source*, bytes equal, no EPERM, in its own view; their uids."""
    files, dirs, links = nixbuild.read_natively(source)
    uids = [r.host_uid for r in readings]
    assert len(set(uids)) == BUILDS, f"builds shared a build user: {uids}"
    assert set(uids) <= set(nixbuild.build_users()), uids
    for r in readings:
        who = f"build as uid {r.host_uid}"
        assert r.uid == nixbuild.SANDBOX_UID, who
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
    print(f"each build: {len(files)} files, {len(dirs)} directories, {len(links)} symlinks")
    return uids


def check_views(status: dict[str, object], uids: Sequence[int], files: int) -> None:
    """The daemon has one view per build: the builds' uids, each with its drops."""
    views = status["views"]
    assert isinstance(views, dict), status
    assert set(views) == {str(u) for u in uids}, views
    for uid in uids:
        view = views[str(uid)]
        assert view["noatime_dropped"] >= files, (uid, view)
        assert view["noatime_kept"] == 0, (uid, view)
    print(f"view of uid {uids[0]}: {views[str(uids[0])]}")


def test_six_build_users_read_the_store_through_self(
    store: Path, reader: Path, builds: nixbuild.Builds, world_tmp: Path
) -> None:
    users = nixbuild.build_users()
    assert len(users) >= BUILDS, f"need {BUILDS} build users in group nixbld: {users}"
    barrier = make_barrier(world_tmp)
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
    for r in (readings := [nixbuild.parse_reading(out.read_text()) for out in outs]):
        assert r.self_link == str(r.host_uid), f"self -> {r.self_link} for uid {r.host_uid}"

    uids = check_readings(readings, store)
    check_views(status, uids, len(readings[0].files))


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


def test_a_build_user_the_owner_list_leaves_out_gets_enoent(
    store: Path, reader: Path, builds: nixbuild.Builds
) -> None:
    """``--owner`` admits only nobody here: a build's ``self`` leads nowhere."""
    with util.mounted(store, None, "--per-user", "--owner", "nobody", allow_other=True) as m:
        with pytest.raises(nixbuild.BuildFailed) as excinfo:
            builds.build(
                nixbuild.READERS_NIX,
                {"count": "1", "nonce": nixbuild.nonce(), "dir": f"{BOUND}/self"},
                [f"{nixbuild.READER_IN_SANDBOX}={reader}", f"{BOUND}={m.path}"],
                max_jobs=1,
            )
        status = m.status()
    assert f"noatimefs-reader: {BOUND}/self: No such file or directory" in str(excinfo.value)
    assert status["views"] == {}, status["views"]


# --------------------------------------------------------------------------- the README's recipe

README = util.REPO / "README.rst"
RECIPE_TITLE = "Builders: one mount for every build user"
#: What the recipe makes, and the test checks is gone at the end.
RECIPE_CONF = util.CONF_DIR / "run-noatimefs.conf"
RECIPE_MNT = Path("/run/noatimefs")
RECIPE_UNIT = "noatimefs@run-noatimefs.service"


def recipe_blocks() -> list[str]:
    """The literal blocks (``::``) of the README's builder recipe, dedented."""
    text = README.read_text()
    start = text.index(RECIPE_TITLE + "\n")
    end = re.compile(r"\n[^\n]+\n-{3,}\n").search(text, start + len(RECIPE_TITLE) + 1)
    lines = text[start : end.start() if end else len(text)].split("\n")
    blocks: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::"):
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                body.append(lines[i][4:])
                i += 1
            blocks.append("\n".join(body).strip() + "\n")
        else:
            i += 1
    return blocks


def recipe_virtfs() -> list[str]:
    """``["-virtfs", "local,path=…"]`` from the recipe's QEMU line."""
    words = recipe_blocks()[1].split()
    i = words.index("-virtfs")
    assert words[0] == "qemu-system-x86_64", words
    return words[i : i + 2]


def add_store_path(parent: Path, builds: nixbuild.Builds) -> Path:
    """A storegen tree added to /nix/store (root-owned, as Nix makes it); deleted after."""
    tree = parent / f"noatimefs-builders-{nixbuild.nonce()}"
    storegen.generate(tree, paths=12, files_per_path=6, seed=17)
    r = subprocess.run(
        ["nix-store", "--add", str(tree)],
        capture_output=True,
        text=True,
        env=nixbuild.NIX_ENV,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    builds.made.append(path)
    return path


def run_recipe(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        cwd=util.REPO,
        env=env,
        timeout=900,
        check=False,
    )
    print(f"the recipe's shell block: {time.monotonic() - start:.1f} s")
    assert r.returncode == 0, f"the recipe failed: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_readme_builder_recipe(reader: Path, builds: nixbuild.Builds, world_tmp: Path) -> None:
    script, qemu = recipe_blocks()
    assert script.startswith("./dev install\n"), script
    # QEMU's export path (the QEMU tests below boot a guest with this very -virtfs),
    # and the path the recipe binds into every sandbox.
    exported = re.search(r"-virtfs local,path=([^,\s]+)", qemu)
    assert exported, qemu
    assert exported.group(1) == f"{RECIPE_MNT}/self", qemu
    assert f"extra-sandbox-paths = {RECIPE_MNT}" in script

    nix_conf = world_tmp / "nix"
    nix_conf.mkdir()
    if Path("/etc/nix/nix.conf").exists():
        shutil.copyfile("/etc/nix/nix.conf", nix_conf / "nix.conf")
    assert "/etc/nix/nix.conf" in script
    script = script.replace("/etc/nix/nix.conf", str(nix_conf / "nix.conf"))
    env = {**nixbuild.NIX_ENV, "PATH": "/usr/local/sbin:/usr/local/bin:" + nixbuild.NIX_ENV["PATH"]}
    state = world_tmp / "units"
    state.mkdir()
    real_systemd = units.systemd_running()
    if not real_systemd:
        env["PATH"] = f"{units.shim(world_tmp / 'shim', state)}:{env['PATH']}"
    units.systemd_tool("systemd-escape")

    path = add_store_path(world_tmp, builds)
    with util.install_lock():
        there = util.leftovers_of_install() + [str(p) for p in (RECIPE_CONF,) if p.exists()]
        if there or util.mount_entry(RECIPE_MNT) is not None:
            pytest.fail(f"already here, not touching it: {there} {util.mount_entry(RECIPE_MNT)}")
        try:
            r = run_recipe(script, env)
            assert "self" in r.stdout.split(), r.stdout  # the last line: ls /run/noatimefs
            entry = util.mount_entry(RECIPE_MNT)
            assert entry is not None, f"nothing mounted at {RECIPE_MNT}"
            assert entry.fstype == "fuse.noatimefs", entry
            assert entry.source == "/nix/store", entry
            assert "allow_other" in entry.options, entry

            barrier = make_barrier(world_tmp)
            start = time.monotonic()
            outs = builds.build(
                nixbuild.READERS_NIX,
                {
                    "count": str(BUILDS),
                    "nonce": nixbuild.nonce(),
                    "dir": f"{exported.group(1)}/{path.name}",
                    "barrier": BARRIER,
                    "timeout": str(BARRIER_SECONDS),
                },
                [],  # the sandbox and /run/noatimefs in it come from the recipe's nix.conf
                extra=[
                    "--option",
                    "extra-sandbox-paths",
                    f"{nixbuild.READER_IN_SANDBOX}={reader} {BARRIER}={barrier}",
                ],
                env={"NIX_CONF_DIR": str(nix_conf)},
                max_jobs=BUILDS,
                sandbox_option=False,
            )
            print(f"{BUILDS} builds through the recipe's mount: {time.monotonic() - start:.1f} s")
            status = json.loads(os.getxattr(RECIPE_MNT, util.STATUS_XATTR))
        finally:
            problems = stop_recipe(env, real_systemd, state)
        assert not problems, problems
    readings = [nixbuild.parse_reading(out.read_text()) for out in outs]
    uids = check_readings(readings, path)
    check_views(status, uids, len(readings[0].files))


def stop_recipe(env: dict[str, str], real_systemd: bool, state: Path) -> list[str]:
    """The recipe undone: the unit stopped, its settings removed, ``./dev uninstall``."""
    problems = []
    if real_systemd:
        r = subprocess.run(
            ["systemctl", "disable", "--now", RECIPE_UNIT],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            problems.append(f"systemctl disable --now: {r.stderr}")
    else:
        problems += units.stop_all(state)
    if util.mount_entry(RECIPE_MNT) is not None:
        problems.append(f"{RECIPE_MNT} still mounted after the unit stopped")
        problems += util.umount(RECIPE_MNT)
    with_conf = RECIPE_CONF.exists()
    RECIPE_CONF.unlink(missing_ok=True)
    if not with_conf:
        problems.append(f"the recipe did not write {RECIPE_CONF}")
    with_dir = RECIPE_MNT.is_dir()
    if with_dir:
        RECIPE_MNT.rmdir()  # the unit made it
    u = util.dev("uninstall")
    if u.returncode != 0:
        problems.append(f"./dev uninstall: exit {u.returncode}: {u.stderr}")
    problems += [f"left after ./dev uninstall: {p}" for p in util.leftovers_of_install()]
    return problems


# --------------------------------------------------------------------------- QEMU in a build

QEMU_NIX = nixbuild.HERE / "qemu-guest.nix"
#: Debian's QEMU, sh and strace stand in for nixpkgs' (this test has no nixpkgs).
HOST_TOOLS = ("/bin", "/lib", "/lib64", "/usr")
GUEST_DIR = "/guest"


@pytest.fixture(scope="module")
def guest_image() -> guest.GuestImage:
    util.fuse_available()
    try:
        return guest.build()
    except guest.GuestError as exc:
        pytest.fail(f"cannot build the QEMU guest: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def guest_store() -> Iterator[Path]:
    with util.unchanged_store("noatimefs-builders-guest-", test_qemu.build_guest_store) as root:
        yield root


def boot_in_build(
    image: guest.GuestImage, bind: str, builds: nixbuild.Builds
) -> tuple[guest.GuestRun, list[test_qemu.Open]]:
    """Boot the guest in a sandboxed build, QEMU under strace exporting ``BOUND/self``.

    *bind* (a sandbox path) puts it there: a ``--per-user`` mount at ``BOUND``,
    or (the control) the store itself at ``BOUND/self``.
    """
    guest_files = []
    for src in (image.kernel, image.initrd):
        src.chmod(0o644)  # read by the build user (the cache's directory may stay private)
        guest_files.append(f"{GUEST_DIR}/{src.name}={src}")
    qemu = guest.qemu_argv(
        Path(GUEST_DIR, image.kernel.name),
        Path(GUEST_DIR, image.initrd.name),
        Path(BOUND, "self"),
        cache="loose",
    )
    # The export as the README's recipe writes it (-virtfs, the short form of -fsdev + -device).
    fsdev = qemu.index("-fsdev")
    assert qemu[fsdev + 2] == "-device", qemu
    qemu[fsdev : fsdev + 4] = virtfs = recipe_virtfs()
    assert f"path={BOUND}/self," in virtfs[1], virtfs
    argv = [*test_qemu.strace_argv(Path("qemu")), *qemu]
    start = time.monotonic()
    (out,) = builds.build(
        QEMU_NIX,
        {"nonce": nixbuild.nonce(), "argv": json.dumps(argv)},
        [*HOST_TOOLS, *guest_files, bind],
        max_jobs=1,
        extra=["--option", "timeout", str(int(test_qemu.BOOT_TIMEOUT))],
    )
    seconds = time.monotonic() - start
    print(f"the build that booted the guest: {seconds:.1f} s")
    console = (out / "console.log").read_text(errors="replace").replace("\r\n", "\n")
    run = guest.GuestRun(
        argv=argv,
        returncode=int((out / "status").read_text()),
        timed_out=False,
        console=console,
        report=guest.parse_console(console),
        seconds=seconds,
    )
    return run, test_qemu.parse_strace(out / "strace" / "qemu")


@pytest.mark.qemu
def test_qemu_guest_booted_inside_a_sandboxed_build(
    guest_image: guest.GuestImage,
    guest_store: Path,
    builds: nixbuild.Builds,
) -> None:
    """The 2019 scenario: QEMU in a build, as the build user, exporting ``…/self`` over 9p."""
    with util.mounted(guest_store, None, "--per-user", "--owner", "@nixbld", allow_other=True) as m:
        run, opens = boot_in_build(guest_image, f"{BOUND}={m.path}", builds)
        status = m.status()
    test_qemu.assert_guest_ok(run, guest_store)

    # The view QEMU used is the build user's, and QEMU's opens went through it.
    (uid,) = (int(u) for u in status["views"])
    assert uid in nixbuild.build_users(), status["views"]
    view = Path(BOUND, str(uid))
    exported = test_qemu.below(opens, view)
    assert exported, f"no opens below {view}: {opens[:20]}"
    noatime = [o for o in exported if o.noatime]
    unflagged = set(run.report.sums) - {os.path.relpath(o.path, view) for o in noatime}
    assert not unflagged, f"files read in the guest without an O_NOATIME open: {unflagged}"
    failed = [o for o in exported if o.fd < 0 and o.error in ("EPERM", "EACCES")]
    assert not failed, f"opens refused through noatimefs: {failed}"
    assert all(o.fd >= 0 for o in noatime), [o for o in noatime if o.fd < 0]
    qemu_drops = {k: v for k, v in status["dropped_by_process"].items() if "qemu" in k}
    assert sum(qemu_drops.values()) == len(noatime), (status, len(noatime))
    assert status["views"][str(uid)]["noatime_dropped"] == len(noatime), status
    print(f"{len(noatime)} O_NOATIME opens by QEMU as uid {uid}, 0 EPERM; view {status['views']}")


@pytest.mark.qemu
def test_qemu_guest_in_a_build_on_the_source_itself_gets_eperm(
    guest_image: guest.GuestImage,
    guest_store: Path,
    builds: nixbuild.Builds,
) -> None:
    """The control: the same build exporting the root-owned store itself."""
    run, opens = boot_in_build(guest_image, f"{BOUND}/self={guest_store}", builds)
    test_qemu.assert_guest_ok(run, guest_store)  # QEMU retries without the flag
    share = Path(BOUND, "self")
    exported = test_qemu.below(opens, share)
    refused = [o for o in exported if o.noatime and o.error == "EPERM"]
    spared = set(run.report.sums) - {os.path.relpath(o.path, share) for o in refused}
    assert refused, f"no EPERM on O_NOATIME opens of the bare store: {exported[:20]}"
    assert not spared, f"files read in the guest without an EPERM first: {spared}"
    print(f"{len(refused)} O_NOATIME opens refused with EPERM on the bare store")
