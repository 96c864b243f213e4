"""The store-tree generator, and a small-scale run of bench/run.py (so it cannot rot).

The benchmark's timings are never judged here: only that every mode mounts,
every workload's output matches native's, and nothing is left mounted or
running afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from noatimefs import storegen

REPO = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI") == "true"


def _listing(root: Path) -> list[tuple[str, int, int, str, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out.append((str(p.relative_to(root)), st.st_mode, st.st_size, target, data))
    return sorted(out)


@pytest.fixture
def scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="noatimefs-bench-test."))
    d.chmod(0o755)  # the benchmark's consumer user must reach the mountpoints
    try:
        yield d
    finally:
        for entry in d.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                storegen.remove_tree(entry)
        shutil.rmtree(d)


def test_storegen_is_deterministic_and_store_like(scratch: Path) -> None:
    a = storegen.generate(scratch / "a", paths=40, files_per_path=6, big_files=1, big_size=1 << 16)
    b = storegen.generate(scratch / "b", paths=40, files_per_path=6, big_files=1, big_size=1 << 16)
    assert a.entries == b.entries > 40 * 6
    assert a.symlinks > 0
    assert a.big_files == b.big_files
    assert _listing(scratch / "a") == _listing(scratch / "b")

    for name in os.listdir(scratch / "a"):
        h, _, rest = name.partition("-")
        assert len(h) == 32
        assert set(h) <= set(storegen.NIX_BASE32)
        assert rest
    for path, mode, _size, target, _ in _listing(scratch / "a"):
        perm = stat.S_IMODE(mode)
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
            assert perm in (0o444, 0o555), path
        if target:  # links stay inside the tree
            resolved = (scratch / "a" / path).parent.joinpath(target).resolve()
            assert resolved.is_relative_to((scratch / "a").resolve()), (path, target)
            assert resolved.exists(), (path, target)
    assert (scratch / "a" / a.big_files[0]).stat().st_size == 1 << 16


def test_storegen_more_paths_extend_fewer(scratch: Path) -> None:
    storegen.generate(scratch / "few", paths=10, seed=7)
    storegen.generate(scratch / "many", paths=25, seed=7)
    few = _listing(scratch / "few")
    many = {e[0]: e for e in _listing(scratch / "many")}
    assert all(many[e[0]] == e for e in few)
    other = storegen.generate(scratch / "other", paths=10, seed=8)
    assert other.paths == 10
    assert _listing(scratch / "other") != few


def test_storegen_entries_and_cache(scratch: Path) -> None:
    s = storegen.ensure_tree(scratch / "t", entries=500, max_file_size=0, seed=3)
    assert s.entries >= 500
    assert s.bytes == 0
    marker = scratch / "t" / os.listdir(scratch / "t")[0]
    before = marker.lstat()
    again = storegen.ensure_tree(scratch / "t", entries=500, max_file_size=0, seed=3)
    assert again == s
    after = marker.lstat()
    assert (after.st_ino, after.st_ctime_ns) == (before.st_ino, before.st_ctime_ns)
    with pytest.raises(FileExistsError):
        storegen.generate(scratch / "t")


def test_storegen_shape_is_deterministic(scratch: Path) -> None:
    a = storegen.generate(scratch / "a", paths=30, dirs_per_path=4, files_per_dir=3, seed=2)
    storegen.generate(scratch / "b", paths=30, dirs_per_path=4, files_per_dir=3, seed=2)
    assert _listing(scratch / "a") == _listing(scratch / "b")
    singles = sum(1 for n in os.listdir(scratch / "a") if (scratch / "a" / n).is_file())
    assert a.paths == 30
    assert a.dirs == (30 - singles) * 4
    deps = sum(1 for e in _listing(scratch / "a") if "/dep-" in e[0])  # links to other paths
    assert a.files + a.symlinks - deps == (30 - singles) * 4 * 3 + singles
    for path, _mode, _size, target, _ in _listing(scratch / "a"):
        if target:  # every link resolves inside the tree
            assert (scratch / "a" / path).resolve().exists(), (path, target)
    with pytest.raises(ValueError, match="together"):
        storegen.generate(scratch / "c", paths=3, dirs_per_path=2)


def _require_fuse() -> None:
    """Skip (fail, with CI=true) unless the bench can mount."""
    why = _fuse_ready()
    if why:
        if CI:
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)


def _fuse_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for what in ("/dev/fuse", shutil.which("fusermount3"), shutil.which("bindfs")):
        if not what or not os.path.exists(what):
            return f"missing {what or 'fusermount3/bindfs'}"
    return None


@pytest.mark.mount
def test_bench_small_outputs_match_native(scratch: Path) -> None:
    _require_fuse()
    have_noatimefs = importlib.util.find_spec("noatimefs.cli") is not None
    required = ["native", "bindfs", "bindfs-tuned", "floor"] + ["noatimefs"] * have_noatimefs
    data, log = _run_bench(scratch, "--opens=300", f"--require={','.join(required)}")
    assert set(required) <= set(data["modes"]), log
    runs = data["runs"]
    assert {r["workload"] for r in runs} == {
        "find",
        "stat",
        "small_read",
        "big_seq",
        "big_par2",
        "open20k",
    }
    assert [r for r in runs if not r["ok"]] == [], log
    assert len(runs) == 6 * 2 * len(data["modes"])
    assert list((scratch / "results").glob("*.md")), log
    assert not list((scratch / "cache").glob("mnt.*"))


def test_bench_base_mode_runs_the_other_checkouts_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--base DIR``: the A/B arm must import DIR's noatimefs, not the installed one."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_run", run)  # its dataclasses look it up there
    spec.loader.exec_module(run)
    assert run.daemon_cwd("noatimefs", None) == run.REPO
    with pytest.raises(run.MountError, match="needs --base"):
        run.daemon_cwd("noatimefs-base", None)
    with pytest.raises(run.MountError, match="imports noatimefs from"):
        run.daemon_cwd("noatimefs-base", tmp_path)  # no package there: the installed one
    (tmp_path / "noatimefs").mkdir()
    (tmp_path / "noatimefs" / "__init__.py").write_text("")
    assert run.daemon_cwd("noatimefs-base", tmp_path) == tmp_path


def _run_bench(scratch: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = scratch / "bench.out"
    result = scratch / "result.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--small",
        "--reps=1",
        f"--cache={scratch / 'cache'}",
        f"--out={scratch / 'results'}",
        f"--json={result}",
        *args,
    ]
    with open(out, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    log = out.read_text(errors="replace")
    assert rc == 0, log
    with open("/proc/self/mountinfo") as f:
        assert str(scratch) not in f.read()
    return json.loads(result.read_text()), log


_PIN = "--pin=apart" if (os.cpu_count() or 1) >= 2 else "--pin=together"


@pytest.mark.mount
@pytest.mark.parametrize(
    ("modes", "workloads", "extra"),
    [
        # A --per-user view (mode noatimefs-view, the workloads in MNT/<uid>).
        pytest.param("native,noatimefs-view", "find,stat,small_read,open20k,ls", [], id="view"),
        # floor-pass (floorfs --passthrough), everything pinned with --pin.
        pytest.param(
            "native,floor-pass", "find,stat,small_read,open20k,lookup", [_PIN], id="floor-pass"
        ),
    ],
)
def test_bench_small_modes_outputs_match_native(
    scratch: Path, modes: str, workloads: str, extra: list[str]
) -> None:
    """Every workload of each mode answers as native does."""
    _require_fuse()
    data, log = _run_bench(
        scratch,
        f"--modes={modes}",
        f"--require={modes}",
        "--opens=300",
        f"--workloads={workloads}",
        *extra,
    )
    runs = data["runs"]
    assert {(r["mode"], r["workload"]) for r in runs} == {
        (m, w) for m in modes.split(",") for w in workloads.split(",")
    }, log
    assert [r for r in runs if not r["ok"]] == [], log
    assert ("; pinned " in log) == bool(extra), log


@pytest.mark.mount
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--big-top"], id="big-top"),
        pytest.param(
            [
                "--paths=40",
                "--dirs-per-path=3",
                "--files-per-dir=4",
                "--opens=300",
                "--workloads=find,stat,open20k,ls,glob,lookup",
            ],
            id="shaped",
        ),
    ],
)
def test_bench_small_shapes_outputs_match_native(scratch: Path, args: list[str]) -> None:
    """The big top level (ls, glob, lookup, find) and a chosen shape: outputs as native's."""
    _require_fuse()
    modes = "native,noatimefs,bindfs-tuned"
    data, log = _run_bench(scratch, f"--modes={modes}", f"--require={modes}", *args)
    assert data["modes"] == modes.split(","), log
    runs = data["runs"]
    workloads = {r["workload"] for r in runs}
    assert workloads >= {"ls", "glob", "lookup", "find"}, log
    assert [r for r in runs if not r["ok"]] == [], log
    assert len(runs) == len(workloads) * 2 * 3
    shown = {r["workload"]: r["shown"] for r in runs if r["mode"] == "native"}
    assert shown["glob"] == "1 lines", log  # one store path matched
    assert shown["lookup"] == f"{data['summary']['paths']} lstat", log  # all of them (< 10,000)
    if "--big-top" in args:
        assert data["summary"]["paths"] == 2000
        assert data["summary"]["dirs"] < 2000  # one directory per path, some paths a file


@pytest.mark.mount
def test_coldwalk_walks_fresh_daemons_of_two_checkouts(scratch: Path) -> None:
    """bench/coldwalk.py: an A/B of cold walks, one fresh daemon per walk, nothing left."""
    _require_fuse()
    tree = storegen.generate(scratch / "tree", paths=20, files_per_path=5, big_files=0)
    result = scratch / "walks.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "coldwalk.py"),
        str(scratch / "tree"),
        f"--base={REPO}",
        "--reps=1",
        "--printf",
        f"--json={result}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads(result.read_text())
    assert [run["mode"] for run in runs] == ["noatimefs", "noatimefs-base"]
    assert {run["lines"] for run in runs} == {tree.entries + 1}  # and the root
    assert all(run["daemon_read_mib"] >= 0 and run["seconds"] > 0 for run in runs)
    assert "| noatimefs-base |" in done.stdout
    with open("/proc/self/mountinfo") as f:
        assert "noatimefs-coldwalk" not in f.read()
