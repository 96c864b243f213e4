"""Cold walks through a fresh daemon, A/B: the time, and who read the disk.

    .venv/bin/python bench/coldwalk.py TREE [--base DIR] [--reps N] [--printf] [--warm-source]

Each run mounts TREE anew (``bench/run.py``'s modes ``noatimefs`` and, with
``--base``, ``noatimefs-base``: another checkout), drops the kernel's caches,
walks the mount with GNU ``find`` as ``--owner`` (``-printf '%y %s'`` with
``--printf``) and unmounts. Runs of the two checkouts alternate. Reported per
run: the walk's seconds, the daemon's own user and system CPU, and the bytes
the daemon and its walk-ahead helper each had read from the disk
(``/proc/PID/io``, ``read_bytes``). ``bench/run.py``'s cold rows keep one
daemon for the whole run and count the helper's CPU in the daemon's; this
tells the two apart: a helper that walks ahead of the caller leaves the
daemon little to read itself. ``--warm-source`` reads TREE's metadata into
memory first instead of dropping caches: the daemon's and the kernel's FUSE
caches are still empty (a fresh daemon over a warm store).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: mounts, modes, drop_caches)


def process_facts(process: psutil.Process) -> tuple[int, float, float]:
    """(bytes read from the disk, user CPU s, system CPU s) of *process* so far."""
    times = process.cpu_times()
    return process.io_counters().read_bytes, times.user, times.system


def walk_once(mode: str, tree: str, workdir: Path, args: argparse.Namespace) -> dict[str, object]:
    m = bench.start_mount(mode, tree, workdir, args.owner, args.base)
    try:
        if args.warm_source:
            subprocess.run(["find", tree, "-printf", "%s\n"], stdout=subprocess.DEVNULL, check=True)
        else:
            bench.drop_caches()
        assert m.proc is not None
        process = psutil.Process(m.proc.pid)
        before = process_facts(process)
        find = ["find", m.root, *(["-printf", "%y %s\n"] if args.printf else [])]
        started = time.perf_counter()
        out = subprocess.run(
            ["runuser", "-u", args.owner, "--", *find], capture_output=True, check=True
        ).stdout
        seconds = time.perf_counter() - started
        daemon = process_facts(process)
        helpers = [process_facts(child) for child in process.children()]
    finally:
        bench.stop_mount(m)  # (and removes the mountpoint)
    return {
        "mode": mode,
        "seconds": round(seconds, 3),
        "lines": out.count(b"\n"),
        "daemon_user": round(daemon[1] - before[1], 2),
        "daemon_sys": round(daemon[2] - before[2], 2),
        "daemon_read_mib": round((daemon[0] - before[0]) / (1 << 20), 1),
        "helper_cpu": round(sum(h[1] + h[2] for h in helpers), 2),
        "helper_read_mib": round(sum(h[0] for h in helpers) / (1 << 20), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", help="a store-shaped tree (bench/run.py keeps them in its cache)")
    parser.add_argument("--base", type=Path, help="another checkout, run as noatimefs-base")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--owner", default="nobody")
    parser.add_argument("--printf", action="store_true", help="find -printf '%%y %%s'")
    parser.add_argument("--warm-source", action="store_true", help="no drop_caches")
    parser.add_argument("--json", type=Path, help="also write every run here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("coldwalk: error: run as root (mounts, drop_caches)", file=sys.stderr)
        return 2
    modes = ["noatimefs", *(["noatimefs-base"] if args.base else [])]
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="noatimefs-coldwalk.") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # the owner must reach the mountpoints
        for rep in range(1, args.reps + 1):
            for mode in modes:
                run = {"rep": rep, **walk_once(mode, args.tree, workdir, args)}
                runs.append(run)
                print(json.dumps(run), flush=True)
    if len({run["lines"] for run in runs}) != 1:
        print("coldwalk: error: the walks listed different numbers of entries", file=sys.stderr)
        return 1
    print("\n| mode | median s | per run | daemon user / sys s | read by daemon / helper MiB |")
    print("|---|---:|---|---|---|")
    for mode in modes:
        mine = [run for run in runs if run["mode"] == mode]

        def med(key: str, mine: list[dict[str, object]] = mine) -> float:
            return statistics.median(float(str(run[key])) for run in mine)

        per_run = " ".join(f"{run['seconds']:.2f}" for run in mine)
        print(
            f"| {mode} | {med('seconds'):.2f} | {per_run} | "
            f"{med('daemon_user'):.2f} / {med('daemon_sys'):.2f} | "
            f"{med('daemon_read_mib'):.0f} / {med('helper_read_mib'):.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
