"""Virtio over PCI (§4.1), the modern interface only: one PCI function and its BAR0.

Primer.  A virtio-pci function identifies itself in its configuration space
(vendor 0x1AF4, device 0x1040 + device type, revision 1: §4.1.2) and lists
*vendor capabilities* (``struct virtio_pci_cap``, §4.1.4) that say where in
which BAR each structure lives.  Ours are all in one 64-bit memory BAR0::

    0x0000 common configuration (§4.1.4.3)     0x1000 ISR status (§4.1.4.5)
    0x2000 device configuration (§4.1.4.6)     0x3000 notifications (§4.1.4.4)
    0x4000 MSI-X table                         0x6000 MSI-X PBA

The common configuration is the register file virtio-mmio spreads over its
window: feature words through ``*_feature_select``, ``device_status``, and
per queue (through ``queue_select``) its size, MSI-X vector, enable bit and
the three ring addresses.  A driver kicks queue *q* by writing at
``0x3000 + queue_notify_off * notify_off_multiplier`` (here ``4 * q``; KVM
normally catches that write with an ioeventfd, so it reaches us only as a
fallback).  Interrupts are MSI-X only (no INTx pin): a used buffer of queue
*q* sends ``queue_msix_vector[q]``, a configuration change sends
``config_msix_vector`` (§4.1.5.3, §4.1.5.4); either also sets its ISR bit,
which a read of the ISR byte clears.  The VIRTIO_PCI_CAP_PCI_CFG capability
(§4.1.4.9) is a window onto BAR0 through configuration space, for firmware
that cannot map BARs yet.

What all transports share (status machine, negotiation, activation, reset,
queue snapshot checks) is :class:`~asyncvmm.devices.virtio.transport.VirtioTransport`.

Threads and I/O.  Everything runs on the loop that owns the device: the
configuration space (:meth:`VirtioPciTransport.config_read` /
``config_write``, a :class:`~asyncvmm.pci.bus.PciFunction`) and BAR0
(:meth:`~VirtioPciTransport.read` / ``write``, a bus device).  The transport
does no I/O of its own: MSI-X vectors go out through the ``deliver``
callback, vector reprogramming through ``on_route_change``, and BAR0 moves
or memory-decoding changes through ``on_bar_change`` (the glue then asks
:meth:`~VirtioPciTransport.bar_mapping`).  Everything a driver does wrong
is ignored and reported to the VM's :class:`~asyncvmm.guestfault.GuestFaults`.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Callable

import msgspec

from asyncvmm import guestfault
from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.virtio import status as st
from asyncvmm.devices.virtio.device import VirtioDevice
from asyncvmm.devices.virtio.queue import Queue
from asyncvmm.devices.virtio.spec import DRIVER_OK, VIRTIO_ID_BLOCK, VIRTIO_ID_NET
from asyncvmm.devices.virtio.transport import QueueState, SnapshotStateError, VirtioTransport
from asyncvmm.memory import GuestMemory
from asyncvmm.pci.config import PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, ConfigSpace
from asyncvmm.pci.msix import PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL, Msix, MsixState

# §4.1.2 PCI Device Discovery
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040        # + device type: the modern-only device IDs
VIRTIO_PCI_REVISION = 1                   # "MUST have a Revision ID of 1 or higher" for 0x1040+
VIRTIO_PCI_SUBSYSTEM_ID = 0x0040          # >= 0x40 (§4.1.2.1)

# PCI class codes (base << 16 | sub << 8 | prog_if) as Firecracker's guests see them.
PCI_CLASS_STORAGE_OTHER = 0x018000
PCI_CLASS_NETWORK_ETHERNET = 0x020000
PCI_CLASS_OTHERS = 0xFF0000

# §4.1.4 Virtio Structure PCI Capabilities: cfg_type (Linux's virtio_pci.h names)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# §4.1.4.3 common configuration structure layout (struct virtio_pci_common_cfg)
VIRTIO_PCI_COMMON_DFSELECT = 0x00         # le32 device_feature_select
VIRTIO_PCI_COMMON_DF = 0x04               # le32 device_feature (RO)
VIRTIO_PCI_COMMON_GFSELECT = 0x08         # le32 driver_feature_select
VIRTIO_PCI_COMMON_GF = 0x0C               # le32 driver_feature
VIRTIO_PCI_COMMON_MSIX = 0x10             # le16 config_msix_vector
VIRTIO_PCI_COMMON_NUMQ = 0x12             # le16 num_queues (RO)
VIRTIO_PCI_COMMON_STATUS = 0x14           # u8 device_status
VIRTIO_PCI_COMMON_CFGGENERATION = 0x15    # u8 config_generation (RO)
VIRTIO_PCI_COMMON_Q_SELECT = 0x16         # le16 queue_select
VIRTIO_PCI_COMMON_Q_SIZE = 0x18           # le16 queue_size
VIRTIO_PCI_COMMON_Q_MSIX = 0x1A           # le16 queue_msix_vector
VIRTIO_PCI_COMMON_Q_ENABLE = 0x1C         # le16 queue_enable
VIRTIO_PCI_COMMON_Q_NOFF = 0x1E           # le16 queue_notify_off (RO)
VIRTIO_PCI_COMMON_Q_DESCLO = 0x20         # le64 queue_desc
VIRTIO_PCI_COMMON_Q_DESCHI = 0x24
VIRTIO_PCI_COMMON_Q_AVAILLO = 0x28        # le64 queue_driver
VIRTIO_PCI_COMMON_Q_AVAILHI = 0x2C
VIRTIO_PCI_COMMON_Q_USEDLO = 0x30         # le64 queue_device
VIRTIO_PCI_COMMON_Q_USEDHI = 0x34
COMMON_CFG_SIZE = 0x38

# Field start -> width in bytes.  64-bit fields may also be accessed as two 32-bit halves (§4.1.3.1).
_COMMON_FIELDS = {
    VIRTIO_PCI_COMMON_DFSELECT: 4, VIRTIO_PCI_COMMON_DF: 4, VIRTIO_PCI_COMMON_GFSELECT: 4,
    VIRTIO_PCI_COMMON_GF: 4, VIRTIO_PCI_COMMON_MSIX: 2, VIRTIO_PCI_COMMON_NUMQ: 2,
    VIRTIO_PCI_COMMON_STATUS: 1, VIRTIO_PCI_COMMON_CFGGENERATION: 1, VIRTIO_PCI_COMMON_Q_SELECT: 2,
    VIRTIO_PCI_COMMON_Q_SIZE: 2, VIRTIO_PCI_COMMON_Q_MSIX: 2, VIRTIO_PCI_COMMON_Q_ENABLE: 2,
    VIRTIO_PCI_COMMON_Q_NOFF: 2, VIRTIO_PCI_COMMON_Q_DESCLO: 8, VIRTIO_PCI_COMMON_Q_AVAILLO: 8,
    VIRTIO_PCI_COMMON_Q_USEDLO: 8,
}
_QUEUE_ADDRESS = {VIRTIO_PCI_COMMON_Q_DESCLO: "desc_table", VIRTIO_PCI_COMMON_Q_AVAILLO: "avail_ring",
                  VIRTIO_PCI_COMMON_Q_USEDLO: "used_ring"}
_READ_ONLY = (VIRTIO_PCI_COMMON_DF, VIRTIO_PCI_COMMON_NUMQ, VIRTIO_PCI_COMMON_CFGGENERATION,
              VIRTIO_PCI_COMMON_Q_NOFF)

# §4.1.4.5 ISR status bits
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

# §4.1.5.1.2 "no vector": the event is not signalled by MSI-X
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# BAR0 layout (the shared design)
BAR0 = 0
BAR0_SIZE = 0x8000
COMMON_CFG_OFFSET = 0x0000
ISR_OFFSET = 0x1000
ISR_SIZE = 1
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_SIZE = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4                 # one dword per queue
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x6000

# struct virtio_pci_cap after its (cap_vndr, cap_next) header:
# cap_len, cfg_type, bar, id, padding[2], le32 offset, le32 length
_VIRTIO_CAP = struct.Struct("<BBBB2xII")
VIRTIO_PCI_CAP_LEN = 16
VIRTIO_PCI_NOTIFY_CAP_LEN = 20            # + le32 notify_off_multiplier
VIRTIO_PCI_CFG_CAP_LEN = 20               # + u8 pci_cfg_data[4]
# Offsets inside struct virtio_pci_cfg_cap, from the capability's ID byte.
_CFG_CAP_BAR = 4
_CFG_CAP_OFFSET = 8
_CFG_CAP_LENGTH = 12
_CFG_CAP_DATA = 16


class PciTransportState(msgspec.Struct, forbid_unknown_fields=True, tag="virtio-pci-v1"):
    """A virtio-pci function in a snapshot: common configuration, queues, config space, MSI-X."""

    device_type: int
    status: int
    needs_reset: bool
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    config_generation: int
    config_msix_vector: int
    queue_msix_vectors: list[int]
    isr: int
    queues: list[QueueState]
    config_space: bytes
    msix: MsixState


def _pci_class(device_type: int) -> int:
    if device_type == VIRTIO_ID_BLOCK:
        return PCI_CLASS_STORAGE_OTHER
    if device_type == VIRTIO_ID_NET:
        return PCI_CLASS_NETWORK_ETHERNET
    return PCI_CLASS_OTHERS


def _in_device_cfg(offset: int, size: int) -> bool:
    """Inside the device configuration; any access up to 8 bytes goes to the device (§4.1.4.6)."""
    return DEVICE_CFG_OFFSET <= offset and offset + size <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE and size <= 8


def _overlaps(offset: int, size: int, start: int, length: int) -> bool:
    return offset < start + length and start < offset + size


class VirtioPciTransport(VirtioTransport):
    """One PCI function + its BAR0, driving one :class:`VirtioDevice`."""

    NAME = "virtio-pci"
    FAULT_ACCESS = "virtio_pci_access"
    FAULT_PROTOCOL = "virtio_pci_protocol"
    BAR0_SIZE = BAR0_SIZE
    NOTIFY_OFFSET = NOTIFY_OFFSET

    def __init__(self, device: VirtioDevice, *, mem: GuestMemory, queue_events: list[EventFd],
                 loop: asyncio.AbstractEventLoop, faults: guestfault.GuestFaults | None = None,
                 deliver: Callable[[int], None], on_route_change: Callable[[int], None],
                 on_bar_change: Callable[[], None],
                 vector_eventfd: Callable[[int], EventFd] | None = None) -> None:
        super().__init__(device, mem=mem, queue_events=queue_events, loop=loop, faults=faults)
        self.on_bar_change = on_bar_change
        self._vector_eventfd = vector_eventfd    # a vector's irqfd, for vhost back ends
        self.msix = Msix(device.num_queues + 1, deliver=deliver, on_route_change=on_route_change,
                         faults=self.faults)
        if self.msix.table_size > MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET:
            raise ValueError(f"{device.num_queues} queues need more MSI-X vectors than BAR0 holds")
        self.config = self._build_config_space()

    def _build_config_space(self) -> ConfigSpace:
        dtype = self.device.device_type
        config = ConfigSpace(vendor_id=VIRTIO_PCI_VENDOR_ID, device_id=VIRTIO_PCI_DEVICE_ID_BASE + dtype,
                             class_code=_pci_class(dtype), revision_id=VIRTIO_PCI_REVISION,
                             subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID, subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID)
        config.add_bar(BAR0, BAR0_SIZE, mem64=True, prefetchable=False)

        def virtio_cap(cfg_type: int, offset: int, length: int, cap_len: int = VIRTIO_PCI_CAP_LEN) -> bytes:
            return _VIRTIO_CAP.pack(cap_len, cfg_type, BAR0, 0, offset, length)

        config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET,
                                                          COMMON_CFG_SIZE))
        config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER * self.device.num_queues,
            VIRTIO_PCI_NOTIFY_CAP_LEN) + struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
        config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE))
        config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET,
                                                          DEVICE_CFG_SIZE))
        # §4.1.4.9: cap.bar, cap.offset, cap.length and pci_cfg_data are the driver's to write.
        writable = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        self._pci_cfg_cap = config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(
            VIRTIO_PCI_CAP_PCI_CFG, 0, 0, VIRTIO_PCI_CFG_CAP_LEN) + bytes(4), writable=writable)
        body, writable = self.msix.capability(table_bar=BAR0, table_offset=MSIX_TABLE_OFFSET,
                                              pba_bar=BAR0, pba_offset=MSIX_PBA_OFFSET)
        self._msix_cap = config.add_capability(PCI_CAP_ID_MSIX, body, writable=writable)
        return config

    def _reset_registers(self) -> None:
        super()._reset_registers()
        self.isr = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_msix_vectors = [VIRTIO_MSI_NO_VECTOR] * self.device.num_queues

    # -- PciFunction: configuration space (loop thread) -------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        if _overlaps(offset, size, self._pci_cfg_cap + _CFG_CAP_DATA, 4):
            self._pci_cfg_access(write=False)
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        mapping = self.bar_mapping()
        self.config.write(offset, data)
        if _overlaps(offset, len(data), self._msix_cap + PCI_MSIX_FLAGS, 2):
            self.msix.control_written(self._config_u(self._msix_cap + PCI_MSIX_FLAGS, 2))
        if _overlaps(offset, len(data), self._pci_cfg_cap + _CFG_CAP_DATA, 4):
            self._pci_cfg_access(write=True)
        if self.bar_mapping() != mapping:
            self.on_bar_change()

    def _config_u(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config.read(offset, size), "little")

    def _pci_cfg_access(self, *, write: bool) -> None:
        """§4.1.4.9: an access of pci_cfg_data is an access of cap.length bytes at cap.offset
        of BAR cap.bar; a read leaves what it read in pci_cfg_data."""
        cap = self._pci_cfg_cap
        bar = self._config_u(cap + _CFG_CAP_BAR, 1)
        offset = self._config_u(cap + _CFG_CAP_OFFSET, 4)
        length = self._config_u(cap + _CFG_CAP_LENGTH, 4)
        if length == 0:
            return           # the window is not set up (lspci reading every dword, say)
        if bar != BAR0 or length not in (1, 2, 4) or offset % length or offset + length > BAR0_SIZE:
            self._fault(self.FAULT_ACCESS, "VIRTIO_PCI_CAP_PCI_CFG access of %d bytes at BAR %d offset "
                        "%#x ignored", length, bar, offset)
            return
        if write:
            self.write(offset, self.config.read(cap + _CFG_CAP_DATA, length))
        else:
            self.config.write(cap + _CFG_CAP_DATA, self.read(offset, length).ljust(4, b"\0"))

    def bar_mapping(self) -> int | None:
        """BAR0's base if memory decoding is on and the BAR is programmed, else ``None``."""
        if not self.config.memory_enabled:
            return None
        base = self.config.bar_address(BAR0)
        return base or None

    def notify_address(self, base: int, queue: int) -> int:
        """The guest-physical address a driver writes to kick ``queue`` with BAR0 at ``base``."""
        return base + NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * queue

    # -- BAR0 (loop thread) -------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
            return self._read_common(offset - COMMON_CFG_OFFSET, size)
        if offset == ISR_OFFSET and size == 1:
            # §4.1.4.5.1: reading the ISR status resets it to 0.
            isr, self.isr = self.isr, 0
            return bytes([isr])
        if _in_device_cfg(offset, size):
            data = self.device.read_config(offset - DEVICE_CFG_OFFSET, size)
            return bytes(data[:size]).ljust(size, b"\0")
        if MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            return self.msix.read_table(offset - MSIX_TABLE_OFFSET, size)
        if MSIX_PBA_OFFSET <= offset < BAR0_SIZE:
            return self.msix.read_pba(offset - MSIX_PBA_OFFSET, size)
        self._fault(self.FAULT_ACCESS, "%d-byte read at BAR0 offset %#x ignored", size, offset)
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
            self._write_common(offset - COMMON_CFG_OFFSET, bytes(data))
        elif _in_device_cfg(offset, size):
            self.device.write_config(offset - DEVICE_CFG_OFFSET, bytes(data))
        elif (NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * self.device.num_queues
              and size in (2, 4) and offset % NOTIFY_OFF_MULTIPLIER == 0):
            # §4.1.4.4.1: the driver writes the queue index; like KVM's ioeventfd (no datamatch)
            # the address alone names the queue.
            self.queue_events[(offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER].write(1)
        elif MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            self.msix.write_table(offset - MSIX_TABLE_OFFSET, bytes(data))
        elif MSIX_PBA_OFFSET <= offset < BAR0_SIZE:
            self.msix.write_pba(offset - MSIX_PBA_OFFSET, bytes(data))
        else:
            self._fault(self.FAULT_ACCESS, "%d-byte write at BAR0 offset %#x ignored", size, offset)

    # -- the common configuration structure (§4.1.4.3) -----------------------------

    def _common_field(self, offset: int, size: int, verb: str) -> tuple[int, int] | None:
        """``(field start, bit shift)`` of an access with the field's width, or a 32-bit half
        of a 64-bit field; ``None`` (reported) for anything else."""
        width = _COMMON_FIELDS.get(offset)
        if width == size:
            return offset, 0
        if size == 4:
            if width == 8:
                return offset, 0
            if _COMMON_FIELDS.get(offset - 4) == 8:
                return offset - 4, 32
        self._fault(self.FAULT_ACCESS, "%d-byte %s at common config offset %#x ignored", size, verb, offset)
        return None

    def _read_common(self, offset: int, size: int) -> bytes:
        field = self._common_field(offset, size, "read")
        if field is None:
            return bytes(size)
        start, shift = field
        value = self._common_value(start) >> shift
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _common_value(self, start: int) -> int:
        q = self._selected_queue()
        if start == VIRTIO_PCI_COMMON_DFSELECT:
            return self.device_features_sel
        if start == VIRTIO_PCI_COMMON_DF:
            return self.device_features_word()
        if start == VIRTIO_PCI_COMMON_GFSELECT:
            return self.driver_features_sel
        if start == VIRTIO_PCI_COMMON_GF:
            sel = self.driver_features_sel
            return self.driver_features >> (32 * sel) if sel < 2 else 0
        if start == VIRTIO_PCI_COMMON_MSIX:
            return self.config_msix_vector
        if start == VIRTIO_PCI_COMMON_NUMQ:
            return self.device.num_queues
        if start == VIRTIO_PCI_COMMON_STATUS:
            return self.device_status
        if start == VIRTIO_PCI_COMMON_CFGGENERATION:
            return self.config_generation
        if start == VIRTIO_PCI_COMMON_Q_SELECT:
            return self.queue_sel
        if q is None:
            # §4.1.4.3: a queue_size of 0 says there is no such queue; no vector is mapped to it.
            return VIRTIO_MSI_NO_VECTOR if start == VIRTIO_PCI_COMMON_Q_MSIX else 0
        if start == VIRTIO_PCI_COMMON_Q_SIZE:
            return q.size
        if start == VIRTIO_PCI_COMMON_Q_MSIX:
            return self.queue_msix_vectors[self.queue_sel]
        if start == VIRTIO_PCI_COMMON_Q_ENABLE:
            return int(q.ready)
        if start == VIRTIO_PCI_COMMON_Q_NOFF:
            return self.queue_sel
        return getattr(q, _QUEUE_ADDRESS[start])

    def _write_common(self, offset: int, data: bytes) -> None:
        field = self._common_field(offset, len(data), "write")
        if field is None:
            return
        start, shift = field
        value = int.from_bytes(data, "little")
        if start in _READ_ONLY:
            self._fault(self.FAULT_ACCESS, "write of %#x to read-only common config field %#x ignored",
                        value, start)
        elif start == VIRTIO_PCI_COMMON_DFSELECT:
            self.device_features_sel = value
        elif start == VIRTIO_PCI_COMMON_GFSELECT:
            self.driver_features_sel = value
        elif start == VIRTIO_PCI_COMMON_GF:
            self._write_driver_features(value)
        elif start == VIRTIO_PCI_COMMON_MSIX:
            self.config_msix_vector = self._vector(value, "config_msix_vector")
        elif start == VIRTIO_PCI_COMMON_STATUS:
            self._write_status(value)
        elif start == VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_sel = value
        elif start == VIRTIO_PCI_COMMON_Q_MSIX:
            if self.queue_sel < len(self.queue_msix_vectors):
                self.queue_msix_vectors[self.queue_sel] = self._vector(value, "queue_msix_vector")
            else:
                self._fault(self.FAULT_PROTOCOL, "queue_msix_vector written for absent queue %d ignored",
                            self.queue_sel)
        else:
            self._write_queue_field(start, shift, len(data), value)

    def _vector(self, value: int, name: str) -> int:
        """§4.1.5.1.2.1: a vector beyond the table is refused; the register then reads NO_VECTOR."""
        if value == VIRTIO_MSI_NO_VECTOR or value < self.msix.num_vectors:
            return value
        self._fault(self.FAULT_PROTOCOL, "%s %d beyond the %d MSI-X vectors refused", name, value,
                    self.msix.num_vectors)
        return VIRTIO_MSI_NO_VECTOR

    def _write_queue_field(self, start: int, shift: int, size: int, value: int) -> None:
        q = self._selected_queue()
        # §4.1.4.3.2 / §3.1.1 step 7: queues are set up after FEATURES_OK and before DRIVER_OK,
        # and an enabled queue's configuration stays as it is (reads back unchanged).
        if q is None or self.status != st.S_FEATURES_OK:
            self._fault(self.FAULT_PROTOCOL, "queue field %#x written for queue %d in status %#x ignored",
                        start, self.queue_sel, self.status)
        elif q.ready:
            self._fault(self.FAULT_PROTOCOL, "queue %d reconfigured while enabled; ignored", self.queue_sel)
        elif start == VIRTIO_PCI_COMMON_Q_ENABLE:
            if value == 1:
                q.ready = True
            else:
                # §4.1.4.3.2: the driver MUST NOT write 0 to queue_enable.
                self._fault(self.FAULT_PROTOCOL, "queue_enable %d for queue %d ignored", value,
                            self.queue_sel)
        elif start == VIRTIO_PCI_COMMON_Q_SIZE:
            q.size = value           # checked at DRIVER_OK, as on virtio-mmio
        else:
            attr = _QUEUE_ADDRESS[start]
            mask = ((1 << (8 * size)) - 1) << shift
            setattr(q, attr, (getattr(q, attr) & ~mask) | (value << shift))

    # -- notifications (loop thread) -------------------------------------------------

    def _signal_used(self, queue: int | None) -> None:
        self.isr |= VIRTIO_PCI_ISR_QUEUE
        vectors = self.queue_msix_vectors if queue is None else [self.queue_msix_vectors[queue]]
        for vector in dict.fromkeys(vectors):
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.msix.trigger(vector)

    def _signal_config(self) -> None:
        self.isr |= VIRTIO_PCI_ISR_CONFIG
        if self.config_msix_vector != VIRTIO_MSI_NO_VECTOR:
            self.msix.trigger(self.config_msix_vector)

    def _queue_irqfd(self, queue: int) -> int | None:
        # Only a vector the guest has enabled and unmasked: a masked one must set its pending
        # bit instead (Msix.trigger), which takes the loop.  The vector is the one at DRIVER_OK.
        vector = self.queue_msix_vectors[queue]
        if (self._vector_eventfd is None or vector == VIRTIO_MSI_NO_VECTOR or not self.msix.enabled
                or self.msix.masked(vector)):
            return None
        return self._vector_eventfd(vector).fd

    def _on_config_change(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF    # an 8-bit field here
        if self.status & DRIVER_OK:
            self._signal_config()

    # -- snapshots (loop thread, vCPUs paused) ----------------------------------------

    def save_state(self) -> PciTransportState:
        """Everything the driver set up, for a device with nothing in flight (:meth:`in_flight`)."""
        return PciTransportState(
            device_type=self.device.device_type, status=self.status, needs_reset=self.needs_reset,
            device_features_sel=self.device_features_sel, driver_features_sel=self.driver_features_sel,
            driver_features=self.driver_features, queue_sel=self.queue_sel,
            config_generation=self.config_generation, config_msix_vector=self.config_msix_vector,
            queue_msix_vectors=list(self.queue_msix_vectors), isr=self.isr, queues=self._queue_states(),
            config_space=self.config.state(), msix=self.msix.state())

    def restore_state(self, state: PciTransportState) -> None:
        """Take a snapshot's state (all of it checked before any is taken), report BAR0's
        mapping and every MSI-X route, then activate the device if the driver had (DRIVER_OK)."""
        queues = self._check_state(
            device_type=state.device_type, status=state.status, driver_features=state.driver_features,
            queues=state.queues,
            registers={"device_features_sel": state.device_features_sel,
                       "driver_features_sel": state.driver_features_sel})
        if not 0 <= state.queue_sel <= 0xFFFF or not 0 <= state.config_generation <= 0xFF:
            raise SnapshotStateError("virtio-pci state: queue_sel or config_generation out of range")
        if not 0 <= state.isr <= VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG:
            raise SnapshotStateError("virtio-pci state: ISR bits out of range")
        vectors = [state.config_msix_vector, *state.queue_msix_vectors]
        if len(state.queue_msix_vectors) != self.device.num_queues or any(
                v != VIRTIO_MSI_NO_VECTOR and not 0 <= v < self.msix.num_vectors for v in vectors):
            raise SnapshotStateError("virtio-pci state: MSI-X vectors that do not fit the table")
        control = int.from_bytes(state.config_space[self._msix_cap + PCI_MSIX_FLAGS:][:2], "little")
        if ((state.msix.enabled, state.msix.function_mask)
                != (bool(control & PCI_MSIX_FLAGS_ENABLE), bool(control & PCI_MSIX_FLAGS_MASKALL))):
            raise SnapshotStateError("virtio-pci state: MSI-X state disagrees with Message Control")
        try:
            # A scratch table checks the MSI-X state, so nothing is changed if it does not fit.
            Msix(self.msix.num_vectors, deliver=_ignore, on_route_change=_ignore).restore(state.msix)
            self.config.restore(state.config_space)
        except ValueError as e:
            raise SnapshotStateError(f"virtio-pci state: {e}") from None
        self.status = state.status & 0xFF
        self.needs_reset = state.needs_reset
        self.device_features_sel = state.device_features_sel
        self.driver_features_sel = state.driver_features_sel
        self.driver_features = state.driver_features
        self.queue_sel = state.queue_sel
        self.config_generation = state.config_generation
        self.config_msix_vector = state.config_msix_vector
        self.queue_msix_vectors = list(state.queue_msix_vectors)
        self.isr = state.isr
        self.queues = queues
        self.msix.restore(state.msix)
        self.on_bar_change()
        self._resume()


def _ignore(_vector: int) -> None:
    pass
