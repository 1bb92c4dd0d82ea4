"""Every behaviour of API-BEHAVIOUR.md against a live ``asyncvmm`` process on its Unix socket.

Every response is validated against the swagger response schema.  Checks that
need a booted guest use the real VMM core (``asyncvmm.vmm``), ``/dev/kvm`` and
the freestanding test guest of ``tests/guest``; they go through ``require()``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import require
from tests.integration.apiclient import Process, Response, SpecValidator, asyncvmm_command

SPEC = SpecValidator()


class Api:
    """A process plus spec validation of everything it answers."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc

    def __call__(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        resp = self.proc.request(method, path, body, **kw)
        SPEC.check(method, path, resp)
        return resp


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    proc = Process(tmp_path)
    yield Api(proc)
    proc.stop()


@pytest.fixture
def disk(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 4096)
    return str(path)


def vmm_available() -> bool:
    return importlib.util.find_spec("asyncvmm.vmm") is not None


# -- transport and responses -----------------------------------------------------------


def test_get_root_describes_the_instance(api: Api) -> None:
    resp = api("GET", "/")
    assert resp.status == 200
    assert resp.json() == {"app_name": "Firecracker", "id": "anonymous-instance",
                           "state": "Not started", "vmm_version": "1.16.1"}


def test_version_is_stable(api: Api) -> None:
    assert api("GET", "/version").json() == {"firecracker_version": "1.16.1"}


def test_success_without_data_is_204(api: Api) -> None:
    resp = api("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    assert resp.status == 204 and resp.body == b""


@pytest.mark.parametrize("method,path,resource", [
    ("PATCH", "/boot-source", "boot-source"), ("PATCH", "/logger", "logger"),
    ("PUT", "/vm", "vm"), ("POST", "/actions", "actions"), ("DELETE", "/boot-source", "boot-source"),
    ("GET", "/nonexistent", "nonexistent"),
])
def test_unknown_method_or_path_is_400(api: Api, method: str, path: str, resource: str) -> None:
    body = None if method in ("GET", "DELETE") else {}
    resp = api(method, path, body)
    assert resp.status == 400
    assert resp.fault == f"Invalid request method and/or path: {method} {resource}."


def test_get_with_body_and_empty_put_patch(api: Api) -> None:
    assert api("GET", "/", raw=b"{}").fault == "GET request cannot have a body."
    assert api("PUT", "/boot-source", raw=b"").fault == "Empty PUT request."
    assert api("PATCH", "/machine-config", raw=b"").fault == "Empty PATCH request."
    assert api("DELETE", "/drives/root", raw=b"{}").fault == "Empty Delete request."


@pytest.mark.parametrize("flags", [(), ("--enable-pci",)])
def test_delete_unplugs_only_after_boot(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """DELETE /drives|network-interfaces|pmem/{id} is PCI hot-unplug: refused before boot, with or
    without --enable-pci (which the process accepts)."""
    proc = Process(tmp_path, *flags)
    try:
        api = Api(proc)
        for path in ("/drives/root", "/network-interfaces/eth0", "/pmem/p0"):
            resp = api("DELETE", path)
            assert resp.status == 400
            assert resp.fault == "The requested operation is not supported before starting the microVM."
        assert api("DELETE", "/drives/").fault == "The ID cannot be empty."
    finally:
        proc.stop()


def test_resource_ids(api: Api, disk: str) -> None:
    drive = {"drive_id": "root", "path_on_host": disk, "is_root_device": True, "is_read_only": False}
    assert api("PUT", "/drives/", drive).fault == "The ID cannot be empty."
    assert api("PUT", "/drives/ro-ot", drive).fault == (
        "API Resource IDs can only contain alphanumeric characters and underscores.")
    assert api("PUT", "/drives/other", drive).status == 400
    assert api("PUT", "/drives/root", drive).status == 204


def test_unknown_and_missing_fields(api: Api) -> None:
    resp = api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1})
    assert resp.status == 400 and "unknown field `bogus`" in resp.fault
    resp = api("PUT", "/boot-source", {"boot_args": "x"})
    assert resp.status == 400 and "missing field `kernel_image_path`" in resp.fault


def test_deprecated_fields_set_the_deprecation_header(api: Api, tmp_path: Path) -> None:
    resp = api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"})
    assert resp.status == 204 and resp.headers.get("deprecation") == "true"
    resp = api("PATCH", "/machine-config", {"cpu_template": "None"})
    assert resp.status == 204 and resp.headers.get("deprecation") == "true"
    resp = api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    assert "deprecation" not in resp.headers


def test_payload_limit(api: Api) -> None:
    big = {"k": "x" * 52000}
    resp = api("PUT", "/mmds", big)
    assert resp.status == 400 and "larger than the limit of 51200" in resp.fault
    assert api("GET", "/").status == 200  # the server survives


def test_custom_payload_and_mmds_limits(tmp_path: Path) -> None:
    proc = Process(tmp_path, "--http-api-max-payload-size", "1000", "--mmds-size-limit", "100")
    try:
        api = Api(proc)
        assert api("PUT", "/mmds", {"k": "x" * 2000}).status == 400
        resp = api("PUT", "/mmds", {"k": "x" * 200})
        assert resp.status == 413 and "MMDS" in resp.fault
        assert api("PUT", "/mmds", {"k": "v"}).status == 204
    finally:
        proc.stop()


# -- phases ---------------------------------------------------------------------------

POST_BOOT_ONLY = [
    ("PATCH", "/drives/root", {"drive_id": "root", "path_on_host": "/x"}),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}),
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PATCH", "/vm", {"state": "Resumed"}),
    ("PUT", "/actions", {"action_type": "FlushMetrics"}),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
]


@pytest.mark.parametrize("method,path,body", POST_BOOT_ONLY)
def test_post_boot_only_operations_fail_before_boot(api: Api, method: str, path: str, body: Any) -> None:
    resp = api(method, path, body)
    assert resp.status == 400
    assert resp.fault == "The requested operation is not supported before starting the microVM."


def test_any_time_operations_before_boot(api: Api) -> None:
    assert api("GET", "/machine-config").json()["mem_size_mib"] == 128
    assert api("GET", "/mmds").json() == {}
    assert api("PUT", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-1"}}}).status == 204
    assert api("PATCH", "/mmds", {"latest": {"meta-data": {"ami-id": None, "id": 7}}}).status == 204
    assert api("GET", "/mmds").json() == {"latest": {"meta-data": {"id": 7}}}


def test_failed_instance_start_leaves_vm_configurable(api: Api, disk: str) -> None:
    # A "kernel" that is no kernel, and far more memory than can be mapped: the start must fail.
    assert api("PUT", "/boot-source", {"kernel_image_path": disk}).status == 204
    assert api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 1 << 40}).status == 204
    resp = api("PUT", "/actions", {"action_type": "InstanceStart"})
    assert resp.status == 400 and resp.fault.startswith("Start microvm error: ")
    assert api("GET", "/").json()["state"] == "Not started"
    assert api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}).status == 204


# -- resources --------------------------------------------------------------------------


def test_machine_config_put_patch_and_limits(api: Api) -> None:
    assert api("GET", "/machine-config").json() == {
        "vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False, "huge_pages": "None"}
    assert api("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "smt": True}).status == 204
    assert api("GET", "/machine-config").json()["smt"] is True
    assert api("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}).status == 204
    assert api("GET", "/machine-config").json()["smt"] is False  # PUT resets omitted fields
    assert api("PATCH", "/machine-config", {"mem_size_mib": 512}).status == 204
    assert api("GET", "/machine-config").json()["vcpu_count"] == 2
    for body in ({"vcpu_count": 0, "mem_size_mib": 128}, {"vcpu_count": 33, "mem_size_mib": 128},
                 {"vcpu_count": 3, "mem_size_mib": 128, "smt": True}, {"vcpu_count": 1, "mem_size_mib": 0}):
        resp = api("PUT", "/machine-config", body)
        assert resp.status == 400 and resp.fault.startswith("Machine config error: ")


def test_drives(api: Api, disk: str) -> None:
    root = {"drive_id": "root", "path_on_host": disk, "is_root_device": True, "is_read_only": False,
            "rate_limiter": {}}
    assert api("PUT", "/drives/root", root).status == 204
    assert api("PUT", "/drives/root", root).status == 204  # update by id
    second = {**root, "drive_id": "root2"}
    assert "A root block device already exists" in api("PUT", "/drives/root2", second).fault
    missing = {**root, "drive_id": "data", "is_root_device": False, "path_on_host": "/no/such/file"}
    assert "No such file or directory (os error 2)" in api("PUT", "/drives/data", missing).fault


def test_network_interfaces(api: Api) -> None:
    eth0 = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}
    assert api("PUT", "/network-interfaces/eth0", eth0).status == 204
    dup_tap = {"iface_id": "eth1", "host_dev_name": "tap0"}
    assert "already in use" in api("PUT", "/network-interfaces/eth1", dup_tap).fault
    dup_mac = {"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:ac:10:00:02"}
    assert "already in use" in api("PUT", "/network-interfaces/eth1", dup_mac).fault
    limited = {"iface_id": "eth1", "host_dev_name": "tap1", "rx_rate_limiter": {
        "bandwidth": {"size": 1000, "refill_time": 100, "one_time_burst": 10}, "ops": {"size": 1, "refill_time": 1}}}
    assert api("PUT", "/network-interfaces/eth1", limited).status == 204


def test_mmds_config(api: Api) -> None:
    assert "does not correspond" in api("PUT", "/mmds/config", {"network_interfaces": ["eth0"]}).fault
    api("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"})
    assert "is empty" in api("PUT", "/mmds/config", {"network_interfaces": []}).fault
    bad = {"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}
    assert "not link local" in api("PUT", "/mmds/config", bad).fault
    good = {"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.170.2"}
    assert api("PUT", "/mmds/config", good).status == 204
    assert api("GET", "/vm/config").json()["mmds-config"]["version"] == "V2"


def test_vsock_is_configured_pre_boot_and_its_errors_are_firecrackers(api: Api, tmp_path: Path) -> None:
    resp = api("PUT", "/vsock", {"guest_cid": 2, "uds_path": str(tmp_path / "v")})
    assert resp.fault == "Vsock config error: The guest CID must be at least 3."
    (tmp_path / "taken").write_text("")
    resp = api("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "taken")})
    assert resp.fault == ("Vsock config error: Cannot create backend for vsock device: Error binding to the "
                          "host-side Unix socket: Address already in use (os error 98)")
    assert api("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v")}).status == 204
    assert api("GET", "/vm/config").json()["vsock"] == {"guest_cid": 3, "uds_path": str(tmp_path / "v")}
    resp = api("PUT", "/vsock", {"guest_cid": 3})
    assert "missing field `uds_path`" in resp.fault  # a malformed body keeps its parse error


def test_full_vm_config_has_config_file_shape(api: Api, disk: str) -> None:
    api("PUT", "/boot-source", {"kernel_image_path": disk, "boot_args": "console=ttyS0"})
    out = api("GET", "/vm/config").json()
    assert out["boot-source"] == {"kernel_image_path": disk, "boot_args": "console=ttyS0"}
    for key in ("balloon", "cpu-config", "logger", "metrics", "mmds-config", "vsock", "entropy", "memory-hotplug"):
        assert out[key] is None, key
    assert out["drives"] == [] and out["network-interfaces"] == []


def test_metrics_only_once(api: Api, tmp_path: Path) -> None:
    assert api("PUT", "/metrics", {"metrics_path": str(tmp_path / "m.json")}).status == 204
    resp = api("PUT", "/metrics", {"metrics_path": str(tmp_path / "m.json")})
    assert resp.status == 400 and "Reinitialization of metrics not allowed." in resp.fault


def test_logger_line_format(tmp_path: Path) -> None:
    log = tmp_path / "fc.log"
    log.write_text("")
    proc = Process(tmp_path, "--id", "vm-42", "--log-path", str(log), "--show-level", "--level", "Info")
    try:
        Api(proc)("GET", "/")
    finally:
        proc.stop()
    lines = log.read_text().splitlines()
    assert lines, "nothing was logged"
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+ \[vm-42:[^:\]]+:(ERROR|WARN|INFO|DEBUG|TRACE)\] ", line), line


# -- nothing accepted and then ignored -------------------------------------------------------

NOT_YET = " is not supported yet by asyncvmm."

# Every request of a feature that is not built, valid per the spec, and its refusal.  When a feature
# is built, its rows leave this table and a test of the working feature replaces them.
# Every feature is built now: the last one refused (the serial rate limiter) is accepted.
def test_the_serial_rate_limiter_is_accepted_and_a_bad_one_refused(api: Api) -> None:
    assert api("PUT", "/serial", {"rate_limiter": {"size": 100, "refill_time": 10}}).status == 204
    resp = api("PUT", "/serial", {"rate_limiter": {"size": 100}})
    assert resp.status == 400 and "refill_time" in resp.fault and NOT_YET not in resp.fault


def test_memory_hotplug_before_boot(api: Api) -> None:
    """PUT /hotplug/memory is pre-boot only, validated with Firecracker's messages; GET and PATCH
    are post-boot only (docs/memory-hotplug.md)."""
    resp = api("PUT", "/hotplug/memory", {"total_size_mib": 1000})
    assert resp.status == 400 and resp.fault == (
        "Memory hotplug config error: Total size must be a multiple of slot size (128 MiB)")
    resp = api("PUT", "/hotplug/memory", {"block_size_mib": 2})
    assert resp.status == 400 and "missing field `total_size_mib`" in resp.fault
    assert api("GET", "/vm/config").json()["memory-hotplug"] is None
    assert api("PUT", "/hotplug/memory", {"total_size_mib": 1024}).status == 204
    assert api("GET", "/vm/config").json()["memory-hotplug"] == {
        "total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128}
    for method, body in (("GET", None), ("PATCH", {"requested_size_mib": 128})):
        resp = api(method, "/hotplug/memory", body)
        assert resp.status == 400
        assert resp.fault == "The requested operation is not supported before starting the microVM."


def _leaf(leaf: str = "0x1", register: str = "ecx", bitmap: str = "0b0") -> dict:
    return {"leaf": leaf, "subleaf": "0x0", "flags": 0,
            "modifiers": [{"register": register, "bitmap": bitmap}]}


NO_PREFIX = ("No supported number system prefix found in value [1]. Make sure to prefix the number "
             "with '0x' for hexadecimal numbers or '0b' for binary numbers.")


@pytest.mark.parametrize("body,fault", [
    ({"cpuid_modifiers": [_leaf(leaf="1")]}, NO_PREFIX),
    ({"cpuid_modifiers": [_leaf(register="ekx")]},
     "Invalid CPUID register. Must be one of [eax, ebx, ecx, edx]"),
    ({"cpuid_modifiers": [_leaf(bitmap="0b1?0")]},
     "Failed to parse string [0b1?0] as a bitmap - unknown character: 63"),
    ({"cpuid_modifiers": [_leaf(bitmap="0b" + "1" * 33)]},
     "Failed to parse string [0b" + "1" * 33 + "] as a bitmap - string is too long"),
    ({"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "x" * 65}]},
     "Failed to parse string [0b" + "x" * 65 + "] as a bitmap - string is too long"),
    ({"kvm_capabilities": ["!abc"]},
     "Failed to parse string [!abc] as a kvm capability - can not convert to numeric: invalid digit "
     "found in string"),
    ({"reg_modifiers": []},
     "unknown field `reg_modifiers`, expected one of `kvm_capabilities`, `cpuid_modifiers`, "
     "`msr_modifiers`"),
])
def test_custom_cpu_template_is_refused_naming_the_field(api: Api, body: dict, fault: str) -> None:
    resp = api("PUT", "/cpu-config", body)
    assert resp.status == 400
    assert resp.fault == f"An error occurred when deserializing the json body of a request: {fault}."


def test_cpu_templates_before_boot(api: Api) -> None:
    """A custom template is stored (GET /vm/config never shows it, as in Firecracker); a static
    one shows in machine-config until a custom one replaces it (docs/cpu-templates.md)."""
    body = {"kvm_capabilities": ["!56", "7"], "cpuid_modifiers": [_leaf(bitmap="0b0_xx1")],
            "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "x" * 64}]}
    assert api("PUT", "/cpu-config", body).status == 204
    assert api("GET", "/vm/config").json()["cpu-config"] is None
    resp = api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2A"})
    assert resp.status == 204 and resp.headers.get("deprecation") == "true"
    assert api("GET", "/machine-config").json()["cpu_template"] == "T2A"
    assert api("PUT", "/cpu-config", body).status == 204
    assert "cpu_template" not in api("GET", "/machine-config").json()
    resp = api("PATCH", "/machine-config", {"cpu_template": "V1N1"})
    assert resp.status == 400
    assert "unknown variant `V1N1`, expected one of `C3`, `T2`, `T2S`, `None`, `T2CL`, `T2A`" in resp.fault


def test_vhost_user_drive_is_refused_without_a_back_end_or_with_a_file_drives_fields(api: Api, tmp_path: Path) -> None:
    """PUT /drives with `socket` connects to the back end, as Firecracker does (docs/devices.md)."""
    before = api("GET", "/vm/config").json()
    resp = api("PUT", "/drives/vu", {"drive_id": "vu", "is_root_device": False, "socket": str(tmp_path / "none")})
    assert resp.status == 400 and resp.fault == (
        "Drive config error: Unable to create the virtio block device: Vhost user backend error: "
        "Vhost-user error: Failed to connect to UDS Unix stream: No such file or directory (os error 2)")
    resp = api("PUT", "/drives/vu", {"drive_id": "vu", "is_root_device": False, "socket": str(tmp_path / "none"),
                                     "rate_limiter": {"ops": {"size": 1, "refill_time": 100}}})
    assert resp.status == 400 and resp.fault == ("Drive config error: Unable to create the virtio block "
                                                 "device: Invalid block config.")
    assert api("GET", "/vm/config").json() == before


def test_pmem_before_boot(api: Api, disk: str) -> None:
    """PUT /pmem configures (the file opens at InstanceStart), one root device among drives and
    pmem, PATCH is post-boot only; GET /vm/config lists them in order (docs/pmem.md)."""
    assert api("PUT", "/pmem/p0", {"id": "p0", "path_on_host": disk, "root_device": True}).status == 204
    assert api("PUT", "/pmem/p1", {"id": "p1", "path_on_host": "/later", "read_only": True,
                                   "rate_limiter": {"ops": {"size": 1, "refill_time": 100}}}).status == 204
    resp = api("PUT", "/pmem/p2", {"id": "p2", "path_on_host": disk, "root_device": True})
    assert resp.status == 400 and resp.fault == "Pmem config error: A root pmem device already exist"
    resp = api("PUT", "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": True, "path_on_host": disk})
    assert resp.status == 400 and resp.fault == ("Drive config error: Attempt to add block as a root device "
                                                 "while the root device defined as a pmem device")
    resp = api("PUT", "/pmem/p9", {"id": "p0", "path_on_host": disk})
    assert resp.status == 400
    resp = api("PATCH", "/pmem/p0", {"id": "p0", "rate_limiter": {}})
    assert resp.status == 400 and resp.fault == "The requested operation is not supported before starting the microVM."
    pmem = api("GET", "/vm/config").json()["pmem"]
    assert [(p["id"], p["root_device"], p["read_only"]) for p in pmem] == [("p0", True, False), ("p1", False, True)]
    assert pmem[1]["rate_limiter"]["ops"] == {"size": 1, "refill_time": 100}
    assert api("PUT", "/boot-source", {"kernel_image_path": disk}).status == 204   # no kernel: never reached
    resp = api("PUT", "/actions", {"action_type": "InstanceStart"})
    assert resp.status == 400 and resp.fault.startswith("Start microvm error: Cannot create pmem device: "
                                                        "Error accessing backing file: No such file")


def test_balloon_before_boot(api: Api) -> None:
    resp = api("GET", "/balloon")
    assert resp.status == 400 and resp.fault == "Balloon config error: No balloon device found."
    resp = api("PUT", "/balloon", {"amount_mib": 129, "deflate_on_oom": True})
    assert resp.status == 400 and resp.fault == "Balloon config error: Amount of pages requested is too large."
    body = {"amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 1, "free_page_reporting": True,
            "free_page_hinting": True}
    assert api("PUT", "/balloon", body).status == 204
    assert api("GET", "/balloon").json() == body
    assert api("GET", "/vm/config").json()["balloon"] == body
    resp = api("PATCH", "/machine-config", {"mem_size_mib": 32})
    assert resp.fault == ("Machine config error: The memory size (MiB) is smaller than the previously set "
                          "balloon device target size.")
    for method, path, req in (("PATCH", "/balloon", {"amount_mib": 1}), ("GET", "/balloon/statistics", None),
                              ("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 2}),
                              ("PATCH", "/balloon/hinting/start", {}), ("GET", "/balloon/hinting/status", None),
                              ("PATCH", "/balloon/hinting/stop", None)):
        resp = api(method, path, req)
        assert resp.status == 400
        assert resp.fault == "The requested operation is not supported before starting the microVM."


def test_what_clients_send_as_defaults_is_accepted(api: Api, disk: str, tmp_path: Path) -> None:
    # The Go SDK, containerd and Kata send every field, at its default or no-op value.
    machine = {"vcpu_count": 2, "mem_size_mib": 256, "smt": False, "cpu_template": "None",
               "track_dirty_pages": False, "huge_pages": "None"}
    assert api("PUT", "/machine-config", machine).status == 204
    assert api("PATCH", "/machine-config", {"smt": False, "track_dirty_pages": False}).status == 204
    drive = {"drive_id": "rootfs", "path_on_host": disk, "is_root_device": True, "is_read_only": False,
             "partuuid": "0eaa91a0-01", "cache_type": "Unsafe", "io_engine": "Sync", "rate_limiter": {}}
    assert api("PUT", "/drives/rootfs", drive).status == 204
    assert api("PUT", "/cpu-config", {}).status == 204  # an empty template asks for nothing
    assert api("PUT", "/serial", {"serial_out_path": str(tmp_path / "serial.out")}).status == 204
    assert api("PUT", "/entropy", {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}).status == 204
    assert api("PUT", "/logger", {"level": "Info", "module": "asyncvmm.vmm"}).status == 204
    api("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"})
    mmds = {"network_interfaces": ["eth0"], "version": "V2", "imds_compat": True}
    assert api("PUT", "/mmds/config", mmds).status == 204
    assert api("GET", "/vm/config").json()["machine-config"] == {
        "vcpu_count": 2, "mem_size_mib": 256, "smt": False, "track_dirty_pages": False, "huge_pages": "None"}


def test_duplicate_fields_and_syntax_errors_say_where(api: Api) -> None:
    resp = api("PUT", "/machine-config", raw=b'{"vcpu_count": 1, "mem_size_mib": 64, "mem_size_mib": 128}')
    assert resp.fault == ("An error occurred when deserializing the json body of a request: "
                          "duplicate field `mem_size_mib`.")
    assert api("GET", "/machine-config").json()["mem_size_mib"] == 128  # the default: nothing applied
    resp = api("PUT", "/machine-config", raw=b'{\n  "vcpu_count": 1,\n  "mem_size_mib": }')
    assert resp.fault.endswith("invalid character at line 3 column 19.")


# -- process ---------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*asyncvmm_command(), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_version_flag() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "Firecracker v1.16.1"


def test_bad_arguments_exit_153() -> None:
    assert run_cli("--no-such-flag").returncode == 153
    assert run_cli("--no-api").returncode == 153


def test_bad_config_file_exits_152(tmp_path: Path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"boot-source": {"kernel_image_path": "/no/kernel"}}))
    assert run_cli("--api-sock", str(tmp_path / "s"), "--config-file", str(cfg), "--no-api").returncode == 152
    cfg.write_text("{not json")
    assert run_cli("--api-sock", str(tmp_path / "s"), "--config-file", str(cfg)).returncode == 152


def test_config_file_pmem_is_opened_at_start(tmp_path: Path, disk: str) -> None:
    """A config file's pmem list is built at InstanceStart; a file that does not open fails it
    with Firecracker's message (exit 152)."""
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"boot-source": {"kernel_image_path": disk},
                               "pmem": [{"id": "p0", "path_on_host": str(tmp_path / "nope"),
                                         "root_device": True}]}))
    out = run_cli("--api-sock", str(tmp_path / "s"), "--config-file", str(cfg), "--no-api")
    assert out.returncode == 152
    assert (f"Configuration for VMM from one single json failed: {cfg}: Start microvm error: Cannot "
            "create pmem device: Error accessing backing file: No such file or directory (os error 2)"
            ) in out.stdout + out.stderr


def test_config_file_syntax_error_and_duplicates_say_where(tmp_path: Path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text('{\n  "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "vcpu_count": 2}\n}')
    out = run_cli("--config-file", str(cfg), "--no-api")
    assert out.returncode == 152 and f"{cfg}: duplicate field `vcpu_count`" in out.stdout + out.stderr
    cfg.write_text('{\n  "boot-source": }')
    out = run_cli("--config-file", str(cfg), "--no-api")
    assert out.returncode == 152 and f"{cfg}: invalid character at line 2 column 18" in out.stdout + out.stderr


def test_an_unusable_seccomp_filter_is_refused_not_ignored(tmp_path: Path) -> None:
    out = run_cli("--api-sock", str(tmp_path / "s"), "--seccomp-filter", "/etc/hostname")
    assert out.returncode == 1          # Firecracker's code for a filter it cannot use
    assert "Seccomp error: invalid filter file /etc/hostname: not a JSON document" in out.stdout + out.stderr
    assert not (tmp_path / "s").exists()
    proc = Process(tmp_path, "--no-seccomp")
    try:
        assert Api(proc)("GET", "/").status == 200
    finally:
        proc.stop()


def test_api_socket_in_a_missing_directory_names_the_path(tmp_path: Path) -> None:
    sock = tmp_path / "no-dir" / "api.sock"
    out = run_cli("--api-sock", str(sock))
    assert out.returncode == 1
    assert (f"Failed to open the API socket at: {sock}. No such file or directory (os error 2) "
            f"(no directory {sock.parent}).") in out.stdout + out.stderr


def test_a_broken_vmm_core_exits_before_serving(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    broken = ("import sys; sys.modules['asyncvmm.vmm'] = None; from asyncvmm.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", broken, "--api-sock", str(sock)], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 2
    assert "The VMM core (asyncvmm.vmm) cannot be imported; exiting before serving the API." in out.stdout
    assert "Listening on API socket" not in out.stdout and not sock.exists()


def test_socket_in_use(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(path))
    try:
        out = run_cli("--api-sock", str(path))
    finally:
        holder.close()
    assert out.returncode == 1
    assert f"Failed to open the API socket at: {path}. Check that it is not already used." in out.stdout + out.stderr


def test_metadata_prefills_mmds(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"latest": {"meta-data": {"instance-id": "i-1"}}}))
    proc = Process(tmp_path, "--metadata", str(meta))
    try:
        assert Api(proc)("GET", "/mmds").json() == {"latest": {"meta-data": {"instance-id": "i-1"}}}
    finally:
        proc.stop()


def test_instance_id_flag(tmp_path: Path) -> None:
    proc = Process(tmp_path, "--id", "my-vm-1")
    try:
        assert Api(proc)("GET", "/").json()["id"] == "my-vm-1"
    finally:
        proc.stop()


# -- after boot (needs the VMM core and a guest kernel) -----------------------------------------


@pytest.fixture(scope="session")
def guest_kernel() -> str:
    require(vmm_available(), "asyncvmm.vmm (the VMM core) is not importable yet")
    require(os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK),
            "/dev/kvm is missing or not accessible")
    from tests.guest.build import build_test_guest

    return str(build_test_guest().elf_pvh)


def boot(api: Api, kernel: str, cmdline: str = "console=ttyS0") -> None:
    api("PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": cmdline})
    api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    resp = api("PUT", "/actions", {"action_type": "InstanceStart"})
    assert resp.status == 204, resp.body


@pytest.fixture
def booted(api: Api, tmp_path: Path, guest_kernel: str) -> Api:
    api("PUT", "/metrics", {"metrics_path": str(tmp_path / "metrics.json")})
    boot(api, guest_kernel)  # the test guest halts and stays up by default
    return api


PRE_BOOT_ONLY = [
    ("PUT", "/boot-source", {"kernel_image_path": "/k"}),
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
    ("PATCH", "/machine-config", {"vcpu_count": 1}),
    ("PUT", "/mmds/config", {"network_interfaces": ["eth0"]}),
    ("PUT", "/entropy", {}),
    ("PUT", "/logger", {"level": "Info"}),
    ("PUT", "/metrics", {"metrics_path": "/m"}),
    ("PUT", "/serial", {}),
    ("PUT", "/cpu-config", {}),
    ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": False}),
]


@pytest.mark.parametrize("method,path,body", PRE_BOOT_ONLY)
def test_pre_boot_only_operations_fail_after_boot(booted: Api, method: str, path: str, body: Any) -> None:
    resp = booted(method, path, body)
    assert resp.fault == "The requested operation is not supported after starting the microVM."


def test_hot_plug_after_boot_needs_enable_pci(booted: Api, disk: str) -> None:
    """Without --enable-pci, the device requests of hot-plug and hot-unplug all say so first."""
    for method, path, body in (
            ("PUT", "/drives/d", {"drive_id": "d", "is_root_device": False, "path_on_host": disk}),
            ("PUT", "/network-interfaces/n", {"iface_id": "n", "host_dev_name": "t"}),
            ("DELETE", "/drives/d", None), ("DELETE", "/network-interfaces/n", None), ("DELETE", "/pmem/p", None)):
        resp = booted(method, path, body)
        assert (resp.status, resp.fault) == (400, "PCI is not enabled"), (method, path)
    assert booted("GET", "/vm/config").json()["drives"] == []


def test_balloon_after_boot_without_a_driver(api: Api, guest_kernel: str) -> None:
    # The test guest has no balloon driver: the device is there but never activated.
    assert api("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 1}).status == 204
    boot(api, guest_kernel)
    assert api("GET", "/balloon").json()["stats_polling_interval_s"] == 1
    resp = api("PATCH", "/balloon", {"amount_mib": 1})
    assert resp.status == 400 and resp.fault == "Balloon update error: Balloon: Device not activated yet."
    stats = api("GET", "/balloon/statistics")
    assert stats.status == 200
    assert stats.json() == {"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0}
    resp = api("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 0})
    assert resp.fault == "Balloon update error: Balloon: Statistics cannot be enabled/disabled after activation."
    assert api("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 5}).status == 204
    assert api("GET", "/balloon").json()["stats_polling_interval_s"] == 5
    hinting = "Balloon update error: Balloon: Attempting to use hinting when not enabled"
    assert api("PATCH", "/balloon/hinting/start", {"acknowledge_on_stop": True}).fault == hinting
    assert api("GET", "/balloon/hinting/status").fault == hinting
    assert api("PATCH", "/balloon/hinting/stop").fault == hinting


def test_balloon_hinting_after_boot_without_a_driver(api: Api, guest_kernel: str) -> None:
    assert api("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False, "free_page_hinting": True}).status == 204
    boot(api, guest_kernel)
    assert api("GET", "/balloon/hinting/status").json() == {"host_cmd": 0}
    resp = api("PATCH", "/balloon/hinting/start")
    assert resp.status == 400 and resp.fault == "Balloon update error: Balloon: Device not activated yet."
    assert api("PATCH", "/balloon/hinting/stop").fault == "Balloon update error: Balloon: Device not activated yet."


def test_balloon_statistics_when_polling_is_off(api: Api, guest_kernel: str) -> None:
    assert api("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False}).status == 204
    boot(api, guest_kernel)
    resp = api("GET", "/balloon/statistics")
    assert resp.status == 400
    assert resp.fault == "Internal VMM error: Balloon: Received stats query when stats are disabled."


def test_balloon_operations_after_boot_without_a_balloon(booted: Api) -> None:
    not_found = "Failed perform action on device: Device not found"
    assert booted("GET", "/balloon").fault == "Internal VMM error: " + not_found
    assert booted("GET", "/balloon/statistics").fault == "Internal VMM error: " + not_found
    assert booted("PATCH", "/balloon", {"amount_mib": 1}).fault == "Balloon update error: " + not_found


def test_serial_is_pre_boot_only_rate_limiter_or_not(booted: Api) -> None:
    resp = booted("PUT", "/serial", {"rate_limiter": {"size": 100, "refill_time": 10}})
    assert resp.fault == "The requested operation is not supported after starting the microVM."


def test_pause_resume_and_metrics_after_boot(booted: Api, tmp_path: Path) -> None:
    assert booted("GET", "/").json()["state"] == "Running"
    assert booted("PATCH", "/vm", {"state": "Paused"}).status == 204
    assert booted("PATCH", "/vm", {"state": "Paused"}).status == 204
    assert booted("GET", "/").json()["state"] == "Paused"
    assert booted("PATCH", "/vm", {"state": "Resumed"}).status == 204
    assert booted("PUT", "/actions", {"action_type": "FlushMetrics"}).status == 204
    lines = (tmp_path / "metrics.json").read_text().splitlines()
    assert len(lines) >= 2 and all("utc_timestamp_ms" in json.loads(line) for line in lines)
    assert booted("GET", "/version").json() == {"firecracker_version": "1.16.1"}


def test_guest_reset_ends_the_process_with_code_0(api: Api, guest_kernel: str) -> None:
    boot(api, guest_kernel, "console=ttyS0 exit=reset")
    assert api.proc.proc.wait(timeout=120) == 0
    assert "testguest: exit reset" in api.proc.output()


# -- virtio-pmem after boot (docs/pmem.md): real KVM slots, hot-plug, snapshots ------------------


def test_pmem_is_mapped_hot_plugged_and_snapshotted(tmp_path: Path, guest_kernel: str) -> None:
    """pmem devices become KVM slots at InstanceStart; with --enable-pci they are plugged and
    unplugged after boot (the unplugged region is reused), PATCH changes the flush limiter, the
    metrics have Firecracker's groups, and a snapshot restores them where they were."""
    data, ro, empty = tmp_path / "data.img", tmp_path / "ro.img", tmp_path / "empty.img"
    for path, size in ((data, 3 << 20), (ro, 2 << 20), (empty, 0)):
        with open(path, "wb") as f:
            f.truncate(size)
    proc = Process(tmp_path, "--enable-pci")
    try:
        api = Api(proc)
        api("PUT", "/metrics", {"metrics_path": str(tmp_path / "metrics.json")})
        assert api("PUT", "/pmem/data", {"id": "data", "path_on_host": str(data)}).status == 204
        assert api("PUT", "/pmem/ro", {"id": "ro", "path_on_host": str(ro), "read_only": True}).status == 204
        boot(api, guest_kernel)
        hot = {"id": "hot", "path_on_host": str(ro), "read_only": True}
        assert api("PUT", "/pmem/hot", hot).status == 204
        resp = api("PUT", "/pmem/bad", {"id": "bad", "path_on_host": str(empty)})
        assert resp.status == 400 and resp.fault == ("Pmem config error: Unable to create the virtio-pmem "
                                                     "device: Error backing file size is 0")
        assert api("DELETE", "/pmem/ro").status == 204          # booted with it, not the root
        assert api("DELETE", "/pmem/hot").status == 204
        assert api("PUT", "/pmem/hot", hot).status == 204       # its region is free again
        limiter = {"bandwidth": {"size": 3 << 20, "refill_time": 1000}}
        assert api("PATCH", "/pmem/data", {"id": "data", "rate_limiter": limiter}).status == 204
        pmem = api("GET", "/vm/config").json()["pmem"]
        assert [p["id"] for p in pmem] == ["data", "hot"] and pmem[0]["rate_limiter"]["bandwidth"]["size"] == 3 << 20
        assert api("PUT", "/actions", {"action_type": "FlushMetrics"}).status == 204
        line = json.loads((tmp_path / "metrics.json").read_text().splitlines()[-1])
        assert {"pmem", "pmem_data", "pmem_hot"} <= set(line) and "pmem_ro" not in line
        assert set(line["pmem_data"]) == {"activate_fails", "cfg_fails", "event_fails", "queue_event_count",
                                          "rate_limiter_throttled_events", "rate_limiter_event_count"}
        assert api("PATCH", "/vm", {"state": "Paused"}).status == 204
        snap = {"snapshot_path": str(tmp_path / "snap.state"), "mem_file_path": str(tmp_path / "snap.mem")}
        assert api("PUT", "/snapshot/create", snap).status == 204
    finally:
        proc.stop()
    (tmp_path / "restored").mkdir()
    second = Process(tmp_path / "restored")
    try:
        api = Api(second)
        load = {"snapshot_path": snap["snapshot_path"],
                "mem_backend": {"backend_type": "File", "backend_path": snap["mem_file_path"]}}
        resp = api("PUT", "/snapshot/load", load)
        assert resp.status == 204, resp.body
        assert [p["id"] for p in api("GET", "/vm/config").json()["pmem"]] == ["data", "hot"]
        # The snapshot had a PCI bus: hot-plug works without the flag.
        assert api("PUT", "/pmem/ro", {"id": "ro", "path_on_host": str(ro), "read_only": True}).status == 204
    finally:
        second.stop()
