"""A virtio-net device whose data path runs in the host kernel (vhost-net); beyond Firecracker.

The device the guest sees is :class:`~asyncvmm.devices.virtio.net.Net`'s:
same config space (``mac``, ``status``, ``mtu``), same queues, the same
offloads mirrored onto the tap with ``TUNSETOFFLOAD``.  What differs is who
moves the frames: at activation this device hands the rings to
``/dev/vhost-net`` and the kernel's vhost worker copies between them and
the tap, so no frame, kick or (on virtio-pci) interrupt passes through
Python:

* kick: the queue's notification eventfd (KVM's ioeventfd on QueueNotify or
  the PCI notify address) becomes the vring's kick fd;
* call: the transport's irqfd (:meth:`Interrupts.irqfd`): on virtio-pci the
  queue's MSI-X vector, on virtio-mmio the device's line (InterruptStatus
  then reports a used buffer until reset), so KVM injects the interrupt;
  where the transport must see each notification (a PCI vector that is
  masked or not set up) a call eventfd of our own, read by the loop, which
  raises the interrupt through the transport;
* err: an eventfd the kernel signals when the guest breaks a ring (read by
  the loop: DEVICE_NEEDS_RESET).

Features (§5.1.3 and drivers/vhost/net.c): the ring and transport bits the
kernel implements (``VIRTIO_F_VERSION_1``, ``VIRTIO_RING_F_EVENT_IDX``,
``VIRTIO_RING_F_INDIRECT_DESC``, ``VIRTIO_NET_F_MRG_RXBUF``) are offered only
if ``VHOST_GET_FEATURES`` reports them (:func:`offered_features`); the rest
(MAC, MTU, checksum and segmentation offloads) are the tap's business and
stay as the userspace device offers them.  ``VHOST_SET_FEATURES`` gets the
driver's choice of the kernel's bits only (:func:`vhost_features`), never
``VHOST_NET_F_VIRTIO_NET_HDR``: the tap keeps its 12-byte virtio-net header
(``IFF_VNET_HDR``, ``TUNSETVNETHDRSZ``), which is what a VERSION_1 driver
lays out.

Reset: ``VHOST_NET_SET_BACKEND`` -1 stops each queue, ``VHOST_GET_VRING_BASE``
says where the kernel stopped (kept in :attr:`VhostNet.vring_bases`), and
the kick, call and err fds are unbound.

Not here, by design (docs/network.md): rate limiters (the kernel does not
rate-limit), MMDS (userspace never sees the frames), snapshots (the kernel
writes guest memory behind the VMM's dirty log), packet counters (the
``net_<id>`` metrics stay at zero but for ``activate_fails``/``event_fails``).
The plan (:func:`memory_regions`, :func:`vring_addr`, the feature functions) is
pure; :class:`VhostNet` does the ioctls through a :class:`VhostBackend`.
"""

from __future__ import annotations

import logging
from typing import Protocol

from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.virtio.device import Activation, ActivationError
from asyncvmm.devices.virtio.net.device import Net, TapBackend
from asyncvmm.devices.virtio.net.header import VIRTIO_NET_F_MRG_RXBUF
from asyncvmm.devices.virtio.net.metrics import NetMetrics
from asyncvmm.devices.virtio.queue import Queue
from asyncvmm.devices.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit
from asyncvmm.memory import GuestMemory
from asyncvmm.net.tap import offload_for_guest_features

from . import structs as s
from .fd import VhostFd, open_vhost_net

log = logging.getLogger(__name__)

#: The feature bits vhost-net implements itself (the rest of what Net offers is the tap's).
KERNEL_FEATURES = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
                   | bit(VIRTIO_NET_F_MRG_RXBUF))

# Sizes of the split ring's three areas for a queue of n entries (§2.7: 16-byte descriptors;
# avail: flags, idx, ring[n], used_event; used: flags, idx, 8-byte ring[n], avail_event).
_DESC_SIZE, _AVAIL_SIZE, _USED_SIZE = (lambda n: 16 * n), (lambda n: 6 + 2 * n), (lambda n: 6 + 8 * n)


class VhostBackend(Protocol):
    """What the device needs of its vhost fd (:class:`~asyncvmm.devices.vhost.fd.VhostFd`)."""

    def set_features(self, features: int) -> None: ...
    def set_mem_table(self, regions: list[s.vhost_memory_region]) -> None: ...
    def set_vring_num(self, index: int, num: int) -> None: ...
    def set_vring_base(self, index: int, num: int) -> None: ...
    def get_vring_base(self, index: int) -> int: ...
    def set_vring_addr(self, addr: s.vhost_vring_addr) -> None: ...
    def set_vring_kick(self, index: int, fd: int) -> None: ...
    def set_vring_call(self, index: int, fd: int) -> None: ...
    def set_vring_err(self, index: int, fd: int) -> None: ...
    def net_set_backend(self, index: int, fd: int) -> None: ...
    def close(self) -> None: ...


def open_backend() -> tuple[VhostFd, int]:
    """Open ``/dev/vhost-net``, become its owner, and read its features (at build time)."""
    vhost = VhostFd(open_vhost_net())
    try:
        vhost.set_owner()
        return vhost, vhost.get_features()
    except BaseException:
        vhost.close()
        raise


# -- the plan (pure) ----------------------------------------------------------

def offered_features(net_features: int, kernel_features: int) -> int:
    """What the guest is offered: the userspace device's bits, less the kernel's bits it lacks."""
    return net_features & ~(KERNEL_FEATURES & ~kernel_features)


def vhost_features(acked: int, kernel_features: int) -> int:
    """What ``VHOST_SET_FEATURES`` gets: the driver's choice among the kernel's own bits."""
    return acked & kernel_features & KERNEL_FEATURES


def memory_regions(mem: GuestMemory) -> list[s.vhost_memory_region]:
    """Guest RAM as vhost's memory table: guest-physical -> this process's addresses."""
    return [s.vhost_memory_region(guest_phys_addr=r.guest_addr, memory_size=r.size,
                                  userspace_addr=r.host_addr) for r in mem.regions]


def host_address(mem: GuestMemory, gpa: int, length: int) -> int:
    """This process's address of guest RAM ``[gpa, gpa+length)``; ValueError if not all RAM."""
    for r in mem.regions:
        if r.guest_addr <= gpa and gpa + length <= r.end:
            return r.host_addr + (gpa - r.guest_addr)
    raise ValueError(f"guest range {gpa:#x}+{length:#x} is not in one RAM region")


def vring_addr(mem: GuestMemory, index: int, q: Queue) -> s.vhost_vring_addr:
    """``VHOST_SET_VRING_ADDR``'s argument for queue ``index`` (no dirty logging)."""
    return s.vhost_vring_addr(index=index, flags=0,
                              desc_user_addr=host_address(mem, q.desc_table, _DESC_SIZE(q.size)),
                              used_user_addr=host_address(mem, q.used_ring, _USED_SIZE(q.size)),
                              avail_user_addr=host_address(mem, q.avail_ring, _AVAIL_SIZE(q.size)),
                              log_guest_addr=0)


# -- the device ----------------------------------------------------------------

class VhostNet(Net):
    """virtio-net on a tap, its queues served by ``/dev/vhost-net``."""

    def __init__(self, iface_id: str, tap: TapBackend, vhost: VhostBackend, kernel_features: int, *,
                 guest_mac: str | None = None, mtu: int | None = None,
                 metrics: NetMetrics | None = None) -> None:
        # No rate limiters, no MMDS stack: neither can see the kernel's frames.
        super().__init__(iface_id, tap, guest_mac=guest_mac, mtu=mtu, metrics=metrics)
        self.vhost = vhost
        self.kernel_features = kernel_features
        self.vring_bases: list[int] = []       # where the kernel stopped, at the last reset
        self._act: Activation | None = None
        self._started: list[int] = []          # queues with the tap as their back end
        self._own_fds: list[EventFd] = []      # our call and err eventfds, read by the loop

    @property
    def avail_features(self) -> int:
        return offered_features(super().avail_features, self.kernel_features)

    # -- lifecycle (loop) ---------------------------------------------------

    def activate(self, activation: Activation) -> None:
        if not all(q.ready for q in activation.queues):
            raise ActivationError(f"net {self.iface_id}: receive and transmit queues must both be ready")
        self.deactivate()
        self._set_tap_offload(offload_for_guest_features(activation.acked_features))
        self._act = activation
        try:
            self._start(activation)
        except (OSError, ValueError) as e:
            self.deactivate()
            raise ActivationError(f"net {self.iface_id}: vhost-net: {e}") from None

    def _start(self, act: Activation) -> None:
        v = self.vhost
        v.set_features(vhost_features(act.acked_features, self.kernel_features))
        v.set_mem_table(memory_regions(act.mem))
        for i, q in enumerate(act.queues):
            v.set_vring_num(i, q.size)
            v.set_vring_base(i, q.next_avail)
            v.set_vring_addr(vring_addr(act.mem, i, q))
            v.set_vring_kick(i, act.queue_events[i].fd)
            v.set_vring_call(i, self._call_fd(act, i))
            v.set_vring_err(i, self._loop_eventfd(act, lambda i=i: self._on_err(i)).fd)
        for i in range(len(act.queues)):
            v.net_set_backend(i, self.tap.fileno())
            self._started.append(i)

    def _call_fd(self, act: Activation, queue: int) -> int:
        irqfd = getattr(act.interrupts, "irqfd", None)
        direct = irqfd(queue) if irqfd is not None else None
        if direct is not None:
            return direct
        return self._loop_eventfd(act, lambda: act.interrupts.signal_used(queue)).fd

    def _loop_eventfd(self, act: Activation, on_signal) -> EventFd:
        evt = EventFd()
        self._own_fds.append(evt)

        def readable() -> None:
            if evt.read():
                on_signal()

        act.loop.add_reader(evt.fd, readable)
        return evt

    def _on_err(self, queue: int) -> None:
        self.metrics.event_fails += 1
        if self._act is not None:
            self._act.interrupts.needs_reset(f"net {self.iface_id}: vhost-net stopped queue {queue} "
                                             "(the driver broke the ring)")

    def deactivate(self) -> None:
        act, self._act = self._act, None
        if act is None:
            return
        v = self.vhost
        bases = []
        for i in range(len(act.queues)):
            try:
                if i in self._started:
                    v.net_set_backend(i, s.VHOST_FILE_UNBIND)
                bases.append(v.get_vring_base(i))
                v.set_vring_kick(i, s.VHOST_FILE_UNBIND)
                v.set_vring_call(i, s.VHOST_FILE_UNBIND)
                v.set_vring_err(i, s.VHOST_FILE_UNBIND)
            except OSError as e:     # a host failure; the reset goes on
                log.error("net %s: stopping vhost-net queue %d: %s", self.iface_id, i, e)
        self._started = []
        self.vring_bases = bases
        for evt in self._own_fds:
            act.loop.remove_reader(evt.fd)
            evt.close()
        self._own_fds = []

    def close(self) -> None:
        self.deactivate()
        self.vhost.close()
        self.tap.close()

    def update_rate_limiters(self, rx, tx) -> None:
        raise ValueError(f"net {self.iface_id}: a vhost-net interface has no rate limiters")
