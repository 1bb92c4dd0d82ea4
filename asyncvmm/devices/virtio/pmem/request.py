"""Parsing one virtio-pmem request (virtio 1.2 §5.19.6): pure validation, no I/O.

A request is a device-readable ``le32 type`` followed by a device-writable
``le32 ret``::

    struct virtio_pmem_req  { le32 type; };      /* VIRTIO_PMEM_REQ_TYPE_FLUSH = 0 */
    struct virtio_pmem_resp { le32 ret; };       /* 0: OK, 1: EIO */

Linux's virtio_pmem puts each in its own descriptor, and so does every
driver we know; as Firecracker does, the device asks for exactly that: the
head is 4 device-readable bytes naming FLUSH, the next descriptor 4
device-writable bytes.  Descriptors after those two are ignored.  Every other
shape is its own :class:`PmemRequestError`, answered with used length 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain
from asyncvmm.devices.virtio.handler import Effect
from asyncvmm.memory import GuestMemory, GuestMemoryError

VIRTIO_PMEM_REQ_TYPE_FLUSH = 0
VIRTIO_PMEM_RESP_TYPE_OK = 0
VIRTIO_PMEM_RESP_TYPE_EIO = 1
REQ_SIZE = 4
RESP_SIZE = 4


class PmemRequestError(Exception):
    """A request the device cannot use."""


class WriteOnlyHeaderError(PmemRequestError):
    """The request header is device-writable."""


class HeaderLengthError(PmemRequestError):
    """The request header is not 4 bytes."""


class UnknownRequestTypeError(PmemRequestError):
    """A request type other than VIRTIO_PMEM_REQ_TYPE_FLUSH."""


class ChainTooShortError(PmemRequestError):
    """No descriptor for the response."""


class ReadOnlyStatusError(PmemRequestError):
    """The response descriptor is device-readable."""


class StatusLengthError(PmemRequestError):
    """The response descriptor is not 4 bytes."""


class BadChainError(PmemRequestError):
    """The descriptor chain itself is broken (a loop, an index or buffer out of range ...)."""


@dataclass(slots=True)
class Flush(Effect):
    """Write the backing file back, then answer chain ``head`` with the result at ``status_addr``."""

    head: int
    status_addr: int


def parse_request(mem: GuestMemory, chain: DescriptorChain) -> Flush:
    """The flush ``chain`` asks for; raises a :class:`PmemRequestError` for anything else."""
    try:
        descriptors = iter(chain)
        header = next(descriptors, None)
        if header is None:          # a chain always has a head; kept for safety
            raise ChainTooShortError("empty chain")
        if header.is_write_only:
            raise WriteOnlyHeaderError("the request header is device-writable")
        if header.len != REQ_SIZE:
            raise HeaderLengthError(f"request header of {header.len} bytes instead of 4")
        request_type = mem.read_u32(header.addr)
        if request_type != VIRTIO_PMEM_REQ_TYPE_FLUSH:
            raise UnknownRequestTypeError(f"request type {request_type}")
        status = next(descriptors, None)
        if status is None:
            raise ChainTooShortError("no response descriptor")
    except ChainError as e:
        raise BadChainError(str(e)) from None
    except GuestMemoryError as e:
        raise BadChainError(str(e)) from None
    if not status.is_write_only:
        raise ReadOnlyStatusError("the response descriptor is device-readable")
    if status.len != RESP_SIZE:
        raise StatusLengthError(f"response descriptor of {status.len} bytes instead of 4")
    return Flush(chain.head, status.addr)
