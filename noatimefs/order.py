"""The order listings are served in: by cookie, a keyed 63-bit hash of each name.

Every listing the daemon serves is in cookie order, and a readdir offset is
the cookie of the last entry sent (:mod:`noatimefs.listing`, "Offsets"). A
walk of the mount (``find``, ``tar``) therefore visits each directory's
entries in cookie order, and the walk-ahead helper (:mod:`noatimefs.walkahead`)
must walk in that same order to stay ahead of it: a helper that walked in
SOURCE's own ``getdents`` order warmed store paths the walker reached only
much later, and the daemon read the disk itself (a cold ``find`` of the
store shape: 7.96 s against 5.95 s, bench/README.md).

The helper is another process, so the cookie cannot be Python's ``hash``
(seeded per process): it is BLAKE2s with a random key the daemon draws at
start and hands to its helper (:data:`KEY_VARIABLE`, in the helper's
environment, which only its own user and root can read). A keyed hash keeps
the property ``hash`` gave: no one who can name a store path can choose two
names with one cookie (which would hide one of them from a readdir resumed
between them). About 0.6 µs a name, paid once per listed entry.
"""

from __future__ import annotations

import hashlib
import os

#: The helper's environment variable holding the daemon's key, in hex.
KEY_VARIABLE = "NOATIMEFS_ORDER_KEY"

_KEY_BYTES = 16
_key = os.urandom(_KEY_BYTES)


def use(new_key: bytes) -> None:
    """Order as the process that drew *new_key* does (the helper, the daemon's key)."""
    global _key
    if len(new_key) != _KEY_BYTES:
        raise ValueError(f"an order key has {_KEY_BYTES} bytes, not {len(new_key)}")
    _key = new_key


def use_environment() -> None:
    """:func:`use` the key in :data:`KEY_VARIABLE`, if it is set (the helper, at start)."""
    value = os.environ.pop(KEY_VARIABLE, None)
    if value is not None:
        use(bytes.fromhex(value))


def environment() -> dict[str, str]:
    """The environment for a helper that orders as this process does."""
    return {**os.environ, KEY_VARIABLE: _key.hex()}


def cookie(name: bytes) -> int:
    """The readdir offset that goes on after the entry *name*: positive, below 2⁶³."""
    digest = hashlib.blake2s(name, digest_size=8, key=_key).digest()
    return int.from_bytes(digest, "little") >> 1 or 1


def ordered(names: list[bytes]) -> list[bytes]:
    """*names*, sorted in place in cookie order."""
    names.sort(key=cookie)
    return names
