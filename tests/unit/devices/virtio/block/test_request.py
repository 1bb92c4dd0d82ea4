"""Parsing virtio-block requests: pure validation, one error per failure, any framing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.virtio.block import request as rq
from asyncvmm.devices.virtio.chain import ChainBuffers, DescriptorChain, Segments, collect
from asyncvmm.devices.virtio.spec import VIRTQ_DESC_F_WRITE as W
from tests.fakes.virtio_driver import Allocator, Buf, FakeVirtqueue
from tests.unit.devices.virtio.block.helpers import cuts, header, lay_out

DISK = rq.Disk(capacity=64, read_only=False, flush=True)


def buffers(bufs) -> ChainBuffers:
    readable = Segments([(b.addr, b.len) for b in bufs if not b.write])
    writable = Segments([(b.addr, b.len) for b in bufs if b.write])
    return ChainBuffers(0, readable, writable)


def build(mem, readable: bytes, writable_len: int, rcuts=(), wcuts=()):
    alloc = Allocator(0x10000, mem.end)
    bufs, answer = lay_out(mem, alloc, readable, writable_len, rcuts, wcuts)
    return buffers(bufs), answer


def test_in_request(guest_mem):
    bufs, answer = build(guest_mem, header(rq.VIRTIO_BLK_T_IN, 3), 1024 + 1)
    req = rq.parse(guest_mem, bufs, DISK)
    assert (req.type, req.sector, req.offset, req.nbytes) == (0, 3, 3 * 512, 1024)
    assert req.status_at.parts == answer.slice(1024, 1).parts
    assert req.used_len(rq.VIRTIO_BLK_S_OK) == 1025
    assert req.used_len(rq.VIRTIO_BLK_S_IOERR) == 1


def test_out_request(guest_mem):
    bufs, _ = build(guest_mem, header(rq.VIRTIO_BLK_T_OUT, 63) + b"x" * 512, 1)
    req = rq.parse(guest_mem, bufs, DISK)
    assert (req.type, req.nbytes, req.data.read(guest_mem)) == (1, 512, b"x" * 512)
    assert req.used_len(rq.VIRTIO_BLK_S_OK) == 1


def test_flush_ignores_sector_and_data(guest_mem):
    bufs, _ = build(guest_mem, header(rq.VIRTIO_BLK_T_FLUSH, 99999) + b"junk", 1)
    req = rq.parse(guest_mem, bufs, DISK)
    assert (req.type, req.nbytes) == (rq.VIRTIO_BLK_T_FLUSH, 0)


def test_get_id(guest_mem):
    bufs, _ = build(guest_mem, header(rq.VIRTIO_BLK_T_GET_ID), 21)
    req = rq.parse(guest_mem, bufs, DISK)
    assert req.nbytes == 20 and req.used_len(rq.VIRTIO_BLK_S_OK) == 21


def test_device_id_pads_and_truncates():
    assert rq.device_id("root") == b"root" + bytes(16)
    assert rq.device_id("x" * 30) == b"x" * 20


@pytest.mark.parametrize("readable,wlen,error", [
    (header(rq.VIRTIO_BLK_T_IN), 0, rq.MissingStatusError),
    (header(rq.VIRTIO_BLK_T_IN)[:15], 513, rq.HeaderLengthError),
    (b"", 1, rq.HeaderLengthError),
    (header(rq.VIRTIO_BLK_T_IN) + b"x", 513, rq.UnexpectedReadableDataError),
    (header(rq.VIRTIO_BLK_T_OUT) + bytes(512), 2, rq.UnexpectedWritableDataError),
    (header(rq.VIRTIO_BLK_T_IN), 100, rq.DataLengthError),
    (header(rq.VIRTIO_BLK_T_OUT) + bytes(100), 1, rq.DataLengthError),
    (header(rq.VIRTIO_BLK_T_IN, 64), 513, rq.SectorRangeError),
    (header(rq.VIRTIO_BLK_T_IN, 63), 1025, rq.SectorRangeError),
    (header(rq.VIRTIO_BLK_T_IN, 2**64 - 1), 513, rq.SectorRangeError),
    (header(rq.VIRTIO_BLK_T_GET_ID), 1, rq.IdBufferError),
    (header(rq.VIRTIO_BLK_T_GET_ID) + b"x", 21, rq.UnexpectedReadableDataError),
    (header(11), 1, rq.UnsupportedRequestError),             # DISCARD: not offered
    (header(0xFFFF_FFFF), 1, rq.UnsupportedRequestError),
])
def test_each_failure_has_its_own_error(guest_mem, readable, wlen, error):
    bufs, answer = build(guest_mem, readable, wlen)
    with pytest.raises(error) as info:
        rq.parse(guest_mem, bufs, DISK)
    if wlen:
        assert info.value.status_at.parts == answer.slice(wlen - 1, 1).parts
    else:
        assert info.value.status_at is None
    expected = rq.VIRTIO_BLK_S_UNSUPP if error is rq.UnsupportedRequestError else rq.VIRTIO_BLK_S_IOERR
    assert info.value.status == expected


def test_writes_to_read_only_disk(guest_mem):
    bufs, _ = build(guest_mem, header(rq.VIRTIO_BLK_T_OUT) + bytes(512), 1)
    with pytest.raises(rq.ReadOnlyError):
        rq.parse(guest_mem, bufs, rq.Disk(64, read_only=True, flush=False))


def test_flush_without_the_feature_is_unsupported(guest_mem):
    bufs, _ = build(guest_mem, header(rq.VIRTIO_BLK_T_FLUSH), 1)
    with pytest.raises(rq.UnsupportedRequestError):
        rq.parse(guest_mem, bufs, rq.Disk(64, read_only=False, flush=False))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req_type=st.sampled_from([rq.VIRTIO_BLK_T_IN, rq.VIRTIO_BLK_T_OUT]),
       sector=st.integers(0, 60), sectors=st.integers(0, 4), rcuts=cuts, wcuts=cuts)
def test_any_framing_parses_the_same(guest_mem, req_type, sector, sectors, rcuts, wcuts):
    n = sectors * 512
    payload = bytes((sector + i) & 0xFF for i in range(n))
    if req_type == rq.VIRTIO_BLK_T_IN:
        readable, wlen = header(req_type, sector), n + 1
    else:
        readable, wlen = header(req_type, sector) + payload, 1
    bufs, answer = build(guest_mem, readable, wlen, rcuts, wcuts)
    req = rq.parse(guest_mem, bufs, DISK)
    assert (req.type, req.sector, req.nbytes) == (req_type, sector, n)
    assert req.status_at.parts == answer.slice(wlen - 1, 1).parts
    if req_type == rq.VIRTIO_BLK_T_OUT:
        assert req.data.read(guest_mem) == payload
    else:
        assert req.data.parts == answer.slice(0, n).parts


# -- the usual framing's fast path ---------------------------------------------

def three(mem, header_bytes: bytes, data_len: int, flags: tuple[int, int, int], status_len: int = 1,
          header_len: int = 16):
    """A three-descriptor chain (header, data, status) with these WRITE flags."""
    vq = FakeVirtqueue(mem, Allocator(0x1000, 0x10000), 0, 8)
    mem.write(0x10000, header_bytes)
    bufs = [Buf(0x10000, header_len, bool(flags[0])), Buf(0x20000, data_len, bool(flags[1])),
            Buf(0x40000, status_len, bool(flags[2]))]
    head = vq.add_chain(bufs)
    return DescriptorChain(mem, mem.view(vq.desc, 16 * vq.size), head, indirect_ok=False)


def test_parse_framed_reads_the_usual_in_and_out(guest_mem):
    c = three(guest_mem, header(rq.VIRTIO_BLK_T_IN, 5), 4096, (0, W, W))
    assert rq.parse_framed(guest_mem, c, DISK) == (rq.VIRTIO_BLK_T_IN, 5 * 512, 0x20000, 4096, 0x40000)
    c = three(guest_mem, header(rq.VIRTIO_BLK_T_OUT, 7), 512, (0, 0, W))
    assert rq.parse_framed(guest_mem, c, DISK) == (rq.VIRTIO_BLK_T_OUT, 7 * 512, 0x20000, 512, 0x40000)


def test_parse_framed_agrees_with_parse(guest_mem):
    """Whatever parse_framed (or parse_framed_at) answers, parse answers the same; what it
    leaves, parse decides.  Every combination of the values each check looks at, around each boundary."""
    accepted = 0
    for req_type, sector, data_len, header_len, status_len, read_only, flags in itertools.product(
            [rq.VIRTIO_BLK_T_IN, rq.VIRTIO_BLK_T_OUT, rq.VIRTIO_BLK_T_FLUSH, rq.VIRTIO_BLK_T_GET_ID, 11],
            [0, 56, 57, 63, 64, 2**64 - 1], [0, 1, 511, 512, 4096], [15, 16, 17], [1, 2],
            [False, True], itertools.product((0, W), repeat=3)):
        disk = rq.Disk(capacity=64, read_only=read_only, flush=True)
        c = three(guest_mem, header(req_type, sector), data_len, flags, status_len, header_len)
        framed = rq.parse_framed(guest_mem, c, disk)
        # The same read straight from the table by the head (the Sync drain's way).
        assert rq.parse_framed_at(guest_mem, c._table, c.head, disk) == framed
        if framed is None:
            continue
        accepted += 1
        req = rq.parse(guest_mem, collect(c), disk)               # raises if it disagrees
        req_type_, offset, data_addr, nbytes, status_addr = framed
        assert (req_type_, offset, req.data.parts, req.status_at.parts) == (
            req.type, req.offset, [(data_addr, nbytes)], [(status_addr, 1)])
        same = rq.Request.from_framed(req.head, framed)
        assert (same.head, same.type, same.sector, same.data.parts, same.data.length,
                same.status_at.parts, same.status_at.length) == (
            req.head, req.type, req.sector, req.data.parts, req.data.length,
            req.status_at.parts, req.status_at.length)
    assert accepted
