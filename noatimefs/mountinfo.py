"""What is mounted where: /proc/self/mountinfo, and dead FUSE mounts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    device: str  # major:minor of the mounted filesystem
    mountpoint: str
    fstype: str
    source: str
    options: frozenset[str]  # per-mount and per-superblock options together


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for space, ...) mountinfo uses."""
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def parse(text: str) -> list[MountEntry]:
    """Parse the text of a mountinfo file (proc(5))."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    device=fields[2],
                    mountpoint=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    options=frozenset(fields[5].split(",") + fields[sep + 3].split(",")),
                )
            )
        except (ValueError, IndexError):
            continue
    return entries


def read(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


def find(mountpoint: str, path: str = "/proc/self/mountinfo") -> MountEntry | None:
    """The topmost mount on *mountpoint* (an absolute, normalised path), if any."""
    found = None
    for entry in read(path):
        if entry.mountpoint == mountpoint:
            found = entry
    return found
