"""Build and boot the small QEMU guest used by ``tests/test_qemu.py``.

Everything comes from Debian at build time, nothing else is downloaded:

* ``qemu-system-x86``, ``busybox-static`` and ``cpio`` are installed with
  ``apt-get`` when missing;
* the guest kernel is Debian's generic ``linux-image-<abi>-amd64`` (the one the
  ``linux-image-amd64`` meta-package currently points to; the ``cloud`` flavour
  lacks 9p), fetched with ``apt-get download`` and unpacked with ``dpkg -x``
  into the cache -- never installed on the host;
* the initramfs holds busybox-static, the modules for virtio-pci + 9p +
  overlay (dependencies resolved as in ``modules.dep``, whose lines are made
  from the modules' own ``depends=`` since the package ships none) and
  ``init.sh`` as ``/init``.

The cache is ``${XDG_CACHE_HOME:-~/.cache}/noatimefs/qemu/<package>_<version>/``;
the kernel is fetched once per version, the initramfs is rebuilt only when one
of its inputs (init script, busybox, modules, this builder's format) changes.

As a script::

    python tests/qemu/guest.py build            # prints the image as JSON
    python tests/qemu/guest.py run SHARE [--cache none] [--user nobody]

``run`` boots the guest against the directory SHARE exported read-only over
9p and prints the console; QEMU runs as ``--user`` (via ``setpriv``) when given.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import pwd
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("noatimefs.tests.qemu")

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
#: Bump when the layout of the initramfs changes (forces a rebuild).
FORMAT = "3"
HOST_DEBS = ("qemu-system-x86", "busybox-static", "cpio")
META_PACKAGE = "linux-image-amd64"
#: What the guest needs: virtio PCI transport, 9p over virtio, overlayfs.
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
MOUNT_TAG = "store"


class GuestError(Exception):
    """The guest could not be built, or did not boot and report as expected."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_release: str
    package: str

    def as_json(self) -> str:
        return json.dumps(
            {
                "kernel": str(self.kernel),
                "initrd": str(self.initrd),
                "kernel_release": self.kernel_release,
                "package": self.package,
            }
        )


# --------------------------------------------------------------------------- build


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "noatimefs" / "qemu"


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    log.info("running: %s", " ".join(argv))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    try:
        return subprocess.run(argv, check=True, text=True, capture_output=True, env=env, cwd=cwd)
    except subprocess.CalledProcessError as exc:
        raise GuestError(
            f"{' '.join(argv)} failed with {exc.returncode}:\n{exc.stdout}{exc.stderr}"
        ) from exc


def _installed(package: str) -> bool:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return res.returncode == 0 and "install ok installed" in res.stdout


def ensure_host_packages() -> None:
    """Install what the guest needs from Debian, if missing (needs root)."""
    missing = [p for p in HOST_DEBS if not _installed(p)]
    if not missing:
        return
    log.info("installing %s", " ".join(missing))
    argv = [
        "apt-get", "install", "-y", "-q", "--no-install-recommends",
        "-o", "DPkg::Lock::Timeout=300", *missing,
    ]  # fmt: skip
    try:
        _run(argv)
    except GuestError:
        _run(["apt-get", "update", "-q"])
        _run(argv)


def kernel_package() -> tuple[str, str]:
    """The generic kernel package the meta-package points to: (name, version)."""
    show = _run(["apt-cache", "show", "--no-all-versions", META_PACKAGE]).stdout
    match = re.search(r"^Depends:.*?\b(linux-image-[^\s,]+-amd64)\s*\(=\s*([^)\s]+)\)", show, re.M)
    if not match or "cloud" in match.group(1) or "-rt-" in match.group(1):
        raise GuestError(f"cannot find the generic kernel package in:\n{show}")
    return match.group(1), match.group(2)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_module(path: Path) -> bytes:
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    raise GuestError(f"unknown module format: {path}")


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def resolve_modules(modules_dep: str, wanted: Sequence[str]) -> list[str]:
    """Paths from modules.dep for ``wanted`` and their dependencies, load order first."""
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        path_of[_module_name(mod)] = mod
        deps[mod] = rest.split()
    order: list[str] = []

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in order:
            return
        if mod in stack:
            raise GuestError(f"module dependency cycle: {' -> '.join(stack + (mod,))}")
        for dep in deps.get(mod, []):
            visit(dep, stack + (mod,))
        order.append(mod)

    for name in wanted:
        if name.replace("-", "_") not in path_of:
            raise GuestError(f"module {name} not found in modules.dep (built in? missing?)")
        visit(path_of[name.replace("-", "_")], ())
    return order


def modinfo(ko: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` ELF section (64-bit LE)."""
    if ko[:6] != b"\x7fELF\x02\x01":
        raise GuestError("not a 64-bit little-endian ELF module")
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:  # name offset, file offset, size
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        name = ko[strtab + name_off : ko.index(b"\0", strtab + name_off)]
        if name == b".modinfo":
            pairs = (item.partition(b"=") for item in ko[offset : offset + size].split(b"\0"))
            return {k.decode(): v.decode(errors="replace") for k, _, v in pairs if k}
    return {}


def modules_dep_from_modinfo(moddir: Path, wanted: Sequence[str]) -> str:
    """``modules.dep`` lines for ``wanted`` and everything they depend on.

    Reads only the modules involved (``busybox depmod`` over the whole tree
    takes ~15 s here); each module's ``depends=`` names its direct dependencies.
    """
    paths = {
        _module_name(p.name): p.relative_to(moddir).as_posix()
        for p in (moddir / "kernel").rglob("*.ko*")
    }
    direct: dict[str, list[str]] = {}
    todo = [w.replace("-", "_") for w in wanted]
    while todo:
        name = todo.pop()
        if name in direct or name not in paths:
            continue
        deps = modinfo(_read_module(moddir / paths[name])).get("depends", "")
        direct[name] = [d.replace("-", "_") for d in deps.split(",") if d]
        todo += direct[name]

    def closure(name: str, seen: set[str]) -> list[str]:
        out = []
        for dep in direct.get(name, []):
            if dep not in seen and dep in paths:
                seen.add(dep)
                out += [paths[dep], *closure(dep, seen)]
        return out

    return "".join(f"{paths[n]}: {' '.join(closure(n, set()))}\n" for n in sorted(direct))


def _fetch_kernel(dest: Path, package: str, version: str) -> None:
    """Download and unpack the kernel package into ``dest`` (vmlinuz, modules/)."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp_s:
        tmp = Path(tmp_s)
        # apt's _apt sandbox user cannot write here; apt then downloads as root.
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise GuestError(f"apt-get download left {debs}")
        root = tmp / "root"
        _run(["dpkg", "-x", str(debs[0]), str(root)])
        releases = [p.name for p in (root / "lib" / "modules").iterdir()]
        if len(releases) != 1:
            raise GuestError(f"expected one kernel release in {package}, got {releases}")
        release = releases[0]
        moddir = root / "lib" / "modules" / release
        if (moddir / "modules.dep").exists():
            modules_dep = (moddir / "modules.dep").read_text()
        else:
            # Debian's package ships none (depmod runs in its postinst); make
            # the lines we need from the modules' own "depends=" (.modinfo).
            modules_dep = modules_dep_from_modinfo(moddir, WANTED_MODULES)
        order = resolve_modules(modules_dep, WANTED_MODULES)
        stage = tmp / "stage"
        (stage / "modules").mkdir(parents=True)
        shutil.copyfile(root / "boot" / f"vmlinuz-{release}", stage / "vmlinuz")
        names = []
        for rel in order:
            name = _module_name(rel)
            (stage / "modules" / f"{name}.ko").write_bytes(_read_module(moddir / rel))
            names.append(name)
        (stage / "modules" / "order").write_text("\n".join(names) + "\n")
        (stage / "kernel-release").write_text(release + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)
    log.info("kernel %s=%s cached in %s (modules: %s)", package, version, dest, " ".join(names))


def _initramfs_inputs(kdir: Path) -> str:
    h = hashlib.sha256(f"format {FORMAT}\n".encode())
    for path in [INIT_SCRIPT, BUSYBOX, *sorted((kdir / "modules").iterdir())]:
        h.update(f"{path.name} {path.stat().st_size}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _build_initramfs(kdir: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=kdir, prefix=".initramfs-") as tmp_s:
        root = Path(tmp_s) / "root"
        for sub in ("bin", "dev", "proc", "sys", "tmp", "mnt", "lib/modules"):
            (root / sub).mkdir(parents=True)
        shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
        shutil.copyfile(INIT_SCRIPT, root / "init")
        os.chmod(root / "bin" / "busybox", 0o755)
        os.chmod(root / "init", 0o755)
        for mod in (kdir / "modules").iterdir():
            shutil.copyfile(mod, root / "lib" / "modules" / mod.name)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "--reproducible", "--owner=0:0"],
            input=("\n".join(files) + "\n").encode(),
            capture_output=True,
            cwd=root,
            check=False,
        )
        if cpio.returncode != 0:
            raise GuestError(f"cpio failed: {cpio.stderr.decode(errors='replace')}")
        tmp_out = out.with_name(out.name + ".tmp")
        with open(tmp_out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(cpio.stdout)
        tmp_out.rename(out)


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF kernel has Xen's PVH entry note.

    QEMU boots such a ``vmlinux`` directly (``-kernel vmlinux``), which skips
    decompressing the bzImage, several seconds under TCG.
    """
    if elf[:6] != b"\x7fELF\x02\x01":
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        notes, pos = elf[p_offset : p_offset + p_filesz], 0
        while pos + 12 <= len(notes):
            namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
            name = notes[pos + 12 : pos + 12 + namesz]
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
            if name == b"Xen\0" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
    return False


def _extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage (xz or gzip payload), or None."""
    if bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            return lzma.LZMADecompressor().decompress(payload)
        if payload.startswith(b"\x1f\x8b"):
            return gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    except (lzma.LZMAError, OSError, EOFError):
        return None
    return None  # zstd, lz4, ...: not in the standard library; use the bzImage


def _pvh_kernel(kdir: Path) -> Path | None:
    """``kdir/vmlinux`` (made once from the bzImage) if QEMU can boot it directly."""
    vmlinux, unsupported = kdir / "vmlinux", kdir / "vmlinux.unsupported"
    if vmlinux.exists():
        return vmlinux
    if unsupported.exists():
        return None
    elf = _extract_vmlinux((kdir / "vmlinuz").read_bytes())
    if elf is None or not _has_pvh_entry(elf):
        unsupported.write_text("no PVH-bootable vmlinux in this bzImage; booting vmlinuz\n")
        return None
    tmp = vmlinux.with_name("vmlinux.tmp")
    tmp.write_bytes(elf)
    tmp.rename(vmlinux)
    log.info("extracted %s (%d bytes) for a direct PVH boot", vmlinux, len(elf))
    return vmlinux


def _cached_kernels(root: Path) -> list[Path]:
    found = [p for p in root.glob("linux-image-*") if (p / "kernel-release").exists()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _current_kernel(root: Path) -> Path:
    """The cache directory of the kernel apt offers now, fetched if missing."""
    package, version = kernel_package()
    kdir = root / f"{package}_{version}"
    if (kdir / "kernel-release").exists():
        return kdir
    try:
        _fetch_kernel(kdir, package, version)
    except GuestError:
        # Stale package lists name a version the mirror no longer has.
        _run(["apt-get", "update", "-q"])
        package, version = kernel_package()
        kdir = root / f"{package}_{version}"
        if not (kdir / "kernel-release").exists():
            _fetch_kernel(kdir, package, version)
    for old in _cached_kernels(root):
        if old != kdir:
            log.info("removing the superseded kernel %s", old)
            shutil.rmtree(old)
    return kdir


def build(*, install: bool = True) -> GuestImage:
    """Make sure a kernel and an up-to-date initramfs are cached; return them."""
    if install:
        ensure_host_packages()
    if not BUSYBOX.exists():
        raise GuestError(f"{BUSYBOX} missing (apt-get install busybox-static)")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        try:
            kdir = _current_kernel(root)
        except GuestError as exc:
            cached = _cached_kernels(root)
            if not cached:
                raise
            kdir = cached[0]
            log.warning("%s\nusing the cached kernel %s", exc, kdir.name)
        initrd = kdir / "initramfs.cpio.gz"
        stamp = kdir / "initramfs.inputs"
        inputs = _initramfs_inputs(kdir)
        if not initrd.exists() or not stamp.exists() or stamp.read_text() != inputs:
            log.info("building %s", initrd)
            _build_initramfs(kdir, initrd)
            stamp.write_text(inputs)
        return GuestImage(
            kernel=_pvh_kernel(kdir) or kdir / "vmlinuz",
            initrd=initrd,
            kernel_release=(kdir / "kernel-release").read_text().strip(),
            package=kdir.name.partition("_")[0],
        )


# ---------------------------------------------------------------------------- boot


@dataclass
class Report:
    """What the guest printed: checks, checksums, whether it finished."""

    checks: dict[str, tuple[str, str]] = field(default_factory=dict)
    sums: dict[str, str] = field(default_factory=dict)
    done: bool = False

    def failed(self) -> dict[str, tuple[str, str]]:
        return {k: v for k, v in self.checks.items() if v[0] != "PASS"}


_CHECK_RE = re.compile(r"^CHECK (\S+) (PASS|FAIL) ?(.*)$")
_SUM_RE = re.compile(r"^SUM ([0-9a-f]{64}) (.+)$")


def parse_console(text: str) -> Report:
    report = Report()
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if m := _CHECK_RE.match(line):
            # A repeated name (should not happen) counts as failed if any failed.
            prev = report.checks.get(m.group(1))
            status = "FAIL" if prev and prev[0] == "FAIL" else m.group(2)
            report.checks[m.group(1)] = (status, m.group(3))
        elif m := _SUM_RE.match(line):
            report.sums[m.group(2)] = m.group(1)
        elif line == "GUEST-DONE":
            report.done = True
    return report


def qemu_argv(
    kernel: Path, initrd: Path, share: Path, *, cache: str, extra_append: Sequence[str] = ()
) -> list[str]:
    append = ["console=ttyS0", "panic=-1", "loglevel=4", f"noatimefs.cache={cache}"]
    return [
        QEMU,
        "-accel", "tcg",
        "-m", "512",
        "-smp", "1",
        "-nographic",
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", " ".join([*append, *extra_append]),
        "-fsdev", f"local,id=store,path={share},security_model=none,readonly=on",
        "-device", f"virtio-9p-pci,fsdev=store,mount_tag={MOUNT_TAG}",
    ]  # fmt: skip


@dataclass
class GuestRun:
    argv: list[str]
    returncode: int | None
    timed_out: bool
    console: str
    report: Report
    seconds: float

    def describe(self) -> str:
        state = "timed out" if self.timed_out else f"exited with {self.returncode}"
        return (
            f"QEMU {state} after {self.seconds:.1f}s; argv: {' '.join(self.argv)}\n"
            f"--- serial console ---\n{self.console}\n--- end of serial console ---"
        )


def _is_qemu(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    """True when *pid* has exited (or is a zombie: its files are closed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


#: How long a killed QEMU (and its wrapper) may take to go away.
STOP_DEADLINE = 30.0


def _stop(proc: subprocess.Popen[bytes], pidfile: Path) -> None:
    """Kill QEMU, let the wrapper reap it, and return only when it is gone.

    QEMU goes first and the wrapper (strace) is left to reap it: killing strace
    first would detach QEMU and leave it running; killing both at once leaves
    QEMU to exit on its own after we return, still holding the exported
    directory open (a FUSE mount is then still busy). Last resort after
    :data:`STOP_DEADLINE`: SIGKILL to every descendant and the wrapper.
    """
    pids = set(_descendants(proc.pid))
    with contextlib.suppress(OSError, ValueError):
        pids.add(int(pidfile.read_text().strip()))
    qemus = {pid for pid in pids | {proc.pid} if _is_qemu(pid)}
    for pid in sorted(qemus):
        _kill(pid)
    try:
        proc.wait(timeout=STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        log.error("pid %d still running %.0fs after QEMU was killed", proc.pid, STOP_DEADLINE)
        for pid in [*sorted(pids), proc.pid]:
            _kill(pid)
        proc.wait()
    for pid in qemus:  # reaped by now, unless it was orphaned: then wait for its exit
        _wait_gone(pid, STOP_DEADLINE)


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait until *pid* (not necessarily our child) has exited; pidfds signal that."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)) and not _gone(pid):
            raise GuestError(f"QEMU (pid {pid}) still running {timeout:.0f}s after SIGKILL")
    finally:
        os.close(fd)


def run_guest(
    image: GuestImage,
    share: Path,
    workdir: Path,
    *,
    cache: str = "loose",
    user: int | None = None,
    wrapper: Sequence[str] = (),
    timeout: float = 120.0,
    extra_append: Sequence[str] = (),
) -> GuestRun:
    """Boot the guest against ``share``; return its console and report.

    ``workdir`` receives copies of the kernel and initrd (the cache may sit in a
    home directory QEMU's user cannot enter), the QEMU pid file and the serial
    log. QEMU runs as ``user`` (uid; its primary gid, no supplementary groups)
    via setpriv when given, under ``wrapper`` (e.g. an strace command line)
    when given. A guest still running after ``timeout`` seconds is killed, as
    is every process this started, in every case.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    kernel, initrd = workdir / image.kernel.name, workdir / "initrd.cpio.gz"
    for src, dst in ((image.kernel, kernel), (image.initrd, initrd)):
        os.chmod(src, 0o644)  # the cache's own directory may be private; the files need not be
        try:
            os.link(src, dst)
        except OSError:  # another file system
            shutil.copyfile(src, dst)
    pidfile = workdir / "qemu.pid"
    console_path = workdir / "console.log"
    argv = qemu_argv(kernel, initrd, share, cache=cache, extra_append=extra_append)
    argv += ["-pidfile", str(pidfile)]
    if user is not None:
        gid = pwd.getpwuid(user).pw_gid
        os.chown(workdir, user, gid)  # for the pid file
        argv = ["setpriv", f"--reuid={user}", f"--regid={gid}", "--clear-groups", *argv]
    argv = [*wrapper, *argv]
    log.info("booting: %s", " ".join(argv))
    start = time.monotonic()
    timed_out = False
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console, cwd=workdir
        )
        try:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            _stop(proc, pidfile)
    seconds = time.monotonic() - start
    text = console_path.read_text(errors="replace").replace("\r\n", "\n")
    return GuestRun(
        argv=argv,
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        console=text,
        report=parse_console(text),
        seconds=seconds,
    )


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guest.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="fetch/build the guest kernel and initramfs, print JSON")
    run = sub.add_parser("run", help="boot the guest against SHARE and print its console")
    run.add_argument("share", type=Path)
    run.add_argument("--cache", default="loose")
    run.add_argument("--user", help="run QEMU as this user (name or uid) via setpriv")
    run.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        image = build()
        if args.cmd == "build":
            print(image.as_json())
            return 0
        user = None
        if args.user is not None:
            user = int(args.user) if args.user.isdigit() else pwd.getpwnam(args.user).pw_uid
        with tempfile.TemporaryDirectory(prefix="noatimefs-guest-") as tmp:
            result = run_guest(
                image, args.share.resolve(), Path(tmp), cache=args.cache, user=user,
                timeout=args.timeout,
            )  # fmt: skip
        print(result.describe())
        ok = result.report.done and not result.report.failed() and result.report.checks
        return 0 if ok else 1
    except GuestError as exc:
        print(f"guest.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
