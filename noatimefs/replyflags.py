"""Reply fields pyfuse3 cannot set: the kernel's cache of directory listings, bare entries.

The kernel can keep a FUSE directory's listing and serve ``getdents`` from it
without asking the daemon (``FOPEN_CACHE_DIR``), also across opens
(``FOPEN_KEEP_CACHE``); both are flags of the OPENDIR reply. pyfuse3 3.5 sets
only the file handle of that reply. The C module ``noatimefs._replyflags``
defines ``fuse_reply_open`` so that bits of the handle become those flags (its
source says how); :func:`load` puts it where pyfuse3's extension finds it
before libfuse.

The handle bits are always safe to send: without the C module they reach the
kernel as part of the handle, come back in READDIR and RELEASEDIR, and
:func:`strip` removes them. :func:`inactive` tells the daemon that this
happened, so it stops asking.

The module also carries readdirplus entries without attributes ("bare", node
id 0: :mod:`noatimefs.listing`). Those are *not* safe without it, so the daemon
sends one only once :func:`carries_bare` has seen an entry go through the module.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

#: fh bits the C module turns into FOPEN_CACHE_DIR and FOPEN_KEEP_CACHE
#: (keep in step with ``_replyflags.c``). Handles are small counters, far below.
CACHE_DIR = 1 << 63
KEEP_CACHE = 1 << 62
FLAGS = CACHE_DIR | KEEP_CACHE

_module: object | None = None


def load() -> bool:
    """Load the C module into the global symbol scope (once); whether it is there.

    Must run before pyfuse3 answers its first open: pyfuse3's extension binds
    ``fuse_reply_open`` at its first call (or at import, if it was linked with
    ``-z now``, hence the call from ``noatimefs/__init__.py``).
    """
    global _module
    if _module is not None:
        return True
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from noatimefs import _replyflags  # type: ignore[attr-defined]
    except ImportError as exc:
        log.debug("no kernel listing cache: %s", exc)
        return False
    finally:
        sys.setdlopenflags(flags)
    _module = _replyflags
    return True


def loaded() -> bool:
    return _module is not None


def applied() -> int:
    """How many open replies the C module has flagged (0 if it is not loaded)."""
    return int(_module.applied()) if _module is not None else 0  # type: ignore[attr-defined]


def entries() -> int:
    """How many readdirplus entries went through the C module (0 if it is not loaded)."""
    return int(_module.entries()) if _module is not None else 0  # type: ignore[attr-defined]


def carries_bare() -> bool:
    """Whether readdirplus entries go through the C module, which sends bare entries
    (``noatimefs.listing``, "Bare entries"): once one has, every later one does."""
    global _carries_bare
    if not _carries_bare:
        _carries_bare = entries() > 0
    return _carries_bare


_carries_bare = False


def handle(fh: int, *, keep: bool) -> int:
    """*fh* marked for a reply with ``FOPEN_CACHE_DIR`` (and ``FOPEN_KEEP_CACHE`` if *keep*)."""
    return fh | CACHE_DIR | (KEEP_CACHE if keep else 0)


def strip(fh: int) -> int:
    """*fh* as the daemon numbered it (the bits are gone if the C module carried them)."""
    return fh & ~FLAGS


def inactive(fh: int) -> bool:
    """Whether the kernel got *fh* with the bits still set: the C module did not carry them."""
    return fh & FLAGS != 0
