"""The snapshot memory file: guest RAM regions back to back, holes where RAM is zero.

A Full snapshot writes every region in guest-physical order (the state file
records each region's offset).  Chunks that are all zero are not written but
left as holes (``ftruncate`` sets the final size), so a guest that touched
little makes a small file on disk while its size stays the guest's; a
restore maps the file privately and reads holes as zero pages.
"""

from __future__ import annotations

import os

from ..memory import GuestMemory

CHUNK = 1 << 16
_ZERO = bytes(CHUNK)


def write_memory_file(path: str, mem: GuestMemory) -> int:
    """Write ``mem`` to ``path``; returns the file's size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        for region in mem.regions:
            view = region.view
            for start in range(0, region.size, CHUNK):
                piece = view[start:start + CHUNK]
                if piece != _ZERO[:len(piece)]:
                    _pwrite_all(fd, piece, offset + start)
            offset += region.size
        os.ftruncate(fd, offset)
        return offset
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def snapshot_unsupported_devices(machine) -> list[str]:
    """The devices of ``machine`` whose state a snapshot cannot hold yet (docs/snapshots.md)."""
    found = []
    if machine.blocks:
        found.append("block devices")
    if machine.nets:
        found.append("network interfaces")
    if machine.vsock is not None:
        found.append("a vsock device")
    if machine.balloon is not None:
        found.append("a balloon device")
    if machine.rng is not None:
        found.append("an entropy device")
    return found
