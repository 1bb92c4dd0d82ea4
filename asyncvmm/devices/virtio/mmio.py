"""The virtio-mmio transport, version 2 (§4.2), as a bus device.

Primer.  Each device gets a 4 KiB window of 32-bit little-endian registers
(names below as in Linux's ``virtio_mmio.h``; the spec's QueueDriver/
QueueDevice are ``QUEUE_AVAIL``/``QUEUE_USED`` there) and, from 0x100, its
device-specific configuration space.  The driver identifies the device
(MagicValue "virt", Version 2, DeviceID), walks the status byte through
§3.1.1, reads and writes 64-bit feature words 32 bits at a time through the
``*_SEL`` registers, and sets up each queue through QueueSel (§4.2.3.2).

Threads.  The transport and its device belong to the asyncio loop:
:meth:`read`/:meth:`write` run there (a vCPU thread hands each register
access over and waits for the answer), so activation (DRIVER_OK) and reset
run synchronously, in order with every other register access.  A reset
stops the device and closes the activation's :class:`DmaGate` before the
driver's status write completes, so afterwards nothing of the old
activation touches guest memory.  Queue kicks do not come here: KVM signals
the queue's eventfd directly (an ioeventfd on QueueNotify); a QueueNotify
that does reach us signals the same eventfd.

Reads need not exit at all.  The builder maps every window as a read-only
KVM memory slot over a page that holds what each readable register and the
configuration space would answer (:meth:`attach_register_page`); the
transport rewrites that page whenever a value changes (a register write, an
interrupt, a reset, a config change), before the guest can look again, and
the guest's reads never leave the vCPU.  Writes still exit (or, for
QueueNotify and the used-buffer InterruptACK, end in KVM's ioeventfds).
Without the page (KVM refused the slot) reads exit and are answered here.

The interrupt word is also answered on the vCPU thread: Linux writes
InterruptACK (and, without the page, reads InterruptStatus) on every
interrupt, so :meth:`read_inline` / :meth:`write_inline` answer those two
registers there (measured in ``docs/architecture.md``);
``interrupt_status`` is therefore shared between the loop (which raises
interrupts) and the vCPUs, and only it is behind a lock.

What is not about registers (the status state machine, feature
negotiation, activation, reset, the queues' snapshot state) is shared with
virtio-pci in :mod:`asyncvmm.devices.virtio.transport`.

Everything a driver does wrong is ignored and reported to the VM's
:class:`~asyncvmm.guestfault.GuestFaults` (counted; logged a few times).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from typing import Protocol

import msgspec

from asyncvmm import guestfault
from asyncvmm.devices.irq import EventFd, IrqLine
from asyncvmm.devices.virtio import status as st
from asyncvmm.devices.virtio.device import VirtioDevice
from asyncvmm.devices.virtio.spec import DRIVER_OK
from asyncvmm.devices.virtio.transport import QueueState, SnapshotStateError, VirtioTransport
from asyncvmm.memory import GuestMemory

# QueueState and SnapshotStateError live in transport.py; their old home still names them.
__all__ = ["DRIVER_OK", "QueueState", "SnapshotStateError", "TransportState", "VirtioMmioTransport"]

log = logging.getLogger(__name__)

MMIO_MAGIC_VALUE = 0x74726976      # "virt"
MMIO_VERSION = 2                   # the non-legacy interface only
VENDOR_ID = 0x4D4D5641             # "AVMM"

VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_QUEUE_RESET = 0x0C0
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

VIRTIO_MMIO_INT_VRING = 1
VIRTIO_MMIO_INT_CONFIG = 2

# Queue address registers: (attribute, high half?).
_QUEUE_ADDR_REGS = {
    VIRTIO_MMIO_QUEUE_DESC_LOW: ("desc_table", False),
    VIRTIO_MMIO_QUEUE_DESC_HIGH: ("desc_table", True),
    VIRTIO_MMIO_QUEUE_AVAIL_LOW: ("avail_ring", False),
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH: ("avail_ring", True),
    VIRTIO_MMIO_QUEUE_USED_LOW: ("used_ring", False),
    VIRTIO_MMIO_QUEUE_USED_HIGH: ("used_ring", True),
}
_U32 = struct.Struct("<I")
PAGE_SIZE = 0x1000
# The registers a driver may read (§4.2.2); every other word of the page stays zero.
_READABLE = (VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_VERSION, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_VENDOR_ID,
             VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
             VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_SHM_LEN_LOW,
             VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
             VIRTIO_MMIO_CONFIG_GENERATION)
# While InterruptStatus still has the bits being raised, no new edge is sent unless the
# last one is this old (see VirtioMmioTransport.raise_interrupt).
REASSERT_S = 0.005


class KernelVringAck(Protocol):
    """KVM completing the driver's InterruptACK of the used-buffer bit (an ioeventfd on the
    register with datamatch 1 over an eventfd that counts them); the builder makes one per window."""

    def switch(self, on: bool) -> bool:
        """Add (``on``) or remove the ioeventfd; whether KVM did."""

    def taken(self) -> int:
        """How many such ACKs KVM completed since the last call."""


class TransportState(msgspec.Struct, forbid_unknown_fields=True, tag="virtio-mmio-v1"):
    """A virtio-mmio transport's registers and its queues' positions in a snapshot."""

    device_type: int
    status: int
    needs_reset: bool
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    shm_sel: int
    interrupt_status: int
    config_generation: int
    queues: list[QueueState]


class VirtioMmioTransport(VirtioTransport):
    """One virtio-mmio window driving one :class:`VirtioDevice`."""

    NAME = "virtio-mmio"
    FAULT_ACCESS = "virtio_mmio_access"
    FAULT_PROTOCOL = "virtio_mmio_protocol"

    def __init__(self, device: VirtioDevice, *, mem: GuestMemory, irq: IrqLine,
                 queue_events: list[EventFd], loop: asyncio.AbstractEventLoop,
                 faults: guestfault.GuestFaults | None = None,
                 kernel_vring_ack: KernelVringAck | None = None) -> None:
        self.irq = irq
        self._page: memoryview | None = None   # the guest's read-only view of the registers
        self._config_len = 0                   # config bytes last written to the page
        self._isr_lock = threading.Lock()      # interrupt_status: the loop and vCPU threads
        self.interrupt_status = 0
        # InterruptStatus reads with the used-buffer bit set until reset: KVM completes its ACK,
        # or a back end outside the VMM writes the irqfd itself (see _activate, _queue_irqfd).
        self._vring_always = False
        self._kernel_ack = kernel_vring_ack
        self._kvm_acks_vring = False
        self._last_edge = float("-inf")        # time.monotonic() of the last edge sent
        self._edge_unseen = False              # the driver has not acknowledged the last edge
        self.interrupts_coalesced = 0          # raises the driver had not yet looked for
        super().__init__(device, mem=mem, queue_events=queue_events, loop=loop, faults=faults)
        device.set_config_watcher(self._sync_config)

    def _reset_registers(self) -> None:
        super()._reset_registers()
        self.shm_sel = 0
        with self._isr_lock:
            self.interrupt_status = 0
            self._vring_always = False
            self._edge_unseen = False
        if self._kvm_acks_vring:
            self._kvm_acks_vring = not self._kernel_ack.switch(False)
        self._sync_page()

    def _activate(self) -> None:
        self._let_kvm_ack_vring()
        super()._activate()

    def _let_kvm_ack_vring(self) -> None:
        """Let KVM complete the driver's ACK of the used-buffer bit, which then always reads set.

        Linux's handler costs two exits per interrupt: it reads InterruptStatus and writes
        what it read to InterruptACK.  With the used-buffer bit reported from activation to
        reset (§4.2.2: the device has used a buffer in an active queue, or may have), its ACK
        changes nothing, so an ioeventfd with that datamatch (over an eventfd that counts
        them) completes it in KVM and only the read still reaches the VMM.  An ACK with the
        config bit in it is another value and still comes here.  The driver's handler looks
        at every ring on each interrupt, finding nothing new at worst; raise_interrupt
        learns of the ACKs from the ioeventfd's counter (:meth:`KernelVringAck.taken`).
        With the register page (:meth:`attach_register_page`) the read stays in the vCPU
        too, and an interrupt costs no exit at all.  Without the kernel's help (no
        ``kernel_vring_ack``, or KVM refused it) the register keeps the ACK-cleared behaviour.
        """
        if self._kernel_ack is not None and not self._kvm_acks_vring:
            self._kvm_acks_vring = self._kernel_ack.switch(True)
            if self._kvm_acks_vring:
                self._kernel_ack.taken()           # ACKs of an earlier activation do not count
        if self._kvm_acks_vring:
            self._set_vring_always()

    def _set_vring_always(self) -> None:
        with self._isr_lock:
            self._vring_always = True
            self._sync_isr()

    # -- the register page ----------------------------------------------------

    def attach_register_page(self, page: memoryview | None) -> None:
        """Have the guest read the registers from ``page`` (a :data:`PAGE_SIZE` view the
        builder maps read-only into the guest at this window), kept current from now on;
        ``None``: reads exit and are answered by :meth:`read` again."""
        if page is not None and (len(page) != PAGE_SIZE or page.readonly):
            raise ValueError(f"a register page is {PAGE_SIZE} writable bytes")
        with self._isr_lock:                       # a vCPU's ACK may be writing the old one
            self._page = page
        if page is not None:
            page[:] = bytes(PAGE_SIZE)
            self._config_len = 0
            self._sync_page()

    def _sync_page(self) -> None:
        """Every readable register and the config space into the page (after a register
        write, a reset, a config change or a restore: none is on the I/O path)."""
        page = self._page
        if page is None:
            return
        for offset in _READABLE:
            if offset != VIRTIO_MMIO_INTERRUPT_STATUS:
                _U32.pack_into(page, offset, self._read_register(offset) & 0xFFFF_FFFF)
        with self._isr_lock:
            self._sync_isr()
        self._sync_config()

    def _sync_isr(self) -> None:
        """InterruptStatus into the page (the caller holds ``_isr_lock``)."""
        page = self._page
        if page is not None:
            _U32.pack_into(page, VIRTIO_MMIO_INTERRUPT_STATUS, self._isr_value())

    def _sync_config(self) -> None:
        page = self._page
        if page is None:
            return
        config = self.device._config[:PAGE_SIZE - VIRTIO_MMIO_CONFIG]
        end = VIRTIO_MMIO_CONFIG + len(config)
        page[VIRTIO_MMIO_CONFIG:end] = config
        if self._config_len > len(config):         # shorter than before: the rest reads zero
            page[end:VIRTIO_MMIO_CONFIG + self._config_len] = bytes(self._config_len - len(config))
        self._config_len = len(config)

    def _on_config_change(self) -> None:
        super()._on_config_change()
        self._sync_page()

    def set_needs_reset(self) -> None:
        super().set_needs_reset()
        self._sync_page()

    # -- BusDevice (loop thread) --------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset >= VIRTIO_MMIO_CONFIG:
            data = self.device.read_config(offset - VIRTIO_MMIO_CONFIG, size)
            return bytes(data[:size]).ljust(size, b"\0")
        if size != 4 or offset % 4:
            self._fault(self.FAULT_ACCESS, "%d-byte read at register offset %#x ignored", size, offset)
            return bytes(size)
        return _U32.pack(self._read_register(offset) & 0xFFFF_FFFF)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= VIRTIO_MMIO_CONFIG:
            self.device.write_config(offset - VIRTIO_MMIO_CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            self._fault(self.FAULT_ACCESS, "%d-byte write at register offset %#x ignored",
                        len(data), offset)
            return
        self._write_register(offset, _U32.unpack(data)[0])
        if offset != VIRTIO_MMIO_QUEUE_NOTIFY:
            self._sync_page()                       # before the vCPU reads again

    # -- InlineRegisters (vCPU threads) -------------------------------------

    def read_inline(self, offset: int, size: int) -> bytes | None:
        """InterruptStatus, answered on the vCPU thread; anything else goes to the loop."""
        if offset != VIRTIO_MMIO_INTERRUPT_STATUS or size != 4:
            return None
        return _U32.pack(self._interrupt_status_register())

    def write_inline(self, offset: int, data: bytes) -> bool:
        """InterruptACK, handled on the vCPU thread; anything else goes to the loop."""
        if offset != VIRTIO_MMIO_INTERRUPT_ACK or len(data) != 4:
            return False
        self._ack_interrupt(_U32.unpack(data)[0])
        return True

    def _interrupt_status_register(self) -> int:
        with self._isr_lock:
            return self._isr_value()

    def _isr_value(self) -> int:
        if self._vring_always:
            return self.interrupt_status | VIRTIO_MMIO_INT_VRING
        return self.interrupt_status

    def _ack_interrupt(self, bits: int) -> None:
        with self._isr_lock:
            self.interrupt_status &= ~bits
            if bits & VIRTIO_MMIO_INT_VRING:
                self._edge_unseen = False          # its handler is under way
            self._sync_isr()

    # -- registers ----------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        q = self._selected_queue()
        if offset == VIRTIO_MMIO_MAGIC_VALUE:
            return MMIO_MAGIC_VALUE
        if offset == VIRTIO_MMIO_VERSION:
            return MMIO_VERSION
        if offset == VIRTIO_MMIO_DEVICE_ID:
            return self.device.device_type
        if offset == VIRTIO_MMIO_VENDOR_ID:
            return VENDOR_ID
        if offset == VIRTIO_MMIO_DEVICE_FEATURES:
            return self.device_features_word()
        if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
            return q.max_size if q else 0   # 0: no such queue (§4.2.3.2)
        if offset == VIRTIO_MMIO_QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            return self._interrupt_status_register()
        if offset == VIRTIO_MMIO_STATUS:
            return self.device_status
        if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH,
                      VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_BASE_HIGH):
            return 0xFFFF_FFFF              # all ones: no shared memory region (§4.2.2)
        if offset == VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        # Write-only registers and holes read as zero (§4.2.2.1 leaves them undefined).
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            if value < len(self.queue_events):
                self.queue_events[value].write(1)
        elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
            self._ack_interrupt(value)
        elif offset == VIRTIO_MMIO_STATUS:
            self._write_status(value)
        elif offset == VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
        elif offset in (VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY) or offset in _QUEUE_ADDR_REGS:
            self._write_queue_register(offset, value)
        else:
            self._fault(self.FAULT_ACCESS, "write of %#x to read-only or unknown register %#x ignored",
                        value, offset)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        # §4.2.3.2: queues are set up after FEATURES_OK and before DRIVER_OK.
        if q is None or self.status != st.S_FEATURES_OK:
            self._fault(self.FAULT_PROTOCOL, "queue register %#x written for queue %d in status %#x "
                        "ignored", offset, self.queue_sel, self.status)
            return
        if offset == VIRTIO_MMIO_QUEUE_READY:
            q.ready = bool(value & 1)
        elif q.ready:
            # §4.2.2.2: a ready queue's configuration must not change.
            self._fault(self.FAULT_PROTOCOL, "queue %d reconfigured while ready; ignored", self.queue_sel)
        elif offset == VIRTIO_MMIO_QUEUE_NUM:
            q.size = value
        else:
            attr, high = _QUEUE_ADDR_REGS[offset]
            old = getattr(q, attr)
            new = (old & 0xFFFF_FFFF) | (value << 32) if high else (old & ~0xFFFF_FFFF) | value
            setattr(q, attr, new)

    # -- snapshots (loop thread, vCPUs paused) ---------------------------------

    def save_state(self) -> TransportState:
        """The registers, and each queue where the live device is in it (its held chains
        given back), for a device with nothing in flight (:meth:`in_flight`)."""
        with self._isr_lock:
            isr = self.interrupt_status
        return TransportState(
            device_type=self.device.device_type, status=self.status, needs_reset=self.needs_reset,
            device_features_sel=self.device_features_sel, driver_features_sel=self.driver_features_sel,
            driver_features=self.driver_features, queue_sel=self.queue_sel, shm_sel=self.shm_sel,
            interrupt_status=isr, config_generation=self.config_generation, queues=self._queue_states())

    def restore_state(self, state: TransportState) -> None:
        """Take a snapshot's registers and queues (each checked as the driver's writes are),
        then activate the device if the driver had (DRIVER_OK) and kick every queue once."""
        queues = self._check_state(
            device_type=state.device_type, status=state.status, driver_features=state.driver_features,
            queues=state.queues,
            registers={name: getattr(state, name) for name in (
                "queue_sel", "device_features_sel", "driver_features_sel", "shm_sel",
                "interrupt_status", "config_generation")})
        self.status = state.status & 0xFF
        self.needs_reset = state.needs_reset
        self.device_features_sel = state.device_features_sel
        self.driver_features_sel = state.driver_features_sel
        self.driver_features = state.driver_features
        self.queue_sel = state.queue_sel
        self.shm_sel = state.shm_sel
        self.config_generation = state.config_generation
        self.queues = queues
        with self._isr_lock:
            self.interrupt_status = state.interrupt_status
        self._sync_page()
        self._resume()

    # -- interrupts (loop thread) -------------------------------------------

    def raise_interrupt(self, bits: int) -> None:
        """Set ``bits`` in InterruptStatus; send an edge only if that sets a bit (§4.2.2) -- or,
        while the used-buffer bit always reads set (:meth:`_let_kvm_ack_vring`), only if the
        driver has acknowledged the last edge.

        The irqfd is an edge, but the register behaves like a level: while a
        bit is still set the driver has not acknowledged the interrupt that set
        it, and Linux's handler reads InterruptStatus, writes InterruptACK and
        only then looks at the rings, so a used buffer added before the ACK is
        seen by that handler run (the ACK takes the same lock).  A second edge
        would only interrupt the vCPU again: on this host the irqfd write was
        44% of the loop's busy time under the block benchmark
        (docs/benchmarks.md).  An edge is still sent when the last one is
        older than :data:`REASSERT_S`, so a lost edge (a restore, a masked
        pin) costs a pause, never a hung device.  When KVM completes the ACK
        its counter says whether the driver's handler has acknowledged the
        last edge; if not, that handler is still to look at the rings.
        """
        now = time.monotonic()
        with self._isr_lock:
            pending = self.interrupt_status
            self.interrupt_status = pending | bits
            if self._vring_always:
                # The bit never clears: the driver has not started on the last edge while it
                # has not acknowledged it (in KVM, counted, or here).
                if self._edge_unseen and self._kvm_acks_vring and self._kernel_ack.taken():
                    self._edge_unseen = False
                # A new config bit gets its edge: the handler may have read the status already.
                coalesce = self._edge_unseen and not bits & ~pending & VIRTIO_MMIO_INT_CONFIG
            else:
                coalesce = bits & ~pending == 0
            if bits & ~pending:
                self._sync_isr()                    # before the edge
            if coalesce and now - self._last_edge < REASSERT_S:
                self.interrupts_coalesced += 1
                return
            self._last_edge = now
            self._edge_unseen = True
        self.irq.trigger()

    def _signal_used(self, queue: int | None) -> None:
        self.raise_interrupt(VIRTIO_MMIO_INT_VRING)

    def _queue_irqfd(self, queue: int) -> int | None:
        """The device's own irqfd, for a back end outside the VMM (vhost-net, vhost-user) to write.

        Such a back end signals without telling the transport, so from now until the driver
        resets the device InterruptStatus reads with the used-buffer bit set (§4.2.2 lets it be
        set while any queue may have used buffers; Firecracker does the same for vhost-user).
        The driver's handler then looks at every ring on each interrupt, finding nothing new at
        worst, and no signal waits for the loop: without this each one was an eventfd read,
        a Python callback and an irqfd write on the loop.  Config interrupts still set bit 1.
        Usually the activation already did this (:meth:`_let_kvm_ack_vring`).
        """
        evt = getattr(self.irq, "eventfd", None)
        if evt is None:
            return None
        self._set_vring_always()
        self._let_kvm_ack_vring()
        return evt.fd

    def _signal_config(self) -> None:
        self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG)
