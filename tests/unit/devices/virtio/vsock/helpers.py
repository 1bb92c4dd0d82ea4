"""A guest's vsock driver in miniature, over the fake virtio driver: send and receive packets."""

from __future__ import annotations

import asyncio
import collections

from asyncvmm.devices.virtio.vsock.packet import HDR_SIZE, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST, Header
from tests.fakes.virtio_driver import Buf

GUEST_CID = 3
RX_BUF = 4096 + HDR_SIZE
TX_SLOT = 64 * 1024 + HDR_SIZE


class Guest:
    def __init__(self, rig, rxq, txq, evq, *, rx_count: int = 64, tx_slots: int = 96) -> None:
        self.rig, self.rxq, self.txq, self.evq = rig, rxq, txq, evq
        self.mem = rig.mem
        self.rx_addr: dict[int, int] = {}
        self.received: collections.deque[tuple[Header, bytes]] = collections.deque()
        for _ in range(rx_count):
            self.post_rx(rig.alloc.alloc(RX_BUF))
        self.kick_rx()
        self.free_slots = [rig.alloc.alloc(TX_SLOT) for _ in range(tx_slots)]
        self.tx_slot: dict[int, int] = {}

    def post_rx(self, addr: int) -> None:
        head = self.rxq.add_chain([Buf(addr, RX_BUF, True)])
        self.rx_addr[head] = addr
        self.rxq.offer(head)

    def kick_rx(self) -> None:
        self.rig.driver.kick(self.rxq)

    def _reclaim_tx(self) -> None:
        for head, _ in self.txq.take_used():
            slot = self.tx_slot.pop(head, None)      # None: a chain a test laid out itself
            if slot is not None:
                self.free_slots.append(slot)

    def send_raw(self, hdr: Header, payload: bytes = b"") -> None:
        self._reclaim_tx()
        slot = self.free_slots.pop()
        self.mem.write(slot, hdr.pack() + payload)
        head = self.txq.add_chain([Buf(slot, HDR_SIZE + len(payload))])
        self.tx_slot[head] = slot
        self.txq.offer(head)
        self.rig.driver.kick(self.txq)

    def send(self, op: int, src_port: int, dst_port: int, payload: bytes = b"", *, flags: int = 0,
             buf_alloc: int = 256 * 1024, fwd_cnt: int = 0) -> None:
        self.send_raw(Header(GUEST_CID, VMADDR_CID_HOST, src_port, dst_port, len(payload),
                             VIRTIO_VSOCK_TYPE_STREAM, op, flags, buf_alloc, fwd_cnt), payload)

    def poll(self) -> None:
        """Take the RX queue's used packets and give their buffers back."""
        used = self.rxq.take_used()
        for head, length in used:
            addr = self.rx_addr.pop(head)
            if length >= HDR_SIZE:
                hdr = Header.unpack(self.mem.read(addr, HDR_SIZE))
                self.received.append((hdr, self.mem.read(addr + HDR_SIZE, length - HDR_SIZE)))
            else:
                self.received.append((None, b""))
            self.post_rx(addr)
        if used:
            self.kick_rx()

    async def recv(self, timeout: float = 5.0) -> tuple[Header, bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.poll()
            if self.received:
                return self.received.popleft()
            if loop.time() > deadline:
                raise TimeoutError("no packet for the guest")
            await asyncio.sleep(0.001)

    async def quiet(self, seconds: float = 0.05) -> list[tuple[Header, bytes]]:
        """Everything that arrives within ``seconds``."""
        await asyncio.sleep(seconds)
        self.poll()
        out = list(self.received)
        self.received.clear()
        return out


async def host_recv_exactly(sock, n: int, timeout: float = 10.0) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), timeout)
        except ConnectionResetError:       # closed with our bytes unread: closed all the same
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)
