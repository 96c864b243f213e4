"""openat2 and name_to_handle_at: the C module and ctypes make the same calls, to the same end.

``noatimefs._syscalls`` is optional (the daemon falls back on ctypes), but the
install this suite runs from builds it: its absence is a failure here, so a
broken build does not pass unnoticed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from noatimefs import source
from noatimefs.source import (
    _AT_EMPTY_PATH,
    _RESOLVE,
    O_PATH,
    RESOLVE_CACHED,
    _name_to_handle_ctypes,
    _openat2_ctypes,
    identify,
    incarnation,
)


def test_the_c_module_is_built_and_used() -> None:
    assert source.native, "noatimefs._syscalls was not built: the daemon uses ctypes"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "file").write_bytes(b"x")
    (tmp_path / "d" / "link").symlink_to("file")
    (tmp_path / "linkdir").symlink_to("d")
    os.mkfifo(tmp_path / "d" / "fifo")
    return tmp_path


@pytest.fixture
def root(tree: Path) -> Iterator[int]:
    fd = os.open(tree, O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def _outcome(fd: int) -> str | int:
    """What an open gave: the file type and close-on-exec of a descriptor (closed), or -errno."""
    if fd < 0:
        return fd
    try:
        st = os.fstat(fd)
        return f"{st.st_mode >> 12:o} cloexec={not os.get_inheritable(fd)}"
    finally:
        os.close(fd)


CASES = [
    (b"d/file", os.O_RDONLY),
    (b"d/file", O_PATH | os.O_NOFOLLOW),
    (b"d/link", os.O_RDONLY | os.O_NOFOLLOW),  # ELOOP
    (b"d/link", O_PATH | os.O_NOFOLLOW),  # the link itself
    (b"linkdir/file", os.O_RDONLY),  # a link on the way: ELOOP
    (b"../etc", O_PATH),  # beneath: EXDEV
    (b"d/missing", O_PATH),  # ENOENT
    (b"d/fifo", os.O_RDONLY | os.O_NONBLOCK),
    (b"d", O_PATH | os.O_DIRECTORY),
    (b"d/file", O_PATH | os.O_DIRECTORY),  # ENOTDIR
]


@pytest.mark.parametrize(("path", "flags"), CASES)
@pytest.mark.parametrize("resolve", [_RESOLVE, _RESOLVE | RESOLVE_CACHED])
def test_openat2_agrees(root: int, path: bytes, flags: int, resolve: int) -> None:
    native = source._openat2  # the C module's, as test_the_c_module_is_built_and_used checks
    got = _outcome(native(root, path, flags, resolve))
    assert got == _outcome(_openat2_ctypes(root, path, flags, resolve))
    if (path, flags, resolve) == (b"d/file", os.O_RDONLY, _RESOLVE):
        assert got == f"{0o10:o} cloexec=True"
    if (path, resolve) == (b"../etc", _RESOLVE):
        assert got == -errno.EXDEV


@pytest.mark.parametrize("name", [b"file", b"link", b"sub", b"fifo", b"missing", b""])
def test_name_to_handle_agrees(root: int, name: bytes) -> None:
    d = os.open(b"d", O_PATH, dir_fd=root)
    try:
        flags = source._fid_flag | (_AT_EMPTY_PATH if not name else 0)
        got = source._name_to_handle(d, name, flags)
        assert got == _name_to_handle_ctypes(d, name, flags)
        if name == b"missing":
            assert got == -errno.ENOENT
        else:
            assert isinstance(got, bytes)
            assert len(got) > 4
    finally:
        os.close(d)


def test_incarnation_and_identify_are_the_same_without_the_c_module(
    root: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = os.open(b"d", O_PATH, dir_fd=root)
    try:
        with_c = [incarnation(d, b"file"), incarnation(d), identify(d, b"link")[1]]
        monkeypatch.setattr(source, "_name_to_handle", _name_to_handle_ctypes)
        monkeypatch.setattr(source, "_openat2", _openat2_ctypes)
        assert [incarnation(d, b"file"), incarnation(d), identify(d, b"link")[1]] == with_c
        with pytest.raises(FileNotFoundError):
            incarnation(d, b"missing")
    finally:
        os.close(d)
