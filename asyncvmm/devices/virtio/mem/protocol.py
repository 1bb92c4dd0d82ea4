"""virtio-mem wire formats (virtio 1.2 §5.15), parsed and built without I/O.

Primer.  The device owns a guest-physical region of ``region_size`` bytes at
``addr``, cut into blocks of ``block_size``.  The host sets ``requested_size``;
the driver plugs or unplugs blocks (only inside the first
``usable_region_size`` bytes) until ``plugged_size`` matches it.  Every
request is one chain: a device-readable ``struct virtio_mem_req`` then a
device-writable ``struct virtio_mem_resp`` (§5.15.6):

    struct virtio_mem_req  { le16 type; le16 padding[3];
                             union { struct { le64 addr; le16 nb_blocks; le16 padding[3]; } plug,
                                     unplug, state; } u; };                   /* 24 bytes */
    struct virtio_mem_resp { le16 type; le16 padding[3];
                             union { struct { le16 state; } state; } u; };     /* 10 bytes */

Config space (§5.15.4), read-only for the driver:

    le64 block_size; le16 node_id; u8 padding[6]; le64 addr; le64 region_size;
    le64 usable_region_size; le64 plugged_size; le64 requested_size;          /* 56 bytes */
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# §5 Device Types.
VIRTIO_ID_MEM = 24

# §5.15.3 Feature bits.
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2

# §5.15.6 request types.
VIRTIO_MEM_REQ_PLUG = 0
VIRTIO_MEM_REQ_UNPLUG = 1
VIRTIO_MEM_REQ_UNPLUG_ALL = 2
VIRTIO_MEM_REQ_STATE = 3

# §5.15.6 response types.
VIRTIO_MEM_RESP_ACK = 0
VIRTIO_MEM_RESP_NACK = 1
VIRTIO_MEM_RESP_BUSY = 2
VIRTIO_MEM_RESP_ERROR = 3

# §5.15.6.4 states of a block range.
VIRTIO_MEM_STATE_PLUGGED = 0
VIRTIO_MEM_STATE_UNPLUGGED = 1
VIRTIO_MEM_STATE_MIXED = 2

REQ = struct.Struct("<H6xQH6x")          # type, addr, nb_blocks
RESP = struct.Struct("<H6xH")            # type, state
CONFIG = struct.Struct("<QH6xQQQQQ")     # block_size, node_id, addr, region_size, usable, plugged, requested
assert REQ.size == 24 and RESP.size == 10 and CONFIG.size == 56

REQUEST_NAMES = {VIRTIO_MEM_REQ_PLUG: "plug", VIRTIO_MEM_REQ_UNPLUG: "unplug",
                 VIRTIO_MEM_REQ_UNPLUG_ALL: "unplug_all", VIRTIO_MEM_REQ_STATE: "state"}


class RequestError(Exception):
    """Bytes that are not a virtio_mem_req."""


@dataclass(frozen=True, slots=True)
class Request:
    """One ``virtio_mem_req``; ``addr``/``nb_blocks`` are 0 for UNPLUG_ALL (the union is unused)."""

    type: int
    addr: int = 0
    nb_blocks: int = 0

    def pack(self) -> bytes:
        return REQ.pack(self.type, self.addr, self.nb_blocks)


def parse_request(raw: bytes) -> Request:
    """The request in the first 24 bytes of ``raw``; an unknown type is kept for the caller."""
    if len(raw) < REQ.size:
        raise RequestError(f"request of {len(raw)} bytes, expected {REQ.size}")
    kind, addr, nb_blocks = REQ.unpack_from(raw)
    if kind == VIRTIO_MEM_REQ_UNPLUG_ALL:
        return Request(kind)
    return Request(kind, addr, nb_blocks)


def response(kind: int, state: int = 0) -> bytes:
    """A ``virtio_mem_resp``; ``state`` means something only in the answer to STATE."""
    return RESP.pack(kind, state)
