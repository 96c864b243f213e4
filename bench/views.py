#!/usr/bin/env python3
"""What views cost: bytes per remembered inode with N active views (``--per-user``).

Mounts a store-shaped tree with ``noatimefs --per-user --allow-other``, then, for
each of N uids (20000, 20001, …: no passwd entries, as Nix's auto-allocated
build uids), walks the whole tree through ``MNT/self`` as that uid (``find``,
which looks up every entry: readdirplus makes the kernel remember each one).
The daemon's status then gives its RSS and the inodes it remembers; the report
is (RSS after − RSS before the walks) / (inodes after − before). Then
``drop_caches`` makes the kernel forget what nobody uses, and the report shows
what the views still hold.

    .venv/bin/python bench/views.py --views 32 --paths 300

Run as root. Prints one JSON object (and a line per step on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from noatimefs import storegen  # noqa: E402

STATUS_XATTR = "user.noatimefs.status"
FIRST_UID = 20000


def status(mnt: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(os.getxattr(mnt, STATUS_XATTR))
    return result


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes], deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while True:
        with open("/proc/self/mountinfo") as f:
            if any(line.split(" ", 5)[4] == str(mnt) for line in f):
                return
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"views: the daemon did not mount (exit {proc.poll()})")
        time.sleep(0.05)


def walk_as(uid: int, mnt: Path) -> None:
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    subprocess.run([*prefix, "find", f"{mnt}/self/", "-printf", ""], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--paths", type=int, default=300, help="store paths in the tree")
    parser.add_argument("--cache", default="/var/tmp/noatimefs-bench", help="tree cache")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("views: error: run as root", file=sys.stderr)
        return 2
    dest = Path(args.cache) / f"views-p{args.paths}"
    summary = storegen.ensure_tree(dest, paths=args.paths, seed=11, big_files=0)
    os.chmod(args.cache, 0o755)
    with tempfile.TemporaryDirectory(prefix="noatimefs-views-") as work:
        os.chmod(work, 0o755)
        mnt = Path(work) / "mnt"
        mnt.mkdir()
        argv = [
            sys.executable,
            "-m",
            "noatimefs",
            "--per-user",
            "--allow-other",
            str(dest),
            str(mnt),
        ]
        with open(Path(work) / "daemon.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO)
        try:
            wait_mounted(mnt, proc)
            before = after = status(mnt)
            t0 = time.monotonic()
            for i in range(args.views):
                walk_as(FIRST_UID + i, mnt)
                # Another process's drop_caches makes the kernel forget inodes: keep the
                # fullest snapshot (the machine may be shared).
                now = status(mnt)
                if now["inodes"] >= after["inodes"]:
                    after = now
            walked = time.monotonic() - t0
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("2\n")
            forgotten = status(mnt)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            proc.wait(30)
    inodes = after["inodes"] - before["inodes"]
    report = {
        "tree_entries": summary.entries,
        "views": len(after["views"]),
        "walk_seconds": round(walked, 2),
        "inodes_remembered": after["inodes"],
        "rss_before": before["rss"],
        "rss_after": after["rss"],
        "bytes_per_inode": round((after["rss"] - before["rss"]) / max(inodes, 1)),
        "inodes_per_view": sorted({v["inodes"] for v in after["views"].values()}),
        "listing_cache_entries": after["listing_cache_entries"],
        "after_drop_caches_inodes": forgotten["inodes"],
        "after_drop_caches_rss": forgotten["rss"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
