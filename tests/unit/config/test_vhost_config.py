"""The ``vhost`` extension of a network interface: what the API accepts and refuses, and why."""

from __future__ import annotations

from typing import Any

import pytest

from asyncvmm.config import (BootSourceConfig, MmdsConfig, NetworkInterfaceConfig,
                             NetworkInterfaceUpdateConfig, SnapshotCreateConfig, VmConfig, decode,
                             to_builtins)
from asyncvmm.config.common import RateLimiterConfig, TokenBucketConfig
from asyncvmm.config.devices import VHOST_MMDS, VHOST_RATE_LIMITER
from asyncvmm.config.errors import ConfigError
from asyncvmm.config.resources import insert_network_interface, set_mmds_config
from asyncvmm.controller import Action, ActionKind as K, Controller, ControllerError
from asyncvmm.devices.vhost import fd as vhost_fd

LIMIT = RateLimiterConfig(bandwidth=TokenBucketConfig(size=1000, refill_time=100))


class Backend:
    """Records the VMM calls the controller makes; every one succeeds."""

    pci_enabled = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        async def call(*args: Any) -> None:
            self.calls.append(name)
        return call


class Metrics:
    def flush(self) -> None:
        pass

    def start_periodic(self) -> None:
        pass


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def ctl(backend) -> Controller:
    return Controller(backend, instance_id="vm1", metrics=Metrics())


@pytest.fixture
def kernel(tmp_path) -> str:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return str(path)


async def boot(ctl: Controller, kernel: str) -> None:
    await ctl.handle(Action(K.CONFIGURE_BOOT_SOURCE, BootSourceConfig(kernel_image_path=kernel)))
    await ctl.handle(Action(K.START_MICRO_VM))

LIMIT = RateLimiterConfig(bandwidth=TokenBucketConfig(size=1000, refill_time=100))


def vhost_iface(**kw: Any) -> NetworkInterfaceConfig:
    return NetworkInterfaceConfig(iface_id="eth0", host_dev_name="tap0", vhost=True, **kw)


def test_the_field_parses_and_an_unset_one_reads_back_absent():
    cfg = decode(b'{"network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "vhost": true},'
                 b' {"iface_id": "b", "host_dev_name": "u"}]}', VmConfig)
    assert [i.vhost for i in cfg.network_interfaces] == [True, None]
    assert "vhost" not in to_builtins(cfg.network_interfaces[1])


@pytest.mark.parametrize("limits", [{"rx_rate_limiter": LIMIT}, {"tx_rate_limiter": LIMIT}])
def test_rate_limiters_are_refused_on_a_vhost_interface(limits):
    with pytest.raises(ConfigError) as e:
        insert_network_interface(VmConfig(), vhost_iface(**limits))
    assert str(e.value) == VHOST_RATE_LIMITER
    insert_network_interface(VmConfig(), NetworkInterfaceConfig(iface_id="eth0", host_dev_name="tap0",
                                                                **limits))


def test_mmds_is_refused_on_a_vhost_interface_whichever_comes_first():
    cfg = insert_network_interface(VmConfig(), vhost_iface())
    with pytest.raises(ConfigError, match="cannot serve the MMDS"):
        set_mmds_config(cfg, MmdsConfig(network_interfaces=["eth0"]))
    plain = NetworkInterfaceConfig(iface_id="eth0", host_dev_name="tap0")
    cfg = set_mmds_config(insert_network_interface(VmConfig(), plain),
                          MmdsConfig(network_interfaces=["eth0"]))
    with pytest.raises(ConfigError) as e:
        insert_network_interface(cfg, vhost_iface())
    assert str(e.value) == VHOST_MMDS
    # MMDS on another interface of the same microVM is fine.
    eth1 = NetworkInterfaceConfig(iface_id="eth1", host_dev_name="tap1", vhost=True)
    cfg = insert_network_interface(cfg, eth1)
    assert cfg.network_interfaces[1].vhost


async def test_put_is_refused_with_a_clear_400_where_vhost_net_cannot_be_opened(ctl, monkeypatch, tmp_path):
    monkeypatch.setattr(vhost_fd.check_vhost_net, "__defaults__", (str(tmp_path / "vhost-net"),))
    with pytest.raises(ControllerError) as e:
        await ctl.handle(Action(K.INSERT_NETWORK_DEVICE, vhost_iface()))
    assert str(e.value) == (f"Network config error: vhost-net is not available for eth0: cannot open "
                            f"{tmp_path}/vhost-net: No such file or directory (is the vhost_net module "
                            "loaded? modprobe vhost_net)")
    assert ctl.config.network_interfaces == []


@pytest.fixture
def vhost_ok(monkeypatch, tmp_path):
    path = tmp_path / "vhost-net"
    path.write_bytes(b"")
    monkeypatch.setattr(vhost_fd.check_vhost_net, "__defaults__", (str(path),))


async def test_patching_limiters_and_snapshots_are_refused(ctl, backend, kernel, vhost_ok):
    await ctl.handle(Action(K.INSERT_NETWORK_DEVICE, vhost_iface()))
    await boot(ctl, kernel)
    with pytest.raises(ControllerError, match="cannot have a rate limiter"):
        await ctl.handle(Action(K.UPDATE_NETWORK_INTERFACE,
                                NetworkInterfaceUpdateConfig(iface_id="eth0", rx_rate_limiter=LIMIT)))
    await ctl.handle(Action(K.PAUSE))
    with pytest.raises(ControllerError, match="vhost-net interface cannot be snapshotted.*eth0"):
        create = SnapshotCreateConfig(snapshot_path="s", mem_file_path="m")
        await ctl.handle(Action(K.CREATE_SNAPSHOT, create))
    assert "update_network_interface" not in backend.calls and "create_snapshot" not in backend.calls
