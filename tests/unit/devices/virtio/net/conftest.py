"""virtio-net behind a real transport, a fake driver, and a socket standing in for the tap.

:class:`SocketTap` has the methods of ``asyncvmm.net.tap.Tap`` on one end of
an ``AF_UNIX``/``SOCK_SEQPACKET`` pair: each message is one frame with its
virtio header, exactly like a tap opened with IFF_VNET_HDR, it has a real fd
for the loop's reader and writer, and it fills up (EAGAIN) like a tap.  The
test holds the other end (``peer``): what it sends the guest receives, what
the guest transmits it reads.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

import pytest

from asyncvmm.devices.virtio.net import Net
from asyncvmm.devices.virtio.net.header import VNET_HDR_SIZE
from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET
from tests.fakes.virtio_driver import Buf, FakeVirtqueue, settle
from tests.unit.devices.virtio.conftest import Rig, make_rig

GUEST_MAC = "aa:fc:00:00:00:01"
WAIT_S = 10.0          # how long a wait_* helper lets the loop run before giving up
RX_BUF = 2048          # a receive buffer the size Linux uses for MTU-sized frames


class SocketTap:
    def __init__(self, sndbuf: int | None = None) -> None:
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.sock, self.peer):
            s.setblocking(False)
            if sndbuf is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.offloads: list[int] = []
        self.closed = False

    # -- the Tap interface the device uses ----------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_into(self, buf) -> int | None:
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            return None

    def writev(self, bufs) -> int | None:
        try:
            return self.sock.sendmsg(bufs)
        except BlockingIOError:
            return None

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)

    def close(self) -> None:
        if not self.closed:
            self.sock.close()
            self.closed = True

    # -- the test's side ----------------------------------------------------

    def inject(self, frame: bytes, hdr: bytes = bytes(VNET_HDR_SIZE)) -> bool:
        """The host sends ``frame`` to the guest; False if the tap's queue is full."""
        try:
            self.peer.send(hdr + frame)
            return True
        except BlockingIOError:
            return False

    def sent(self) -> list[bytes]:
        """Everything the guest transmitted so far (virtio header included)."""
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def shutdown(self) -> None:
        self.close()
        self.peer.close()


async def _polls(timeout: float):
    """Yield, letting the loop (and its timers) run, until ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    spins = 0
    while loop.time() < deadline:
        yield
        spins += 1
        # A few rounds of bare yields cover call_soon chains; after that, real
        # sleeps let throttle and retransmission timers come due.
        await (settle(2) if spins < 50 else asyncio.sleep(0.001))


def frame(n: int, seq: int = 0, dst: bytes = b"\xaa\xfc\x00\x00\x00\x01",
          src: bytes = b"\x02\x00\x00\x00\x00\x09") -> bytes:
    """An ``n``-byte Ethernet frame carrying ``seq`` (to check order) and a pattern."""
    body = struct.pack(">I", seq) + bytes((seq + i) & 0xFF for i in range(max(0, n - 18)))
    return (dst + src + b"\x88\xb5" + body)[:n]


def seq_of(data: bytes) -> int:
    return struct.unpack_from(">I", data, 14)[0]


@dataclass
class NetRig:
    rig: Rig
    dev: Net
    tap: SocketTap
    rxq: FakeVirtqueue
    txq: FakeVirtqueue
    rx_bufs: dict[int, list[Buf]] = field(default_factory=dict)

    @property
    def driver(self):
        return self.rig.driver

    @property
    def mem(self):
        return self.rig.mem

    @property
    def handler(self):
        return self.dev.handler

    def needs_reset(self) -> bool:
        return bool(self.driver.status & DEVICE_NEEDS_RESET)

    # -- transmit -----------------------------------------------------------

    def lay_out(self, data: bytes, cuts=()) -> list[Buf]:
        """``data`` in guest memory, split at the offsets in ``cuts``."""
        bufs, start = [], 0
        for end in [*cuts, len(data)]:
            addr = self.rig.alloc.alloc(max(1, end - start), 8)
            self.mem.write(addr, data[start:end])
            bufs.append(Buf(addr, end - start))
            start = end
        return bufs

    def transmit(self, frame_bytes: bytes, *, hdr: bytes = bytes(VNET_HDR_SIZE), cuts=(),
                 indirect: bool = False, kick: bool = True) -> int:
        bufs = self.lay_out(hdr + frame_bytes, cuts)
        head = self.txq.add_indirect_chain(bufs) if indirect else self.txq.add_chain(bufs)
        self.txq.offer(head)
        if kick:
            self.driver.kick(self.txq)
        return head

    # -- receive ------------------------------------------------------------

    def post_rx(self, count: int, size: int = RX_BUF, *, parts: int = 1, kick: bool = True) -> list[int]:
        """Offer ``count`` receive chains of ``size`` bytes (in ``parts`` descriptors)."""
        heads = []
        for _ in range(count):
            piece = size // parts
            bufs = [Buf(self.rig.alloc.alloc(piece, 8), piece, True) for _ in range(parts)]
            for b in bufs:
                self.mem.fill(b.addr, b.len, 0xEE)      # bytes the device never wrote stay 0xEE
            head = self.rxq.add_chain(bufs)
            self.rx_bufs[head] = bufs
            self.rxq.offer(head)
            heads.append(head)
        if kick:
            self.driver.kick(self.rxq)
        return heads

    def _read_chain(self, head: int, length: int) -> bytes:
        out = b""
        for b in self.rx_bufs.pop(head):
            take = min(b.len, length - len(out))
            out += self.mem.read(b.addr, take)
        return out

    def received(self) -> list[tuple[bytes, bytes]]:
        """(header, frame) for every frame the device delivered since the last call."""
        used = self.rxq.take_used()
        out = []
        i = 0
        while i < len(used):
            head, length = used[i]
            data = self._read_chain(head, length)
            if length < VNET_HDR_SIZE:
                out.append((data, b""))
                i += 1
                continue
            count = struct.unpack_from("<H", data, 10)[0]
            for head2, length2 in used[i + 1:i + count]:
                data += self._read_chain(head2, length2)
            i += max(count, 1)
            out.append((data[:VNET_HDR_SIZE], data[VNET_HDR_SIZE:]))
        return out

    async def wait_received(self, count: int, timeout: float = WAIT_S) -> list[tuple[bytes, bytes]]:
        got: list[tuple[bytes, bytes]] = []
        async for _ in _polls(timeout):
            got += self.received()
            if len(got) >= count:
                return got
        raise AssertionError(f"{len(got)} of {count} frames received")

    async def wait_sent(self, count: int, timeout: float = WAIT_S) -> list[bytes]:
        got: list[bytes] = []
        async for _ in _polls(timeout):
            got += self.tap.sent()
            if len(got) >= count:
                return got
        raise AssertionError(f"{len(got)} of {count} frames reached the tap")

    def close(self) -> None:
        self.dev.close()
        self.tap.shutdown()
        self.rig.close()


async def make_net_rig(*, features: int | None = None, mask: int = ~0, tap: SocketTap | None = None,
                       queue_sizes: dict[int, int] | None = None, post: int = 0,
                       **net_kwargs) -> NetRig:
    tap = tap or SocketTap()
    net_kwargs.setdefault("guest_mac", GUEST_MAC)
    dev = Net("eth0", tap, **net_kwargs)
    rig = make_rig(dev)
    rxq, txq = await rig.driver.init(features, mask=mask, queue_sizes=queue_sizes)
    n = NetRig(rig, dev, tap, rxq, txq)
    if post:
        n.post_rx(post)
        await settle()
    return n


@pytest.fixture
async def loop_errors():
    """Exceptions that reached the loop's handler: must stay empty."""
    errors: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield errors
    loop.set_exception_handler(None)
