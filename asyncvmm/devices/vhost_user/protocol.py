"""vhost-user messages, front-end side: bytes in, bytes out, no I/O here.

Primer (QEMU's docs/interop/vhost-user.rst, "Message Specification").  The
front end (the VMM) and the back end (a process serving one device, e.g.
qemu-storage-daemon's vhost-user-blk export) talk over a Unix stream socket.
Every message is a 12-byte header followed by ``size`` payload bytes, all
little-endian (the spec says host-endian; every host here is x86-64):

* ``u32 request``: the message type (``VHOST_USER_*`` below);
* ``u32 flags``: bits 0-1 the version (``0x1``), bit 2 ``REPLY_MASK`` (set on
  answers from the back end), bit 3 ``NEED_REPLY_MASK`` (with the
  ``REPLY_ACK`` protocol feature: please acknowledge this one);
* ``u32 size``: the payload length.

File descriptors (guest memory, eventfds) travel beside the message as
``SCM_RIGHTS`` ancillary data.  Payloads used here: a ``u64``; a vring state
(``u32 index, u32 num``); a vring address (``u32 index, u32 flags, u64
descriptor, u64 used, u64 available, u64 log``, all front-end *userspace*
addresses); a memory table (``u32 nregions, u32 padding`` then per region
``u64 guest_phys_addr, u64 memory_size, u64 userspace_addr, u64
mmap_offset``, one fd per region); a device configuration (``u32 offset,
u32 size, u32 flags`` then ``size`` bytes).  ``SET_VRING_KICK``/``CALL``/
``ERR`` carry a ``u64``: the vring index in bits 0-7, and bit 8 set when no
fd is attached.

The front end sends requests and reads the answers of those that have one
(``GET_*``, and any with ``NEED_REPLY_MASK``); :func:`parse_reply` checks an
answer against what was asked and raises :class:`ProtocolError` on anything
else.  The socket side is :mod:`asyncvmm.devices.vhost_user.frontend`.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple, Sequence


class ProtocolError(Exception):
    """The back end sent something the protocol does not allow here."""


class Request(enum.IntEnum):
    """Front-end message types (vhost-user.rst, "Front-end message types")."""

    VHOST_USER_GET_FEATURES = 1
    VHOST_USER_SET_FEATURES = 2
    VHOST_USER_SET_OWNER = 3
    VHOST_USER_RESET_OWNER = 4
    VHOST_USER_SET_MEM_TABLE = 5
    VHOST_USER_SET_VRING_NUM = 8
    VHOST_USER_SET_VRING_ADDR = 9
    VHOST_USER_SET_VRING_BASE = 10
    VHOST_USER_GET_VRING_BASE = 11
    VHOST_USER_SET_VRING_KICK = 12
    VHOST_USER_SET_VRING_CALL = 13
    VHOST_USER_SET_VRING_ERR = 14
    VHOST_USER_GET_PROTOCOL_FEATURES = 15
    VHOST_USER_SET_PROTOCOL_FEATURES = 16
    VHOST_USER_GET_QUEUE_NUM = 17
    VHOST_USER_SET_VRING_ENABLE = 18
    VHOST_USER_GET_CONFIG = 24
    VHOST_USER_SET_CONFIG = 25


#: Requests the back end always answers (the rest only with NEED_REPLY_MASK under REPLY_ACK).
ANSWERED = frozenset({Request.VHOST_USER_GET_FEATURES, Request.VHOST_USER_GET_PROTOCOL_FEATURES,
                      Request.VHOST_USER_GET_VRING_BASE, Request.VHOST_USER_GET_QUEUE_NUM,
                      Request.VHOST_USER_GET_CONFIG})

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

#: The virtio feature bit (unused by virtio itself) saying the back end has protocol features.
VHOST_USER_F_PROTOCOL_FEATURES = 30

# Protocol feature bits ("Protocol features").
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_CONFIG = 9

#: SET_VRING_KICK/CALL/ERR: bits 0-7 the index; this bit set means "no fd attached".
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8
VHOST_USER_VRING_IDX_MASK = 0xFF

#: The most regions one SET_MEM_TABLE carries (VHOST_MEMORY_BASELINE_NREGIONS).
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: The largest payload the front end accepts in an answer (a 256-byte config is plenty).
MAX_PAYLOAD = 4096

HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEMORY_HEADER = struct.Struct("<II")
_MEMORY_REGION = struct.Struct("<QQQQ")
_CONFIG_HEADER = struct.Struct("<III")


class Header(NamedTuple):
    request: int
    flags: int
    size: int


class MemoryRegion(NamedTuple):
    """One ``VhostUserMemoryRegion``: where the back end finds a region of guest RAM."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


class VringAddr(NamedTuple):
    """A ``vhost_vring_addr``: the three areas as front-end userspace addresses."""

    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int = 0


# -- encoding -----------------------------------------------------------------


def message(request: Request, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """Header and payload of one front-end message."""
    flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def u64(value: int) -> bytes:
    return _U64.pack(value)


def vring_state(index: int, num: int) -> bytes:
    return _VRING_STATE.pack(index, num)


def vring_addr(addr: VringAddr) -> bytes:
    return _VRING_ADDR.pack(*addr)


def vring_fd(index: int, *, has_fd: bool) -> bytes:
    """The ``u64`` of SET_VRING_KICK/CALL/ERR."""
    if not 0 <= index <= VHOST_USER_VRING_IDX_MASK:
        raise ValueError(f"vring index {index} does not fit in 8 bits")
    return _U64.pack(index | (0 if has_fd else VHOST_USER_VRING_NOFD_MASK))


def memory_table(regions: Sequence[MemoryRegion]) -> bytes:
    """SET_MEM_TABLE's payload; the caller attaches one fd per region, in the same order."""
    if not 0 < len(regions) <= VHOST_MEMORY_BASELINE_NREGIONS:
        raise ValueError(f"{len(regions)} memory regions (1..{VHOST_MEMORY_BASELINE_NREGIONS})")
    return _MEMORY_HEADER.pack(len(regions), 0) + b"".join(_MEMORY_REGION.pack(*r) for r in regions)


def config(offset: int, size: int, flags: int = 0, data: bytes | None = None) -> bytes:
    """GET_CONFIG's (``data`` None: ``size`` zero bytes) or SET_CONFIG's payload."""
    body = bytes(size) if data is None else data
    if len(body) != size:
        raise ValueError(f"config payload of {len(body)} bytes for size {size}")
    return _CONFIG_HEADER.pack(offset, size, flags) + body


# -- decoding -----------------------------------------------------------------


def parse_header(data: bytes) -> Header:
    """The header of a back-end message: the version checked, the size bounded."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"a {len(data)}-byte message header (the header is {HEADER.size} bytes)")
    header = Header(*HEADER.unpack(data))
    if header.flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise ProtocolError(f"a message of version {header.flags & VHOST_USER_VERSION_MASK} "
                            f"(flags {header.flags:#x}); only version {VHOST_USER_VERSION} exists")
    if header.size > MAX_PAYLOAD:
        raise ProtocolError(f"a {header.size}-byte payload (at most {MAX_PAYLOAD} accepted)")
    return header


def check_reply(header: Header, request: Request) -> None:
    """The header must answer ``request``."""
    if not header.flags & VHOST_USER_REPLY_MASK:
        raise ProtocolError(f"a message without the reply flag (request {header.request}) "
                            f"while waiting for the answer to {request.name}")
    if header.request != request:
        raise ProtocolError(f"an answer to request {header.request} while waiting for the "
                            f"answer to {request.name}")


def parse_u64(payload: bytes) -> int:
    if len(payload) != _U64.size:
        raise ProtocolError(f"a {len(payload)}-byte payload where a u64 belongs")
    return _U64.unpack(payload)[0]


def parse_vring_state(payload: bytes) -> tuple[int, int]:
    if len(payload) != _VRING_STATE.size:
        raise ProtocolError(f"a {len(payload)}-byte payload where a vring state belongs")
    return _VRING_STATE.unpack(payload)


def parse_config(payload: bytes, offset: int, size: int) -> bytes:
    """The configuration bytes of a GET_CONFIG answer for ``offset``/``size``."""
    if len(payload) < _CONFIG_HEADER.size:
        raise ProtocolError(f"a {len(payload)}-byte GET_CONFIG answer")
    got_offset, got_size, _flags = _CONFIG_HEADER.unpack_from(payload)
    data = payload[_CONFIG_HEADER.size:]
    if (got_offset, got_size) != (offset, size) or len(data) != size:
        raise ProtocolError(f"a GET_CONFIG answer for {got_size} bytes at {got_offset} carrying "
                            f"{len(data)}; asked for {size} at {offset}")
    return data
