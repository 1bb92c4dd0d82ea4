"""A deterministic writer of cpio "newc" archives (the initramfs format).

No I/O here: entries go in, bytes come out.  The same inputs always give the
same bytes (fixed mtimes, owner root, inode numbers assigned in sorted order),
so an initramfs can be cached by the hash of its inputs.

Primer (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
each entry is a 110-byte ASCII header ``070701`` followed by thirteen 8-digit
hex fields (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
rdevmajor, rdevminor, namesize, check), then the NUL-terminated name padded to
a multiple of 4 bytes (counting the header), then the data padded to 4.  A
symlink's data is its target.  The archive ends with an entry named
``TRAILER!!!``.  Names have no leading slash.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110


class CpioError(ValueError):
    """An entry that cannot be represented in a newc archive."""


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int              # file type bits | permission bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    mtime: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _normalise(name: str) -> str:
    name = name.strip("/")
    if not name:
        raise CpioError("empty path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CpioError(f"path {name!r} has empty, '.' or '..' components")
    return name


class CpioArchive:
    """Collects entries; parents are created as 0755 directories on demand."""

    def __init__(self, mtime: int = 0) -> None:
        self._entries: dict[str, CpioEntry] = {}
        self._mtime = mtime

    def __contains__(self, name: str) -> bool:
        return _normalise(name) in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _add(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        name = _normalise(name)
        self._ensure_parents(name)
        old = self._entries.get(name)
        if old is not None and not (stat.S_ISDIR(old.mode) and stat.S_ISDIR(mode)):
            raise CpioError(f"duplicate entry {name!r}")
        self._entries[name] = CpioEntry(name, mode, data, rdev, self._mtime)

    def _ensure_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = CpioEntry(parent, stat.S_IFDIR | 0o755, mtime=self._mtime)
            elif not stat.S_ISDIR(existing.mode):
                raise CpioError(f"{parent!r} is not a directory")

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._add(name, stat.S_IFDIR | (perm & 0o7777))

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | (perm & 0o7777), bytes(data))

    def add_symlink(self, name: str, target: str) -> None:
        if not target:
            raise CpioError(f"symlink {name!r} has an empty target")
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(name, stat.S_IFCHR | (perm & 0o7777), rdev=(major, minor))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, name in enumerate(sorted(self._entries), start=1):
            e = self._entries[name]
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            out += encode_entry(ino, e.mode, nlink, e.mtime, e.rdev, name, e.data)
        out += encode_entry(0, 0, 1, 0, (0, 0), TRAILER, b"")
        return bytes(out)


def encode_entry(ino: int, mode: int, nlink: int, mtime: int,
                 rdev: tuple[int, int], name: str, data: bytes) -> bytes:
    """One newc header + name + data, each padded to a 4-byte boundary."""
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    for f in fields:
        if not 0 <= f <= 0xFFFF_FFFF:
            raise CpioError(f"field value {f} of {name!r} does not fit in 32 bits")
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + raw_name + _pad4(HEADER_SIZE + len(raw_name)) + data + _pad4(len(data))


def parse(archive: bytes) -> list[CpioEntry]:
    """Read a newc archive back (for tests and `images paths --verify`)."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if archive[pos:pos + 6] != NEWC_MAGIC:
            raise CpioError(f"bad magic at offset {pos}")
        try:
            f = [int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise CpioError(f"bad header at offset {pos}") from exc
        namesize, filesize = f[11], f[6]
        name_start = pos + HEADER_SIZE
        name = archive[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(HEADER_SIZE + namesize) % 4)
        data = archive[data_start:data_start + filesize]
        if len(data) != filesize:
            raise CpioError(f"truncated data of {name!r}")
        pos = data_start + filesize + (-filesize % 4)
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, f[1], data, (f[9], f[10]), f[5]))
