"""Descriptor chains: walking, indirect tables, and every way a chain can be wrong."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.virtio.chain import (
    MAX_CHAIN_BYTES,
    ChainError,
    ChainLengthError,
    ChainLoopError,
    DescriptorChain,
    DescriptorDirectionError,
    DescriptorIndexError,
    DescriptorRangeError,
    IndirectNotNegotiatedError,
    IndirectTableError,
    NestedIndirectError,
    Segments,
    collect,
    direct_three,
)
from asyncvmm.devices.virtio.spec import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from asyncvmm.memory import GuestMemory
from tests.fakes.virtio_driver import Allocator, Buf, FakeVirtqueue

N = VIRTQ_DESC_F_NEXT
W = VIRTQ_DESC_F_WRITE
I = VIRTQ_DESC_F_INDIRECT
SIZE = 8


@pytest.fixture
def vq(guest_mem) -> FakeVirtqueue:
    return FakeVirtqueue(guest_mem, Allocator(0x1000, guest_mem.end), 0, SIZE)


def chain(vq: FakeVirtqueue, head: int, *, indirect_ok: bool = True) -> DescriptorChain:
    return DescriptorChain(vq.mem, vq.mem.view(vq.desc, 16 * vq.size), head, indirect_ok=indirect_ok)


def test_direct_chain_splits_into_readable_then_writable(vq):
    head = vq.add_chain([Buf(0x10000, 16), Buf(0x20000, 100), Buf(0x30000, 1, True)])
    bufs = collect(chain(vq, head))
    assert bufs.head == head
    assert bufs.readable.parts == [(0x10000, 16), (0x20000, 100)]
    assert bufs.writable.parts == [(0x30000, 1)]


def test_indirect_chain_after_direct_descriptors(vq):
    head = vq.add_indirect_chain([Buf(0x20000, 8), Buf(0x30000, 4, True)], direct=[Buf(0x10000, 16)])
    bufs = collect(chain(vq, head))
    assert bufs.readable.parts == [(0x10000, 16), (0x20000, 8)]
    assert bufs.writable.parts == [(0x30000, 4)]


def test_cycle_ends_in_loop_error(vq):
    vq.write_desc(0, 0x10000, 1, N, 1)
    vq.write_desc(1, 0x10000, 1, N, 0)
    with pytest.raises(ChainLoopError):
        collect(chain(vq, 0))


def test_self_loop_in_indirect_table_ends(vq):
    table = vq.alloc.alloc(32)
    vq.mem.write(table, struct.pack("<QIHH", 0x10000, 1, N, 1) + struct.pack("<QIHH", 0x10000, 1, N, 0))
    vq.write_desc(0, table, 32, I)
    with pytest.raises(ChainLoopError):
        collect(chain(vq, 0))


def test_next_outside_table(vq):
    vq.write_desc(0, 0x10000, 1, N, SIZE)
    with pytest.raises(DescriptorIndexError):
        collect(chain(vq, 0))


def test_buffer_outside_guest_memory(vq):
    vq.write_desc(0, vq.mem.end - 4, 8, 0)
    with pytest.raises(DescriptorRangeError):
        collect(chain(vq, 0))


def test_huge_length_is_a_range_error_not_a_huge_allocation(vq):
    vq.write_desc(0, 0, 0xFFFF_FFFF, W)
    with pytest.raises(DescriptorRangeError):
        collect(chain(vq, 0))


def test_readable_after_writable(vq):
    vq.write_desc(0, 0x10000, 1, W | N, 1)
    vq.write_desc(1, 0x10000, 1, 0)
    with pytest.raises(DescriptorDirectionError):
        collect(chain(vq, 0))


def test_indirect_requires_the_feature(vq):
    head = vq.add_indirect_chain([Buf(0x10000, 1)])
    with pytest.raises(IndirectNotNegotiatedError):
        collect(chain(vq, head, indirect_ok=False))


def test_nested_indirect(vq):
    inner = vq.alloc.alloc(16)
    vq.mem.write(inner, struct.pack("<QIHH", 0x10000, 1, 0, 0))
    outer = vq.alloc.alloc(16)
    vq.mem.write(outer, struct.pack("<QIHH", inner, 16, I, 0))
    vq.write_desc(0, outer, 16, I)
    with pytest.raises(NestedIndirectError):
        collect(chain(vq, 0))


@pytest.mark.parametrize("length", [0, 8, 17, 16 * (SIZE + 1)])
def test_bad_indirect_table_lengths(vq, length):
    vq.write_desc(0, vq.alloc.alloc(1024), length, I)
    with pytest.raises(IndirectTableError):
        collect(chain(vq, 0))


def test_indirect_with_next_is_refused(vq):
    vq.write_desc(0, vq.alloc.alloc(16), 16, I | N, 1)
    with pytest.raises(IndirectTableError):
        collect(chain(vq, 0))


def test_indirect_table_outside_memory(vq):
    vq.write_desc(0, vq.mem.end - 8, 16, I)
    with pytest.raises(IndirectTableError):
        collect(chain(vq, 0))


def test_indirect_descriptor_write_flag_is_ignored(vq):
    # §2.7.5.3.2: the device ignores VIRTQ_DESC_F_WRITE on the descriptor naming the table.
    table = vq.alloc.alloc(16)
    vq.mem.write(table, struct.pack("<QIHH", 0x10000, 4, 0, 0))
    vq.write_desc(0, table, 16, I | W)
    assert collect(chain(vq, 0)).readable.parts == [(0x10000, 4)]


def test_zero_length_descriptors_are_walked_but_carry_nothing(vq):
    head = vq.add_chain([Buf(0, 0), Buf(0x10000, 0, True)])
    bufs = collect(chain(vq, head))
    assert bufs.readable.length == 0 and bufs.writable.length == 0


def test_buffer_spanning_two_adjacent_regions_is_fine():
    mem = GuestMemory.from_buffers([(0, bytearray(0x20000)), (0x20000, bytearray(0x10000))])
    vq = FakeVirtqueue(mem, Allocator(0x1000, 0x10000), 0, SIZE)
    head = vq.add_chain([Buf(0x1F000, 0x2000)])
    assert collect(chain(vq, head)).readable.length == 0x2000


def test_segments_slice_read_write(guest_mem):
    seg = Segments([(0x10000, 3), (0x20000, 5), (0x30000, 2)])
    assert seg.length == 10
    assert seg.slice(2, 4).parts == [(0x10002, 1), (0x20000, 3)]
    assert seg.write(guest_mem, b"abcdefghijkl") == 10
    assert seg.read(guest_mem) == b"abcdefghij"
    assert seg.slice(9, 1).read(guest_mem) == b"j"
    with pytest.raises(ValueError):
        seg.slice(8, 3)


# -- hostile tables -----------------------------------------------------------

descriptor = st.tuples(
    st.one_of(st.integers(0, 0x20000), st.integers(0, 2**64 - 1)),     # addr: mostly in memory
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),           # len
    st.integers(0, 7),                                                  # flags: NEXT/WRITE/INDIRECT
    st.integers(0, SIZE + 2),                                           # next: sometimes outside
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(descriptor, min_size=SIZE, max_size=SIZE), head=st.integers(0, SIZE - 1),
       indirect_ok=st.booleans())
def test_random_tables_give_buffers_or_a_chain_error(guest_mem, table, head, indirect_ok):
    vq = FakeVirtqueue(guest_mem, Allocator(0x1000, guest_mem.end), 0, SIZE)
    for i, (addr, length, flags, nxt) in enumerate(table):
        vq.write_desc(i, addr, length, flags, nxt)
    try:
        bufs = collect(chain(vq, head, indirect_ok=indirect_ok))
    except ChainError:
        return
    for addr, length in bufs.readable.parts + bufs.writable.parts:
        assert guest_mem.contains(addr, length)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(descriptor, min_size=SIZE, max_size=SIZE), head=st.integers(0, SIZE - 1),
       indirect_ok=st.booleans())
def test_collect_agrees_with_walking_the_chain(guest_mem, table, head, indirect_ok):
    """collect's one-loop walk gives what iterating the chain gives, error type included."""
    vq = FakeVirtqueue(guest_mem, Allocator(0x1000, guest_mem.end), 0, SIZE)
    for i, (addr, length, flags, nxt) in enumerate(table):
        vq.write_desc(i, addr, length, flags, nxt)

    def outcome(walk):
        try:
            return walk(chain(vq, head, indirect_ok=indirect_ok))
        except ChainError as e:
            return type(e)

    def iterate(c):
        readable, writable = Segments(), Segments()
        for addr, length, flags in c:
            (writable if flags & W else readable).append(addr, length)
        return readable.parts, writable.parts

    collected = outcome(collect)
    expected = outcome(iterate)
    if collected is ChainLengthError:           # the one check collect adds to the walk
        assert max(sum(n for _, n in parts) for parts in expected) > MAX_CHAIN_BYTES
    elif isinstance(collected, type):
        assert collected == expected
    else:
        assert (collected.readable.parts, collected.writable.parts) == expected
        assert collected.readable.length == sum(n for _, n in expected[0])


@settings(max_examples=200)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), offset=st.integers(0, 60))
def test_split_last_byte_and_after_are_slices(lengths, offset):
    seg = Segments([(0x1000 * (i + 1), n) for i, n in enumerate(lengths)])
    head, tail = seg.split_last_byte()
    assert (head.parts, head.length) == (seg.slice(0, seg.length - 1).parts, seg.length - 1)
    assert (tail.parts, tail.length) == (seg.slice(seg.length - 1, 1).parts, 1)
    for off in (offset % (seg.length + 1), lengths[0]):
        rest = seg.after(off)
        assert (rest.parts, rest.length) == (seg.slice(off, seg.length - off).parts, seg.length - off)


# -- the three-descriptor fast path -------------------------------------------

def test_direct_three_reads_the_usual_request_shape(vq):
    head = vq.add_chain([Buf(0x10000, 16), Buf(0x20000, 4096, True), Buf(0x30000, 1, True)])
    c = chain(vq, head)
    (a0, l0, f0, _), (a1, l1, f1, _), (a2, l2, f2, _) = c.direct_three()
    assert [(a0, l0, f0 & W), (a1, l1, f1 & W), (a2, l2, f2 & W)] == [
        (0x10000, 16, 0), (0x20000, 4096, W), (0x30000, 1, W)]
    assert collect(c).writable.parts == [(0x20000, 4096), (0x30000, 1)]    # the chain is not advanced


def test_direct_three_leaves_other_shapes_to_collect(vq):
    two = vq.add_chain([Buf(0x10000, 16), Buf(0x20000, 4097, True)])
    four = vq.add_chain([Buf(0x10000, 16), Buf(0x20000, 1), Buf(0x21000, 512, True), Buf(0x30000, 1, True)])
    indirect = vq.add_indirect_chain([Buf(0x10000, 16), Buf(0x20000, 512, True), Buf(0x30000, 1, True)])
    for head in (two, four, indirect):
        assert chain(vq, head).direct_three() is None


def _three_links(size: int):
    """A table of ``size`` whose head links to two more descriptors (``(addr, len)`` each and
    their indices: mostly distinct ones in the table, sometimes outside it or repeated)."""
    in_ram = st.tuples(st.integers(0, 0x20000), st.sampled_from([0, 1, 16, 512]))
    wild = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
    buf = st.one_of(*[in_ram] * 7, wild)       # one_of picks its branches evenly
    anywhere = st.lists(st.integers(0, size), min_size=3, max_size=3)
    at = st.one_of(st.permutations(range(size)).map(lambda p: p[:3]), anywhere) if size >= 3 else anywhere
    return st.tuples(st.just(size), st.lists(buf, min_size=3, max_size=3), at)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from([1, 2, 3, 4, SIZE]).flatmap(_three_links), indirect_ok=st.booleans())
def test_direct_three_agrees_with_collect(guest_mem, table, indirect_ok):
    """Whatever direct_three accepts, with any flags, collect accepts with the same buffers."""
    size, bufs, at = table
    vq = FakeVirtqueue(guest_mem, Allocator(0x1000, guest_mem.end), 0, size)
    head = at[0] % size
    for flags in itertools.product(range(8), repeat=3):
        for k in range(3):                  # later ones win a shared slot, as a driver's rewrite
            if at[k] < size:
                vq.write_desc(at[k], *bufs[k], flags[k], at[(k + 1) % 3])
        found = chain(vq, head, indirect_ok=indirect_ok).direct_three()
        assert direct_three(guest_mem, guest_mem.view(vq.desc, 16 * size), head) == found
        if found is None:
            continue
        got = collect(chain(vq, head, indirect_ok=indirect_ok))     # raises if it disagrees
        readable = [(a, n) for a, n, f, _ in found if n and not f & W]
        writable = [(a, n) for a, n, f, _ in found if n and f & W]
        assert (got.readable.parts, got.writable.parts) == (readable, writable)
