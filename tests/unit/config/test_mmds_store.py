"""MMDS data store: RFC 7396 merge patch, size limit, initialisation."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.config.mmds_store import (
    MmdsLimitExceededError,
    MmdsNotInitializedError,
    MmdsStore,
    merge_patch,
)

# RFC 7396 appendix A test cases.
RFC_CASES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize("target,patch,result", RFC_CASES)
def test_rfc7396_examples(target: object, patch: object, result: object) -> None:
    assert merge_patch(target, patch) == result


json_obj = st.recursive(
    st.none() | st.integers() | st.text(max_size=5),
    lambda inner: st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=15,
)


@given(json_obj, json_obj)
def test_patch_is_idempotent(target: object, patch: object) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


def test_store_lifecycle_and_limit() -> None:
    store = MmdsStore(limit=30)
    assert store.get() == {}
    with pytest.raises(MmdsNotInitializedError):
        store.patch({"a": 1})
    store.put({"a": {"b": 1}})
    store.patch({"a": {"c": 2}})
    assert store.get() == {"a": {"b": 1, "c": 2}}
    with pytest.raises(MmdsLimitExceededError):
        store.patch({"big": "x" * 30})
    assert store.get() == {"a": {"b": 1, "c": 2}}  # a refused patch changes nothing
    exact = {"k": "x" * (30 - len(b'{"k":""}'))}
    assert len(msgspec.json.encode(exact)) == 30
    store.put(exact)
