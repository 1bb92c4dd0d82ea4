"""Applying a --config-file-shaped configuration through the API."""

from __future__ import annotations

import pytest

from asyncvmm.client import Client, ConfigShapeError, apply_config
from asyncvmm.client.config import requests_for
from tests.unit.client.fake_api import FakeApi, fault

FULL = {
    "balloon": None, "vsock": None, "cpu-config": None, "pmem": [], "memory-hotplug": None,
    "entropy": {"rate_limiter": None},
    "mmds-config": {"network_interfaces": ["eth0"], "version": "V2"},
    "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": None}],
    "drives": [{"drive_id": "rootfs", "path_on_host": "/r.img", "is_root_device": True},
               {"drive_id": "data", "path_on_host": "/d.img", "is_root_device": False, "partuuid": None}],
    "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0", "initrd_path": None},
    "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
    "logger": {"log_path": "/l", "level": "Info"},
    "metrics": {"metrics_path": "/m"},
}


def test_order_and_bodies():
    assert requests_for(FULL) == [
        ("/logger", {"log_path": "/l", "level": "Info"}),
        ("/metrics", {"metrics_path": "/m"}),
        ("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}),
        ("/boot-source", {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"}),
        ("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/r.img", "is_root_device": True}),
        ("/drives/data", {"drive_id": "data", "path_on_host": "/d.img", "is_root_device": False}),
        ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
        ("/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}),
        ("/entropy", {}),
    ]


@pytest.mark.parametrize("config,needle", [
    ({"boot_source": {}}, "unknown configuration keys"),
    ({"drives": {"drive_id": "x"}}, "must be a list"),
    ({"drives": [{"path_on_host": "/x"}]}, "drive_id"),
    ({"machine-config": [1]}, "must be an object"),
])
def test_bad_shapes_are_refused_before_anything_is_sent(config, needle):
    with pytest.raises(ConfigShapeError, match=needle):
        requests_for(config)


async def test_apply_sends_puts_and_stops_at_the_first_error(tmp_path):
    fake = FakeApi()
    sock = str(tmp_path / "api.sock")
    await fake.start(sock)

    async def refuse_data_drive(rec):
        return fault("No such file") if rec.path == "/drives/data" else None

    fake.hook = refuse_data_drive
    try:
        async with Client(sock) as client:
            with pytest.raises(Exception, match="No such file"):
                await apply_config(client, FULL)
    finally:
        await fake.stop()
    assert [(r.method, r.path) for r in fake.requests] == [
        ("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/machine-config"), ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"), ("PUT", "/drives/data")]
