"""``./dev install`` and ``./dev uninstall``: the system parts in one command, and back.

They run for real at their default places (``/opt/noatimefs/venv``,
``/usr/local/bin/noatimefs``, ``/etc/systemd/system``, ``/etc/noatimefs``),
under the lock the other install tests take; a test fails, touching nothing,
if noatimefs is already installed there. The installed command must work for
an unprivileged user, from the venv and not from this clone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import util

import noatimefs

NOBODY_UID, NOBODY_GID = util.NOBODY
VENV = util.INSTALL_PREFIX / "venv"


def test_install_then_uninstall(world_tmp: Path) -> None:
    with util.system_installed() as installed:
        print(f"./dev install: {installed.seconds:.1f} s")
        link = util.INSTALLED_LINK
        assert link.is_symlink(), util.leftovers_of_install()
        assert os.readlink(link) == str(VENV / "bin" / "noatimefs")
        assert (
            util.INSTALLED_UNIT.read_bytes()
            == (util.REPO / "systemd" / "noatimefs@.service").read_bytes()
        )
        assert (util.CONF_DIR / "noatimefs.conf.example").is_file()
        # The venv is made from Debian's python, and the package is a copy, not this clone.
        cfg = (VENV / "pyvenv.cfg").read_text()
        assert "home = /usr/bin" in cfg, cfg
        assert "include-system-site-packages = false" in cfg, cfg

        # An unprivileged user, with only the system PATH, runs it.
        r = util.run_as_argv(NOBODY_UID, NOBODY_GID, ["noatimefs", "--version"])
        assert r.returncode == 0, r
        assert r.stdout.strip() == f"noatimefs {noatimefs.__version__}", r.stdout
        r = util.run_as_argv(
            NOBODY_UID,
            NOBODY_GID,
            [
                str(VENV / "bin" / "python"),
                "-c",
                "import noatimefs, pyfuse3; from noatimefs import replyflags, source;"
                " print(noatimefs.__file__, replyflags.loaded(), source.native)",
            ],
        )
        assert r.returncode == 0, r
        assert r.stdout.strip().startswith(str(VENV / "lib")), r.stdout
        # The C parts were built and load: the kernel may keep listings, and the daemon
        # makes openat2 and name_to_handle_at without ctypes.
        assert r.stdout.strip().endswith(" True True"), r.stdout
        # ... and gets the CLI's one-line errors and exit codes (3: bad SOURCE).
        r = util.run_as_argv(
            NOBODY_UID, NOBODY_GID, ["noatimefs", str(world_tmp / "none"), str(world_tmp)]
        )
        assert r.returncode == 3, r
        assert r.stderr.startswith("noatimefs: error: SOURCE"), r.stderr

        # The admin's settings survive an uninstall.
        conf = util.CONF_DIR / "mnt-store.conf"
        conf.write_text("SOURCE=/nix/store\nOPTIONS=--owner nobody --allow-other\n")
    start = time.monotonic()
    try:
        assert util.leftovers_of_install() == []
        assert conf.read_text().startswith("SOURCE=")
    finally:
        conf.unlink()
        with contextlib.suppress(OSError):  # not if the admin has settings there
            util.CONF_DIR.rmdir()
    print(f"(checks after ./dev uninstall: {time.monotonic() - start:.1f} s)")


def test_install_refuses_to_replace_a_command_it_did_not_make() -> None:
    with util.install_lock():
        if util.leftovers_of_install():
            pytest.fail(f"noatimefs is already installed here: {util.leftovers_of_install()}")
        util.INSTALLED_LINK.symlink_to("/bin/true")
        try:
            r = util.dev("install")
            assert r.returncode == 1, r
            assert "exists and is not" in r.stderr, r.stderr
            assert os.readlink(util.INSTALLED_LINK) == "/bin/true"
            assert not util.INSTALL_PREFIX.exists()
        finally:
            util.INSTALLED_LINK.unlink()
        assert util.leftovers_of_install() == []


def _dev(
    clone: Path, verb: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``CLONE/dev VERB`` run from / with *env*; its output captured."""
    return subprocess.run(
        [str(clone / "dev"), verb],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=timeout,
        check=False,
    )


def test_install_from_a_clone_of_another_user_at_other_places(world_tmp: Path) -> None:
    """``sudo ./dev install`` from a user's clone (git's ownership check), PREFIX & co. honoured."""
    clone = world_tmp / "clone"
    r = subprocess.run(
        ["git", "clone", "-q", str(util.REPO), str(clone)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    shutil.copy2(util.REPO / "dev", clone / "dev")  # this one, not the last committed one
    for dirpath, dirnames, filenames in os.walk(clone):
        for name in [".", *dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), NOBODY_UID, NOBODY_GID)
    places = {
        "PREFIX": world_tmp / "opt",
        "BINDIR": world_tmp / "bin",
        "UNITDIR": world_tmp / "units",
        "CONFDIR": world_tmp / "etc",
    }
    env = {**os.environ, **{k: str(v) for k, v in places.items()}}
    start = time.monotonic()
    r = _dev(clone, "install", env, timeout=900)
    print(f"./dev install: {time.monotonic() - start:.1f} s")
    assert r.returncode == 0, r.stdout + r.stderr
    command = places["BINDIR"] / "noatimefs"
    r2 = util.run_as_argv(NOBODY_UID, NOBODY_GID, [str(command), "--version"])
    assert r2.stdout.strip() == f"noatimefs {noatimefs.__version__}", r2
    site = places["PREFIX"] / "venv" / "lib"
    assert list(site.glob("python3*/site-packages/noatimefs/listing.py")), "not the clone's files"
    assert (places["UNITDIR"] / "noatimefs@.service").is_file()
    assert not (clone / "build").exists(), "the build wrote into the clone"
    r = _dev(clone, "uninstall", env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not command.is_symlink()
    assert not places["PREFIX"].exists()
    assert not (places["UNITDIR"] / "noatimefs@.service").exists()
