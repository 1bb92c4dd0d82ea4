"""The MMDS data store in a snapshot's state file: round trip, the never-PUT store, the size
limit of the restoring process and a corrupt document refused with a clear message."""

from __future__ import annotations

import pytest

from asyncvmm.mmds.store import MmdsStore
from asyncvmm.snapshot.format import SnapshotState, VmState, decode_state, encode_state
from asyncvmm.snapshot.mmds import MmdsStateError, load_mmds, save_mmds

DOC = {"latest": {"meta-data": {"ami-id": "ami-12345678", "big": 2 ** 80, "pi": 3.5,
                                "list": [1, None, True, "ü"]}}}


def _state(mmds: bytes | None) -> SnapshotState:
    vm = VmState(pic_master=b"", pic_slave=b"", ioapic=b"", pit=b"", clock=b"")
    return SnapshotState(asyncvmm_version="x", snapshot_type="Full", config=b"{}", memory=[],
                         memory_file_size=0, vm=vm, vcpus=[], devices={}, mmds=mmds)


def test_the_store_round_trips_through_the_state_file() -> None:
    store = MmdsStore()
    store.put(DOC)
    state = decode_state(encode_state(_state(save_mmds(store))))
    present, doc = load_mmds(state.mmds, store.limit_bytes)
    assert present and doc == DOC
    restored = MmdsStore()
    restored.put(doc)
    assert restored.get() == DOC and restored.lookup("/latest/meta-data/big") == 2 ** 80


def test_a_store_never_put_stays_absent() -> None:
    assert save_mmds(MmdsStore()) is None
    assert load_mmds(None, 10) == (False, None)
    store = MmdsStore()
    store.put({})
    assert load_mmds(save_mmds(store), 10) == (True, {})


def test_a_store_over_this_process_limit_is_refused() -> None:
    store = MmdsStore(limit_bytes=1 << 20)
    store.put({"k": "v" * 1000})
    data = save_mmds(store)
    assert load_mmds(data, len(data))[0]
    with pytest.raises(MmdsStateError, match=rf"has {len(data)} bytes, more than this process's "
                                             rf"MMDS size limit of {len(data) - 1} bytes"):
        load_mmds(data, len(data) - 1)


@pytest.mark.parametrize("data", [b"{", b"\xff", b"NaN", b'"\\ud800"', b"[" * 100_000 + b"]" * 100_000])
def test_a_corrupt_document_is_refused(data) -> None:
    with pytest.raises(MmdsStateError, match="not a valid JSON document"):
        load_mmds(data, 1 << 21)
