#!/usr/bin/env python3
"""Profile a Python daemon (noatimefs or the floor) under the metadata workloads with py-spy.

    .venv/bin/pip install py-spy        # a tool for this script, not a dependency
    .venv/bin/python bench/profile.py [--mode noatimefs] [--workloads find,stat,open20k]

It mounts the mode on the benchmark's cached tree (the same arguments as
``run.py``), attaches ``py-spy record`` to the daemon for each workload (cold
and warm), and sums the samples by FUSE handler (the outermost frame of the
daemon's own code) and, within a handler, by leaf function.  Samples with no
handler frame are pyfuse3's and trio's dispatch (the Cython parts of pyfuse3
are invisible to py-spy without ``--native``; they show as the nearest Python
frame).  Raw stacks are kept beside the report for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import run as bench

from noatimefs import storegen

HANDLERS = frozenset(
    [
        "lookup",
        "forget",
        "getattr",
        "readlink",
        "statfs",
        "open",
        "read",
        "release",
        "opendir",
        "readdir",
        "releasedir",
        "getxattr",
        "listxattr",
        "access",
    ]
)
FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def classify(stack: list[str], own: str) -> tuple[str, str]:
    """(category, leaf) for one sampled stack, outermost frame first.

    The category is the FUSE handler of the daemon's own code on the stack, if
    any; else where the event loop was: waiting in or handling epoll, in
    pyfuse3's Cython request loop (its frames are invisible: the sample lands on
    pyfuse3's Python wrapper around it), or elsewhere in trio.
    """
    frames = [m for m in map(FRAME.match, stack) if m]
    leaf = f"{frames[-1]['func']} ({os.path.basename(frames[-1]['file'])})" if frames else "?"
    for m in frames:
        if own in m["file"] and m["func"].rpartition(".")[2] in HANDLERS:
            return m["func"].rpartition(".")[2], leaf
    last = frames[-1]["func"] if frames else ""
    if "_io_epoll" in (frames[-1]["file"] if frames else "") and "get_events" in last:
        return "trio: epoll_wait and events", leaf
    if last == "async_wrapper.<locals>.wrapper":
        return "pyfuse3: Cython request loop (decode, dispatch, reply)", leaf
    if any("_pyfuse3.py" in m["file"] for m in frames):
        return "pyfuse3/trio: task switches of a request", leaf
    return "trio: scheduler, other", leaf


def summarize(raw: Path, own: str, top: int = 5) -> tuple[int, list[str]]:
    by_handler: collections.Counter[str] = collections.Counter()
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        # py-spy prefixes the thread ("process 12:...;thread (0x..)"): keep code frames only.
        stack = [
            f for f in stack_text.split(";") if "(" in f and not f.startswith(("process", "thread"))
        ]
        handler, leaf = classify(stack, own)
        by_handler[handler] += n
        leaves[handler][leaf] += n
        total += n
    lines = []
    for handler, n in by_handler.most_common():
        top_leaves = ", ".join(
            f"{leaf} {100 * k / n:.0f}%" for leaf, k in leaves[handler].most_common(top)
        )
        lines.append(f"| {handler} | {n} | {100 * n / max(total, 1):.1f}% | {top_leaves} |")
    return total, lines


def request_counts(m: bench.Mount, timeout: float = 10.0) -> dict[str, int]:
    """Ask floorfs (SIGUSR1) for its request counts since the last ask, from its log."""
    assert m.proc is not None
    assert m.log is not None
    start = m.log.stat().st_size
    m.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(m.log, "rb") as f:
            f.seek(start)
            for line in f.read().decode(errors="replace").splitlines():
                if " calls {" in line:
                    counts: dict[str, int] = json.loads(line.split(" calls ", 1)[1])
                    return counts
        time.sleep(0.05)
    raise RuntimeError(f"no request counts from {m.mode}:\n{m.log_tail()}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="noatimefs", choices=["noatimefs", "floor", "floor-fast"])
    p.add_argument("--workloads", default="find,stat,open20k")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--small", action="store_true")
    p.add_argument("--owner", default="nobody")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cache", default="/var/tmp/noatimefs-bench")
    p.add_argument("--out", default=str(bench.HERE / "results"))
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not pyspy:
        print("profile: error: py-spy not found (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    scale = bench.SMALL if args.small else bench.FULL
    gen = {
        "paths": scale.paths,
        "files_per_path": scale.files_per_path,
        "big_files": scale.big_files,
        "big_size": scale.big_size,
        "seed": args.seed,
    }
    key = bench.tree_key(gen)
    cache = Path(args.cache)
    summary = storegen.ensure_tree(cache / f"tree-{key}", **gen)
    listfile = bench.file_list(summary, cache / f"tree-{key}.files")
    wl = bench.Workloads(summary, args.owner, scale.opens, str(listfile))
    own = "noatimefs/" if args.mode == "noatimefs" else "floorfs.py"
    counting = args.mode.startswith("floor")  # floorfs counts requests by type
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = [f"# py-spy profile of {args.mode} ({summary.entries} entries, {args.rate} Hz)", ""]
    workdir = Path(tempfile.mkdtemp(prefix="mnt.", dir=cache))
    workdir.chmod(0o755)
    try:
        with bench.mounts([args.mode], summary.dest, workdir, args.owner) as active:
            m = active[args.mode]
            assert m.pid is not None
            for w in args.workloads.split(","):
                for c in ("cold", "warm"):
                    if c == "cold":
                        bench.drop_caches()
                    raw = out / f"{stamp}-profile-{args.mode}-{w}-{c}.txt"
                    spy = subprocess.Popen(
                        [
                            pyspy,
                            "record",
                            "-p",
                            str(m.pid),
                            "-r",
                            str(args.rate),
                            "-f",
                            "raw",
                            "-o",
                            str(raw),
                            "--threads",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1.0)  # let py-spy attach (not a synchronisation the result needs)
                    if counting:
                        request_counts(m)  # reset: the forgets after drop_caches are not the run's
                    cpu0 = m.cpu()
                    o = wl.get(w)(m.root)
                    cpu = m.cpu() - cpu0
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                    total, lines = summarize(raw, own)
                    calls = request_counts(m) if counting else {}
                    n = sum(calls.values())
                    per = f", {1e6 * cpu / n:.0f} µs CPU per request" if n else ""
                    report += [
                        f"## {w} {c}: {o.seconds:.2f}s, daemon CPU {cpu:.2f}s, {o.shown}{per}",
                        "",
                        *(
                            [f"requests: {n} = {json.dumps(calls, sort_keys=True)}", ""]
                            if n
                            else []
                        ),
                        "| handler | samples | share | top leaf functions (share of handler) |",
                        "|---|---:|---:|---|",
                        *lines,
                        "",
                    ]
                    print(f"{w} {c}: {o.seconds:.2f}s, {total} samples", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(report)
    print(text)
    path = out / f"{stamp}-profile-{args.mode}.md"
    path.write_text(text)
    print(f"written: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
