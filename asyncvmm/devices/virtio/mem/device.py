"""The virtio-mem device (virtio 1.2 §5.15): memory hotplug as Firecracker 1.16 offers it.

The device owns the hotpluggable region (``total_size_mib`` at ``addr``),
cut into blocks of ``block_size_mib`` and, for the host, into KVM slots of
``slot_size_mib``.  It holds which blocks are plugged and answers the
driver's requests (protocol.py has the primer); what the host must do about
a change is returned as effects, never done here:

* :class:`SlotChange` -- a slot with at least one plugged block is a KVM
  memory slot, a slot with none is not (Firecracker's on-demand slots: a
  guest access to never-plugged memory faults instead of reaching host RAM);
* :class:`Release` -- the host memory of unplugged blocks goes back to the
  host (``MADV_DONTNEED`` in the backing), so the VMM's RSS drops.

The VMM's own accesses (a virtqueue the guest placed in hotplugged memory)
are accepted exactly where blocks are plugged: :meth:`VirtioMem.accessible`
is the region's check in :class:`asyncvmm.memory.GuestMemory`.

Requests are checked as Firecracker checks them (the range is block
aligned, non-empty and inside ``usable_region_size``; a plug needs every
block unplugged, an unplug every block plugged) and answered ERROR
otherwise.  A plug that would take ``plugged_size`` past ``requested_size``
is answered NACK, which §5.15.6.1 asks for and Linux retries later
(Firecracker answers ERROR, after which Linux marks its driver broken).
UNPLUG_ALL shrinks ``usable_region_size`` to what ``requested_size``
needs (Firecracker sets it to 0, which would leave a driver unable to plug
what the host still requests).  Everything here runs on the loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.handler import Effect
from asyncvmm.devices.virtio.mem.handler import Release, SlotChange, VirtioMemHandler
from asyncvmm.devices.virtio.mem.metrics import VirtioMemMetrics
from asyncvmm.devices.virtio.mem.protocol import (
    CONFIG,
    VIRTIO_ID_MEM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
    Request,
)
from asyncvmm.devices.virtio.spec import VIRTIO_F_VERSION_1, bit

MiB = 1 << 20
QUEUE_SIZE = 256
DEFAULT_BLOCK_SIZE_MIB = 2
DEFAULT_SLOT_SIZE_MIB = 128

# Firecracker's VirtioMemError texts (the API prefixes them).
DEVICE_NOT_ACTIVE = "Device is not active"


class VirtioMemState(msgspec.Struct, forbid_unknown_fields=True, tag="virtio-mem-v1"):
    """The device in a snapshot (untrusted on load): its geometry, the sizes the driver sees,
    the plugged blocks as ``[first block, count]`` runs, and where the region's memory starts
    in the memory file."""

    addr: int
    region_size: int
    block_size: int
    slot_size: int
    usable_region_size: int
    requested_size: int
    plugged: list[tuple[int, int]]
    file_offset: int


class VirtioMemError(Exception):
    """An operation the API asked for and the device refuses."""


def invalid_size(size: int) -> VirtioMemError:
    return VirtioMemError(f"Size {size} is invalid: it must be a multiple of block size and less "
                          "than the total size")


class MemoryBacking(Protocol):
    """The host side of the region (the builder's glue: an mmap and KVM slots)."""

    def set_slot(self, index: int, present: bool) -> None:
        """Make slot ``index`` a KVM memory slot, or remove it."""

    def release(self, offset: int, length: int) -> None:
        """Give the host memory of ``[offset, offset+length)`` of the region back (OSError)."""


class VirtioMem(VirtioDevice):
    device_type = VIRTIO_ID_MEM
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, *, addr: int, total_size_mib: int, block_size_mib: int = DEFAULT_BLOCK_SIZE_MIB,
                 slot_size_mib: int = DEFAULT_SLOT_SIZE_MIB, backing: MemoryBacking,
                 metrics: VirtioMemMetrics | None = None) -> None:
        super().__init__()
        if (total_size_mib <= 0 or total_size_mib % slot_size_mib or slot_size_mib % block_size_mib
                or addr % (slot_size_mib * MiB)):
            raise ValueError(f"virtio-mem: region {total_size_mib} MiB at {addr:#x}, slots of "
                             f"{slot_size_mib} MiB and blocks of {block_size_mib} MiB do not fit")
        self.addr = addr
        self.region_size = total_size_mib * MiB
        self.block_size = block_size_mib * MiB
        self.slot_size = slot_size_mib * MiB
        self.usable_region_size = 0
        self.requested_size = 0
        self.backing = backing
        self.metrics = metrics or VirtioMemMetrics()
        #: One byte per block: 1 plugged, 0 not (bytearray.find keeps range checks in C).
        self.plugged = bytearray(self.region_size // self.block_size)
        self.plugged_blocks = 0
        #: Which slots are KVM memory slots now.
        self.slot_present = [False] * (self.region_size // self.slot_size)
        self.handler: VirtioMemHandler | None = None
        self._update_config()

    @property
    def avail_features(self) -> int:
        return bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)

    @property
    def plugged_size(self) -> int:
        return self.plugged_blocks * self.block_size

    def _update_config(self) -> None:
        self._config = CONFIG.pack(self.block_size, 0, self.addr, self.region_size,
                                   self.usable_region_size, self.plugged_size, self.requested_size)

    # -- what the VMM may touch -------------------------------------------------------

    def accessible(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset+length)`` of the region lies in plugged blocks only."""
        if length <= 0:
            return True
        first, last = offset // self.block_size, (offset + length - 1) // self.block_size
        return self.plugged.find(0, first, last + 1) == -1

    # -- requests (sans-I/O) ----------------------------------------------------------

    def handle_request(self, req: Request) -> tuple[int, int, list[Effect]]:
        """Apply one request: ``(response type, state, effects)``; effects come before the answer."""
        m = self.metrics
        if req.type == VIRTIO_MEM_REQ_PLUG:
            m.plug_count += 1
            resp, effects = self._plug(req)
            if resp == VIRTIO_MEM_RESP_ACK:
                m.plug_bytes += req.nb_blocks * self.block_size
            else:
                m.plug_fails += 1
            return resp, 0, effects
        if req.type == VIRTIO_MEM_REQ_UNPLUG:
            m.unplug_count += 1
            resp, effects = self._unplug(req)
            if resp == VIRTIO_MEM_RESP_ACK:
                m.unplug_bytes += req.nb_blocks * self.block_size
            else:
                m.unplug_fails += 1
            return resp, 0, effects
        if req.type == VIRTIO_MEM_REQ_UNPLUG_ALL:
            m.unplug_all_count += 1
            effects = self._set_blocks(0, len(self.plugged), False)
            self.usable_region_size = self._usable_for(self.requested_size)
            self._update_config()
            return VIRTIO_MEM_RESP_ACK, 0, effects
        if req.type == VIRTIO_MEM_REQ_STATE:
            m.state_count += 1
            why = self._range_error(req)
            if why is not None:
                m.state_fails += 1
                self._fault("state", req, why)
                return VIRTIO_MEM_RESP_ERROR, 0, []
            return VIRTIO_MEM_RESP_ACK, self._range_state(req), []
        self.guest_faults.report("virtio_mem", "virtio-mem: unknown request type %d", req.type)
        return VIRTIO_MEM_RESP_ERROR, 0, []

    def _plug(self, req: Request) -> tuple[int, list[Effect]]:
        why = self._range_error(req)
        if why is None and self.plugged_size + req.nb_blocks * self.block_size > self.requested_size:
            return VIRTIO_MEM_RESP_NACK, []        # the driver asks again once the target allows
        if why is None and self._range_state(req) != VIRTIO_MEM_STATE_UNPLUGGED:
            why = "blocks already plugged"
        if why is not None:
            self._fault("plug", req, why)
            return VIRTIO_MEM_RESP_ERROR, []
        return VIRTIO_MEM_RESP_ACK, self._set_blocks(self._first_block(req), req.nb_blocks, True)

    def _unplug(self, req: Request) -> tuple[int, list[Effect]]:
        why = self._range_error(req)
        if why is None and self._range_state(req) != VIRTIO_MEM_STATE_PLUGGED:
            why = "blocks not plugged"
        if why is not None:
            self._fault("unplug", req, why)
            return VIRTIO_MEM_RESP_ERROR, []
        return VIRTIO_MEM_RESP_ACK, self._set_blocks(self._first_block(req), req.nb_blocks, False)

    def _fault(self, what: str, req: Request, why: str) -> None:
        self.guest_faults.report("virtio_mem", "virtio-mem: %s of %d blocks at %#x refused: %s",
                                 what, req.nb_blocks, req.addr, why)

    def _range_error(self, req: Request) -> str | None:
        """Why ``req``'s range is not one the driver may name (§5.15.6), or None."""
        if req.nb_blocks == 0:
            return "no blocks"
        if req.addr % self.block_size:
            return "address not block aligned"
        offset = req.addr - self.addr
        if offset < 0 or offset + req.nb_blocks * self.block_size > self.usable_region_size:
            return "outside the usable region"
        return None

    def _first_block(self, req: Request) -> int:
        return (req.addr - self.addr) // self.block_size

    def _range_state(self, req: Request) -> int:
        first = self._first_block(req)
        count = self.plugged.count(1, first, first + req.nb_blocks)
        if count == req.nb_blocks:
            return VIRTIO_MEM_STATE_PLUGGED
        return VIRTIO_MEM_STATE_UNPLUGGED if count == 0 else VIRTIO_MEM_STATE_MIXED

    def _set_blocks(self, first: int, count: int, plug: bool) -> list[Effect]:
        """Mark blocks; the slot and release effects the change needs, slots added first."""
        end = first + count
        before = self.plugged.count(1, first, end)
        self.plugged[first:end] = (b"\1" if plug else b"\0") * count
        self.plugged_blocks += (count - before) if plug else -before
        self._update_config()
        effects: list[Effect] = []
        if not plug and before:
            effects.append(Release(first * self.block_size, count * self.block_size))
        per_slot = self.slot_size // self.block_size
        for slot in range(first // per_slot, (end - 1) // per_slot + 1):
            present = self.plugged.find(1, slot * per_slot, (slot + 1) * per_slot) != -1
            if present != self.slot_present[slot]:
                self.slot_present[slot] = present
                effects.append(SlotChange(slot, present))
        # A slot must be in KVM before the driver hears ACK of a plug; on an unplug the slot
        # goes first too, so no vCPU can fault released pages back in between.
        effects.sort(key=lambda e: not isinstance(e, SlotChange))
        return effects

    def _usable_for(self, requested: int) -> int:
        return -(-requested // self.slot_size) * self.slot_size

    # -- the API's operations ---------------------------------------------------------

    def update_requested_size(self, requested_size_mib: int) -> None:
        """PATCH /hotplug/memory: a new target, told to the driver by a config-change interrupt."""
        size = requested_size_mib * MiB
        if self.handler is None:
            raise VirtioMemError(DEVICE_NOT_ACTIVE)
        if size % self.block_size or size > self.region_size:
            raise invalid_size(size)
        # The device may grow usable_region_size at any time; it shrinks only at UNPLUG_ALL.
        if self.usable_region_size < size:
            self.usable_region_size = self._usable_for(size)
        self.requested_size = size
        self._update_config()
        self.config_changed()

    def status(self) -> dict[str, Any]:
        """GET /hotplug/memory."""
        return {
            "block_size_mib": self.block_size // MiB,
            "total_size_mib": self.region_size // MiB,
            "slot_size_mib": self.slot_size // MiB,
            "plugged_size_mib": self.plugged_size // MiB,
            "requested_size_mib": self.requested_size // MiB,
        }

    # -- snapshots ----------------------------------------------------------------------

    def plugged_runs(self) -> list[tuple[int, int]]:
        """``(first block, count)`` of each run of plugged blocks, in order."""
        runs: list[tuple[int, int]] = []
        block = self.plugged.find(1)
        while block != -1:
            end = self.plugged.find(0, block)
            end = len(self.plugged) if end == -1 else end
            runs.append((block, end - block))
            block = self.plugged.find(1, end)
        return runs

    def save_state(self, file_offset: int) -> VirtioMemState:
        return VirtioMemState(addr=self.addr, region_size=self.region_size, block_size=self.block_size,
                              slot_size=self.slot_size, usable_region_size=self.usable_region_size,
                              requested_size=self.requested_size, plugged=self.plugged_runs(),
                              file_offset=file_offset)

    def restore_state(self, state: VirtioMemState) -> list[Effect]:
        """Take a snapshot's state, every value checked (nothing changes if one is bad); the
        slots that must be KVM slots again come back as effects."""
        geometry = (state.addr, state.region_size, state.block_size, state.slot_size)
        if geometry != (self.addr, self.region_size, self.block_size, self.slot_size):
            raise ValueError(f"virtio-mem state: region {geometry} is not the configured "
                             f"{(self.addr, self.region_size, self.block_size, self.slot_size)}")
        if (not 0 <= state.usable_region_size <= self.region_size
                or state.usable_region_size % self.slot_size):
            raise ValueError(f"virtio-mem state: usable_region_size {state.usable_region_size:#x}")
        if not 0 <= state.requested_size <= self.region_size or state.requested_size % self.block_size:
            raise ValueError(f"virtio-mem state: requested_size {state.requested_size:#x}")
        plugged = bytearray(len(self.plugged))
        usable_blocks = state.usable_region_size // self.block_size
        last_end = 0
        for first, count in state.plugged:
            if first < last_end or count <= 0 or first + count > usable_blocks:
                raise ValueError(f"virtio-mem state: plugged run {first}+{count} out of order or "
                                 f"outside the usable region")
            plugged[first:first + count] = b"\1" * count
            last_end = first + count
        self.plugged = plugged
        self.plugged_blocks = plugged.count(1)
        self.usable_region_size, self.requested_size = state.usable_region_size, state.requested_size
        self._update_config()
        per_slot = self.slot_size // self.block_size
        effects: list[Effect] = []
        for slot in range(len(self.slot_present)):
            present = plugged.find(1, slot * per_slot, (slot + 1) * per_slot) != -1
            self.slot_present[slot] = present
            if present:
                effects.append(SlotChange(slot, True))
        return effects

    # -- lifecycle ----------------------------------------------------------------------

    def activate(self, activation: Activation) -> None:
        # Without this feature the driver would touch unplugged memory (Firecracker refuses too).
        if not activation.has_feature(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE):
            raise ActivationError("virtio-mem: the driver did not accept "
                                  "VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE")
        if not activation.queues[0].ready:
            raise ActivationError("virtio-mem: queue 0 not ready")
        self.deactivate()
        self.handler = VirtioMemHandler(self, activation)
        self.handler.start()

    def deactivate(self) -> None:
        # Plugged blocks stay plugged across a reset: a new driver finds plugged_size and
        # sends UNPLUG_ALL first (§5.15.5).
        if self.handler is not None:
            self.handler.stop()
            self.handler = None
