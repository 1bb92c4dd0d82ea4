"""Schemas: decoding with serde-like errors, value validation, JSON output shape."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvmm import config as c
from asyncvmm.config.machine import INVALID_MEM_SIZE, INVALID_VCPU_COUNT


def test_decode_reports_serde_style_errors() -> None:
    with pytest.raises(c.ConfigError) as e:
        c.decode(b'{"drive_id": "a", "is_root_device": true, "rate_limiter": {"ops": {"size": 1, "x": 2}}}',
                 c.DriveConfig)
    assert e.value.message == (
        "unknown field `x`, expected one of `size`, `refill_time`, `one_time_burst` at `$.rate_limiter.ops`"
    )
    with pytest.raises(c.ConfigError, match="^missing field `kernel_image_path`$"):
        c.decode(b"{}", c.BootSourceConfig)
    with pytest.raises(c.ConfigError, match="unknown variant `Fast`, expected one of `Sync`, `Async`"):
        c.decode(b'{"drive_id": "a", "is_root_device": true, "io_engine": "Fast"}', c.DriveConfig)
    with pytest.raises(c.ConfigError, match="^EOF while parsing a value at line 1 column 22$"):
        c.decode(b'{"kernel_image_path": ', c.BootSourceConfig)


@pytest.mark.parametrize("body,message", [
    (b"{not json", "object keys must be strings at line 1 column 2"),
    (b'{\n  "kernel_image_path": "k",\n  "boot_args": x\n}', "invalid character at line 3 column 16"),
    (b'{"kernel_image_path": "k",}', "trailing comma in object at line 1 column 27"),
    (b"", "EOF while parsing a value at line 1 column 0"),
])
def test_syntax_errors_give_line_and_column(body: bytes, message: str) -> None:
    with pytest.raises(c.ConfigError) as e:
        c.decode(body, c.BootSourceConfig)
    assert e.value.message == message


@pytest.mark.parametrize("body,type_", [
    (b'{"kernel_image_path": "a", "kernel_image_path": "b"}', c.BootSourceConfig),
    (b'{"drive_id": "d", "is_root_device": false, "rate_limiter": {"ops": {"size": 1, "size": 2, "refill_time": 1}}}',
     c.DriveConfig),
    (b'{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "machine-config": {"vcpu_count": 2, "mem_size_mib": 64}}',
     c.VmConfig),
])
def test_duplicate_keys_are_refused_not_last_one_wins(body: bytes, type_: type) -> None:
    with pytest.raises(c.ConfigError, match="^duplicate field `(kernel_image_path|size|machine-config)`$"):
        c.decode(body, type_)


def test_a_free_form_document_keeps_the_last_of_two_equal_keys() -> None:
    """MMDS bodies and --metadata are serde_json Values in Firecracker: the last key wins."""
    assert c.decode(b'{"latest": {"a": {"size": 1, "size": 2}}}', dict) == {"latest": {"a": {"size": 2}}}


def test_deep_nesting_is_a_config_error_not_a_crash() -> None:
    deep = b"[" * 2000 + b"]" * 2000
    with pytest.raises(c.ConfigError, match="recursion limit exceeded"):
        c.decode(b'{"latest": ' + deep + b"}", dict)


@given(st.integers(min_value=0, max_value=255), st.booleans(), st.integers(min_value=0, max_value=4096),
       st.sampled_from(["None", "2M"]))
def test_machine_config_rules(vcpus: int, smt: bool, mem: int, pages: str) -> None:
    cfg = c.MachineConfig(vcpu_count=vcpus, smt=smt, mem_size_mib=mem, huge_pages=pages)  # type: ignore[arg-type]
    vcpus_ok = 1 <= vcpus <= 32 and not (smt and vcpus > 1 and vcpus % 2)
    mem_ok = mem > 0 and (pages == "None" or mem % 2 == 0)
    if vcpus_ok and mem_ok:
        cfg.validate()
    else:
        with pytest.raises(c.ConfigError) as e:
            cfg.validate()
        assert e.value.message == (INVALID_VCPU_COUNT if not vcpus_ok else INVALID_MEM_SIZE)


def test_machine_config_patch_merges() -> None:
    base = c.MachineConfig(vcpu_count=2, mem_size_mib=256, cpu_template="T2")
    merged = c.MachineConfigUpdate(mem_size_mib=512, cpu_template="None").apply(base)
    assert (merged.vcpu_count, merged.mem_size_mib, merged.cpu_template) == (2, 512, None)
    assert c.MachineConfigUpdate().is_empty()


@pytest.mark.parametrize("address,ok", [("169.254.169.254", True), ("169.254.1.0", True), ("169.254.0.1", False),
                                        ("169.254.255.1", False), ("10.0.0.1", False)])
def test_mmds_address_must_be_link_local(address: str, ok: bool) -> None:
    cfg = c.MmdsConfig(network_interfaces=["eth0"], ipv4_address=address)
    if ok:
        cfg.validate()
    else:
        with pytest.raises(c.ConfigError, match="not link local"):
            cfg.validate()


def test_mmds_address_syntax_is_a_body_error() -> None:
    with pytest.raises(c.ConfigError, match="expected an IPv4 address"):
        c.decode(b'{"network_interfaces": ["a"], "ipv4_address": "nope"}', c.MmdsConfig)


@pytest.mark.parametrize("level", ["Error", "warning", "INFO", "Debug", "trace", "Off"])
def test_logger_levels_are_case_insensitive(level: str) -> None:
    c.decode(json.dumps({"level": level}).encode(), c.LoggerConfig)


def test_logger_rejects_unknown_level() -> None:
    with pytest.raises(c.ConfigError, match="unknown variant `Loud`"):
        c.decode(b'{"level": "Loud"}', c.LoggerConfig)


def test_vsock_cid() -> None:
    with pytest.raises(c.ConfigError, match="at least 3"):
        c.VsockConfig(guest_cid=2, uds_path="/v").validate()
    c.VsockConfig(guest_cid=3, uds_path="/v").validate()


def test_boot_args_length() -> None:
    c.BootSourceConfig(kernel_image_path="/k", boot_args="a" * 2047).validate()
    with pytest.raises(c.ConfigError, match="command line is invalid"):
        c.BootSourceConfig(kernel_image_path="/k", boot_args="a" * 2048).validate()


def test_check_id() -> None:
    assert c.check_id("root_1") == "root_1"
    for bad, msg in (("", "cannot be empty"), ("a-b", "alphanumeric"), ("é", "alphanumeric")):
        with pytest.raises(c.ConfigError, match=msg):
            c.check_id(bad)


def test_config_file_shape_round_trips() -> None:
    text = {
        "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
        "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": True, "is_read_only": False}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
        "mmds-config": {"network_interfaces": ["eth0"]},
        "vsock": {"guest_cid": 3, "uds_path": "/v"},
    }
    cfg = c.decode(json.dumps(text).encode(), c.VmConfig)
    assert cfg.drives[0].path_on_host == "/r" and cfg.machine_config.vcpu_count == 2
    out = c.to_builtins(cfg, keep_top_level_nulls=True)
    assert out["balloon"] is None and "partuuid" not in out["drives"][0]
    assert c.decode(msgspec.json.encode(out), c.VmConfig) == cfg


def test_config_file_rejects_unknown_sections() -> None:
    with pytest.raises(c.ConfigError, match="unknown field `boot_source`"):
        c.decode(b'{"boot_source": {}}', c.VmConfig)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape_as_other_errors(data: bytes) -> None:
    for type_ in (c.VmConfig, c.DriveConfig, c.CpuConfig, c.SnapshotLoadConfig):
        try:
            c.decode(data, type_)
        except c.ConfigError:
            pass
