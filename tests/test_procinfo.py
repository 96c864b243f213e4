"""Process facts (psutil, /proc): names, thread groups, supplementary groups."""

from __future__ import annotations

import os
import threading

from noatimefs import procinfo


def test_thread_maps_to_its_process() -> None:
    seen: list[int] = []
    thread = threading.Thread(
        target=lambda: seen.append(procinfo.process_of(threading.get_native_id()))
    )
    thread.start()
    thread.join()
    assert seen == [os.getpid()]


def test_gone_process() -> None:
    assert procinfo.process_of(2**22 + 12345) == 2**22 + 12345
    assert procinfo.name(2**22 + 12345) == "?"
    assert procinfo.groups(2**22 + 12345) == frozenset()


def test_describe_escapes_unprintable_names() -> None:
    assert procinfo.printable("evil\nINFO: forged") == "evil\\nINFO: forged"
    assert procinfo.describe(os.getpid()).startswith(f"{os.getpid()} (")


def test_groups_of_self() -> None:
    assert procinfo.groups(os.getpid()) == frozenset(os.getgroups())
