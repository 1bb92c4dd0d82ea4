"""Hostile rings and frames: whatever the guest writes, nothing escapes the device.

A hostile input ends in one of two ways: the device answers (used entries,
counted failures) or it sets DEVICE_NEEDS_RESET for a broken ring.  Never an
exception out of a loop callback, and never the "internal error" path, which
would mean a bug in the device rather than in the guest.
"""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.virtio.net.header import VNET_HDR_SIZE
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.net.conftest import frame, make_net_rig
from tests.unit.devices.virtio.net.test_net_mmds import make_stack
from tests.unit.mmds.guest import MMDS_IP

QSIZE = 16
desc = st.tuples(
    st.integers(0, QSIZE - 1),
    st.one_of(st.integers(0x200000, 0x300000), st.integers(0, 2**64 - 1)),   # addr
    st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),              # len
    st.integers(0, 7),                                                        # flags
    st.integers(0, QSIZE + 4),                                                # next
)
SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def internal_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and ("unexpected" in r.getMessage() or "internal" in r.getMessage())]


@SETTINGS
@given(rx_table=st.lists(desc, max_size=10), tx_table=st.lists(desc, max_size=10),
       rx_heads=st.lists(st.integers(0, QSIZE + 4), max_size=6),
       tx_heads=st.lists(st.integers(0, QSIZE + 4), max_size=6),
       jump=st.sampled_from([0, 0, 0, QSIZE + 1]), jump_rx=st.booleans(), mergeable=st.booleans(),
       sizes=st.lists(st.integers(14, 9000), max_size=3))
async def test_hostile_rings_end_in_answers_or_needs_reset(loop_errors, caplog, rx_table, tx_table, rx_heads,
                                                         tx_heads, jump, jump_rx, mergeable, sizes):
    mask = ~0 if mergeable else ~(1 << 15)
    n = await make_net_rig(mask=mask, queue_sizes={0: QSIZE, 1: QSIZE}, mmds=make_stack())
    try:
        n.mem.write(0x200000, bytes(VNET_HDR_SIZE) + frame(200))     # plausible frames where buffers point
        for vq, table, heads in ((n.rxq, rx_table, rx_heads), (n.txq, tx_table, tx_heads)):
            for index, addr, length, flags, nxt in table:
                vq.write_desc(index, addr, length, flags, nxt)
            for h in heads:
                vq.offer(h)
        if jump:
            vq = n.rxq if jump_rx else n.txq
            vq.set_avail_idx(vq.avail_idx + jump)
        for size in sizes:
            n.tap.inject(frame(size))
        n.driver.kick(n.rxq)
        n.driver.kick(n.txq)
        await settle(20)
        assert loop_errors == []
        assert internal_errors(caplog) == []
        if n.needs_reset():
            assert n.dev.metrics.event_fails >= 1
            event("needs reset")
            return
        used = n.txq.take_used()
        assert [h for h, _ in used] == tx_heads       # every TX chain answered, in order
        event("answered")
        assert all(length == 0 for _, length in used)
        for head, length in n.rxq.take_used():
            assert head in rx_heads and length <= 2**32 - 1
    finally:
        n.close()


@SETTINGS
@given(payload=st.binary(min_size=0, max_size=300), ethertype=st.sampled_from([0x0800, 0x0806, 0x86DD]),
       to_mmds=st.booleans())
async def test_hostile_frames_to_the_mmds_never_escape(loop_errors, caplog, payload, ethertype, to_mmds):
    n = await make_net_rig(mmds=make_stack(), post=4)
    try:
        body = bytearray(payload.ljust(40, b"\0"))
        if to_mmds:
            # Put the MMDS address where the stack looks: IPv4 dst (30) / ARP target (38), frame offsets.
            at = 30 - 14 if ethertype == 0x0800 else 38 - 14
            body[at:at + 4] = MMDS_IP
        data = b"\x06\x01\x23\x45\x67\x01" + b"\xaa\xfc\x00\x00\x00\x01" + ethertype.to_bytes(2, "big") + body
        n.transmit(bytes(data))
        await settle(20)
        assert loop_errors == [] and internal_errors(caplog) == []
        assert not n.needs_reset()
        assert len(n.txq.take_used()) == 1
        sent = n.tap.sent()
        if to_mmds and ethertype != 0x86DD:
            assert sent == []                        # the MMDS's, even when malformed
        else:
            assert [s[VNET_HDR_SIZE:] for s in sent] == [data]
    finally:
        n.close()
