"""noatimefs: a read-only FUSE re-export that drops O_NOATIME for non-owners."""

from __future__ import annotations

from noatimefs import replyflags

__version__ = "0.1.0"

# Before anything imports pyfuse3: see replyflags.load.
replyflags.load()
