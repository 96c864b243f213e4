"""Sandboxed Nix builds that read a store through noatimefs (issue 13).

Debian's ``nix-bin`` (Nix 2.8) builds as root without a daemon (``NIX_REMOTE``
empty: the local store, ``/nix/store``), each build as a build user of the
group ``nixbld`` (``nixbld1…10``, made by the package), in a sandbox when
``--option sandbox true`` (the package's ``/etc/nix/nix.conf`` turns it off):
a user namespace mapping uid 1000 to that build user's host uid, and a mount
namespace that sees host paths only through ``sandbox-paths`` (DESIGN.md,
fact 12). Nothing comes from a binary cache (``substituters`` empty) and there
is no nixpkgs: the derivations of ``nix/readers.nix`` are plain
``derivation { … }`` whose builder is ``nix/reader.c``, compiled here with
``gcc -static`` (the sandbox has no libc) and bound into the sandbox at
``/noatimefs-reader``.

The reader opens every directory and file below a directory with
``O_RDONLY|O_NOATIME`` and writes what it read ($out); :class:`Reading` is
that output parsed. With a barrier (a host directory every build may write,
bound in too: Nix 2.8 binds ``sandbox-paths`` read-write) the N builds wait
for each other, so they read at the same time, each as its own build user.

Facts of Nix 2.8 on Debian 12 these rely on: the sandbox works as root
without ``nix-daemon`` (despite the comment in Debian's ``nix.conf``);
``build-users-group`` is ``nixbld`` by default; a later ``sandbox =`` line in
``nix.conf`` overrides Debian's ``sandbox = false``; ``--option
extra-sandbox-paths`` adds to ``nix.conf``'s list while ``--option
sandbox-paths`` replaces it; a build's ``PATH`` is unset (``/path-not-set``)
unless the derivation sets it; a bind source is reached as root (a file below
the 0700 ``/root`` can be bound) and then read with the build user's rights.

Every store path a build makes (outputs and ``.drv`` files) is deleted again.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "nix"
READER_C = HERE / "reader.c"
READERS_NIX = HERE / "readers.nix"
#: Where the reader is bound in the sandbox (readers.nix names it).
READER_IN_SANDBOX = "/noatimefs-reader"
#: The uid a build runs as inside Nix 2.8's sandbox.
SANDBOX_UID = 1000
NIX_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "NIX_REMOTE": "",
    "LANG": "C.UTF-8",
}
#: What every build here passes: local only (nothing from a binary cache) ...
NIX_OPTIONS = ("--option", "substituters", "")
#: ... and, unless nix.conf is what is tested, sandboxed.
SANDBOX_OPTION = ("--option", "sandbox", "true")


def ensure_nix() -> None:
    """Skip (fail with ``CI=true``) unless nix-build, gcc -static and the build users are here.

    ``./dev deps`` installs ``nix-bin`` and ``libc6-dev``; this only installs
    them when missing (as root).
    """
    if os.geteuid() != 0:
        pytest.skip("sandboxed nix builds as root need root")
    missing = [t for t in ("nix-build", "nix-store", "gcc") if shutil.which(t) is None]
    if missing or not Path("/usr/lib/x86_64-linux-gnu/libc.a").exists():
        r = subprocess.run(
            ["apt-get", "install", "-y", "-q", "nix-bin", "gcc", "libc6-dev"],
            capture_output=True,
            text=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=900,
            check=False,
        )
        if r.returncode != 0 or shutil.which("nix-build") is None:
            _unavailable(f"cannot install nix-bin: {r.stderr.strip()[-500:]}")
    Path("/nix/store").mkdir(parents=True, exist_ok=True)  # a fresh nix-bin has none yet


def _unavailable(msg: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (CI=true: a failure, not a skip)", pytrace=False)
    pytest.skip(msg)


def build_users() -> dict[int, str]:
    """uid -> name of the members of the group ``nixbld``."""
    import grp
    import pwd

    try:
        members = grp.getgrnam("nixbld").gr_mem
    except KeyError:
        return {}
    return {pwd.getpwnam(name).pw_uid: name for name in members}


def compile_reader(dest: Path) -> Path:
    """``gcc -static`` the reader to *dest* (mode 0755)."""
    r = subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(dest), str(READER_C)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, f"gcc -static {READER_C}: exit {r.returncode}\n{r.stderr}"
    dest.chmod(0o755)
    return dest


# --------------------------------------------------------------------------- the reader's output


@dataclasses.dataclass
class Reading:
    """What one reader build wrote to $out."""

    host_uid: int
    uid: int
    self_link: str | None
    start: int
    ready: int
    end: int
    barrier: tuple[int, int] | None
    #: relative path -> (sha256, size, uid, mode) of each regular file read
    files: dict[str, tuple[str, int, int, int]]
    #: relative path -> (uid, mode) of each directory listed
    dirs: dict[str, tuple[int, int]]
    links: dict[str, str]
    #: (errno name, relative path) of each open or read that failed
    fails: list[tuple[str, str]]
    counts: tuple[int, int, int, int]  # files, dirs, EPERM, failed

    @property
    def eperm(self) -> int:
        return self.counts[2]


def _rel(path: str) -> str:
    return path[2:] if path.startswith("./") else path


def parse_reading(text: str) -> Reading:
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, int, int, int]] = {}
    dirs: dict[str, tuple[int, int]] = {}
    links: dict[str, str] = {}
    fails: list[tuple[str, str]] = []
    barrier = None
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "file":
            sha, size, uid, mode, path = rest.split(" ", 4)
            files[_rel(path)] = (sha, int(size), int(uid), int(mode, 8))
        elif kind == "dir":
            uid, mode, path = rest.split(" ", 2)
            dirs[_rel(path)] = (int(uid), int(mode, 8))
        elif kind == "link":
            target, path = rest.split(" ", 1)
            links[_rel(path)] = target
        elif kind == "fail":
            err, path = rest.split(" ", 1)
            fails.append((err, _rel(path)))
        elif kind == "barrier":
            m = re.fullmatch(r"(-?\d+) of (\d+)", rest)
            assert m, line
            barrier = (int(m.group(1)), int(m.group(2)))
        else:
            fields[kind] = rest
    counts = tuple(int(x) for x in fields["count"].split())
    assert len(counts) == 4, fields["count"]
    return Reading(
        host_uid=int(fields["host-uid"]),
        uid=int(fields["uid"]),
        self_link=fields.get("self"),
        start=int(fields["start"]),
        ready=int(fields["ready"]),
        end=int(fields["end"]),
        barrier=barrier,
        files=files,
        dirs=dirs,
        links=links,
        fails=fails,
        counts=(counts[0], counts[1], counts[2], counts[3]),
    )


def read_natively(root: Path) -> tuple[dict[str, tuple[str, int]], set[str], dict[str, str]]:
    """(path -> (sha256, size)) of the files, the directories and the links below *root*."""
    import hashlib

    files: dict[str, tuple[str, int]] = {}
    dirs = {"."}
    links: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                links[rel] = os.readlink(p)
            elif p.is_dir():
                dirs.add(rel)
            elif p.is_file():
                data = p.read_bytes()
                files[rel] = (hashlib.sha256(data).hexdigest(), len(data))
    return files, dirs, links


# --------------------------------------------------------------------------- building


class BuildFailed(AssertionError):
    """nix-build exited non-zero; the message holds its output and the builds' logs."""


@dataclasses.dataclass
class Builds:
    """The store paths made by the builds of one test (deleted by :func:`nix_builds`)."""

    made: list[Path] = dataclasses.field(default_factory=list)

    def build(
        self,
        expr: Path,
        args: Mapping[str, str],
        sandbox_paths: Sequence[str],
        *,
        max_jobs: int = 6,
        sandbox_option: bool = True,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
    ) -> list[Path]:
        """``nix-build EXPR --argstr K V ...`` sandboxed with *sandbox_paths*; the outputs.

        Without *sandbox_option* the sandbox is left to ``nix.conf``.

        The ``.drv`` files and outputs are remembered for deletion, also when
        the build fails (then :class:`BuildFailed` carries ``nix-store -l``
        of each failed build).
        """
        argv = ["nix-build", "--no-out-link", str(expr), *NIX_OPTIONS]
        if sandbox_option:
            argv += SANDBOX_OPTION
        if sandbox_paths:
            argv += ["--option", "sandbox-paths", " ".join(sandbox_paths)]
        argv += ["--max-jobs", str(max_jobs), *extra]
        for key, value in args.items():
            argv += ["--argstr", key, value]
        drvs = self._instantiate(expr, args, env)
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**NIX_ENV, **(env or {})},
            timeout=timeout,
            check=False,
        )
        outs = [Path(line) for line in r.stdout.split()]
        self.made[:0] = outs  # outputs first: they refer to nothing, the .drv files may
        if r.returncode != 0:
            logs = []
            for drv in drvs:
                log = subprocess.run(
                    ["nix-store", "-l", str(drv)],
                    capture_output=True,
                    text=True,
                    env=NIX_ENV,
                    check=False,
                )
                if log.returncode == 0:
                    logs.append(f"--- log of {drv.name} ---\n{log.stdout}")
            raise BuildFailed(
                f"{' '.join(argv)}: exit {r.returncode}\n{r.stderr[-5000:]}\n" + "\n".join(logs)
            )
        return outs

    def _instantiate(
        self, expr: Path, args: Mapping[str, str], env: Mapping[str, str] | None
    ) -> list[Path]:
        argv = ["nix-instantiate", str(expr)]
        for key, value in args.items():
            argv += ["--argstr", key, value]
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**NIX_ENV, **(env or {})},
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}\n{r.stderr}"
        drvs = [Path(line.partition("!")[0]) for line in r.stdout.split()]
        self.made += drvs
        return drvs

    def delete(self) -> list[str]:
        """Delete what the builds made, with the lock files Nix leaves; the problems met.

        A failed build can leave its output in the store as an invalid path,
        which ``nix-store --delete`` refuses: that is removed as the garbage
        collector would remove it.
        """
        problems = []
        drvs = [p for p in self.made if p.name.endswith(".drv")]
        outputs = [p for p in self.made if p not in drvs]
        for drv in drvs:
            r = _nix_store("-q", "--outputs", str(drv))
            if r.returncode == 0:
                outputs += [Path(line) for line in r.stdout.split() if Path(line) not in outputs]
        for path in [*outputs, *drvs]:
            if not os.path.lexists(path):
                pass
            elif _nix_store("--check-validity", str(path)).returncode == 0:
                r = _nix_store("--delete", str(path))
                if r.returncode != 0:
                    problems.append(f"cannot delete {path}: {r.stderr.strip()}")
            else:
                _remove_invalid(path)
            Path(f"{path}.lock").unlink(missing_ok=True)
        return problems


def _nix_store(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-store", *args], capture_output=True, text=True, env=NIX_ENV, timeout=120, check=False
    )


def _remove_invalid(path: Path) -> None:
    """rm -rf of a path Nix does not know (its directories may be read-only)."""
    if path.is_dir() and not path.is_symlink():
        for dirpath, _, _ in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path)
    else:
        path.unlink()


def nonce() -> str:
    """A fresh name part: the derivations differ from every earlier run's, so they build."""
    return secrets.token_hex(6)


def nix_builds() -> Iterator[Builds]:
    """A generator for a fixture: :class:`Builds`, whose store paths are deleted after."""
    builds = Builds()
    try:
        yield builds
    finally:
        problems = builds.delete()
        assert not problems, problems
