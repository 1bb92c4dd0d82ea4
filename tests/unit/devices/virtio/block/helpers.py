"""Building virtio-block requests in fake guest memory, split any way a driver might."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from asyncvmm.devices.virtio.chain import Segments
from asyncvmm.memory import GuestMemory
from tests.fakes.virtio_driver import Allocator, Buf


def header(req_type: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", req_type, 0, sector)


def pieces(total: int, cuts: list[int]) -> list[tuple[int, int]]:
    """``(offset, len)`` pieces of a ``total``-byte stream cut at ``cuts``."""
    points = sorted({c for c in cuts if 0 < c < total})
    edges = [0, *points, total]
    return [(a, b - a) for a, b in zip(edges, edges[1:]) if b > a]


def lay_out(mem: GuestMemory, alloc: Allocator, readable: bytes, writable_len: int,
            rcuts: list[int] = (), wcuts: list[int] = ()) -> tuple[list[Buf], Segments]:
    """Scatter the readable bytes and a writable area over separate guest buffers.

    Each piece gets its own allocation (64-byte gaps between), so nothing
    works by accident of adjacency.  Returns the chain's buffers and the
    writable stream, to read the device's answer back.
    """
    bufs: list[Buf] = []
    for off, n in pieces(len(readable), list(rcuts)):
        addr = alloc.alloc(n + 64, 64)
        mem.write(addr, readable[off:off + n])
        bufs.append(Buf(addr, n))
    answer = Segments()
    for _, n in pieces(writable_len, list(wcuts)):
        addr = alloc.alloc(n + 64, 64)
        mem.fill(addr, n, 0xEE)                   # poison: the device must overwrite what it claims
        bufs.append(Buf(addr, n, True))
        answer.append(addr, n)
    return bufs, answer


cuts = st.lists(st.integers(1, 4096), max_size=6)
