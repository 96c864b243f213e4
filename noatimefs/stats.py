"""Counters the daemon keeps about what it did, and the once-per-process drop log."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from noatimefs import procinfo

log = logging.getLogger(__name__)

_LOGGED_MAX = 10_000


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    opens: int = 0
    noatime_kept: int = 0
    noatime_dropped: int = 0
    invalidations: int = 0
    reads_waited: int = 0  # reads that found the data not in SOURCE's page cache
    readdirs: int = 0  # READDIR requests: the listings the kernel did not serve itself
    lookups_kept: int = 0  # top-level lookups answered from the kept listing, not SOURCE
    lookups_listed: int = 0  # lookups below the top answered from the parent's cached listing
    lookups_bare: int = 0  # lookups below the top of a name its cached listing has bare
    checks_settled: int = 0  # identity checks of settled files: no incarnation asked (inodes)
    kept_by_process: Counter[str] = field(default_factory=Counter)
    dropped_by_process: Counter[str] = field(default_factory=Counter)
    _logged: set[int] = field(default_factory=set)

    def kept(self, tid: int) -> None:
        self.noatime_kept += 1
        self.kept_by_process[procinfo.name(procinfo.process_of(tid))] += 1

    def dropped(self, tid: int, uid: int, path: bytes, file_uid: int) -> None:
        """Count a dropped ``O_NOATIME``; log it once per caller process.

        FUSE names the calling *thread*; QEMU opens from a pool of worker
        threads, so the count and the log are keyed by the thread's process.
        """
        self.noatime_dropped += 1
        pid = procinfo.process_of(tid)
        self.dropped_by_process[procinfo.name(pid)] += 1
        if pid in self._logged:
            return
        if len(self._logged) >= _LOGGED_MAX:
            self._logged.clear()
        self._logged.add(pid)
        log.info(
            "O_NOATIME dropped: pid %s uid %d opened %r owned by uid %d "
            "(further drops by this process are counted, not logged)",
            procinfo.describe(pid),
            uid,
            path.decode("utf-8", "backslashreplace") or ".",
            file_uid,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "uptime": round(time.time() - self.started, 3),
            "opens": self.opens,
            "noatime_kept": self.noatime_kept,
            "noatime_dropped": self.noatime_dropped,
            "invalidations": self.invalidations,
            "reads_waited": self.reads_waited,
            "readdirs": self.readdirs,
            "lookups_kept": self.lookups_kept,
            "lookups_listed": self.lookups_listed,
            "lookups_bare": self.lookups_bare,
            "checks_settled": self.checks_settled,
            "kept_by_process": dict(self.kept_by_process),
            "dropped_by_process": dict(self.dropped_by_process),
        }
