"""virtio-net numbers (§5.1) and ``struct virtio_net_hdr_v1``, with the spec's names.

Primer.  Every packet on either queue starts with a 12-byte header
(§5.1.6, the layout every VIRTIO_F_VERSION_1 device uses)::

    struct virtio_net_hdr_v1 {
        u8   flags;        // VIRTIO_NET_HDR_F_NEEDS_CSUM, _DATA_VALID
        u8   gso_type;     // VIRTIO_NET_HDR_GSO_NONE, _TCPV4, _UDP, _TCPV6 (| _ECN)
        le16 hdr_len;
        le16 gso_size;
        le16 csum_start;
        le16 csum_offset;
        le16 num_buffers;  // RX only: how many chains the packet spans
    };

A tap opened with IFF_VNET_HDR and TUNSETVNETHDRSZ 12 reads and writes the
same header in front of each frame (little endian on x86), so the device
passes it through; it only fills ``num_buffers`` on receive and clears
``flags`` when the driver did not take VIRTIO_NET_F_GUEST_CSUM.

Configuration space (§5.1.4): ``u8 mac[6]; le16 status; le16
max_virtqueue_pairs; le16 mtu`` -- the fields after ``mac`` only mean
something with VIRTIO_NET_F_STATUS / _MQ / _MTU.  No logic, no I/O.
"""

from __future__ import annotations

import struct

# §5.1.3 Feature bits (bit numbers, not masks).
VIRTIO_NET_F_CSUM = 0               # the device takes partially checksummed packets (TX)
VIRTIO_NET_F_GUEST_CSUM = 1         # the driver takes partially checksummed packets (RX)
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

# §5.1.4 status field.
VIRTIO_NET_S_LINK_UP = 1

# §5.1.6 header flags and GSO types.
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")
VNET_HDR_SIZE = VIRTIO_NET_HDR.size            # 12
assert VNET_HDR_SIZE == 12
NUM_BUFFERS_OFFSET = 10                         # offsetof(struct virtio_net_hdr_v1, num_buffers)
FLAGS_OFFSET = 0
GSO_TYPE_OFFSET = 1

# The receive and transmit queues of a single queue pair (§5.1.2).
RX_QUEUE = 0
TX_QUEUE = 1

ETH_HLEN = 14
ETH_ALEN = 6
# The largest transmit chain accepted, header included: 64 KiB of GSO
# payload with room for Ethernet, VLAN and IP headers (Firecracker's bound).
MAX_BUFFER_SIZE = 65562

_CONFIG = struct.Struct("<6sHHH")               # mac, status, max_virtqueue_pairs, mtu
CONFIG_SIZE = _CONFIG.size                      # 12
MAC_OFFSET = 0


def pack_config(mac: bytes, mtu: int) -> bytes:
    """The configuration space: ``mac``, link up, one queue pair, ``mtu`` (0: not offered)."""
    return _CONFIG.pack(mac, VIRTIO_NET_S_LINK_UP, 1, mtu)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """``"aa:bb:cc:dd:ee:ff"`` to 6 bytes; :class:`ValueError` otherwise."""
    parts = text.split(":")
    if len(parts) != ETH_ALEN or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)
