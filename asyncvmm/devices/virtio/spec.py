"""Numbers from the virtio 1.2 specification, with the spec's own names.

Section numbers refer to "Virtual I/O Device (VIRTIO) Version 1.2".  Only the
constants asyncvmm uses live here; device-specific ones (``VIRTIO_BLK_*``)
live beside their device.  No logic, no I/O.
"""

from __future__ import annotations

# §2.1 Device Status Field: bits the driver (and, for DEVICE_NEEDS_RESET, the device) sets.
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# §6 Reserved Feature Bits (bit numbers, not masks).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
# The Linux headers' names for the two ring features; the spec calls them VIRTIO_F_*.
VIRTIO_RING_F_INDIRECT_DESC = VIRTIO_F_INDIRECT_DESC
VIRTIO_RING_F_EVENT_IDX = VIRTIO_F_EVENT_IDX

# §2.7.5 The Virtqueue Descriptor Table: descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# §2.7.6 / §2.7.8: ring flags for notification suppression without EVENT_IDX.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# §2.7 Split Virtqueues: element sizes and alignment of the three areas.
VIRTQ_DESC_SIZE = 16
VIRTQ_DESC_ALIGN = 16
VIRTQ_AVAIL_ALIGN = 2
VIRTQ_USED_ALIGN = 4
VIRTQ_USED_ELEM_SIZE = 8
# §2.7: queue sizes are powers of two no larger than 32768.
VIRTQ_MAX_SIZE = 32768

# §5 Device Types: the device IDs used in the DeviceID register.
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19
VIRTIO_ID_PMEM = 27


def bit(n: int) -> int:
    """The mask of feature bit ``n``."""
    return 1 << n
