"""``make demo``: the main job, shown on a small built-in store (run as root).

Builds a root-owned, read-only store-like tree in a temporary directory, shows
that an unprivileged user's ``open(O_RDONLY | O_NOATIME)`` fails on it with
``EPERM``, mounts it with noatimefs presented to that user, shows the same open
succeeding with the same bytes and the daemon counting the dropped flag, then
unmounts and removes everything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USER = "nobody"
_PROBE = r"""
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
        out[path] = os.read(fd, 200).decode()
        os.close(fd)
    except OSError as exc:
        out[path] = "error: " + os.strerror(exc.errno) + " (" + str(exc.errno) + ")"
print(json.dumps(out))
"""


def build_store(root: Path) -> Path:
    store = root / "store"
    pkg = store / "0f3kq8w1c9x2zjv7lmd5a6r4y0b8n2hs-hello-2.12"
    (pkg / "bin").mkdir(parents=True)
    (pkg / "share").mkdir()
    (pkg / "bin" / "hello").write_text("#!/bin/sh\necho 'Hello from the store'\n")
    (pkg / "share" / "greeting.txt").write_text("hello, world\n")
    for path in sorted(store.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() or path.name == "hello" else 0o444)
    store.chmod(0o755)
    return pkg / "share" / "greeting.txt"


def probe(*paths: Path) -> dict[str, str]:
    """Open each path with O_NOATIME as the unprivileged user; what each open gave."""
    argv = ["setpriv", "--reuid", USER, "--regid", "65534", "--clear-groups", "/usr/bin/python3"]
    done = subprocess.run(
        [*argv, "-c", _PROBE, *map(str, paths)], capture_output=True, text=True, check=True
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


def wait_mounted(mountpoint: Path, daemon: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == str(mountpoint) for line in f):
                return
        if daemon.poll() is not None:
            raise SystemExit(f"noatimefs exited with {daemon.returncode} before mounting")
        time.sleep(0.05)
    raise SystemExit("noatimefs did not mount in time")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("the demo builds a root-owned store: run it as root (sudo make demo)")
        return 2
    root = Path(tempfile.mkdtemp(prefix="noatimefs-demo."))
    root.chmod(0o755)
    mountpoint = root / "mnt"
    mountpoint.mkdir()
    daemon = None
    try:
        greeting = build_store(root)
        store = root / "store"
        relative = greeting.relative_to(store)
        say(f"a root-owned store at {store}")
        subprocess.run(["ls", "-ln", str(greeting.parent)], check=True)

        say(f"as {USER}: open(O_RDONLY|O_NOATIME) on the store itself")
        print(f"  {greeting}: {probe(greeting)[str(greeting)]}")

        say(f"noatimefs --owner {USER} --allow-other {store} {mountpoint}")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "noatimefs", "--owner", USER, "--allow-other"]
            + [str(store), str(mountpoint)]
        )
        wait_mounted(mountpoint, daemon, time.monotonic() + 20)
        subprocess.run(["ls", "-ln", str(mountpoint / relative.parent)], check=True)

        say(f"as {USER}: the same open through the mount")
        through = mountpoint / relative
        print(f"  {through}: {probe(through)[str(through)]!r}")

        say("the daemon's counters (getfattr -n user.noatimefs.status MOUNTPOINT)")
        status = json.loads(os.getxattr(mountpoint, "user.noatimefs.status"))
        shown = ("noatime_dropped", "noatime_kept", "dropped_by_process", "opens", "inodes")
        print("  " + json.dumps({key: status[key] for key in shown}))
    finally:
        if daemon is not None:
            say(f"fusermount3 -u {mountpoint}")
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
            try:
                print(f"  noatimefs exited with {daemon.wait(timeout=20)}")
            except subprocess.TimeoutExpired:
                daemon.kill()
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
