"""What every virtio transport does, whatever its registers look like (§3.1, §2.1, §2.4).

Both transports (virtio-mmio, §4.2, and virtio over PCI, §4.1) let the
driver walk the device status through §3.1.1, read the device's feature
words and write its own through a select register, configure each queue
between FEATURES_OK and DRIVER_OK, and reset the device by writing 0.  Only
the register layout and the way an interrupt reaches the guest differ.
:class:`VirtioTransport` is the shared half:

* the status state machine (:mod:`.status`) and what each transition does:
  feature negotiation at FEATURES_OK, activation at DRIVER_OK (queues
  validated against guest memory, a fresh :class:`DmaGate`, the device's
  :meth:`~VirtioDevice.activate`), reset (deactivate, close the gate, every
  register back to its initial value);
* DEVICE_NEEDS_RESET (§2.1.2), kept apart from the driver's bits;
* the queues' part of a snapshot (:class:`QueueState`), checked on restore
  as the driver's writes are.

A subclass names itself (:attr:`VirtioTransport.NAME`, used in fault
messages), says which guest-fault kinds it reports (:attr:`FAULT_ACCESS`,
:attr:`FAULT_PROTOCOL`), adds its own registers to :meth:`_reset_registers`
(called from ``__init__`` too, so a subclass sets up what it needs first)
and turns the two notifications into interrupts (:meth:`_signal_used`,
:meth:`_signal_config`).

Threads: everything here runs on the asyncio loop that owns the device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import msgspec

from asyncvmm import guestfault
from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.virtio import status as st
from asyncvmm.devices.virtio.device import Activation, VirtioDevice
from asyncvmm.devices.virtio.gate import DmaGate
from asyncvmm.devices.virtio.queue import Queue, QueueConfigError
from asyncvmm.devices.virtio.spec import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    bit,
)
from asyncvmm.memory import GuestMemory

log = logging.getLogger(__name__)


class QueueState(msgspec.Struct, forbid_unknown_fields=True):
    """A queue in a snapshot: the numbers of :class:`Queue` (untrusted on load)."""

    max_size: int
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    event_idx: bool
    indirect_desc: bool
    next_avail: int
    next_used: int
    signalled_used: int
    avail_idx_seen: int


class SnapshotStateError(ValueError):
    """A snapshot's transport state cannot be taken."""


class VirtioTransport:
    """The transport-independent half of a virtio transport driving one :class:`VirtioDevice`."""

    NAME = "virtio"
    FAULT_ACCESS = "other"
    FAULT_PROTOCOL = "other"

    def __init__(self, device: VirtioDevice, *, mem: GuestMemory, queue_events: list[EventFd],
                 loop: asyncio.AbstractEventLoop, faults: guestfault.GuestFaults | None = None) -> None:
        if len(queue_events) != device.num_queues:
            raise ValueError(f"{device.num_queues} queues but {len(queue_events)} eventfds")
        self.device = device
        self.mem = mem
        self.queue_events = queue_events
        self.loop = loop
        self.faults = faults or guestfault.DEFAULT
        self.config_generation = 0
        self.activation: Activation | None = None
        self._reset_registers()
        device.set_config_listener(self._on_config_change)
        device.guest_faults = self.faults

    def _reset_registers(self) -> None:
        """Every register back to its value after reset (§2.4); subclasses add theirs."""
        self.status = st.RESET
        self.needs_reset = False
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.unoffered_feature_written = False   # a bit beyond the 64 any device offers
        self.queue_sel = 0
        # The queue size reads back as the maximum until the driver picks one
        # (§4.1.4.3 queue_size, §4.2.3.2 QueueNum).
        self.queues = [Queue(max_size=n, size=n) for n in self.device.queue_max_sizes]

    @property
    def device_status(self) -> int:
        """The status as the driver reads it: its bits plus the device's DEVICE_NEEDS_RESET."""
        return self.status | (DEVICE_NEEDS_RESET if self.needs_reset else 0)

    def _fault(self, kind: str, fmt: str, *args, level: int = logging.WARNING) -> None:
        self.faults.report(kind, self.NAME + " %s: " + fmt, type(self.device).__name__, *args,
                           level=level)

    def _selected_queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    # -- features (§2.2) ------------------------------------------------------

    def device_features_word(self) -> int:
        """The 32 feature bits selected by the device feature select register."""
        # Words beyond the second are all zero: no device offers bits above 63.
        if self.device_features_sel >= 2:
            return 0
        return self.device.avail_features >> (32 * self.device_features_sel) & 0xFFFF_FFFF

    def _write_driver_features(self, value: int) -> None:
        # §3.1.1 step 4 (and §2.2.1): features are only written between DRIVER and FEATURES_OK.
        if self.status != st.S_DRIVER:
            self._fault(self.FAULT_PROTOCOL, "DriverFeatures written in status %#x ignored", self.status)
            return
        if self.driver_features_sel >= 2:
            self.unoffered_feature_written |= value != 0
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    # -- the status state machine -------------------------------------------

    def _write_status(self, value: int) -> None:
        action = st.transition(self.status, value)
        if action is None:
            self._fault(self.FAULT_PROTOCOL, "status %#x -> %#x is not a valid transition; ignored",
                        self.status, value)
            return
        if action is st.Action.RESET:
            self._reset()
        elif action is st.Action.NEGOTIATE:
            self._negotiate()
        elif action is st.Action.ACTIVATE:
            self.status = value & ~DEVICE_NEEDS_RESET
            self._activate()
        else:
            self.status = value & ~DEVICE_NEEDS_RESET & 0xFF

    def _negotiate(self) -> None:
        offered = self.device.avail_features
        extra = self.driver_features & ~offered
        if extra or self.unoffered_feature_written or not self.driver_features & bit(VIRTIO_F_VERSION_1):
            # §3.1.1 step 6: the driver re-reads the status and sees FEATURES_OK clear.
            self._fault(self.FAULT_PROTOCOL, "refusing driver features %#x (offered %#x)",
                        self.driver_features, offered)
            return
        self.status = st.S_FEATURES_OK

    def _activate(self) -> None:
        features = self.driver_features
        queues = [dataclasses.replace(q, event_idx=bool(features & bit(VIRTIO_F_EVENT_IDX)),
                                      indirect_desc=bool(features & bit(VIRTIO_F_INDIRECT_DESC)))
                  for q in self.queues]
        try:
            for q in queues:
                if q.ready:
                    q.validate(self.mem)
        except QueueConfigError as e:
            self._fault(self.FAULT_PROTOCOL, "cannot activate: %s", e, level=logging.ERROR)
            self.device.activation_failed(str(e))
            self.set_needs_reset()
            return
        gate = DmaGate()
        act = Activation(mem=self.mem, queues=queues, queue_events=self.queue_events,
                         acked_features=features, interrupts=ActivationInterrupts(self, gate),
                         loop=self.loop, gate=gate)
        self.activation = act
        try:
            self.device.activate(act)
        except Exception as e:           # a host failure (e.g. opening a file); the VMM lives on
            log.error("%s: activating %s failed: %s", self.NAME, type(self.device).__name__, e)
            self.device.activation_failed(str(e))
            act.interrupts.needs_reset(str(e))

    def _reset(self) -> None:
        act, self.activation = self.activation, None
        if act is not None:
            # Stop the device first: its engines drain their in-flight operations (an
            # io_uring op leaves the gate only when this loop reaps it).  Then the gate
            # is drained and shut, whatever deactivate did.
            try:
                self.device.deactivate()
            except Exception:
                log.exception("%s: deactivating %s failed", self.NAME, type(self.device).__name__)
            act.gate.close()
        self._reset_registers()

    # -- notifications (loop thread) ------------------------------------------

    def _signal_used(self, queue: int | None) -> None:
        """A used buffer notification for ``queue`` (``None``: the device did not say which)."""
        raise NotImplementedError

    def _signal_config(self) -> None:
        """A configuration change notification."""
        raise NotImplementedError

    def _queue_irqfd(self, queue: int) -> int | None:
        """The eventfd that sends ``queue``'s notification inside KVM, if there is one."""
        return None

    def set_needs_reset(self) -> None:
        self.needs_reset = True
        # §2.1.2: a device that is live tells the driver with a configuration change notification.
        if self.status & DRIVER_OK:
            self._signal_config()

    def _on_config_change(self) -> None:
        """The device's configuration changed (loop thread)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
        if self.status & DRIVER_OK:
            self._signal_config()

    # -- snapshots (loop thread, vCPUs paused) ---------------------------------

    def in_flight(self) -> int:
        """Requests the device took from the guest and has not answered yet."""
        act = self.activation
        if act is None:
            return 0
        return sum((q.next_avail - q.next_used - self.device.held_chains(i)) & 0xFFFF
                   for i, q in enumerate(act.queues))

    def _queue_states(self) -> list[QueueState]:
        """Each queue where the live device is in it, its held chains given back."""
        act = self.activation
        queues = []
        for i, q in enumerate(act.queues if act is not None else self.queues):
            state = q.state()
            state["next_avail"] = (q.next_avail - self.device.held_chains(i)) & 0xFFFF
            queues.append(QueueState(**state))
        return queues

    def _check_state(self, *, device_type: int, status: int, driver_features: int,
                     queues: list[QueueState], registers: dict[str, int]) -> list[Queue]:
        """Check the shared part of a snapshot's state; the live queues it describes.

        ``registers`` are the transport's 32-bit registers, by name, checked for range.
        Raises :class:`SnapshotStateError`; nothing is changed here.
        """
        if device_type != self.device.device_type:
            raise SnapshotStateError(f"virtio state of device type {device_type} for a "
                                     f"device of type {self.device.device_type}")
        if [q.max_size for q in queues] != list(self.device.queue_max_sizes):
            raise SnapshotStateError("virtio state with other queues than the device has")
        for name, value in {"status": status, **registers}.items():
            if not 0 <= value <= 0xFFFF_FFFF:
                raise SnapshotStateError(f"virtio state: {name} out of range")
        if not 0 <= driver_features < 1 << 64 or driver_features & ~self.device.avail_features:
            raise SnapshotStateError("virtio state: driver features the device does not offer")
        try:
            live = []
            for q in queues:
                for name in ("next_avail", "next_used", "signalled_used", "avail_idx_seen"):
                    if not 0 <= getattr(q, name) <= 0xFFFF:
                        raise SnapshotStateError(f"virtio state: queue {name} out of range")
                queue = Queue(**msgspec.structs.asdict(q))
                if queue.ready and status & DRIVER_OK:
                    queue.validate(self.mem)
                live.append(queue)
        except (QueueConfigError, ValueError, TypeError) as e:
            raise SnapshotStateError(f"virtio state: {e}") from None
        return live

    def _resume(self) -> None:
        """After a restore: activate the device if the driver had (DRIVER_OK), and kick every
        queue once so requests made before the snapshot are seen."""
        if self.status & DRIVER_OK and not self.needs_reset:
            self._activate()
            for evt in self.queue_events:
                evt.write(1)


class ActivationInterrupts:
    """The interrupts one activation may raise; silent once that activation is reset."""

    def __init__(self, transport: VirtioTransport, gate: DmaGate) -> None:
        self.transport = transport
        self.gate = gate

    def _live(self) -> bool:
        return self.gate.is_open

    def signal_used(self, queue: int | None = None) -> None:
        if self._live():
            self.transport._signal_used(queue)

    def signal_config(self) -> None:
        if self._live():
            self.transport._signal_config()

    def irqfd(self, queue: int) -> int | None:
        return self.transport._queue_irqfd(queue) if self._live() else None

    def needs_reset(self, reason: str) -> None:
        if self._live():
            t = self.transport
            t._fault(t.FAULT_PROTOCOL, "needs reset: %s", reason, level=logging.ERROR)
            t.set_needs_reset()
