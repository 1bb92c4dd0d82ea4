"""The typed client against a fake API server: every spec operation's request shape, the
response mapping (204, 200, fault_message errors), timeouts and connection errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from asyncvmm.client import (ApiConnectionError, ApiDeprecationWarning, ApiError, ApiTimeoutError,
                             Client)
from tests.unit.client.fake_api import FakeApi

SPEC = Path(__file__).resolve().parents[3] / "spec" / "firecracker-api-v1.16.1.yaml"
TB = {"size": 1000, "refill_time": 100}

# method name, arguments, then what must go over the wire: verb, path, JSON body (None: no body)
CALLS: list[tuple[str, tuple, dict[str, Any], str, str, Any]] = [
    ("describe_instance", (), {}, "GET", "/", None),
    ("create_sync_action", ("InstanceStart",), {}, "PUT", "/actions", {"action_type": "InstanceStart"}),
    ("describe_balloon_config", (), {}, "GET", "/balloon", None),
    ("put_balloon", (), {"amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 1},
     "PUT", "/balloon", {"amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 1}),
    ("patch_balloon", (), {"amount_mib": 32}, "PATCH", "/balloon", {"amount_mib": 32}),
    ("describe_balloon_stats", (), {}, "GET", "/balloon/statistics", None),
    ("patch_balloon_stats_interval", (), {"stats_polling_interval_s": 5}, "PATCH", "/balloon/statistics",
     {"stats_polling_interval_s": 5}),
    ("start_balloon_hinting", (), {"acknowledge_on_stop": True}, "PATCH", "/balloon/hinting/start",
     {"acknowledge_on_stop": True}),
    ("describe_balloon_hinting", (), {}, "GET", "/balloon/hinting/status", None),
    ("stop_balloon_hinting", (), {}, "PATCH", "/balloon/hinting/stop", None),
    ("put_guest_boot_source", (), {"kernel_image_path": Path("/k/vmlinux"), "boot_args": "console=ttyS0"},
     "PUT", "/boot-source", {"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"}),
    ("put_cpu_configuration", (), {"kvm_capabilities": ["!56"]}, "PUT", "/cpu-config",
     {"kvm_capabilities": ["!56"]}),
    ("put_guest_drive_by_id", ("rootfs",), {"is_root_device": True, "path_on_host": "/d.img",
                                           "is_read_only": False, "rate_limiter": {"ops": TB}},
     "PUT", "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": True, "path_on_host": "/d.img",
                               "is_read_only": False, "rate_limiter": {"ops": TB}}),
    ("patch_guest_drive_by_id", ("rootfs",), {"path_on_host": "/e.img"}, "PATCH", "/drives/rootfs",
     {"drive_id": "rootfs", "path_on_host": "/e.img"}),
    ("put_guest_pmem_by_id", ("pm0",), {"path_on_host": "/p.img", "read_only": True}, "PUT", "/pmem/pm0",
     {"id": "pm0", "path_on_host": "/p.img", "read_only": True}),
    ("patch_guest_pmem_by_id", ("pm0",), {"rate_limiter": {}}, "PATCH", "/pmem/pm0",
     {"id": "pm0", "rate_limiter": {}}),
    ("put_logger", (), {"log_path": "/l.log", "level": "Info"}, "PUT", "/logger",
     {"log_path": "/l.log", "level": "Info"}),
    ("get_machine_configuration", (), {}, "GET", "/machine-config", None),
    ("put_machine_configuration", (), {"vcpu_count": 2, "mem_size_mib": 256}, "PUT", "/machine-config",
     {"vcpu_count": 2, "mem_size_mib": 256}),
    ("patch_machine_configuration", (), {"smt": False}, "PATCH", "/machine-config", {"smt": False}),
    ("put_metrics", (), {"metrics_path": "/m.json"}, "PUT", "/metrics", {"metrics_path": "/m.json"}),
    ("put_mmds", ({"latest": {"a": 1}},), {}, "PUT", "/mmds", {"latest": {"a": 1}}),
    ("patch_mmds", ({"latest": {"b": None}},), {}, "PATCH", "/mmds", {"latest": {"b": None}}),
    ("get_mmds", (), {}, "GET", "/mmds", None),
    ("put_mmds_config", (), {"network_interfaces": ["eth0"], "version": "V2"}, "PUT", "/mmds/config",
     {"network_interfaces": ["eth0"], "version": "V2"}),
    ("put_entropy_device", (), {"rate_limiter": {"bandwidth": TB}}, "PUT", "/entropy",
     {"rate_limiter": {"bandwidth": TB}}),
    ("put_serial_device", (), {"serial_out_path": "/s.out"}, "PUT", "/serial", {"serial_out_path": "/s.out"}),
    ("put_memory_hotplug", (), {"total_size_mib": 1024}, "PUT", "/hotplug/memory", {"total_size_mib": 1024}),
    ("patch_memory_hotplug", (), {"requested_size_mib": 512}, "PATCH", "/hotplug/memory",
     {"requested_size_mib": 512}),
    ("get_memory_hotplug", (), {}, "GET", "/hotplug/memory", None),
    ("put_guest_network_interface_by_id", ("eth0",), {"host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"},
     "PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                         "guest_mac": "06:00:00:00:00:01"}),
    ("patch_guest_network_interface_by_id", ("eth0",), {"tx_rate_limiter": {"ops": TB}}, "PATCH",
     "/network-interfaces/eth0", {"iface_id": "eth0", "tx_rate_limiter": {"ops": TB}}),
    ("create_snapshot", (), {"mem_file_path": "/mem", "snapshot_path": "/snap", "snapshot_type": "Full"},
     "PUT", "/snapshot/create", {"mem_file_path": "/mem", "snapshot_path": "/snap", "snapshot_type": "Full"}),
    ("load_snapshot", (), {"snapshot_path": "/snap", "mem_backend": {"backend_type": "File",
                                                                     "backend_path": "/mem"}, "resume_vm": True},
     "PUT", "/snapshot/load", {"snapshot_path": "/snap", "mem_backend": {"backend_type": "File",
                                                                         "backend_path": "/mem"},
                               "resume_vm": True}),
    ("get_firecracker_version", (), {}, "GET", "/version", None),
    ("patch_vm", ("Paused",), {}, "PATCH", "/vm", {"state": "Paused"}),
    ("get_export_vm_config", (), {}, "GET", "/vm/config", None),
    ("put_guest_vsock", (), {"guest_cid": 3, "uds_path": "/v.sock"}, "PUT", "/vsock",
     {"guest_cid": 3, "uds_path": "/v.sock"}),
]

SHORTCUTS = [
    ("start_instance", "PUT", "/actions", {"action_type": "InstanceStart"}),
    ("flush_metrics", "PUT", "/actions", {"action_type": "FlushMetrics"}),
    ("send_ctrl_alt_del", "PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
    ("pause", "PATCH", "/vm", {"state": "Paused"}),
    ("resume", "PATCH", "/vm", {"state": "Resumed"}),
]


def snake(operation_id: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", operation_id.replace("ByID", "ById")).lower()


@pytest.fixture
async def api(tmp_path):
    fake = FakeApi("vm0")
    sock = str(tmp_path / "api.sock")
    await fake.start(sock)
    async with Client(sock, timeout=5) as client:
        yield fake, client
    await fake.stop()


def test_every_spec_operation_has_a_method_with_its_verb_and_path():
    spec = yaml.safe_load(SPEC.read_text())
    from_spec = {}
    for template, ops in spec["paths"].items():
        for verb, op in ops.items():
            path = re.sub(r"\{[^}]+\}", "{id}", template)
            from_spec[snake(op["operationId"])] = (verb.upper(), path)
    tested = {}
    for name, args, _, verb, path, _ in CALLS:
        if args and isinstance(args[0], str) and path.endswith("/" + args[0]) and path != "/actions":
            path = path[: -len(args[0])] + "{id}"
        tested[name] = (verb, path)
        assert callable(getattr(Client, name))
    assert tested == from_spec


@pytest.mark.parametrize("name,args,kwargs,verb,path,body", CALLS, ids=[c[0] for c in CALLS])
async def test_request_shape(api, name, args, kwargs, verb, path, body):
    fake, client = api
    await getattr(client, name)(*args, **kwargs)
    (rec,) = fake.requests
    assert (rec.method, rec.path, rec.body) == (verb, path, body)
    if body is not None:
        assert rec.headers["Content-Type"] == "application/json"
    else:
        assert rec.raw == b""


@pytest.mark.parametrize("name,verb,path,body", SHORTCUTS)
async def test_shortcuts(api, name, verb, path, body):
    fake, client = api
    assert await getattr(client, name)() is None
    assert [(r.method, r.path, r.body) for r in fake.requests] == [(verb, path, body)]


async def test_none_fields_are_left_out_and_put_machine_config_sends_only_what_is_given(api):
    fake, client = api
    await client.put_guest_boot_source(kernel_image_path="/k", boot_args=None, initrd_path=None)
    await client.start_balloon_hinting()
    assert fake.requests[0].body == {"kernel_image_path": "/k"}
    assert fake.requests[1].raw == b""          # the spec's body is optional: none sent


async def test_resource_ids_are_quoted_not_checked(api):
    fake, client = api
    await client.put_guest_drive_by_id("a/b c", is_root_device=False, path_on_host="/x")
    (rec,) = fake.requests
    assert rec.path == "/drives/a%2Fb%20c"
    assert rec.body["drive_id"] == "a/b c"      # the VMM, not the client, rejects the id


async def test_204_is_none_and_200_is_the_parsed_body(api):
    fake, client = api
    assert await client.put_metrics(metrics_path="/m") is None
    assert await client.describe_instance() == {"app_name": "Firecracker", "id": "vm0",
                                                "state": "Not started", "vmm_version": "1.16.1"}
    fake.answer("GET", "/mmds", 200, {"latest": {"meta": [1, 2]}})
    assert await client.get_mmds() == {"latest": {"meta": [1, 2]}}


@pytest.mark.parametrize("status", [400, 413])
async def test_fault_message_becomes_api_error(api, status):
    fake, client = api
    fake.answer("PUT", "/boot-source", status, {"fault_message": "No kernel here."})
    with pytest.raises(ApiError) as err:
        await client.put_guest_boot_source(kernel_image_path="/nope")
    e = err.value
    assert (e.status, e.fault_message, e.method, e.path) == (status, "No kernel here.", "PUT", "/boot-source")
    assert "PUT /boot-source: %d No kernel here." % status in str(e)


async def test_error_without_fault_message_keeps_the_body_text(api):
    fake, client = api
    fake.answer("GET", "/", 500, raw=b"internal trouble")
    with pytest.raises(ApiError) as err:
        await client.describe_instance()
    assert (err.value.status, err.value.fault_message) == (500, "internal trouble")


@pytest.mark.parametrize("verb,path,status,payload,call,needle", [
    ("PUT", "/metrics", 200, b'{"x": 1}', ("put_metrics", {"metrics_path": "/m"}), "expected 204, got 200"),
    ("GET", "/version", 204, b"", ("get_firecracker_version", {}), "expected 200, got 204"),
    ("GET", "/version", 200, b"not json", ("get_firecracker_version", {}), "not JSON"),
])
async def test_a_status_or_body_the_spec_does_not_declare_is_an_error(api, verb, path, status, payload, call,
                                                                     needle):
    fake, client = api
    fake.answer(verb, path, status, raw=payload)
    with pytest.raises(ApiError, match=needle):
        await getattr(client, call[0])(**call[1])


async def test_deprecation_header_warns(api):
    fake, client = api
    fake.answer("PUT", "/vsock", 204, headers={"Deprecation": "true"})
    with pytest.warns(ApiDeprecationWarning, match="PUT /vsock"):
        await client.put_guest_vsock(guest_cid=3, uds_path="/v", vsock_id="v0")


async def test_raw_request_reaches_any_path(api):
    fake, client = api
    fake.answer("PATCH", "/boot-source", 400,
                {"fault_message": "Invalid request method and/or path: PATCH /boot-source."})
    with pytest.raises(ApiError, match="Invalid request method"):
        await client.request("PATCH", "/boot-source", {"boot_args": "x"})
    assert fake.requests[-1].body == {"boot_args": "x"}


async def test_timeout(api, tmp_path):
    fake, _ = api
    fake.answer("GET", "/", 200, {"state": "Running"}, delay=2.0)
    async with Client(tmp_path / "api.sock", timeout=0.2) as slow:
        with pytest.raises(ApiTimeoutError) as err:
            await slow.describe_instance()
    assert (err.value.method, err.value.path, err.value.timeout) == ("GET", "/", 0.2)
    assert isinstance(err.value, TimeoutError)


async def test_missing_socket_is_a_connection_error(tmp_path):
    async with Client(tmp_path / "none.sock") as client:
        with pytest.raises(ApiConnectionError, match="GET /"):
            await client.describe_instance()


async def test_connection_is_reused_and_close_is_idempotent(api):
    fake, client = api
    for _ in range(3):
        await client.describe_instance()
    assert len(fake.requests) == 3
    await client.close()
    await client.close()
    assert (await client.describe_instance())["id"] == "vm0"   # reopens on demand


def test_importing_the_sdk_loads_neither_aiohttp_nor_the_vmm():
    code = ("import sys, asyncvmm.client; "
            "print(sorted(m for m in sys.modules if m.startswith(('aiohttp', 'asyncvmm.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert not [m for m in loaded if m.startswith("aiohttp")]
    assert all(m.startswith("asyncvmm.client") for m in loaded), loaded
