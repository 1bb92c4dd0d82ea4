"""A virtio-block device served by a vhost-user back end (Firecracker's drive ``socket``).

The guest's requests never reach this process: the back end (e.g.
qemu-storage-daemon's ``vhost-user-blk`` export) maps guest RAM from the
memfd the VMM gives it, reads the request queue's kick eventfd (the queue's
KVM ioeventfd) and signals the call eventfd.  The VMM's part is the control
plane (:mod:`asyncvmm.devices.vhost_user`), as in Firecracker 1.16:

* at construction (``PUT /drives``' check and ``InstanceStart``): connect,
  ``SET_OWNER``, agree the features -- ``VIRTIO_F_VERSION_1``,
  ``VIRTIO_RING_F_EVENT_IDX``, ``VIRTIO_BLK_F_RO`` (read-only is the back
  end's choice), ``VIRTIO_BLK_F_FLUSH`` for ``cache_type`` Writeback -- and
  the protocol features ``CONFIG`` and ``REPLY_ACK``; the config space
  (capacity and the rest, 60 bytes) comes from ``GET_CONFIG``;
* at activation (DRIVER_OK, on the loop): ``SET_FEATURES`` with what the
  driver acked, ``SET_MEM_TABLE`` (one region per RAM region: guest address,
  size, this process's address, offset in the memfd; the fds by
  ``SCM_RIGHTS``), then the vring: size, addresses translated to this
  process's userspace addresses, base (the next available index), kick =
  the queue's ioeventfd, call = the interrupt, and enable;
* at reset: ``GET_VRING_BASE``, which stops the ring before the driver's
  status write completes.

The call fd is the transport's irqfd (``Activation.interrupts.irqfd``):
on virtio-pci the queue's MSI-X vector, on virtio-mmio the device's line
(InterruptStatus then reports a used buffer on every read until reset), so
a completion reaches the guest without this process.  Where the transport
has none (a masked vector) it is an eventfd of the device's own, read on
the loop, each signal relayed as ``signal_used``.

A back end that dies (EOF on the socket) or says something unasked is
logged once; the device drops the connection, sets DEVICE_NEEDS_RESET and
answers every request the guest makes from then on with
``VIRTIO_BLK_S_IOERR`` in Python (requests the back end had taken are lost
with it).  The VMM lives on.  A back end that fails during activation is a
host failure: the transport logs it and sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.vhost_user import protocol as p
from asyncvmm.devices.vhost_user.frontend import Frontend, VhostUserError
from asyncvmm.devices.virtio.block.device import QUEUE_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO
from asyncvmm.devices.virtio.block.request import VIRTIO_BLK_S_IOERR
from asyncvmm.devices.virtio.chain import DescriptorChain
from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.handler import ChainOutcome, QueueHandler, Used
from asyncvmm.devices.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, bit
from asyncvmm.memory import GuestMemory
from asyncvmm.metrics import MetricGroup

log = logging.getLogger(__name__)

#: virtio-blk's config space as Firecracker asks the back end for it (§5.2.4 up to ``unused1``).
BLOCK_CONFIG_SPACE_SIZE = 60
#: The virtio features a vhost-user drive may have (besides FLUSH for Writeback).
AVAILABLE_FEATURES = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_BLK_F_RO)
                      | bit(p.VHOST_USER_F_PROTOCOL_FEATURES))
PROTOCOL_FEATURES = bit(p.VHOST_USER_PROTOCOL_F_CONFIG) | bit(p.VHOST_USER_PROTOCOL_F_REPLY_ACK)


@dataclass
class VhostUserBlockMetrics(MetricGroup):
    """Firecracker's ``vhost_user_block_<drive_id>`` group, and the back-end failures."""

    STORE_FIELDS = frozenset({"init_time_us", "activate_time_us", "config_change_time_us"})

    activate_fails: int = 0
    cfg_fails: int = 0
    init_time_us: int = 0
    activate_time_us: int = 0
    config_change_time_us: int = 0
    # Not in Firecracker:
    backend_failures: int = 0           # the back end closed the connection or broke the protocol
    failed_reqs_count: int = 0          # requests answered IOERR after the back end was lost


class VhostUserBlockError(Exception):
    """The drive could not be set up; the message is Firecracker's ("Vhost-user error: ...")."""


class VhostUserBlock(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, drive_id: str, socket_path: str, *, is_root_device: bool = False,
                 partuuid: str | None = None, cache_type: str = "Unsafe",
                 metrics: VhostUserBlockMetrics | None = None, timeout: float | None = None) -> None:
        super().__init__()
        start = time.monotonic_ns()
        self.drive_id = drive_id
        self.socket_path = socket_path
        self.is_root_device = is_root_device
        self.partuuid = partuuid
        self.cache_type = cache_type
        self.metrics = metrics or VhostUserBlockMetrics()
        wanted = AVAILABLE_FEATURES | (bit(VIRTIO_BLK_F_FLUSH) if cache_type == "Writeback" else 0)
        kwargs = {} if timeout is None else {"timeout": timeout}
        try:
            self.frontend: Frontend | None = Frontend.connect(socket_path, **kwargs)
        except VhostUserError as e:
            raise VhostUserBlockError(f"Vhost-user error: {e}") from None
        try:
            self.backend_features, self.protocol_features = self.frontend.negotiate(
                wanted, PROTOCOL_FEATURES)
            if self.protocol_features & bit(p.VHOST_USER_PROTOCOL_F_CONFIG):
                self._config = self.frontend.get_config(0, BLOCK_CONFIG_SPACE_SIZE)
        except VhostUserError as e:
            self.frontend.close()
            raise VhostUserBlockError(f"Vhost-user error: {e}") from None
        self.read_only = bool(self.backend_features & bit(VIRTIO_BLK_F_RO))
        self.lost: str | None = None              # why the back end is gone, once it is
        self._act: Activation | None = None
        self._call_events: list[EventFd] = []
        self._fallback: _IoErrorHandler | None = None
        self.metrics.init_time_us = (time.monotonic_ns() - start) // 1000

    @property
    def avail_features(self) -> int:
        # PROTOCOL_FEATURES is a vhost-user bit, not the driver's.
        return self.backend_features & ~bit(p.VHOST_USER_F_PROTOCOL_FEATURES)

    def write_config(self, offset: int, data: bytes) -> None:
        # No VIRTIO_BLK_F_CONFIG_WCE: nothing in this config is writable.
        self.metrics.cfg_fails += 1
        super().write_config(offset, data)

    def config_update(self) -> None:
        """Read the config space from the back end again and tell the driver (Firecracker's
        ``PATCH /drives/{id}`` without fields: the back end's disk changed size)."""
        start = time.monotonic_ns()
        if self.frontend is None:
            raise VhostUserBlockError(f"Vhost-user error: the back end is gone ({self.lost})")
        try:
            self._config = self.frontend.get_config(0, BLOCK_CONFIG_SPACE_SIZE)
        except VhostUserError as e:
            self._lose(str(e), notify=True)
            raise VhostUserBlockError(f"Vhost-user error: {e}") from None
        self.config_changed()
        self.metrics.config_change_time_us = (time.monotonic_ns() - start) // 1000

    # -- lifecycle (loop) ---------------------------------------------------------

    def activate(self, activation: Activation) -> None:
        start = time.monotonic_ns()
        self.deactivate()
        if self.frontend is None:
            # The back end is gone: the guest gets errors, never a hang.
            self._act = activation
            self._start_fallback(activation, resume_at_avail=False)
            return
        queue = activation.queues[0]
        if not queue.ready:
            raise ActivationError(f"vhost-user block {self.drive_id}: request queue not ready")
        mem = activation.mem
        fe = self.frontend
        try:
            features = activation.acked_features | (
                self.backend_features & bit(p.VHOST_USER_F_PROTOCOL_FEATURES))
            fe.set_features(features)
            regions, fds = memory_table(mem)
            fe.set_mem_table(regions, fds)
            fe.set_vring_num(0, queue.size)
            fe.set_vring_addr(p.VringAddr(
                index=0, flags=0, descriptor=host_address(mem, queue.desc_table),
                used=host_address(mem, queue.used_ring), available=host_address(mem, queue.avail_ring)))
            fe.set_vring_base(0, queue.next_avail)
            fe.set_vring_kick(0, activation.queue_events[0].fileno())
            fe.set_vring_call(0, self._call_fd(activation, 0))
            if features & bit(p.VHOST_USER_F_PROTOCOL_FEATURES):
                fe.set_vring_enable(0, True)      # such rings start disabled
        except ValueError as e:         # our side (memory not shareable); the transport counts it
            self._close_call_events(activation)
            raise ActivationError(f"vhost-user block {self.drive_id}: {e}") from None
        except VhostUserError as e:
            # The connection is in an unknown state: it is lost, and the guest gets errors.
            self.metrics.activate_fails += 1
            self._close_call_events(activation)
            self._act = activation
            self._lose(str(e), notify=True)
            return
        self._act = activation
        activation.loop.add_reader(fe.fileno(), self._on_backend_readable)
        self.metrics.activate_time_us = (time.monotonic_ns() - start) // 1000

    def _call_fd(self, activation: Activation, index: int) -> int:
        """The queue's irqfd where the transport has one; else an eventfd relayed on the loop."""
        irqfd = getattr(activation.interrupts, "irqfd", None)
        direct = irqfd(index) if irqfd is not None else None
        if direct is not None:
            log.info("vhost-user block %s: queue %d completions signal the guest's irqfd directly",
                     self.drive_id, index)
            return direct.fileno() if hasattr(direct, "fileno") else direct
        log.info("vhost-user block %s: queue %d completions are relayed to the transport on the loop",
                 self.drive_id, index)
        evt = EventFd()
        self._call_events.append(evt)
        activation.loop.add_reader(evt.fileno(), self._relay_call, evt, activation, index)
        return evt.fileno()

    @staticmethod
    def _relay_call(evt: EventFd, activation: Activation, index: int) -> None:
        if evt.read():
            activation.interrupts.signal_used(index)

    def _close_call_events(self, activation: Activation) -> None:
        for evt in self._call_events:
            activation.loop.remove_reader(evt.fileno())
            evt.close()
        self._call_events.clear()

    def deactivate(self) -> None:
        act, self._act = self._act, None
        if act is None:
            return
        if self._fallback is not None:
            self._fallback.stop()
            self._fallback = None
        if self.frontend is not None:
            act.loop.remove_reader(self.frontend.fileno())
            try:
                # Stops the ring: the back end touches guest memory no more once it answers.
                self.frontend.get_vring_base(0)
            except VhostUserError as e:
                self._lose(f"{e}", notify=False)
        self._close_call_events(act)

    def close(self) -> None:
        self.deactivate()
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None

    # -- the back end's death (loop) --------------------------------------------------

    def _on_backend_readable(self) -> None:
        # Nothing is asked outside the synchronous exchanges, so anything readable now is
        # EOF or a message nobody asked for: either way the connection is over.
        try:
            data = self.frontend.sock.recv(p.HEADER.size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            data = None
            why = f"the connection failed: {e}"
        else:
            why = ("it closed the connection" if not data
                   else f"it sent {len(data)} bytes nobody asked for")
        self._lose(why, notify=True)

    def _lose(self, why: str, *, notify: bool) -> None:
        """The back end is gone: close it, say so once, and answer the guest with errors."""
        if self.frontend is None:
            return
        act = self._act
        if act is not None:
            act.loop.remove_reader(self.frontend.fileno())
        self.frontend.close()
        self.frontend = None
        self.lost = why
        self.metrics.backend_failures += 1
        log.error("vhost-user block %s: lost the back end at %s: %s; the drive fails every "
                  "request from now on", self.drive_id, self.socket_path, why)
        if act is not None and notify:
            act.interrupts.needs_reset(f"vhost-user back end lost: {why}")
            self._start_fallback(act, resume_at_avail=True)

    def _start_fallback(self, activation: Activation, *, resume_at_avail: bool) -> None:
        queue = activation.queues[0]
        if not queue.ready:
            return
        if resume_at_avail:
            # What the back end had taken is unknown and lost with it: go on from the driver's
            # newest request, so no chain is ever answered twice.
            rings = queue.rings(activation.mem)
            queue.next_avail = int.from_bytes(rings.avail[2:4], "little")
            queue.next_used = queue.signalled_used = int.from_bytes(rings.used[2:4], "little")
            queue.avail_idx_seen = queue.next_avail
        self._fallback = _IoErrorHandler(self, activation)
        self._fallback.start()


class _IoErrorHandler(QueueHandler):
    """Answers every request with VIRTIO_BLK_S_IOERR (the back end is gone)."""

    def __init__(self, device: VhostUserBlock, activation: Activation) -> None:
        super().__init__(activation, f"vhost-user block {device.drive_id}")
        self.device = device

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> ChainOutcome:
        last = None
        try:
            for desc in chain:
                last = desc
        except Exception:                  # a malformed chain: return it unanswered
            return [Used(chain.head, 0)]
        if last is None or not last.is_write_only or last.len < 1:
            return [Used(chain.head, 0)]
        self.mem.write(last.addr + last.len - 1, bytes([VIRTIO_BLK_S_IOERR]))
        self.device.metrics.failed_reqs_count += 1
        return [Used(chain.head, 1)]


def host_address(mem: GuestMemory, gpa: int) -> int:
    """This process's address of guest-physical ``gpa`` (what vhost-user rings are given as)."""
    for region in mem.regions:
        if region.guest_addr <= gpa < region.end:
            return region.host_addr + gpa - region.guest_addr
    raise ValueError(f"guest address {gpa:#x} is not in guest RAM")


def memory_table(mem: GuestMemory) -> tuple[list[p.MemoryRegion], list[int]]:
    """SET_MEM_TABLE's regions and fds; guest RAM must be shareable (a memfd)."""
    regions, fds = [], []
    for region in mem.regions:
        if region.shared_fd is None:
            raise ValueError("guest memory is not shareable with a vhost-user back end "
                             "(it is not backed by a memfd)")
        regions.append(p.MemoryRegion(region.guest_addr, region.size, region.host_addr,
                                      region.file_offset))
        fds.append(region.shared_fd)
    return regions, fds
