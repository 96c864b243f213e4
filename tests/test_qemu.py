"""A real QEMU guest with the mount as the lowerdir of an overlay, over 9p (issue 5).

QEMU (``qemu-system-x86_64``, TCG, as uid 65534 via ``setpriv``) exports a
directory read-only with ``-fsdev local,security_model=none,readonly=on``; the
guest (Debian's generic kernel, a busybox initramfs: ``tests/qemu/``) mounts it
with ``-t 9p -o trans=virtio,version=9p2000.L,cache=…``, stacks an overlay on it
(tmpfs upper) and reports one ``CHECK`` line per result on its serial console.

The mechanism is shown, not only the outcome: QEMU runs under ``strace``.
Through ``noatimefs --owner 65534 --allow-other`` every ``O_NOATIME`` open QEMU
makes of an exported file succeeds on the first try, and the daemon's counters
attribute the drops to QEMU by name. Pointed straight at the root-owned SOURCE,
the same guest makes QEMU's ``O_NOATIME`` opens fail with ``EPERM`` (stock QEMU
7.2 then retries without the flag).

Everything is fetched from Debian at test time and cached (``guest.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from qemu import guest

from noatimefs import storegen

#: The uid QEMU runs as and the mount presents entries as owned by.
QEMU_UID = util.NOBODY[0]
#: A normal boot takes 5-10 s here under TCG; this only bounds a broken one.
BOOT_TIMEOUT = 90.0
#: For the hung-guest test: how long before the hang is declared.
HANG_TIMEOUT = 10.0
#: Checks every good guest run must report PASS.
EXPECTED_CHECKS = (
    "modules",
    "mount-9p",
    "mount-overlay",
    "sha256",
    "symlink",
    "exec-binary",
    "exec-script",
    "lower-readonly",
    "copy-up",
    "whiteout",
    "umount",
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def guest_image() -> guest.GuestImage:
    """The cached guest kernel + initramfs (fetched/built on first use)."""
    util.fuse_available()  # root, setpriv, ...; fails instead of skipping with CI=true
    for tool in ("strace", "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not on PATH")
    try:
        return guest.build()
    except guest.GuestError as exc:
        pytest.fail(f"cannot build the QEMU guest: {exc}", pytrace=False)


def build_guest_store(root: Path) -> None:
    """A small root-owned store: 0444 files, 0555 executables and directories.

    ::

        bin/busybox        a copy of the host's busybox-static (run in the guest)
        bin/hello.sh       #!/bin/sh script
        data/copyme.txt    appended to in the guest (copy-up)
        data/deleteme.txt  deleted in the guest (whiteout)
        data/link.txt -> copyme.txt
        data/random.bin    1 MiB of seeded random bytes
        deep/a/b/c/d.txt
        nix/…              a small storegen tree (symlinks between paths)
    """
    old_umask = os.umask(0o022)
    try:
        (root / "bin").mkdir()
        shutil.copyfile(guest.BUSYBOX, root / "bin" / "busybox")
        (root / "bin" / "hello.sh").write_text("#!/bin/sh\necho hello from the store\n")
        data = root / "data"
        data.mkdir()
        (data / "copyme.txt").write_text("original content\n")
        (data / "deleteme.txt").write_text("delete me\n")
        (data / "random.bin").write_bytes(random.Random(5).randbytes(1 << 20))
        os.symlink("copyme.txt", data / "link.txt")
        (root / "deep" / "a" / "b" / "c").mkdir(parents=True)
        (root / "deep" / "a" / "b" / "c" / "d.txt").write_text("deep\n")
        storegen.generate(root / "nix", paths=6, files_per_path=5, seed=11)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in filenames:
                p = Path(dirpath, name)
                if not p.is_symlink():
                    p.chmod(0o555 if p.parent.name == "bin" else 0o444)
            for name in dirnames:
                Path(dirpath, name).chmod(0o555)
    finally:
        os.umask(old_umask)


@pytest.fixture(scope="module")
def guest_store() -> Iterator[Path]:
    """The SOURCE the guest sees; unchanged at the end (the guest writes only to tmpfs)."""
    with util.unchanged_store("noatimefs-qemu-store-", build_guest_store) as root:
        yield root


def host_sums(root: Path) -> dict[str, str]:
    """sha256 of every regular file below *root* (symlinks not followed)."""
    sums = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                sums[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return sums


# --------------------------------------------------------------------------- strace


@dataclasses.dataclass(frozen=True)
class Open:
    """One open call QEMU made, from ``strace -y``."""

    trace: str  # the strace output file (one per thread with -ff)
    path: str
    flags: str
    fd: int  # -1 on error
    error: str  # "EPERM", ... or ""

    @property
    def noatime(self) -> bool:
        return "O_NOATIME" in self.flags


_OPEN_RE = re.compile(
    r"^(?P<call>open|openat|openat2)\("
    r"(?:(?:AT_FDCWD|\d+)(?:<(?P<dir>[^>]*)>)?, )?"
    r'"(?P<name>(?:[^"\\]|\\.)*)", (?P<flags>.*)\) = (?P<ret>-?\d+)'
    r"(?:<[^>]*>)?(?: (?P<err>E[A-Z0-9]+))?"
)


def strace_argv(prefix: Path) -> list[str]:
    """strace for QEMU's opens: every thread (-f) to its own file (-ff), fds as paths (-y)."""
    return [
        "strace", "-f", "-ff", "--seccomp-bpf", "-y", "-qq",
        "-e", "trace=open,openat,openat2", "-o", str(prefix),
    ]  # fmt: skip


def parse_strace(prefix: Path) -> list[Open]:
    opens = []
    for trace in sorted(prefix.parent.glob(prefix.name + ".*")):
        for line in trace.read_text(errors="replace").splitlines():
            m = _OPEN_RE.match(line)
            if not m:
                continue
            name = m.group("name")
            path = name if name.startswith("/") else posixpath.join(m.group("dir") or "?", name)
            ret = int(m.group("ret"))
            opens.append(
                Open(
                    trace.name,
                    posixpath.normpath(path),
                    m.group("flags"),
                    ret,
                    m.group("err") or "",
                )
            )
    return opens


def below(opens: list[Open], top: Path) -> list[Open]:
    """The opens of *top* and of files below it."""
    t = str(top)
    return [o for o in opens if o.path == t or o.path.startswith(t + "/")]


# --------------------------------------------------------------------------- running the guest


def boot(
    image: guest.GuestImage,
    share: Path,
    work: Path,
    *,
    cache: str,
    traced: bool = True,
    timeout: float = BOOT_TIMEOUT,
    extra_append: tuple[str, ...] = (),
) -> tuple[guest.GuestRun, list[Open]]:
    """Boot the guest as uid 65534 against *share* (under strace when *traced*)."""
    prefix = work / "strace" / "qemu"
    if traced:
        prefix.parent.mkdir()
    run = guest.run_guest(
        image,
        share,
        work / "qemu",
        cache=cache,
        user=QEMU_UID,
        wrapper=strace_argv(prefix) if traced else (),
        timeout=timeout,
        extra_append=extra_append,
    )
    assert not util.pids_mentioning(str(work)), "a QEMU (or strace) process is left behind"
    return run, parse_strace(prefix) if traced else []


class GuestFailed(AssertionError):
    """The guest did not boot, finish or pass; the message holds the serial console."""


def assert_guest_ok(run: guest.GuestRun, source: Path) -> None:
    """Every check passed, the guest finished, and its checksums are the host's.

    Raises :class:`GuestFailed` with the whole serial console in the message.
    """
    report = run.report
    problem = ""
    if run.timed_out:
        problem = "the guest timed out"
    elif not report.done:
        problem = "the guest did not finish"
    elif missing := [c for c in EXPECTED_CHECKS if c not in report.checks]:
        problem = f"checks not reported: {missing}"
    elif failed := report.failed():
        problem = f"failed checks: {failed}"
    elif run.returncode != 0:
        problem = f"QEMU exited with {run.returncode}"
    elif report.sums != host_sums(source):
        expected = host_sums(source)
        diff = {
            k: (report.sums.get(k), expected.get(k))
            for k in sorted(set(report.sums) | set(expected))
            if report.sums.get(k) != expected.get(k)
        }
        problem = f"guest checksums differ from the host's (guest, host): {diff}"
    if problem:
        raise GuestFailed(f"{problem}\n{run.describe()}")


# --------------------------------------------------------------------------- tests


@pytest.mark.qemu
@pytest.mark.parametrize("cache", ["loose", "none"])
def test_guest_overlay_on_noatimefs(
    guest_image: guest.GuestImage, guest_store: Path, cache: str
) -> None:
    with (
        util.world_tmpdir("noatimefs-qemu-") as work,
        util.mounted(guest_store, owner=QEMU_UID, allow_other=True) as m,
    ):
        run, opens = boot(guest_image, m.path, work, cache=cache)
        status = m.status()
        daemon_log = m.log_text()
    assert_guest_ok(run, guest_store)

    exported = below(opens, m.path)
    noatime = [o for o in exported if o.noatime]
    # The overlay's lower opens reach QEMU as Tlopen with P9_DOTL_NOATIME ...
    # (every file the guest read was opened so; sums maps each to its checksum)
    unflagged = set(run.report.sums) - {posixpath.relpath(o.path, m.path) for o in noatime}
    assert not unflagged, f"files read in the guest without an O_NOATIME open: {unflagged}"
    # ... and through noatimefs they work the first time: no EPERM, no retry.
    failed = [o for o in exported if o.fd < 0 and o.error in ("EPERM", "EACCES")]
    assert not failed, f"opens refused through noatimefs: {failed}"
    assert all(o.fd >= 0 for o in noatime), [o for o in noatime if o.fd < 0]

    # The daemon dropped the flag for QEMU, and says so by QEMU's name.
    by_process = status["dropped_by_process"]
    qemu_drops = {k: v for k, v in by_process.items() if k.startswith("qemu-system-x86")}
    assert qemu_drops, f"no drops attributed to QEMU: {status}"
    assert sum(qemu_drops.values()) == len(noatime), (status, len(noatime))
    assert status["noatime_dropped"] >= len(noatime), status
    assert re.search(r"O_NOATIME dropped: pid \d+ \(qemu-system-x86", daemon_log), daemon_log


@pytest.mark.qemu
def test_guest_on_the_source_itself_gets_eperm(
    guest_image: guest.GuestImage, guest_store: Path
) -> None:
    """Without noatimefs QEMU's O_NOATIME opens of the root-owned store fail with EPERM."""
    with util.world_tmpdir("noatimefs-qemu-") as work:
        run, opens = boot(guest_image, guest_store, work, cache="loose")
    assert_guest_ok(run, guest_store)  # QEMU >= 5.1 retries without the flag

    exported = below(opens, guest_store)
    refused = [o for o in exported if o.noatime and o.error == "EPERM"]
    assert refused, f"no EPERM on O_NOATIME opens of the bare source: {exported}"
    spared = set(run.report.sums) - {posixpath.relpath(o.path, guest_store) for o in refused}
    assert not spared, f"files read in the guest without an EPERM first: {spared}"
    assert all(o.noatime for o in exported if o.error == "EPERM")
    # Every refusal is followed, in the same thread, by the retry without the flag.
    for o in refused:
        same = [x for x in exported if x.trace == o.trace and x.path == o.path]
        after = same[same.index(o) + 1 :]
        assert after, f"no retry after {o}"
        assert not after[0].noatime, (o, after[0])
        assert after[0].fd >= 0, (o, after[0])


@pytest.mark.qemu
def test_hung_guest_fails_with_console_and_leaves_nothing(
    guest_image: guest.GuestImage, guest_store: Path
) -> None:
    with (
        util.world_tmpdir("noatimefs-qemu-") as work,
        util.mounted(guest_store, owner=QEMU_UID, allow_other=True) as m,
    ):
        run, _ = boot(
            guest_image,
            m.path,
            work,
            cache="loose",
            timeout=HANG_TIMEOUT,
            extra_append=("noatimefs.hang=1",),
        )
        mnt = m.path
    assert run.timed_out
    with pytest.raises(GuestFailed) as excinfo:
        assert_guest_ok(run, guest_store)
    assert "timed out" in str(excinfo.value)
    assert run.console in str(excinfo.value)  # the serial log is attached
    assert util.mount_entry(mnt) is None
    assert not util.pids_mentioning(str(mnt))


@pytest.mark.qemu
def test_failed_boot_fails_with_console(
    guest_image: guest.GuestImage, guest_store: Path, tmp_path: Path
) -> None:
    bad_initrd = tmp_path / "garbage.cpio.gz"
    bad_initrd.write_bytes(b"this is not an initramfs\n" * 100)
    image = dataclasses.replace(guest_image, initrd=bad_initrd)
    with util.world_tmpdir("noatimefs-qemu-") as work:
        run, _ = boot(image, guest_store, work, cache="loose", traced=False)
    assert not run.timed_out, run.describe()  # the kernel panics, QEMU exits (-no-reboot)
    assert "Kernel panic" in run.console, run.describe()
    with pytest.raises(GuestFailed) as excinfo:
        assert_guest_ok(run, guest_store)
    assert "did not finish" in str(excinfo.value)
    assert run.console in str(excinfo.value)


# --------------------------------------------------------------------------- harness (no QEMU)


def test_resolve_modules_puts_dependencies_first() -> None:
    dep = (
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet.ko.xz:\n"
        "kernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: "
        "kernel/drivers/virtio/virtio.ko.xz kernel/net/9p/9pnet.ko.xz\n"
        "kernel/drivers/virtio/virtio.ko.xz:\n"
        "kernel/fs/overlayfs/overlay.ko.xz:\n"
    )
    order = guest.resolve_modules(dep, ["9pnet_virtio", "9p"])
    assert [guest._module_name(p) for p in order] == [
        "virtio",
        "9pnet",
        "9pnet_virtio",
        "netfs",
        "9p",
    ]
    with pytest.raises(guest.GuestError, match="ext4"):
        guest.resolve_modules(dep, ["ext4"])
    with pytest.raises(guest.GuestError, match="cycle"):
        guest.resolve_modules("a.ko: b.ko\nb.ko: a.ko\n", ["a"])


def test_parse_console() -> None:
    text = (
        "SeaBIOS\r\nCHECK modules PASS 11 loaded\n[ 1.0] kernel noise\n"
        "SUM " + "ab" * 32 + " data/x y\nCHECK copy-up FAIL merged=1\nCHECK modules FAIL again\n"
        "GUEST-DONE\n"
    )
    report = guest.parse_console(text)
    assert report.done
    assert report.sums == {"data/x y": "ab" * 32}
    assert report.failed() == {"copy-up": ("FAIL", "merged=1"), "modules": ("FAIL", "again")}
    assert not guest.parse_console("CHECK a PASS\nGUEST-DONE-NOT\n").done


def test_parse_strace(tmp_path: Path) -> None:
    (tmp_path / "qemu.101").write_text(
        'openat(11</s/data>, "f", O_RDONLY|O_NOFOLLOW|O_NOATIME)'
        " = -1 EPERM (Operation not permitted)\n"
        'openat(11</s/data>, "f", O_RDONLY|O_NOFOLLOW) = 10</s/data/f>\n'
        'openat(AT_FDCWD</w>, "/s", O_RDONLY|O_DIRECTORY) = 3</s>\n'
        'open("/etc/x", O_RDONLY) = -1 ENOENT (No such file or directory)\n'
        "+++ exited with 0 +++\n"
    )
    opens = parse_strace(tmp_path / "qemu")
    assert [(o.path, o.noatime, o.fd, o.error) for o in opens] == [
        ("/s/data/f", True, -1, "EPERM"),
        ("/s/data/f", False, 10, ""),
        ("/s", False, 3, ""),
        ("/etc/x", False, -1, "ENOENT"),
    ]
    assert len(below(opens, Path("/s"))) == 3
