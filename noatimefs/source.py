"""Safe access to SOURCE: every path is resolved beneath it, never through a symlink.

The daemon keeps one descriptor, on SOURCE's root, for its whole life. Every
other backing object is reached with ``openat2(root, relative_path, ...)`` and
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``: a symlink
anywhere on the way (say a directory of SOURCE swapped for a link to /etc) makes
the call fail with ``ELOOP`` instead of leaving SOURCE, and ``..`` cannot climb
out. The descriptors it returns are short-lived, so the daemon pins nothing in
SOURCE that no caller has open (a store's garbage collector treats every open
descriptor as a root).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable

from noatimefs import mountinfo

_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_CACHED = 0x20  # Linux 5.12
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
O_PATH = getattr(os, "O_PATH", 0o10000000)
_EAGAIN_RETRIES = 3
COLD = -errno.EAGAIN  # open_cached: resolving it would read the disk
#: Paths at least this long are resolved in pieces: one openat2 takes at most PATH_MAX (4096).
_CHUNK = 3072

#: Filesystems this kernel keeps itself, on a disk or in memory, where two things hold
#: that a network or FUSE filesystem does not promise: a regular file's ``read``
#: ignores ``O_NONBLOCK`` (a FUSE server sees it in each read), and a file's ctime is
#: this kernel's clock at its last change (:func:`noatimefs.inodes.settled`). squashfs
#: and erofs are read-only: no file there ever changes or reuses a number. overlay is
#: not one: it hands both questions to its layers, which may be anything.
LOCAL_FILESYSTEMS = frozenset(
    ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "squashfs", "erofs")
)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
# A typed prototype converts plain ints and bytes itself: a call costs ~2 µs less than
# building ctypes objects for every argument (openat2 is on every request's path).
_openat2_syscall = ctypes.CFUNCTYPE(
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    use_errno=True,
)(("syscall", _libc))
_HOW_SIZE = ctypes.sizeof(_OpenHow)
# One read-only open_how per (flags, resolve), built once; threads share them.
_hows: dict[tuple[int, int], _OpenHow] = {}


def _openat2_ctypes(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """``openat2(2)``: the descriptor, or minus the error number (no exception raised)."""
    how = _hows.get((flags, resolve))
    if how is None:
        how = _hows.setdefault((flags, resolve), _OpenHow(flags | os.O_CLOEXEC, 0, resolve))
    fd = _openat2_syscall(_SYS_OPENAT2, dirfd, path, ctypes.addressof(how), _HOW_SIZE)
    return int(fd) if fd >= 0 else -ctypes.get_errno()


_openat2: Callable[[int, bytes, int, int], int] = _openat2_ctypes


def openat2(dirfd: int, path: bytes, flags: int, resolve: int = _RESOLVE) -> int:
    """``openat2(2)``; raises ``OSError`` like ``os.open``."""
    fd = _openat2(dirfd, path, flags, resolve)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd), os.fsdecode(path))
    return fd


class Source:
    """SOURCE, held open by one ``O_PATH`` descriptor on its root."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.root_fd = os.open(path, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._can_ask_cached = True
        # SOURCE's own device told by its mount, which names it even where mountinfo's
        # device does not (a btrfs subvolume's st_dev is an anonymous device of its own).
        root_dev = os.fstat(self.root_fd).st_dev
        self._local = {root_dev: _mount_fstype(self.root_fd) in LOCAL_FILESYSTEMS}

    def close(self) -> None:
        os.close(self.root_fd)

    def check_openat2(self) -> None:
        """Raise ``OSError(ENOSYS)`` when the kernel lacks openat2 (Linux < 5.6)."""
        os.close(self.open(b".", O_PATH))

    def open(self, relpath: bytes, flags: int) -> int:
        """Open *relpath* (``b"."`` for the root) beneath SOURCE, following no symlink.

        With ``O_PATH | O_NOFOLLOW`` a trailing symlink is opened itself. The
        kernel answers ``EAGAIN`` when a rename raced the resolution; that is
        retried a few times before it is passed on. A path longer than one
        ``openat2`` takes (a deep tree a caller reached one ``openat`` at a
        time) is resolved in pieces, each beneath the directory the last one
        reached, with the same restrictions.
        """
        relpath = relpath or b"."
        if len(relpath) < _CHUNK:
            return self._open_at(self.root_fd, relpath, flags)
        dirfd = self.root_fd
        try:
            while len(relpath) >= _CHUNK:
                cut = relpath.rfind(b"/", 0, _CHUNK)
                if cut <= 0:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
                fd = self._open_at(dirfd, relpath[:cut], O_PATH | os.O_DIRECTORY)
                if dirfd != self.root_fd:
                    os.close(dirfd)
                dirfd, relpath = fd, relpath[cut + 1 :]
            return self._open_at(dirfd, relpath, flags)
        finally:
            if dirfd != self.root_fd:
                os.close(dirfd)

    def in_memory(self, relpath: bytes) -> bool:
        """Whether *relpath* resolves from the kernel's caches alone, without reading the disk.

        (``RESOLVE_CACHED``; a kernel older than 5.12 cannot tell, and True is answered.)
        """
        fd = self.open_cached(relpath)
        if fd >= 0:
            os.close(fd)
        return fd != COLD

    def open_cached(self, relpath: bytes) -> int:
        """An ``O_PATH | O_NOFOLLOW`` descriptor on *relpath* if it resolves from the
        kernel's caches alone; else a negative number: :data:`COLD` when resolving it
        would read the disk, another when that cannot be told or it does not resolve.

        No exception is made on the way: a cold lookup of a store path asks this first.
        """
        if not self._can_ask_cached:
            return -errno.EINVAL
        fd = _openat2(self.root_fd, relpath, O_PATH | os.O_NOFOLLOW, _RESOLVE | RESOLVE_CACHED)
        if fd == -errno.EINVAL:
            self._can_ask_cached = False  # a kernel older than 5.12
        return fd

    @staticmethod
    def _open_at(dirfd: int, relpath: bytes, flags: int) -> int:
        for _ in range(_EAGAIN_RETRIES):
            try:
                return openat2(dirfd, relpath, flags)
            except BlockingIOError:
                continue
        return openat2(dirfd, relpath, flags)

    def is_local(self, dev: int) -> bool:
        """Whether the files of device *dev* (an ``st_dev``) are on one of
        :data:`LOCAL_FILESYSTEMS`. Asked on every open: mountinfo is read once per
        device. SOURCE's root's device is told by its mount; another that mountinfo
        does not name (a btrfs subvolume's below SOURCE) is not local."""
        local = self._local.get(dev)
        if local is None:
            local = self._local[dev] = _fstype(dev) in LOCAL_FILESYSTEMS
        return local

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root_fd)


def _fstype(dev: int) -> str | None:
    """The type of the filesystem mounted from device *dev*, None if none is mounted."""
    device = f"{os.major(dev)}:{os.minor(dev)}"
    return next((e.fstype for e in mountinfo.read() if e.device == device), None)


def _mount_fstype(fd: int) -> str | None:
    """The type of the filesystem of the mount *fd* is on (its ``mnt_id``), None if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            fields = dict(line.split(":", 1) for line in info if ":" in line)
        mount_id = int(fields["mnt_id"])
    except (OSError, KeyError, ValueError):
        return None
    return next((e.fstype for e in mountinfo.read() if e.mount_id == mount_id), None)


# -- incarnations -----------------------------------------------------------

_AT_EMPTY_PATH = 0x1000
#: Linux 6.5: a handle to tell files apart, not to open them (AT_REMOVEDIR's value). From 6.7
#: every filesystem gives one: its own handle, or the inode number and generation.
_AT_HANDLE_FID = 0x200
_MAX_HANDLE_SZ = 128  # fcntl.h


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * _MAX_HANDLE_SZ),
    ]


_name_to_handle_at = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
    use_errno=True,
)(("name_to_handle_at", _libc))
_fid_flag = _AT_HANDLE_FID


class _HandleBuffer:
    """One struct file_handle and mount id per thread, reused (no allocation per call)."""

    def __init__(self) -> None:
        self.fh = _FileHandle()
        self.addr = ctypes.addressof(self.fh)
        self.mount_id = ctypes.c_int()
        self.mount_id_addr = ctypes.addressof(self.mount_id)


_buffers = threading.local()


def _buffer() -> _HandleBuffer:
    b: _HandleBuffer | None = getattr(_buffers, "b", None)
    if b is None:
        b = _buffers.b = _HandleBuffer()
    return b


def _name_to_handle_ctypes(dirfd: int, name: bytes, flags: int) -> bytes | int:
    """``name_to_handle_at(2)``: the handle's type and bytes, or minus the error number."""
    b = _buffer()
    b.fh.handle_bytes = _MAX_HANDLE_SZ
    if _name_to_handle_at(dirfd, name, b.addr, b.mount_id_addr, flags) != 0:
        return -ctypes.get_errno()
    return ctypes.string_at(b.addr + 4, b.fh.handle_bytes + 4)


_name_to_handle: Callable[[int, bytes, int], bytes | int] = _name_to_handle_ctypes

# The same two calls without ctypes, when the optional C module was built: a few µs
# less on nearly every request (noatimefs/_syscalls.c).
try:
    from noatimefs import _syscalls
except ImportError:
    native = False
else:
    native = True
    _openat2 = _syscalls.openat2
    _name_to_handle = _syscalls.name_to_handle


def incarnation(dirfd: int, name: bytes = b"") -> bytes | None:
    """Which incarnation of its inode number *name* in *dirfd* is (*dirfd* itself for ``b""``).

    The file handle ``name_to_handle_at(2)`` gives, type and bytes, taken as
    opaque (each filesystem has its own format): on ext4, xfs, btrfs and tmpfs
    it holds the inode's generation, which a new file that reuses a freed inode
    number does not share. A trailing symlink is not followed. None where the
    filesystem gives no handle (``EOPNOTSUPP``); other errors raise ``OSError``.
    """
    global _fid_flag
    handle = _name_to_handle(dirfd, name, _AT_EMPTY_PATH | _fid_flag if not name else _fid_flag)
    if isinstance(handle, bytes):
        return handle
    err = -handle
    if err == errno.EINVAL and _fid_flag:
        _fid_flag = 0  # a kernel older than 6.5: plain handles (the same facts, fewer fs)
        return incarnation(dirfd, name)
    if err in (errno.EOPNOTSUPP, errno.EOVERFLOW):
        return None
    raise OSError(err, os.strerror(err), os.fsdecode(name))


def identify(dirfd: int, name: bytes) -> tuple[os.stat_result, bytes | None]:
    """``lstat`` of *name* in *dirfd* and its :func:`incarnation`, of one and the same file.

    Both are taken through one short-lived ``O_PATH | O_NOFOLLOW`` descriptor on
    *name*, which holds the file while they are (a name replaced between an
    ``lstat`` and a handle taken by name would pair one file's attributes with
    another's incarnation). *name* is one path component, as FUSE sends it.
    """
    return identify_open(os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd))


def identify_open(fd: int) -> tuple[os.stat_result, bytes | None]:
    """:func:`identify` of the file *fd* is open on (``O_PATH`` will do); closes *fd*."""
    try:
        return os.fstat(fd), incarnation(fd)
    finally:
        os.close(fd)


def proc_path(fd: int) -> str:
    """The ``/proc/self/fd`` path of *fd*, through which ``O_PATH`` descriptors take xattr calls."""
    return f"/proc/self/fd/{fd}"
