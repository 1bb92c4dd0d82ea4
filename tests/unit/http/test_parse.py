"""Every endpoint's parse function: good bodies, each kind of bad body, routing errors; no server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvmm.controller import ActionKind as K
from asyncvmm.controller import VirtioDeviceId
from asyncvmm.http.parse import ParsedRequest, RequestError, parse_request

DESER = "An error occurred when deserializing the json body of a request: "


def ok(method: str, path: str, body: object = None) -> ParsedRequest:
    raw = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return parse_request(method, path, raw)


def err(method: str, path: str, body: object = None) -> str:
    with pytest.raises(RequestError) as e:
        ok(method, path, body)
    return e.value.message


DRIVE = {"drive_id": "root", "is_root_device": True, "path_on_host": "/d", "is_read_only": False}
IFACE = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}
TB = {"size": 1000, "refill_time": 100}

GOOD = [
    ("GET", "/", None, K.GET_INSTANCE_INFO),
    ("GET", "/version", None, K.GET_VMM_VERSION),
    ("GET", "/machine-config", None, K.GET_MACHINE_CONFIG),
    ("GET", "/vm/config", None, K.GET_FULL_VM_CONFIG),
    ("GET", "/mmds", None, K.GET_MMDS),
    ("GET", "/balloon", None, K.GET_BALLOON_CONFIG),
    ("GET", "/balloon/statistics", None, K.GET_BALLOON_STATS),
    ("GET", "/balloon/hinting/status", None, K.GET_FREE_PAGE_HINTING_STATUS),
    ("GET", "/hotplug/memory", None, K.GET_MEMORY_HOTPLUG_STATUS),
    ("PUT", "/actions", {"action_type": "InstanceStart"}, K.START_MICRO_VM),
    ("PUT", "/actions", {"action_type": "FlushMetrics"}, K.FLUSH_METRICS),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, K.SEND_CTRL_ALT_DEL),
    ("PUT", "/boot-source", {"kernel_image_path": "/k", "boot_args": "console=ttyS0"}, K.CONFIGURE_BOOT_SOURCE),
    ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}, K.UPDATE_MACHINE_CONFIGURATION),
    ("PATCH", "/machine-config", {"mem_size_mib": 512}, K.UPDATE_MACHINE_CONFIGURATION),
    ("PUT", "/drives/root", DRIVE, K.INSERT_BLOCK_DEVICE),
    ("PATCH", "/drives/root", {"drive_id": "root", "rate_limiter": {"ops": TB}}, K.UPDATE_BLOCK_DEVICE),
    ("PUT", "/network-interfaces/eth0", IFACE, K.INSERT_NETWORK_DEVICE),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0", "rx_rate_limiter": {}}, K.UPDATE_NETWORK_INTERFACE),
    ("PUT", "/pmem/p0", {"id": "p0", "path_on_host": "/p"}, K.INSERT_PMEM_DEVICE),
    ("PATCH", "/pmem/p0", {"id": "p0"}, K.UPDATE_PMEM_DEVICE),
    ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v.sock"}, K.SET_VSOCK_DEVICE),
    ("PUT", "/entropy", {"rate_limiter": {"bandwidth": TB}}, K.SET_ENTROPY_DEVICE),
    ("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False}, K.SET_BALLOON_DEVICE),
    ("PATCH", "/balloon", {"amount_mib": 1}, K.UPDATE_BALLOON),
    ("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1}, K.UPDATE_BALLOON_STATISTICS),
    ("PATCH", "/balloon/hinting/start", None, K.START_FREE_PAGE_HINTING),
    ("PATCH", "/balloon/hinting/stop", None, K.STOP_FREE_PAGE_HINTING),
    ("PUT", "/logger", {"log_path": "/l", "level": "debug", "show_level": True}, K.CONFIGURE_LOGGER),
    ("PUT", "/metrics", {"metrics_path": "/m"}, K.CONFIGURE_METRICS),
    ("PUT", "/serial", {"serial_out_path": "/s"}, K.CONFIGURE_SERIAL),
    ("PUT", "/cpu-config", {"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
        {"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx1"}]}],
        "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "x" * 64}]}, K.PUT_CPU_CONFIGURATION),
    ("PUT", "/mmds", {"latest": {"meta-data": {}}}, K.PUT_MMDS),
    ("PATCH", "/mmds", {"latest": None}, K.PATCH_MMDS),
    ("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}, K.SET_MMDS_CONFIGURATION),
    ("PUT", "/snapshot/create", {"mem_file_path": "m", "snapshot_path": "s"}, K.CREATE_SNAPSHOT),
    ("PUT", "/snapshot/load", {"mem_backend": {"backend_type": "File", "backend_path": "m"},
                               "snapshot_path": "s"}, K.LOAD_SNAPSHOT),
    ("PATCH", "/vm", {"state": "Paused"}, K.PAUSE),
    ("PATCH", "/vm", {"state": "Resumed"}, K.RESUME),
    ("PUT", "/hotplug/memory", {"total_size_mib": 1024}, K.SET_MEMORY_HOTPLUG_DEVICE),
    ("PATCH", "/hotplug/memory", {"requested_size_mib": 512}, K.UPDATE_MEMORY_HOTPLUG_SIZE),
    ("DELETE", "/drives/root", None, K.HOT_UNPLUG_DEVICE),
    ("DELETE", "/network-interfaces/eth0", None, K.HOT_UNPLUG_DEVICE),
    ("DELETE", "/pmem/p0", None, K.HOT_UNPLUG_DEVICE),
]


@pytest.mark.parametrize("method,path,body,kind", GOOD)
def test_good_requests(method: str, path: str, body: object, kind: K) -> None:
    parsed = ok(method, path, body)
    assert parsed.action.kind is kind
    assert parsed.deprecation is None


BODY_ROUTES = [(m, p, b) for m, p, b, _ in GOOD if b is not None and p not in ("/mmds",)]


@pytest.mark.parametrize("method,path,body", BODY_ROUTES)
def test_unknown_field_is_rejected(method: str, path: str, body: dict) -> None:
    message = err(method, path, {**body, "bogus_field": 1})
    assert message.startswith(DESER + "unknown field `bogus_field`")


@pytest.mark.parametrize("method,path,body", BODY_ROUTES)
def test_malformed_json_is_rejected(method: str, path: str, body: dict) -> None:
    assert err(method, path, b"{not json").startswith(DESER)


def test_missing_field() -> None:
    assert err("PUT", "/drives/root", {"drive_id": "root"}) == DESER + "missing field `is_root_device`."
    assert err("PUT", "/boot-source", {"boot_args": "x"}) == DESER + "missing field `kernel_image_path`."
    assert "missing field `refill_time`" in err("PATCH", "/drives/root", {"drive_id": "root", "rate_limiter": {"ops": {"size": 1}}})


def test_duplicate_fields_and_syntax_positions() -> None:
    body = b'{"vcpu_count": 1, "mem_size_mib": 64, "vcpu_count": 2}'
    assert err("PUT", "/machine-config", body) == DESER + "duplicate field `vcpu_count`."
    # An MMDS document is free-form JSON (serde_json's Value in Firecracker): the last key wins.
    assert ok("PUT", "/mmds", b'{"a": 1, "a": 2}').action.payload == {"a": 2}
    assert err("PUT", "/boot-source", b'{\n "kernel_image_path": }') == (
        DESER + "invalid character at line 2 column 23.")


def test_wrong_types_and_variants() -> None:
    assert "unknown variant `Reboot`" in err("PUT", "/actions", {"action_type": "Reboot"})
    assert "invalid type" in err("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 1})
    assert "out of range" in err("PUT", "/machine-config", {"vcpu_count": 256, "mem_size_mib": 1})
    assert "MAC address" in err("PUT", "/network-interfaces/eth0", {**IFACE, "guest_mac": "zz"})
    assert "as a bitmap - unknown character: 50" in err("PUT", "/cpu-config", {"msr_modifiers": [
        {"addr": "0x10", "bitmap": "0b2"}]})
    assert "No supported number system prefix" in err("PUT", "/cpu-config", {"msr_modifiers": [
        {"addr": "16", "bitmap": "0b1"}]})
    assert "unknown field `vcpu_features`" in err("PUT", "/cpu-config", {"vcpu_features": []})


def test_empty_bodies_and_get_with_body() -> None:
    assert err("PUT", "/boot-source") == "Empty PUT request."
    assert err("PATCH", "/machine-config") == "Empty PATCH request."
    assert err("PATCH", "/machine-config", {}) == "Empty PATCH request."
    assert err("PATCH", "/balloon") == "Empty PATCH request."
    assert err("GET", "/", b"{}") == "GET request cannot have a body."
    assert err("GET", "/nowhere", b"{}") == "GET request cannot have a body."


def test_unknown_paths_and_methods() -> None:
    assert err("PATCH", "/boot-source", {}) == "Invalid request method and/or path: PATCH boot-source."
    assert err("PATCH", "/logger", {}) == "Invalid request method and/or path: PATCH logger."
    assert err("PUT", "/vm", {"state": "Paused"}) == "Invalid request method and/or path: PUT vm."
    assert err("DELETE", "/machine-config") == "Invalid request method and/or path: DELETE machine-config."
    assert err("DELETE", "/") == "Invalid request method and/or path: DELETE ."
    assert err("GET", "/nothing") == "Invalid request method and/or path: GET nothing."
    assert err("GET", "/vm") == "Invalid request method and/or path: GET vm."
    assert err("PUT", "/mmds/other", {}) == "Unrecognized PUT request path `other`."
    assert err("GET", "/balloon/other") == "Unrecognized GET request path `other`."
    assert err("PUT", "/snapshot", {}) == "Missing snapshot operation type."


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("doc", [[1, 2], "text", 3, None])
def test_mmds_documents_must_be_objects(method: str, doc: object) -> None:
    assert "expected a JSON object" in err(method, "/mmds", json.dumps(doc).encode())


def test_resource_ids() -> None:
    assert err("PUT", "/drives", DRIVE) == "The ID cannot be empty."
    assert err("PUT", "/drives/", DRIVE) == "The ID cannot be empty."
    assert err("PUT", "/drives/ro-ot", DRIVE) == (
        "API Resource IDs can only contain alphanumeric characters and underscores."
    )
    assert err("PUT", "/drives/other", DRIVE) == "The id from the path does not match the id from the body!"
    assert err("PATCH", "/network-interfaces/eth1", {"iface_id": "eth0"}) == (
        "The id from the path does not match the id from the body!"
    )
    assert err("PATCH", "/drives/x.y", {"drive_id": "x.y"}).startswith("API Resource IDs")


@pytest.mark.parametrize("path,kind,device_id", [
    ("/drives/block0", "drive", "block0"),
    ("/network-interfaces/eth_1", "net", "eth_1"),
    ("/pmem/pmem0/", "pmem", "pmem0"),
    ("/drives/block0/ignored", "drive", "block0"),     # Firecracker reads only the ID token
])
def test_delete_unplugs_a_device_by_kind_and_id(path: str, kind: str, device_id: str) -> None:
    action = ok("DELETE", path).action
    assert action.kind is K.HOT_UNPLUG_DEVICE
    assert action.payload == VirtioDeviceId(kind, device_id)  # type: ignore[arg-type]


def test_delete_errors() -> None:
    assert err("DELETE", "/drives") == "The ID cannot be empty."
    assert err("DELETE", "/network-interfaces/") == "The ID cannot be empty."
    assert err("DELETE", "/pmem/p-0") == "API Resource IDs can only contain alphanumeric characters and underscores."
    # A DELETE with a body is refused before routing, in Firecracker's words.
    assert err("DELETE", "/drives/root", {"drive_id": "root"}) == "Empty Delete request."
    assert err("DELETE", "/nowhere", b"x") == "Empty Delete request."
    assert err("DELETE", "/vm/config") == "Invalid request method and/or path: DELETE vm."


def test_patch_only_accepts_updatable_fields() -> None:
    assert "unknown field `is_read_only`" in err("PATCH", "/drives/root", {"drive_id": "root", "is_read_only": True})
    assert "unknown field `host_dev_name`" in err(
        "PATCH", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap1"})


def test_deprecated_fields_are_flagged() -> None:
    assert ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "None"}).deprecation
    assert ok("PATCH", "/machine-config", {"cpu_template": "T2"}).deprecation
    assert ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v", "vsock_id": "v"}).deprecation
    load = ok("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_file_path": "m", "enable_diff_snapshots": True})
    assert "mem_file_path" in load.deprecation and "enable_diff_snapshots" in load.deprecation


def test_snapshot_load_memory_source_rules() -> None:
    both = {"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "Uffd", "backend_path": "u"}}
    assert "too many fields" in err("PUT", "/snapshot/load", both)
    assert "missing field: either `mem_backend` or `mem_file_path`" in err("PUT", "/snapshot/load", {"snapshot_path": "s"})


def test_put_machine_config_resets_omitted_fields() -> None:
    cfg = ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}).action.payload
    assert (cfg.smt, cfg.track_dirty_pages, cfg.huge_pages, cfg.cpu_template) == (False, False, "None", None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "PUT", "PATCH", "POST", "DELETE"]),
    path=st.sampled_from([p for _, p, _, _ in GOOD] + ["/", "/drives/a_1", "//x", "/vm/config/extra"]),
    body=st.none() | st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_hostile_requests_only_ever_give_request_errors(method: str, path: str, body: bytes | None) -> None:
    try:
        parsed = parse_request(method, path, body)
    except RequestError as e:
        assert e.message
    else:
        assert isinstance(parsed, ParsedRequest)
