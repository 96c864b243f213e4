"""Deterministic, seeded generator of store-like trees (think ``/nix/store``).

Shared by the tests and ``bench/``.  A tree looks like a small Nix store::

    DEST/
      0a1b…(32)-zlib-1.3.1/            0555 dir
        bin/zlib-tool                  0555 executable
        bin/zlib-tool-wrapped -> zlib-tool                (relative, same path)
        lib/libzlib.so.1.3.1           0444
        lib/libzlib.so.1 -> libzlib.so.1.3.1
        lib/libzlib.so -> libzlib.so.1
        lib/pkgconfig/zlib.pc
        lib/dep-openssl -> ../../7xq…-openssl-3.0.2/lib  (to another path)
        share/doc/zlib/README …
        share/man/man1/zlib-tool.1
      9s2…(32)-builder.sh              0444 single-file store path
      kq0…(32)-bigdata-1.0/share/big-0.bin   big files (size configurable)

Guarantees:

- The same arguments give the same tree, byte for byte (names, sizes,
  contents, link targets, modes).  Store path *i* depends only on ``seed`` and
  *i*, so a tree with more paths extends one with fewer (and a run stopped by
  ``entries=`` is a prefix of a longer one).
- Links to other store paths are relative (``../../<other>/…``) and always
  point at an earlier path, so they resolve inside DEST, natively and through a
  mount of it.
- Modes are read-only: 0444 files, 0555 executables and directories (DEST
  itself is left 0755 so paths can be added and deleted).  The owner is the
  user running the generator (root in the tests and the benchmark).
- Fast: one ``os.open``/``os.write``/``os.close`` per file with contents sliced
  from a pre-generated pool, no ``chmod`` of files; one ``chmod`` per
  directory.  A million entries take about a minute on the project machine
  (see ``bench/README.md``).

``ensure_tree()`` caches a tree between runs: it keeps a ``DEST.json`` beside
DEST with the arguments and the summary, and regenerates only if they differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Summary", "ensure_tree", "generate", "remove_tree", "store_hash"]

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
POOL_SIZE = 1 << 20
BIG_NAME = "bigdata"
DEFAULT_BIG_SIZE = 512 << 20

_NAMES = (
    "zlib",
    "openssl",
    "glibc",
    "bash",
    "coreutils",
    "gcc-lib",
    "python3",
    "perl",
    "ncurses",
    "readline",
    "sqlite",
    "curl",
    "libffi",
    "expat",
    "xz",
    "bzip2",
    "gmp",
    "mpfr",
    "isl",
    "attr",
    "acl",
    "libcap",
    "systemd",
    "util-linux",
    "dbus",
    "glib",
    "pcre2",
    "libxml2",
    "icu",
    "harfbuzz",
    "freetype",
    "fontconfig",
    "cairo",
    "pango",
    "gtk3",
    "mesa",
    "llvm",
    "rustc",
    "go",
    "nodejs",
    "git",
    "gnumake",
    "binutils",
    "findutils",
    "diffutils",
    "gnused",
    "gnugrep",
    "gawk",
    "patch",
    "tar",
    "gzip",
    ").split(",
)
_DOC_NAMES = ("README", "NEWS", "COPYING", "ChangeLog", "AUTHORS", "THANKS", "TODO")
_LIB_SUFFIXES = ("", "-core", "-util", "-extra", "-compat")
_SINGLE_FILE_NAMES = ("builder.sh", "source.tar.gz.drv", "patch.diff", "setup-hook.sh")


@dataclasses.dataclass
class Summary:
    """What ``generate()`` made.  ``entries`` counts everything below DEST."""

    dest: str
    seed: int
    paths: int = 0
    dirs: int = 0
    files: int = 0
    executables: int = 0
    symlinks: int = 0
    bytes: int = 0
    big_files: list[str] = dataclasses.field(default_factory=list)
    big_size: int = 0
    seconds: float = 0.0

    @property
    def entries(self) -> int:
        return self.dirs + self.files + self.symlinks

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["entries"] = self.entries
        return d


def store_hash(seed: int, index: int) -> str:
    """The 32-character Nix-base32 hash of store path ``index`` for ``seed``."""
    digest = hashlib.sha256(f"noatimefs-storegen:{seed}:{index}".encode()).digest()
    n = int.from_bytes(digest[:20], "big")
    return "".join(NIX_BASE32[(n >> (5 * k)) & 31] for k in range(32))


class _Writer:
    """Creates entries below one store path and counts them into a Summary."""

    def __init__(self, summary: Summary, pool: bytes, max_file_size: int | None) -> None:
        self.s = summary
        self.pool = pool
        self.cap = max_file_size

    def dir(self, path: str) -> None:
        os.mkdir(path, 0o755)
        self.s.dirs += 1

    def file(self, path: str, size: int, offset: int, executable: bool = False) -> None:
        mode = 0o555 if executable else 0o444
        if self.cap is not None:
            size = min(size, self.cap)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            if size:
                start = offset % (POOL_SIZE - size) if size < POOL_SIZE else 0
                os.write(fd, self.pool[start : start + size])
        finally:
            os.close(fd)
        self.s.files += 1
        self.s.executables += executable
        self.s.bytes += size

    def link(self, target: str, path: str) -> None:
        os.symlink(target, path)
        self.s.symlinks += 1


def _small_size(rng: random.Random) -> int:
    # Mostly small (a store is dominated by sub-4 KiB files), a tail to 128 KiB.
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.70:
        return rng.randrange(16, 4096)
    if r < 0.97:
        return rng.randrange(4096, 32768)
    return rng.randrange(32768, 131072)


def _make_path(
    w: _Writer, dest: str, seed: int, i: int, files_per_path: int, names: Sequence[str]
) -> str:
    """Create store path ``i`` below ``dest``; return its name.  ``names``: paths 0..i-1."""
    rng = random.Random(f"{seed}:{i}")
    name = rng.choice(_NAMES)
    h = store_hash(seed, i)
    if i > 0 and rng.random() < 0.05:  # a single-file store path
        entry = f"{h}-{rng.choice(_SINGLE_FILE_NAMES)}"
        w.file(os.path.join(dest, entry), _small_size(rng), rng.getrandbits(32))
        w.s.paths += 1
        return entry
    version = f"{rng.randrange(0, 10)}.{rng.randrange(0, 30)}.{rng.randrange(0, 10)}"
    entry = f"{h}-{name}-{version}"
    top = os.path.join(dest, entry)
    dirs = [top]
    w.dir(top)
    bin_, lib, share = (os.path.join(top, d) for d in ("bin", "lib", "share"))
    doc, man1, pkgconfig = (
        os.path.join(share, "doc", name),
        os.path.join(share, "man", "man1"),
        os.path.join(lib, "pkgconfig"),
    )
    for d in (bin_, lib, pkgconfig, share, os.path.join(share, "doc"), doc):
        w.dir(d)
    dirs += [bin_, lib, pkgconfig, share, os.path.join(share, "doc"), doc]
    # Spread about files_per_path regular files over bin, lib, share.
    n = max(1, files_per_path + rng.randrange(-files_per_path // 2, files_per_path // 2 + 1))
    n_bin = max(1, n // 5)
    n_lib = max(1, n // 4)
    n_doc = max(1, n - n_bin - n_lib)
    with_man = n_bin > 0 and rng.random() < 0.6
    if with_man:
        w.dir(os.path.join(share, "man"))
        w.dir(man1)
        dirs += [os.path.join(share, "man"), man1]
    for k in range(n_bin):
        tool = f"{name}-tool{k}" if k else name
        w.file(os.path.join(bin_, tool), _small_size(rng), rng.getrandbits(32), executable=True)
        if rng.random() < 0.3:
            w.link(tool, os.path.join(bin_, f".{tool}-wrapped"))
        if with_man:
            w.file(os.path.join(man1, f"{tool}.1"), rng.randrange(200, 8000), rng.getrandbits(32))
    for k in range(n_lib):
        soname = f"lib{name}{_LIB_SUFFIXES[k % len(_LIB_SUFFIXES)]}{k // len(_LIB_SUFFIXES) or ''}"
        real = f"{soname}.so.{version}"
        w.file(os.path.join(lib, real), _small_size(rng), rng.getrandbits(32), executable=True)
        major = f"{soname}.so.{version.split('.')[0]}"
        w.link(real, os.path.join(lib, major))
        w.link(major, os.path.join(lib, f"{soname}.so"))
    w.file(os.path.join(pkgconfig, f"{name}.pc"), rng.randrange(100, 600), rng.getrandbits(32))
    for k in range(n_doc):
        base = _DOC_NAMES[k % len(_DOC_NAMES)]
        fname = base if k < len(_DOC_NAMES) else f"{base}.{k}"
        w.file(os.path.join(doc, fname), _small_size(rng), rng.getrandbits(32))
    # References to earlier store paths, relative so they stay inside DEST.
    for _ in range(rng.randrange(0, 4) if i else 0):
        j = rng.randrange(0, i)
        link = os.path.join(lib, f"dep-{j}")
        if not os.path.lexists(link):
            w.link(f"../../{names[j]}", link)
    for d in reversed(dirs):
        os.chmod(d, 0o555)
    w.s.paths += 1
    return entry


#: Directory names of a shaped store path (see :func:`_make_shaped_path`).
_SHAPED_DIRS = ("bin", "lib", "share", "include", "libexec", "etc", "doc", "man")


def _make_shaped_path(
    w: _Writer, dest: str, seed: int, i: int, shape: tuple[int, int], names: Sequence[str]
) -> str:
    """Store path ``i`` with ``shape`` = (directories, files per directory); its name.

    The store path's own directory and ``shape[0] - 1`` more, each below a
    random earlier one; ``shape[1]`` entries in each, about 5% of them symlinks to
    a sibling file; about 5% of store paths are a single file; some links to
    earlier store paths, as in :func:`_make_path`.
    """
    dirs_per_path, files_per_dir = shape
    rng = random.Random(f"{seed}:{i}:shaped")
    name = rng.choice(_NAMES)
    h = store_hash(seed, i)
    if i > 0 and rng.random() < 0.05:
        entry = f"{h}-{rng.choice(_SINGLE_FILE_NAMES)}"
        w.file(os.path.join(dest, entry), _small_size(rng), rng.getrandbits(32))
        w.s.paths += 1
        return entry
    version = f"{rng.randrange(0, 10)}.{rng.randrange(0, 30)}.{rng.randrange(0, 10)}"
    entry = f"{h}-{name}-{version}"
    dirs = [os.path.join(dest, entry)]
    w.dir(dirs[0])
    for k in range(1, dirs_per_path):
        parent = dirs[rng.randrange(len(dirs))]
        sub = _SHAPED_DIRS[k % len(_SHAPED_DIRS)] + (str(k) if k >= len(_SHAPED_DIRS) else "")
        dirs.append(os.path.join(parent, sub))
        w.dir(dirs[-1])
    for d in dirs:
        executable = os.path.basename(d).startswith("bin")
        for k in range(files_per_dir):
            path = os.path.join(d, f"{name}-{k}")
            if k and rng.random() < 0.05:
                w.link(f"{name}-{k - 1}", path)
            else:
                w.file(path, _small_size(rng), rng.getrandbits(32), executable=executable)
    for _ in range(rng.randrange(0, 3) if i and dirs_per_path > 1 else 0):
        j = rng.randrange(0, i)
        link = os.path.join(dirs[1], f"dep-{j}")
        if not os.path.lexists(link):
            w.link(f"../../{names[j]}", link)  # dirs[1] is a child of the store path
    for d in reversed(dirs):
        os.chmod(d, 0o555)
    w.s.paths += 1
    return entry


def _make_big(w: _Writer, dest: str, seed: int, count: int, size: int) -> None:
    h = store_hash(seed, -1)
    top = os.path.join(dest, f"{h}-{BIG_NAME}-1.0")
    share = os.path.join(top, "share")
    w.dir(top)
    w.dir(share)
    chunk = bytearray(w.pool) * 4  # 4 MiB per write
    for k in range(count):
        path = os.path.join(share, f"big-{k}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            done = 0
            block = 0
            while done < size:
                # Stamp each block so no two blocks (or files) have equal bytes.
                chunk[:16] = f"{k:07d}:{block:08d}".encode()
                n = min(len(chunk), size - done)
                os.write(fd, memoryview(chunk)[:n])
                done += n
                block += 1
        finally:
            os.close(fd)
        w.s.files += 1
        w.s.bytes += size
        w.s.big_files.append(os.path.relpath(path, dest))
    os.chmod(share, 0o555)
    os.chmod(top, 0o555)
    w.s.paths += 1


def generate(
    dest: str | os.PathLike[str],
    paths: int = 2000,
    files_per_path: int = 12,
    big_files: int = 0,
    big_size: int = DEFAULT_BIG_SIZE,
    seed: int = 0,
    entries: int | None = None,
    max_file_size: int | None = None,
    dirs_per_path: int | None = None,
    files_per_dir: int | None = None,
) -> Summary:
    """Generate a store-like tree in ``dest`` (created if missing; must be empty).

    ``paths`` store paths (``<hash>-name-version``) with about
    ``files_per_path`` regular files each, plus one ``<hash>-bigdata-1.0``
    path holding ``big_files`` files of ``big_size`` bytes if ``big_files``.
    With ``entries``, stop adding store paths once at least that many entries
    exist (``paths`` is then ignored).  ``max_file_size`` caps the small
    files (0: all empty, for metadata-only trees; names and layout unchanged).
    ``dirs_per_path`` and ``files_per_dir`` (both, or neither) choose another shape of
    store path: that many directories, each with that many entries
    (``files_per_path`` is then ignored; see :func:`_make_shaped_path`).
    """
    shape = None
    if dirs_per_path is not None or files_per_dir is not None:
        if not (dirs_per_path and dirs_per_path >= 1 and files_per_dir is not None):
            raise ValueError("dirs_per_path >= 1 and files_per_dir are given together")
        shape = (dirs_per_path, files_per_dir)
    t0 = time.monotonic()
    dest_s = os.fspath(dest)
    os.makedirs(dest_s, exist_ok=True)
    if os.listdir(dest_s):
        raise FileExistsError(f"{dest_s} is not empty")
    summary = Summary(dest=os.path.abspath(dest_s), seed=seed, big_size=big_size)
    pool = random.Random(f"pool:{seed}").randbytes(POOL_SIZE)
    w = _Writer(summary, pool, max_file_size)
    old_umask = os.umask(0o022)
    names: list[str] = []
    try:
        i = 0
        while (summary.entries < entries) if entries is not None else (i < paths):
            if shape is None:
                names.append(_make_path(w, dest_s, seed, i, files_per_path, names))
            else:
                names.append(_make_shaped_path(w, dest_s, seed, i, shape, names))
            i += 1
        if big_files:
            _make_big(w, dest_s, seed, big_files, big_size)
    finally:
        os.umask(old_umask)
    summary.seconds = round(time.monotonic() - t0, 3)
    return summary


def remove_tree(dest: str | os.PathLike[str]) -> None:
    """Remove a generated tree (its directories are read-only)."""
    dest_s = os.fspath(dest)
    if not os.path.lexists(dest_s):
        return
    for root, dirnames, _ in os.walk(dest_s):
        for d in dirnames:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    os.chmod(dest_s, 0o755)
    shutil.rmtree(dest_s)


def ensure_tree(dest: str | os.PathLike[str], **kwargs: object) -> Summary:
    """Return the tree at ``dest`` made by ``generate(dest, **kwargs)``, reusing a cached one.

    The cache key is ``DEST.json`` next to DEST; it is written only after the
    tree is complete, so an interrupted generation is redone.
    """
    dest_p = Path(dest)
    stamp = dest_p.with_name(dest_p.name + ".json")
    want = {k: kwargs[k] for k in sorted(kwargs)}
    if stamp.exists() and dest_p.is_dir():
        try:
            cached = json.loads(stamp.read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("args") == want:
            s = dict(cached["summary"])
            s.pop("entries", None)
            return Summary(**s)
    stamp.unlink(missing_ok=True)
    remove_tree(dest_p)
    summary = generate(dest_p, **kwargs)  # type: ignore[arg-type]
    tmp = stamp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"args": want, "summary": summary.to_json()}, indent=1))
    tmp.replace(stamp)
    return summary


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m noatimefs.storegen", description="Generate a store-like test tree."
    )
    p.add_argument("dest", help="directory to create (must be missing or empty)")
    p.add_argument("--paths", type=int, default=2000, help="store paths (default 2000)")
    p.add_argument("--entries", type=int, help="instead of --paths: at least this many entries")
    p.add_argument("--files-per-path", type=int, default=12, help="mean files per path")
    p.add_argument("--big-files", type=int, default=0, help="number of big files")
    p.add_argument("--big-size", type=_size, default=DEFAULT_BIG_SIZE, help="e.g. 512M")
    p.add_argument("--max-file-size", type=_size, help="cap small files (0: empty files)")
    p.add_argument("--dirs-per-path", type=int, help="another shape: directories per path")
    p.add_argument("--files-per-dir", type=int, help="another shape: entries per directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        s = generate(
            args.dest,
            paths=args.paths,
            files_per_path=args.files_per_path,
            big_files=args.big_files,
            big_size=args.big_size,
            seed=args.seed,
            entries=args.entries,
            max_file_size=args.max_file_size,
            dirs_per_path=args.dirs_per_path,
            files_per_dir=args.files_per_dir,
        )
    except OSError as e:
        print(f"storegen: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(s.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
