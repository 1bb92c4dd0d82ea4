"""The split virtqueue: configuration checks, pop, used ring, notification suppression."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.devices.virtio.queue import Queue, QueueConfigError, QueueContractError, vring_need_event
from asyncvmm.devices.virtio.spec import VIRTQ_AVAIL_F_NO_INTERRUPT
from asyncvmm.memory import GuestMemory
from tests.fakes.virtio_driver import Allocator, Buf, FakeVirtqueue


def make(mem: GuestMemory, size: int = 8, *, event_idx: bool = False) -> tuple[Queue, FakeVirtqueue]:
    vq = FakeVirtqueue(mem, Allocator(0x1000, mem.end), 0, size)
    q = Queue(max_size=256, size=size, ready=True, desc_table=vq.desc, avail_ring=vq.avail,
              used_ring=vq.used, event_idx=event_idx)
    q.validate(mem)
    return q, vq


@pytest.mark.parametrize("size", [0, 3, 6, 100, 512])
def test_size_must_be_a_power_of_two_within_max(guest_mem, size):
    q, _ = make(guest_mem)
    q.size = size
    with pytest.raises(QueueConfigError):
        q.validate(guest_mem)


@pytest.mark.parametrize("area,delta", [("desc_table", 8), ("avail_ring", 1), ("used_ring", 2)])
def test_misaligned_areas_are_refused(guest_mem, area, delta):
    q, _ = make(guest_mem)
    setattr(q, area, getattr(q, area) + delta)
    with pytest.raises(QueueConfigError, match="aligned"):
        q.validate(guest_mem)


@pytest.mark.parametrize("area", ["desc_table", "avail_ring", "used_ring"])
def test_areas_outside_guest_memory_are_refused(guest_mem, area):
    q, _ = make(guest_mem)
    setattr(q, area, guest_mem.end - 16)
    with pytest.raises(QueueConfigError, match="guest memory"):
        q.validate(guest_mem)


def test_max_size_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        Queue(max_size=300, size=256)


def test_pop_returns_offered_chains_in_order_then_none(guest_mem):
    q, vq = make(guest_mem)
    heads = [vq.add_chain([Buf(0x100000 + i * 64, 64)]) for i in range(3)]
    for h in heads:
        vq.offer(h)
    assert [q.pop(guest_mem).head for _ in range(3)] == heads
    assert q.pop(guest_mem) is None


def test_undo_pop_gives_the_chain_back(guest_mem):
    q, vq = make(guest_mem)
    vq.offer(vq.add_chain([Buf(0x100000, 1)]))
    head = q.pop(guest_mem).head
    q.undo_pop()
    assert q.pop(guest_mem).head == head


def test_avail_idx_more_than_size_ahead_is_a_contract_error(guest_mem):
    q, vq = make(guest_mem, size=8)
    vq.set_avail_idx(9)
    with pytest.raises(QueueContractError):
        q.pop(guest_mem)


def test_avail_idx_going_backwards_is_a_contract_error(guest_mem):
    q, vq = make(guest_mem, size=8)
    vq.offer(vq.add_chain([Buf(0x100000, 1)]))
    q.pop(guest_mem)
    vq.set_avail_idx(0)
    with pytest.raises(QueueContractError):
        q.pop(guest_mem)


def test_head_outside_the_table_is_a_contract_error(guest_mem):
    q, vq = make(guest_mem, size=8)
    vq.offer(8)
    with pytest.raises(QueueContractError):
        q.pop(guest_mem)


def test_indices_wrap_at_16_bits(guest_mem):
    q, vq = make(guest_mem, size=4)
    q.next_avail = q.next_used = q.signalled_used = q.avail_idx_seen = 0xFFFE
    vq.avail_idx = 0xFFFE
    vq.last_used = 0xFFFE
    guest_mem.write_u16(vq.used + 2, 0xFFFE)
    for i in range(4):
        vq.offer(vq.add_chain([Buf(0x100000 + i, 1)]))
    for _ in range(4):
        c = q.pop(guest_mem)
        q.add_used(guest_mem, c.head, 7)
    assert q.pop(guest_mem) is None
    assert q.next_avail == 2 and vq.used_idx == 2
    assert [n for _, n in vq.take_used()] == [7] * 4


def test_add_used_writes_the_element_then_the_index(guest_mem):
    q, vq = make(guest_mem)
    q.add_used(guest_mem, 5, 1234)
    assert vq.used_idx == 1
    assert vq.take_used() == [(5, 1234)]


def test_no_interrupt_flag_suppresses_without_event_idx(guest_mem):
    q, vq = make(guest_mem)
    assert not q.needs_notification(guest_mem)            # nothing added yet
    q.add_used(guest_mem, 0, 0)
    assert q.needs_notification(guest_mem)
    vq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add_used(guest_mem, 1, 0)
    assert not q.needs_notification(guest_mem)


def test_event_idx_interrupts_only_when_used_event_is_crossed(guest_mem):
    q, vq = make(guest_mem, event_idx=True)
    vq.set_used_event(2)                 # "interrupt me when entry 2 is used"
    q.add_used(guest_mem, 0, 0)
    assert not q.needs_notification(guest_mem)            # idx 0 -> 1
    q.add_used(guest_mem, 1, 0)
    assert not q.needs_notification(guest_mem)            # 1 -> 2
    q.add_used(guest_mem, 2, 0)
    assert q.needs_notification(guest_mem)                # 2 -> 3 crosses 2
    q.add_used(guest_mem, 3, 0)
    assert not q.needs_notification(guest_mem)


def test_event_idx_batch_crossing_gives_one_interrupt(guest_mem):
    q, vq = make(guest_mem, event_idx=True)
    vq.set_used_event(0)
    for i in range(5):
        q.add_used(guest_mem, i, 0)
    assert q.needs_notification(guest_mem)
    assert not q.needs_notification(guest_mem)


def test_enable_notification_publishes_avail_event_and_rechecks(guest_mem):
    q, vq = make(guest_mem, event_idx=True)
    vq.offer(vq.add_chain([Buf(0x100000, 1)]))
    q.pop(guest_mem)
    assert q.enable_notification(guest_mem) is False
    assert vq.avail_event == 1           # kick me when you make slot 1 available
    vq.offer(vq.add_chain([Buf(0x100000, 1)]))
    assert q.enable_notification(guest_mem) is True      # arrived meanwhile: keep going


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_matches_its_definition(event, new, old):
    # Notify iff event lies in the half-open window [old, new) of indices just published,
    # i.e. it is fewer steps past old than new is.
    steps_to_event = (event - old) & 0xFFFF
    steps_to_new = (new - old) & 0xFFFF
    assert vring_need_event(event, new, old) == (steps_to_event < steps_to_new)


def test_vring_need_event_small_cases():
    assert vring_need_event(5, 6, 5)          # just used entry 5
    assert not vring_need_event(6, 6, 5)      # entry 6 not used yet
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap
