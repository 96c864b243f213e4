"""noatimefs: a read-only FUSE re-export that drops O_NOATIME for non-owners."""

from __future__ import annotations

__version__ = "0.1.0"
