import json

import pytest
from hypothesis import given, strategies as st

from asyncvmm.mmds.store import (DataStoreLimitExceededError, DataStoreNotInitializedError,
                                 InvalidMmdsDataError, MmdsNotFoundError, MmdsStore,
                                 merge_patch, resolve_pointer, serialized_size)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=20)


def test_empty_store_reads_as_empty_object_for_the_api_and_null_for_the_guest():
    store = MmdsStore()
    assert store.get() == {}
    assert not store.initialized
    assert store.lookup("") is None
    with pytest.raises(MmdsNotFoundError):
        store.lookup("/latest")


def test_put_replaces_and_get_returns_a_copy():
    store = MmdsStore()
    doc = {"latest": {"meta-data": {"ami-id": "ami-1"}}}
    store.put(doc)
    doc["latest"]["meta-data"]["ami-id"] = "changed by caller"
    got = store.get()
    assert got == {"latest": {"meta-data": {"ami-id": "ami-1"}}}
    got["latest"] = "changed again"
    assert store.get()["latest"] == {"meta-data": {"ami-id": "ami-1"}}
    store.put({"other": "x"})
    assert store.get() == {"other": "x"}


def test_patch_before_put_is_refused_with_firecrackers_message():
    store = MmdsStore()
    with pytest.raises(DataStoreNotInitializedError, match="The MMDS data store is not initialized."):
        store.patch({"a": "b"})


def test_patch_is_rfc7396_merge():
    store = MmdsStore()
    store.put({"name": {"first": "John", "second": "Doe"}, "age": "43", "list": [1, 2]})
    store.patch({"name": {"second": None, "last": "Kennedy"}, "age": "44", "list": [3],
                 "new": {"deep": None, "x": 1}})
    assert store.get() == {"name": {"first": "John", "last": "Kennedy"}, "age": "44",
                           "list": [3], "new": {"x": 1}}
    store.patch({"name": "flat"})
    assert store.get()["name"] == "flat"


# RFC 7396 appendix A, all of it.
@pytest.mark.parametrize("target,patch,result", [
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
])
def test_merge_patch_rfc7396_examples(target, patch, result):
    assert merge_patch(target, patch) == result


@given(json_values, json_values)
def test_merge_patch_never_mutates_its_inputs(target, patch):
    before = (json.dumps(target), json.dumps(patch))
    merge_patch(target, patch)
    assert (json.dumps(target), json.dumps(patch)) == before


def test_size_is_compact_utf8_json_length():
    assert serialized_size({"a": "b"}) == len('{"a":"b"}')
    assert serialized_size({"k": "é"}) == len('{"k":"é"}'.encode())
    assert serialized_size([1, 2.5, True, None]) == len("[1,2.5,true,null]")


def test_put_over_the_limit_is_refused_and_leaves_the_store_unchanged():
    store = MmdsStore(limit_bytes=51200)
    small = {"latest": {"meta-data": {"ami-id": "dummy"}}}
    store.put(small)
    with pytest.raises(DataStoreLimitExceededError) as exc:
        store.put({"latest": {"meta-data": {"ami-id": "smth", "secret_key": "a" * 51200}}})
    assert exc.value.limit == 51200 and exc.value.size > 51200
    assert str(exc.value) == "The MMDS patch request doesn't fit."
    assert store.get() == small


def test_limit_boundary_is_inclusive():
    store = MmdsStore(limit_bytes=len('{"a":"bbbb"}'))
    store.put({"a": "bbbb"})
    with pytest.raises(DataStoreLimitExceededError):
        store.put({"a": "bbbbb"})


def test_patch_over_the_limit_is_all_or_nothing_and_shrinking_frees_room():
    # The scenario of Firecracker's test_mmds_limit_scenario.
    store = MmdsStore(51200)
    store.put({"latest": {"meta-data": {"ami-id": "dummy"}}})
    store.patch({"latest": {"meta-data": {"ami-id": "smth", "secret_key": "a" * 51137}}})
    with pytest.raises(DataStoreLimitExceededError):
        store.patch({"latest": {"meta-data": {"ami-id": "smth", "secret_key2": "b" * 10}}})
    assert "secret_key2" not in store.get()["latest"]["meta-data"]
    store.patch({"latest": {"meta-data": {"ami-id": "smth", "secret_key": "a"}}})
    assert store.size_bytes() == 59
    store.patch({"latest": {"meta-data": {"ami-id": "smth", "secret_key": "a" * 100}}})
    assert store.size_bytes() == 158


@pytest.mark.parametrize("bad", [{1: "int key"}, {"a": float("nan")}, {"a": {1, 2}},
                                 {"a": b"bytes"}, {"a": "\ud800"}, {"\udfff": 1}, object()])
def test_non_json_values_are_refused(bad):
    store = MmdsStore()
    with pytest.raises(InvalidMmdsDataError):
        store.put(bad)
    assert not store.initialized


def test_absurd_nesting_is_refused_not_a_recursion_error():
    doc: object = "leaf"
    for _ in range(500):
        doc = {"a": doc}
    with pytest.raises(InvalidMmdsDataError):
        MmdsStore(10**9).put(doc)


@pytest.mark.parametrize("pointer,expected", [
    ("", {"a": {"b/c": 1, "m~n": 2, "arr": ["x", "y"]}}),
    ("/a/b~1c", 1),
    ("/a/m~0n", 2),
    ("/a/arr/0", "x"),
    ("/a/arr/1", "y"),
])
def test_json_pointer_rfc6901(pointer, expected):
    doc = {"a": {"b/c": 1, "m~n": 2, "arr": ["x", "y"]}}
    assert resolve_pointer(doc, pointer) == expected


@pytest.mark.parametrize("pointer", ["a", "/missing", "/a/arr/2", "/a/arr/01", "/a/arr/-",
                                     "/a/arr/+1", "/a/arr/x", "/a/b~1c/deeper", "/a/arr/١"])
def test_json_pointer_misses(pointer):
    doc = {"a": {"b/c": 1, "arr": ["x", "y"]}}
    with pytest.raises(MmdsNotFoundError):
        resolve_pointer(doc, pointer)


@given(json_values, st.text(max_size=30))
def test_lookup_never_raises_anything_but_not_found(doc, pointer):
    store = MmdsStore(10**9)
    store.put(doc)
    try:
        store.lookup(pointer)
    except MmdsNotFoundError:
        pass
