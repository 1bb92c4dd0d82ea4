"""A fake virtio-pci driver: what Linux's virtio_pci_modern does, through config space and BAR0.

It probes the function as the PCI core and ``virtio_pci_modern_dev.c`` do:
checks the IDs, sizes and places BAR0 with memory decoding off, turns on
memory decoding and bus mastering, walks the capability list for the vendor
capabilities (common, notify, ISR, device) and the MSI-X capability, then
enables MSI-X (entries programmed under the Function Mask), negotiates
through the common configuration, maps a vector per queue (vector 0 for
configuration changes, as Linux does with enough vectors), sets up the
queues with :class:`~tests.fakes.virtio_driver.FakeVirtqueue` and sets
DRIVER_OK.  BAR0 accesses go straight to the transport's ``read``/``write``
at offsets into the BAR (what the MMIO bus does once the glue maps it).

It can also do what no honest driver would, through :meth:`FakePciDriver.bar_write`
and :meth:`FakePciDriver.cfg_write` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.devices.virtio import pci as p
from asyncvmm.devices.virtio.spec import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK
from asyncvmm.memory import GuestMemory
from asyncvmm.pci import config as c
from asyncvmm.pci import msix as m
from tests.fakes.virtio_driver import Allocator, FakeVirtqueue, settle, wait_used

MSI_ADDRESS = 0xFEE0_0000          # the local APIC's MSI window
MSI_DATA_BASE = 0x40               # vector v -> data (IDT vector) 0x40 + v


@dataclass
class VirtioCap:
    """One ``struct virtio_pci_cap`` as read from configuration space."""

    at: int                        # offset of its ID byte
    cfg_type: int
    bar: int
    offset: int
    length: int


class FakePciDriver:
    """Drives one :class:`VirtioPciTransport` as Linux's virtio_pci_modern would."""

    def __init__(self, transport, mem: GuestMemory, alloc: Allocator, bar_base: int = 0x1_0000_0000) -> None:
        self.t = transport
        self.mem = mem
        self.alloc = alloc
        self.bar_base = bar_base
        self.caps: dict[int, VirtioCap] = {}
        self.msix_cap = 0
        self.notify_off_multiplier = 0
        self.queues: dict[int, FakeVirtqueue] = {}

    # -- configuration space ---------------------------------------------------

    def cfg_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.t.config_read(offset, size), "little")

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.t.config_write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def size_bar0(self) -> int:
        """BAR sizing (PCI 3.0 §6.2.5.1), decoding off as Linux's pci_read_bases does."""
        command = self.cfg_read(c.PCI_COMMAND, 2)
        self.cfg_write(c.PCI_COMMAND, 2, command & ~c.PCI_COMMAND_MEMORY)
        lo, hi = c.PCI_BASE_ADDRESS_0, c.PCI_BASE_ADDRESS_1
        orig = self.cfg_read(lo, 4), self.cfg_read(hi, 4)
        assert orig[0] & c.PCI_BASE_ADDRESS_MEM_TYPE_MASK == c.PCI_BASE_ADDRESS_MEM_TYPE_64
        self.cfg_write(lo, 4, 0xFFFF_FFFF)
        self.cfg_write(hi, 4, 0xFFFF_FFFF)
        mask = (self.cfg_read(hi, 4) << 32 | self.cfg_read(lo, 4)) & ~0xF
        self.cfg_write(lo, 4, orig[0])
        self.cfg_write(hi, 4, orig[1])
        self.cfg_write(c.PCI_COMMAND, 2, command)
        return (~mask + 1) & ((1 << 64) - 1)

    def place_bar0(self, base: int) -> None:
        self.cfg_write(c.PCI_BASE_ADDRESS_0, 4, base & 0xFFFF_FFF0)
        self.cfg_write(c.PCI_BASE_ADDRESS_1, 4, base >> 32)

    def enable_device(self) -> None:
        """pci_enable_device + pci_set_master."""
        command = self.cfg_read(c.PCI_COMMAND, 2)
        self.cfg_write(c.PCI_COMMAND, 2, command | c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER)

    def walk_capabilities(self) -> list[tuple[int, int]]:
        """``(id, offset)`` of every capability, as the PCI core walks the list."""
        assert self.cfg_read(c.PCI_STATUS, 2) & c.PCI_STATUS_CAP_LIST
        out, at, seen = [], self.cfg_read(c.PCI_CAPABILITY_LIST, 1) & ~3, set()
        while at and at not in seen:
            seen.add(at)
            out.append((self.cfg_read(at, 1), at))
            at = self.cfg_read(at + 1, 1) & ~3
        return out

    def probe(self) -> None:
        """What virtio_pci_modern_probe finds: the IDs and where each structure lives."""
        assert self.cfg_read(c.PCI_VENDOR_ID, 2) == p.VIRTIO_PCI_VENDOR_ID
        assert self.cfg_read(c.PCI_DEVICE_ID, 2) >= p.VIRTIO_PCI_DEVICE_ID_BASE
        assert self.cfg_read(c.PCI_REVISION_ID, 1) >= 1
        size = self.size_bar0()
        self.place_bar0(self.bar_base)
        self.enable_device()
        for cap_id, at in self.walk_capabilities():
            if cap_id == c.PCI_CAP_ID_MSIX:
                self.msix_cap = at
            elif cap_id == c.PCI_CAP_ID_VNDR:
                cfg_type = self.cfg_read(at + 3, 1)
                # virtio_pci_find_capability keeps the first of each type
                if cfg_type not in self.caps:
                    self.caps[cfg_type] = VirtioCap(at, cfg_type, self.cfg_read(at + 4, 1),
                                                    self.cfg_read(at + 8, 4), self.cfg_read(at + 12, 4))
        for cfg_type in (p.VIRTIO_PCI_CAP_COMMON_CFG, p.VIRTIO_PCI_CAP_NOTIFY_CFG, p.VIRTIO_PCI_CAP_ISR_CFG):
            cap = self.caps[cfg_type]
            assert cap.bar == 0 and cap.offset + cap.length <= size
        self.notify_off_multiplier = self.cfg_read(self.caps[p.VIRTIO_PCI_CAP_NOTIFY_CFG].at + 16, 4)

    # -- BAR0 --------------------------------------------------------------------

    def bar_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.t.read(offset, size), "little")

    def bar_write(self, offset: int, size: int, value: int) -> None:
        self.t.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def common_read(self, field: int, size: int) -> int:
        return self.bar_read(self.caps[p.VIRTIO_PCI_CAP_COMMON_CFG].offset + field, size)

    def common_write(self, field: int, size: int, value: int) -> None:
        self.bar_write(self.caps[p.VIRTIO_PCI_CAP_COMMON_CFG].offset + field, size, value)

    def read_isr(self) -> int:
        return self.bar_read(self.caps[p.VIRTIO_PCI_CAP_ISR_CFG].offset, 1)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.t.read(self.caps[p.VIRTIO_PCI_CAP_DEVICE_CFG].offset + offset, size)

    # -- MSI-X (pci_msix_enable + request_irq) -----------------------------------

    def msix_table(self) -> int:
        """BAR offset of the table (after checking it is in BAR0)."""
        table = self.cfg_read(self.msix_cap + m.PCI_MSIX_TABLE, 4)
        assert table & m.PCI_MSIX_TABLE_BIR == 0
        return table & ~m.PCI_MSIX_TABLE_BIR

    def msix_pba(self) -> int:
        pba = self.cfg_read(self.msix_cap + m.PCI_MSIX_PBA, 4)
        assert pba & m.PCI_MSIX_TABLE_BIR == 0
        return pba & ~m.PCI_MSIX_TABLE_BIR

    def msix_vectors(self) -> int:
        return (self.cfg_read(self.msix_cap + m.PCI_MSIX_FLAGS, 2) & m.PCI_MSIX_FLAGS_QSIZE) + 1

    def msix_control(self, value: int) -> None:
        self.cfg_write(self.msix_cap + m.PCI_MSIX_FLAGS, 2, value)

    def set_vector_mask(self, vector: int, masked: bool) -> None:
        self.bar_write(self.msix_table() + 16 * vector + m.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, int(masked))

    def enable_msix(self) -> int:
        """Enable MSI-X with every entry programmed and unmasked; the number of vectors."""
        n = self.msix_vectors()
        self.msix_control(m.PCI_MSIX_FLAGS_ENABLE | m.PCI_MSIX_FLAGS_MASKALL)
        table = self.msix_table()
        for v in range(n):
            self.bar_write(table + 16 * v + m.PCI_MSIX_ENTRY_LOWER_ADDR, 4, MSI_ADDRESS)
            self.bar_write(table + 16 * v + m.PCI_MSIX_ENTRY_UPPER_ADDR, 4, 0)
            self.bar_write(table + 16 * v + m.PCI_MSIX_ENTRY_DATA, 4, MSI_DATA_BASE + v)
        self.msix_control(m.PCI_MSIX_FLAGS_ENABLE)
        for v in range(n):
            self.set_vector_mask(v, False)
        return n

    # -- §3.1.1 through the common configuration ---------------------------------

    @property
    def status(self) -> int:
        return self.common_read(p.VIRTIO_PCI_COMMON_STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.common_write(p.VIRTIO_PCI_COMMON_STATUS, 1, self.status | bits)

    def device_features(self) -> int:
        words = []
        for sel in (0, 1):
            self.common_write(p.VIRTIO_PCI_COMMON_DFSELECT, 4, sel)
            words.append(self.common_read(p.VIRTIO_PCI_COMMON_DF, 4))
        return words[1] << 32 | words[0]

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.common_write(p.VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
            self.common_write(p.VIRTIO_PCI_COMMON_GF, 4, features >> (32 * sel))

    def reset_device(self) -> None:
        """vp_modern_set_status(0), then wait for the status to read 0 (§4.1.4.3.2)."""
        self.common_write(p.VIRTIO_PCI_COMMON_STATUS, 1, 0)
        assert self.status == 0

    def negotiate(self, features: int | None = None, *, mask: int = ~0) -> bool:
        self.reset_device()
        self.add_status(ACKNOWLEDGE)
        self.add_status(DRIVER)
        if features is None:
            features = self.device_features() & mask
        self.write_features(features)
        self.add_status(FEATURES_OK)
        return bool(self.status & FEATURES_OK)

    def num_queues(self) -> int:
        return self.common_read(p.VIRTIO_PCI_COMMON_NUMQ, 2)

    def select(self, index: int) -> None:
        self.common_write(p.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)

    def set_config_vector(self, vector: int) -> int:
        """vp_modern_config_vector: write, then read back what the device took."""
        self.common_write(p.VIRTIO_PCI_COMMON_MSIX, 2, vector)
        return self.common_read(p.VIRTIO_PCI_COMMON_MSIX, 2)

    def set_queue_vector(self, index: int, vector: int) -> int:
        self.select(index)
        self.common_write(p.VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        return self.common_read(p.VIRTIO_PCI_COMMON_Q_MSIX, 2)

    def write_queue_address(self, lo_field: int, addr: int) -> None:
        """vp_iowrite64_twopart: the low half, then the high half."""
        self.common_write(lo_field, 4, addr)
        self.common_write(lo_field + 4, 4, addr >> 32)

    def setup_queue(self, index: int, size: int | None = None, vector: int | None = None) -> FakeVirtqueue:
        """virtio_pci_modern's setup_vq: everything but queue_enable."""
        self.select(index)
        qmax = self.common_read(p.VIRTIO_PCI_COMMON_Q_SIZE, 2)
        assert qmax, f"queue {index} not available"
        assert self.common_read(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
        vq = FakeVirtqueue(self.mem, self.alloc, index, size or qmax)
        self.common_write(p.VIRTIO_PCI_COMMON_Q_SIZE, 2, vq.size)
        self.write_queue_address(p.VIRTIO_PCI_COMMON_Q_DESCLO, vq.desc)
        self.write_queue_address(p.VIRTIO_PCI_COMMON_Q_AVAILLO, vq.avail)
        self.write_queue_address(p.VIRTIO_PCI_COMMON_Q_USEDLO, vq.used)
        if vector is not None:
            assert self.set_queue_vector(index, vector) == vector, "device refused the vector"
        self.queues[index] = vq
        return vq

    def enable_queue(self, index: int) -> None:
        self.select(index)
        self.common_write(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)

    async def init(self, features: int | None = None, *, mask: int = ~0,
                   queue_sizes: dict[int, int] | None = None) -> list[FakeVirtqueue]:
        """Probe, MSI-X, §3.1.1 with vector 0 for configuration changes and vector i+1 for queue i."""
        if not self.caps:
            self.probe()
        self.enable_msix()
        if not self.negotiate(features, mask=mask):
            raise RuntimeError("device refused the features")
        assert self.set_config_vector(0) == 0
        sizes = queue_sizes or {}
        vqs = [self.setup_queue(i, sizes.get(i), vector=i + 1) for i in range(self.num_queues())]
        for vq in vqs:
            self.enable_queue(vq.index)
        self.add_status(DRIVER_OK)
        await settle()
        return vqs

    async def reset(self) -> None:
        self.reset_device()
        await settle()

    # -- notifications -----------------------------------------------------------

    def notify_offset(self, index: int) -> int:
        """BAR offset of queue ``index``'s notification address (vp_modern_map_vq_notify)."""
        self.select(index)
        off = self.common_read(p.VIRTIO_PCI_COMMON_Q_NOFF, 2)
        return self.caps[p.VIRTIO_PCI_CAP_NOTIFY_CFG].offset + off * self.notify_off_multiplier

    def kick(self, vq: FakeVirtqueue, *, via_bar: bool = False) -> None:
        if via_bar:
            self.bar_write(self.notify_offset(vq.index), 2, vq.index)     # iowrite16(index)
        else:
            self.t.queue_events[vq.index].write(1)      # what KVM's ioeventfd does

    async def wait_used(self, vq: FakeVirtqueue, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        return await wait_used(vq, count, timeout)
