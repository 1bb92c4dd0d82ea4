"""Controller: phase rules, lifecycle table, pre-boot resource rules, backend delegation,
PCI hot-plug, and the refusal of every feature that is not built."""

from __future__ import annotations

import os
from typing import Any

import msgspec
import pytest

from asyncvmm.config import (
    BalloonConfig,
    BalloonStartCmdConfig,
    BalloonStatsUpdateConfig,
    BalloonUpdateConfig,
    BootSourceConfig,
    CpuConfig,
    DriveConfig,
    DriveUpdateConfig,
    EntropyConfig,
    MachineConfig,
    MachineConfigUpdate,
    MemoryHotplugConfig,
    MemoryHotplugSizeUpdateConfig,
    MetricsConfig,
    MmdsConfig,
    NetworkInterfaceConfig,
    NetworkInterfaceUpdateConfig,
    PmemConfig,
    PmemUpdateConfig,
    RateLimiterConfig,
    SerialConfig,
    SnapshotCreateConfig,
    SnapshotLoadConfig,
    TokenBucketConfig,
    VmConfig,
    VsockConfig,
    decode,
)
from asyncvmm.config import LoggerConfig, MemoryBackendConfig, NetworkOverrideConfig, VsockOverrideConfig
from asyncvmm.config.cputemplate import CpuidLeafModifier, CpuidRegisterModifier
from asyncvmm.controller import (
    NOT_BUILT,
    NOT_SUPPORTED_POST_BOOT,
    NOT_SUPPORTED_PRE_BOOT,
    RULES,
    TRANSITIONS,
    Action,
    ActionKind,
    BackendError,
    Controller,
    ControllerError,
    Event,
    Phase,
    PciError,
    StartError,
    VirtioDeviceId,
    VmState,
)
from tests.fakes.vhost_user_backend import FakeBackend as FakeVhostUserBackend

K = ActionKind


class FakeBackend:
    pci_enabled = False
    """Records calls; ``fail`` maps a method name to the BackendError it raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, BackendError] = {}

    async def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    async def start(self, config: VmConfig, requested_at: Any) -> None:
        await self._call("start", config, requested_at)

    async def pause(self) -> None:
        await self._call("pause")

    async def load_snapshot(self, params: Any) -> VmConfig:
        await self._call("load_snapshot", params)
        return VmConfig()

    async def create_snapshot(self, params: Any, config: VmConfig) -> None:
        await self._call("create_snapshot", params, config)

    async def resume(self) -> None:
        await self._call("resume")

    async def send_ctrl_alt_del(self) -> None:
        await self._call("send_ctrl_alt_del")

    async def update_drive(self, drive_id: str, path_on_host: str | None, rate_limiter: Any) -> None:
        await self._call("update_drive", drive_id, path_on_host, rate_limiter)

    async def update_network_interface(self, iface_id: str, rx: Any, tx: Any) -> None:
        await self._call("update_network_interface", iface_id, rx, tx)

    async def update_balloon(self, amount_mib: int) -> None:
        await self._call("update_balloon", amount_mib)

    async def balloon_stats(self) -> dict[str, Any]:
        await self._call("balloon_stats")
        return {"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0}

    async def update_balloon_stats(self, interval_s: int) -> None:
        await self._call("update_balloon_stats", interval_s)

    async def start_balloon_hinting(self, acknowledge_on_stop: bool) -> None:
        await self._call("start_balloon_hinting", acknowledge_on_stop)

    async def balloon_hinting_status(self) -> dict[str, Any]:
        await self._call("balloon_hinting_status")
        return {"host_cmd": 2}

    async def stop_balloon_hinting(self) -> None:
        await self._call("stop_balloon_hinting")

    async def hotplug_drive(self, drive: DriveConfig) -> None:
        await self._call("hotplug_drive", drive)

    async def hotplug_pmem(self, pmem: PmemConfig) -> None:
        await self._call("hotplug_pmem", pmem)

    async def update_pmem(self, pmem_id: str, rate_limiter: Any) -> None:
        await self._call("update_pmem", pmem_id, rate_limiter)

    async def hotplug_network_interface(self, iface: NetworkInterfaceConfig) -> None:
        await self._call("hotplug_network_interface", iface)

    async def unplug_device(self, kind: str, device_id: str) -> None:
        await self._call("unplug_device", kind, device_id)

    async def memory_hotplug_status(self) -> dict[str, Any]:
        await self._call("memory_hotplug_status")
        return {"block_size_mib": 2, "total_size_mib": 1024, "slot_size_mib": 128,
                "plugged_size_mib": 0, "requested_size_mib": 0}

    async def update_memory_hotplug_size(self, requested_size_mib: int) -> None:
        await self._call("update_memory_hotplug_size", requested_size_mib)


class FakeMetrics:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.flushes = 0
        self.periodic = False

    def init(self, path: str) -> None:
        if self.paths:
            raise RuntimeError("Reinitialization of metrics not allowed.")
        self.paths.append(path)

    def flush(self) -> None:
        self.flushes += 1

    def start_periodic(self) -> None:
        self.periodic = True


@pytest.fixture
def kernel(tmp_path: Any) -> str:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return str(path)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def ctl(backend: FakeBackend) -> Controller:
    return Controller(backend, instance_id="vm1", metrics=FakeMetrics())


async def boot(ctl: Controller, kernel: str) -> None:
    await ctl.handle(Action(K.CONFIGURE_BOOT_SOURCE, BootSourceConfig(kernel_image_path=kernel)))
    await ctl.handle(Action(K.START_MICRO_VM))


def test_every_action_has_a_rule_and_either_a_handler_or_a_not_built_feature(ctl: Controller) -> None:
    assert set(RULES) == set(ActionKind)
    handled = set(ctl._handler_table())
    assert handled.isdisjoint(NOT_BUILT)
    assert handled | set(NOT_BUILT) == set(ActionKind)


def test_lifecycle_table_only_moves_forward_from_not_started() -> None:
    assert all(new is not VmState.NOT_STARTED for new in TRANSITIONS.values())
    assert TRANSITIONS[(VmState.PAUSED, Event.PAUSE)] is VmState.PAUSED


@pytest.mark.parametrize("kind", [k for k, phase in RULES.items() if phase is Phase.POST_BOOT and k not in NOT_BUILT])
async def test_post_boot_actions_fail_before_boot(ctl: Controller, kind: ActionKind) -> None:
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(kind))
    assert err.value.message == NOT_SUPPORTED_PRE_BOOT


@pytest.mark.parametrize("kind", [k for k, phase in RULES.items() if phase is Phase.PRE_BOOT and k not in NOT_BUILT])
async def test_pre_boot_actions_fail_after_boot(ctl: Controller, kernel: str, kind: ActionKind) -> None:
    await boot(ctl, kernel)
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(kind, None))
    assert err.value.message == NOT_SUPPORTED_POST_BOOT


async def test_instance_info_and_version(ctl: Controller) -> None:
    info = await ctl.handle(Action(K.GET_INSTANCE_INFO))
    assert info == {"app_name": "Firecracker", "id": "vm1", "state": "Not started", "vmm_version": "1.16.1"}
    assert await ctl.handle(Action(K.GET_VMM_VERSION)) == {"firecracker_version": "1.16.1"}


async def test_start_without_kernel_is_refused(ctl: Controller, backend: FakeBackend) -> None:
    with pytest.raises(ControllerError, match="Cannot start microvm without kernel configuration"):
        await ctl.handle(Action(K.START_MICRO_VM))
    assert backend.calls == []


async def test_failed_start_leaves_vm_configurable(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    backend.fail["start"] = StartError("Cannot allocate memory")
    with pytest.raises(ControllerError) as err:
        await boot(ctl, kernel)
    assert err.value.message == "Start microvm error: Cannot allocate memory"
    assert ctl.state is VmState.NOT_STARTED
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(vcpu_count=1, mem_size_mib=64)))
    del backend.fail["start"]
    await ctl.handle(Action(K.START_MICRO_VM))
    assert ctl.state is VmState.RUNNING
    assert ctl.metrics.flushes == 1 and ctl.metrics.periodic  # type: ignore[union-attr]


async def test_start_passes_the_built_config(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(vcpu_count=2, mem_size_mib=256)))
    await boot(ctl, kernel)
    name, (cfg, requested_at) = backend.calls[-1]
    assert name == "start" and isinstance(cfg, VmConfig)
    assert requested_at.monotonic_ns > 0
    assert cfg.machine_config.vcpu_count == 2 and cfg.boot_source.kernel_image_path == kernel


async def test_pause_resume_cycle(backend: FakeBackend, kernel: str) -> None:
    ticks = iter(range(0, 10_000, 7))
    ctl = Controller(backend, clock_us=lambda: next(ticks))
    await boot(ctl, kernel)
    await ctl.handle(Action(K.PAUSE))
    await ctl.handle(Action(K.PAUSE))  # pausing twice is fine and does not pause twice
    assert ctl.state is VmState.PAUSED
    assert [c for c, _ in backend.calls].count("pause") == 1
    assert (await ctl.handle(Action(K.GET_INSTANCE_INFO)))["state"] == "Paused"
    await ctl.handle(Action(K.RESUME))
    assert ctl.state is VmState.RUNNING
    assert ctl.latencies.pause_vm == 7 and ctl.latencies.vmm_resume_vm == 7


async def test_backend_error_reaches_client_with_prefix(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    await boot(ctl, kernel)
    backend.fail["send_ctrl_alt_del"] = BackendError("i8042 is not supported yet")
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.SEND_CTRL_ALT_DEL))
    assert err.value.message == "Internal VMM error: i8042 is not supported yet"


async def test_machine_config_rules(ctl: Controller) -> None:
    for bad in (MachineConfig(vcpu_count=0), MachineConfig(vcpu_count=33), MachineConfig(vcpu_count=3, smt=True),
                MachineConfig(mem_size_mib=0), MachineConfig(mem_size_mib=3, huge_pages="2M"),
                MachineConfig(mem_size_mib=0, cpu_template="T2")):
        with pytest.raises(ControllerError, match="Machine config error"):
            await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, bad))
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(vcpu_count=2, smt=True)))
    # PATCH keeps the other fields and validates the merged result.
    with pytest.raises(ControllerError):
        await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfigUpdate(vcpu_count=3)))
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfigUpdate(mem_size_mib=512)))
    got = await ctl.handle(Action(K.GET_MACHINE_CONFIG))
    assert got == {"vcpu_count": 2, "mem_size_mib": 512, "smt": True, "track_dirty_pages": False, "huge_pages": "None"}


async def test_drives_root_rules_and_missing_file(ctl: Controller, tmp_path: Any) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"\0" * 512)
    root = DriveConfig(drive_id="root", is_root_device=True, path_on_host=str(disk))
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(drive_id="data", is_root_device=False, path_on_host=str(disk))))
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, root))
    assert [d.drive_id for d in ctl.config.drives] == ["root", "data"]
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, root))  # updating the root device is fine
    with pytest.raises(ControllerError, match="A root block device already exists"):
        await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(drive_id="r2", is_root_device=True, path_on_host=str(disk))))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(drive_id="x", is_root_device=False, path_on_host="/nope")))
    assert "No such file or directory (os error 2)" in err.value.message


async def test_patch_drive_after_boot(ctl: Controller, backend: FakeBackend, kernel: str, tmp_path: Any) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(drive_id="d", is_root_device=False, path_on_host=str(disk))))
    await boot(ctl, kernel)
    new = tmp_path / "disk2"
    new.write_bytes(b"")
    await ctl.handle(Action(K.UPDATE_BLOCK_DEVICE, DriveUpdateConfig(drive_id="d", path_on_host=str(new))))
    assert backend.calls[-1] == ("update_drive", ("d", str(new), None))
    assert ctl.config.drives[0].path_on_host == str(new)
    with pytest.raises(ControllerError, match="not found"):
        await ctl.handle(Action(K.UPDATE_BLOCK_DEVICE, DriveUpdateConfig(drive_id="zz")))


async def test_network_uniqueness_and_mmds_config(ctl: Controller) -> None:
    eth0 = NetworkInterfaceConfig(iface_id="eth0", host_dev_name="tap0", guest_mac="AA:FC:00:00:00:01")
    await ctl.handle(Action(K.INSERT_NETWORK_DEVICE, eth0))
    with pytest.raises(ControllerError, match="The host device name tap0 is already in use."):
        await ctl.handle(Action(K.INSERT_NETWORK_DEVICE, NetworkInterfaceConfig(iface_id="eth1", host_dev_name="tap0")))
    with pytest.raises(ControllerError, match="The MAC address is already in use: aa:fc:00:00:00:01"):
        await ctl.handle(Action(K.INSERT_NETWORK_DEVICE, NetworkInterfaceConfig(
            iface_id="eth1", host_dev_name="tap1", guest_mac="aa:fc:00:00:00:01")))
    with pytest.raises(ControllerError, match="does not correspond to any existing network interface"):
        await ctl.handle(Action(K.SET_MMDS_CONFIGURATION, MmdsConfig(network_interfaces=["eth9"])))
    with pytest.raises(ControllerError, match="not link local"):
        await ctl.handle(Action(K.SET_MMDS_CONFIGURATION, MmdsConfig(network_interfaces=["eth0"], ipv4_address="10.0.0.1")))
    with pytest.raises(ControllerError, match="is empty"):
        await ctl.handle(Action(K.SET_MMDS_CONFIGURATION, MmdsConfig(network_interfaces=[])))
    await ctl.handle(Action(K.SET_MMDS_CONFIGURATION, MmdsConfig(network_interfaces=["eth0"])))
    assert ctl.config.mmds_config.ipv4_address == "169.254.169.254"


async def test_patch_network_after_boot(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    await ctl.handle(Action(K.INSERT_NETWORK_DEVICE, NetworkInterfaceConfig(iface_id="eth0", host_dev_name="tap0")))
    await boot(ctl, kernel)
    await ctl.handle(Action(K.UPDATE_NETWORK_INTERFACE, NetworkInterfaceUpdateConfig(iface_id="eth0")))
    assert backend.calls[-1][0] == "update_network_interface"
    with pytest.raises(ControllerError, match="Invalid interface ID - not found."):
        await ctl.handle(Action(K.UPDATE_NETWORK_INTERFACE, NetworkInterfaceUpdateConfig(iface_id="eth1")))


async def test_mmds_store_errors(backend: FakeBackend) -> None:
    from asyncvmm.mmds.store import MmdsStore

    ctl = Controller(backend, mmds=MmdsStore(limit_bytes=20))
    assert await ctl.handle(Action(K.GET_MMDS)) == {}
    with pytest.raises(ControllerError, match="MMDS error: The MMDS data store is not initialized."):
        await ctl.handle(Action(K.PATCH_MMDS, {"a": 1}))
    await ctl.handle(Action(K.PUT_MMDS, {"a": 1}))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.PUT_MMDS, {"a": "x" * 100}))
    assert err.value.status == 413 and "doesn't fit" in err.value.message
    assert await ctl.handle(Action(K.GET_MMDS)) == {"a": 1}
    await ctl.handle(Action(K.PUT_MMDS, None))
    assert await ctl.handle(Action(K.GET_MMDS)) == {}  # never a 204


async def test_metrics_only_once(ctl: Controller, tmp_path: Any) -> None:
    await ctl.handle(Action(K.CONFIGURE_METRICS, MetricsConfig(metrics_path=str(tmp_path / "m"))))
    with pytest.raises(ControllerError, match="Metrics error: Reinitialization of metrics not allowed."):
        await ctl.handle(Action(K.CONFIGURE_METRICS, MetricsConfig(metrics_path=str(tmp_path / "m"))))


async def test_full_vm_config_shape(ctl: Controller) -> None:
    out = await ctl.handle(Action(K.GET_FULL_VM_CONFIG))
    assert out["boot-source"] is None and out["drives"] == [] and out["balloon"] is None
    assert out["machine-config"]["vcpu_count"] == 1
    assert "serial" not in out
    # The output is a valid --config-file.
    decode(__import__("msgspec").json.encode(out), VmConfig)


async def test_configure_from_file_uses_the_api_rules(ctl: Controller, kernel: str) -> None:
    cfg = decode(
        ('{"boot-source": {"kernel_image_path": "%s"}, "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},'
         ' "network-interfaces": [{"iface_id": "a", "host_dev_name": "t"}, {"iface_id": "b", "host_dev_name": "t"}]}'
         % kernel).encode(),
        VmConfig,
    )
    with pytest.raises(ControllerError, match="already in use"):
        await ctl.configure(cfg)
    bad_id = decode(b'{"drives": [{"drive_id": "a-b", "is_root_device": true, "path_on_host": "/x"}]}', VmConfig)
    with pytest.raises(ControllerError, match="API Resource IDs"):
        await Controller(FakeBackend()).configure(bad_id)


# -- nothing accepted and then ignored: features not built are refused, naming them --------

NOT_YET = "is not supported yet by asyncvmm."

# Every action is built now (NOT_BUILT is empty); the mechanism stays for the next feature that
# lands in pieces, so it is tested with an action marked not built for the test.

def test_no_action_is_refused_as_not_built_any_more() -> None:
    assert NOT_BUILT == {}


@pytest.mark.parametrize("booted", [False, True])
async def test_a_not_built_action_is_refused_in_every_phase_and_stores_nothing(
        ctl: Controller, backend: FakeBackend, kernel: str, booted: bool, monkeypatch: Any) -> None:
    monkeypatch.setitem(NOT_BUILT, K.SET_ENTROPY_DEVICE, "Entropy for this test")
    if booted:
        await boot(ctl, kernel)
    before = await ctl.handle(Action(K.GET_FULL_VM_CONFIG))
    calls = list(backend.calls)
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.SET_ENTROPY_DEVICE, EntropyConfig()))
    assert err.value.message == f"Entropy for this test {NOT_YET}" and err.value.status == 400
    assert await ctl.handle(Action(K.GET_FULL_VM_CONFIG)) == before  # nothing stored
    assert backend.calls == calls  # nothing reached the VMM


# -- vsock: built; PUT /vsock tries the socket path as Firecracker's bind would ----------------

async def test_vsock_is_stored_pre_boot_and_its_path_is_tried(ctl: Controller, kernel: str, tmp_path: Any) -> None:
    path = str(tmp_path / "v.sock")
    await ctl.handle(Action(K.SET_VSOCK_DEVICE, VsockConfig(guest_cid=3, uds_path=path)))
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["vsock"] == {"guest_cid": 3, "uds_path": path}
    assert not os.path.exists(path)              # tried and released: the VMM binds it at boot
    await ctl.handle(Action(K.SET_VSOCK_DEVICE, VsockConfig(guest_cid=4, uds_path=path)))   # replaced
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["vsock"]["guest_cid"] == 4
    await boot(ctl, kernel)
    with pytest.raises(ControllerError, match="not supported after starting"):
        await ctl.handle(Action(K.SET_VSOCK_DEVICE, VsockConfig(guest_cid=5, uds_path=path)))


@pytest.mark.parametrize("where,error", [("taken", "Address already in use (os error 98)"),
                                         ("no/such/dir/v.sock", "No such file or directory (os error 2)")])
async def test_vsock_path_that_cannot_be_bound_is_refused(ctl: Controller, tmp_path: Any, where: str,
                                                          error: str) -> None:
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.SET_VSOCK_DEVICE, VsockConfig(guest_cid=3, uds_path=str(tmp_path / where))))
    assert err.value.message == ("Vsock config error: Cannot create backend for vsock device: Error binding "
                                 "to the host-side Unix socket: " + error)
    assert (tmp_path / "taken").read_text() == "mine"
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["vsock"] is None


async def test_a_not_built_request_keeps_its_own_validation_error(ctl: Controller) -> None:
    with pytest.raises(ControllerError, match="The guest CID must be at least 3"):
        await ctl.handle(Action(K.SET_VSOCK_DEVICE, VsockConfig(guest_cid=2, uds_path="/v")))


CUSTOM = CpuConfig(kvm_capabilities=["!56"], cpuid_modifiers=[CpuidLeafModifier(
    leaf="0x1", subleaf="0x0", flags=0, modifiers=[CpuidRegisterModifier(register="ecx", bitmap="0b0")])])


async def test_cpu_templates_share_one_slot_and_the_last_configured_wins(ctl: Controller) -> None:
    # Firecracker keeps a static and a custom template in one place (docs/cpu-templates.md).
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(cpu_template="T2")))
    assert (await ctl.handle(Action(K.GET_MACHINE_CONFIG)))["cpu_template"] == "T2"
    await ctl.handle(Action(K.PUT_CPU_CONFIGURATION, CUSTOM))
    assert ctl.config.cpu_config == CUSTOM and ctl.config.machine_config.cpu_template is None
    # PUT and PATCH without cpu_template keep the template, custom or static.
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(vcpu_count=2)))
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfigUpdate(mem_size_mib=256)))
    assert ctl.config.cpu_config == CUSTOM
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfigUpdate(cpu_template="T2A")))
    assert ctl.config.cpu_config is None and ctl.config.machine_config.cpu_template == "T2A"
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(mem_size_mib=512)))
    assert ctl.config.machine_config.cpu_template == "T2A"
    # "None" drops either kind.
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(cpu_template="None")))
    assert ctl.config.machine_config.cpu_template is None
    await ctl.handle(Action(K.PUT_CPU_CONFIGURATION, CUSTOM))
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfigUpdate(cpu_template="None")))
    assert ctl.config.cpu_config is None and ctl.config.machine_config.cpu_template is None
    assert "cpu_template" not in await ctl.handle(Action(K.GET_MACHINE_CONFIG))


async def test_full_vm_config_never_shows_a_custom_template(ctl: Controller) -> None:
    await ctl.handle(Action(K.PUT_CPU_CONFIGURATION, CUSTOM))
    cfg = await ctl.handle(Action(K.GET_FULL_VM_CONFIG))
    assert cfg["cpu-config"] is None and "cpu_template" not in cfg["machine-config"]


async def test_a_failed_machine_config_keeps_the_template(ctl: Controller) -> None:
    await ctl.handle(Action(K.PUT_CPU_CONFIGURATION, CUSTOM))
    with pytest.raises(ControllerError, match="Machine config error"):
        await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(vcpu_count=0, cpu_template="C3")))
    assert ctl.config.cpu_config == CUSTOM and ctl.config.machine_config == MachineConfig()


async def test_the_template_reaches_the_backend_at_start(ctl: Controller, backend: FakeBackend,
                                                         kernel: str) -> None:
    await ctl.handle(Action(K.PUT_CPU_CONFIGURATION, CUSTOM))
    await boot(ctl, kernel)
    started = next(args for call, args in backend.calls if call == "start")
    assert started[0].cpu_config == CUSTOM


@pytest.mark.parametrize("machine", [
    # What Firecracker clients (Go SDK, containerd, Kata) send as defaults: they ask for nothing.
    MachineConfig(vcpu_count=2, smt=True, cpu_template=None, track_dirty_pages=False, huge_pages="None"),
    MachineConfigUpdate(cpu_template="None", track_dirty_pages=False, huge_pages="None", smt=False),
])
async def test_machine_config_defaults_and_no_op_values_are_accepted(ctl: Controller, machine: Any) -> None:
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, machine))
    assert ctl.config.machine_config.cpu_template is None


async def test_every_field_of_the_built_resources_is_accepted(ctl: Controller, tmp_path: Any) -> None:
    limit = TokenBucketConfig(size=1, refill_time=1)
    await ctl.handle(Action(K.CONFIGURE_SERIAL, SerialConfig(rate_limiter=limit)))
    assert ctl.config.serial.rate_limiter == limit          # the builder gives it to the UART
    cfg = await ctl.handle(Action(K.GET_FULL_VM_CONFIG))
    assert cfg["drives"] == [] and cfg["cpu-config"] is None
    await ctl.handle(Action(K.CONFIGURE_SERIAL, SerialConfig(serial_out_path=str(tmp_path / "serial.out"))))
    await ctl.handle(Action(K.PUT_CPU_CONFIGURATION, CpuConfig()))
    await ctl.handle(Action(K.PUT_CPU_CONFIGURATION, CpuConfig(cpuid_modifiers=[], msr_modifiers=[])))


async def test_config_file_cpu_config_may_name_a_json_file(ctl: Controller, kernel: str,
                                                         tmp_path: Any) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"kvm_capabilities": ["171"]}')
    cfg = decode(('{"boot-source": {"kernel_image_path": "%s"}, "cpu-config": "%s"}'
                  % (kernel, path)).encode(), VmConfig)
    await ctl.configure(cfg)
    assert ctl.config.cpu_config == CpuConfig(kvm_capabilities=["171"])
    path.write_text('{"kvm_capabilities": ["x"]}')
    with pytest.raises(ControllerError) as err:
        await Controller(FakeBackend()).configure(cfg)
    assert err.value.message == ("Invalid JSON: Failed to parse string [x] as a kvm capability - can not "
                                 "convert to numeric: invalid digit found in string")
    path.unlink()
    with pytest.raises(ControllerError) as err:
        await Controller(FakeBackend()).configure(cfg)
    assert err.value.message == "File operation error: No such file or directory (os error 2)"


async def test_config_file_cpu_config_comes_after_machine_config(ctl: Controller, kernel: str) -> None:
    # As in Firecracker's --config-file: both given, the custom template is the one kept.
    cfg = decode(('{"boot-source": {"kernel_image_path": "%s"}, "machine-config": {"vcpu_count": 1, '
                  '"mem_size_mib": 128, "cpu_template": "T2"}, "cpu-config": {"kvm_capabilities": ["!56"]}}'
                  % kernel).encode(), VmConfig)
    await ctl.configure(cfg)
    assert ctl.config.cpu_config == CpuConfig(kvm_capabilities=["!56"])
    assert ctl.config.machine_config.cpu_template is None


# -- balloon (Firecracker's messages, API-BEHAVIOUR.md) ------------------------------------

async def test_balloon_pre_boot_rules(ctl: Controller) -> None:
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.GET_BALLOON_CONFIG))
    assert err.value.message == "Balloon config error: No balloon device found."
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=129, deflate_on_oom=True)))
    assert err.value.message == "Balloon config error: Amount of pages requested is too large."
    await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=64, deflate_on_oom=True,
                                                                 stats_polling_interval_s=2,
                                                                 free_page_reporting=True)))
    assert await ctl.handle(Action(K.GET_BALLOON_CONFIG)) == {
        "amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 2,
        "free_page_hinting": False, "free_page_reporting": True}
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(mem_size_mib=32)))
    assert err.value.message == ("Machine config error: The memory size (MiB) is smaller than the "
                                 "previously set balloon device target size.")
    assert ctl.config.machine_config.mem_size_mib == 128
    for kind, payload in ((K.UPDATE_BALLOON, BalloonUpdateConfig(amount_mib=1)), (K.GET_BALLOON_STATS, None),
                          (K.UPDATE_BALLOON_STATISTICS, BalloonStatsUpdateConfig(stats_polling_interval_s=1))):
        with pytest.raises(ControllerError) as err:
            await ctl.handle(Action(kind, payload))
        assert err.value.message == NOT_SUPPORTED_PRE_BOOT


async def test_balloon_and_huge_pages_refuse_each_other_at_configuration(ctl: Controller) -> None:
    """Firecracker refuses the pair when it is configured, in either order, not at InstanceStart."""
    incompatible = "Firecracker's huge pages support is incompatible with memory ballooning."
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(huge_pages="2M")))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=1, deflate_on_oom=False)))
    assert err.value.message == "Balloon config error: " + incompatible
    assert ctl.config.balloon is None
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig()))
    await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=1, deflate_on_oom=False)))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(huge_pages="2M")))
    assert err.value.message == "Machine config error: " + incompatible
    assert ctl.config.machine_config.huge_pages == "None"


async def test_balloon_free_page_hinting_calls(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=1, deflate_on_oom=False,
                                                                 free_page_hinting=True)))
    assert ctl.config.balloon.free_page_hinting
    for kind, payload in ((K.START_FREE_PAGE_HINTING, BalloonStartCmdConfig()), (K.GET_FREE_PAGE_HINTING_STATUS, None),
                          (K.STOP_FREE_PAGE_HINTING, None)):
        with pytest.raises(ControllerError, match=NOT_SUPPORTED_PRE_BOOT):
            await ctl.handle(Action(kind, payload))
    await boot(ctl, kernel)
    await ctl.handle(Action(K.START_FREE_PAGE_HINTING, BalloonStartCmdConfig()))
    assert await ctl.handle(Action(K.GET_FREE_PAGE_HINTING_STATUS)) == {"host_cmd": 2}
    await ctl.handle(Action(K.STOP_FREE_PAGE_HINTING))
    assert [c for c in backend.calls if "hinting" in c[0]] == [
        ("start_balloon_hinting", (True,)), ("balloon_hinting_status", ()), ("stop_balloon_hinting", ())]
    backend.fail["stop_balloon_hinting"] = BackendError("Balloon: Attempting to use hinting when not enabled")
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.STOP_FREE_PAGE_HINTING))
    assert err.value.message == "Balloon update error: Balloon: Attempting to use hinting when not enabled"


async def test_balloon_post_boot_operations(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=8, deflate_on_oom=False,
                                                                 stats_polling_interval_s=1)))
    await boot(ctl, kernel)
    await ctl.handle(Action(K.UPDATE_BALLOON, BalloonUpdateConfig(amount_mib=10)))
    assert (await ctl.handle(Action(K.GET_BALLOON_CONFIG)))["amount_mib"] == 10
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["balloon"]["amount_mib"] == 10
    await ctl.handle(Action(K.UPDATE_BALLOON_STATISTICS, BalloonStatsUpdateConfig(stats_polling_interval_s=3)))
    assert ctl.config.balloon.stats_polling_interval_s == 3
    assert (await ctl.handle(Action(K.GET_BALLOON_STATS)))["target_pages"] == 0
    assert [c for c, _ in backend.calls if "balloon" in c] == ["update_balloon", "update_balloon_stats",
                                                               "balloon_stats"]
    with pytest.raises(ControllerError, match=NOT_SUPPORTED_POST_BOOT):
        await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=1, deflate_on_oom=False)))


async def test_balloon_post_boot_errors_carry_firecrackers_prefixes(
        ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    await boot(ctl, kernel)
    for kind, payload, message in (
            (K.GET_BALLOON_CONFIG, None, "Internal VMM error: Failed perform action on device: Device not found"),
            (K.GET_BALLOON_STATS, None, "Internal VMM error: Failed perform action on device: Device not found"),
            (K.UPDATE_BALLOON, BalloonUpdateConfig(amount_mib=1),
             "Balloon update error: Failed perform action on device: Device not found")):
        with pytest.raises(ControllerError) as err:
            await ctl.handle(Action(kind, payload))
        assert err.value.message == message
    ctl.config = msgspec.structs.replace(ctl.config, balloon=BalloonConfig(amount_mib=0, deflate_on_oom=False))
    backend.fail["update_balloon"] = BackendError("Balloon: Requested memory should be less than 4096MiB")
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.UPDATE_BALLOON, BalloonUpdateConfig(amount_mib=4096)))
    assert err.value.message == "Balloon update error: Balloon: Requested memory should be less than 4096MiB"
    assert ctl.config.balloon.amount_mib == 0                 # a refused update changes nothing
    backend.fail["balloon_stats"] = BackendError("Balloon: Received stats query when stats are disabled.")
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.GET_BALLOON_STATS))
    assert err.value.message == "Internal VMM error: Balloon: Received stats query when stats are disabled."


async def test_balloon_target_must_fit_a_le32_of_pages(ctl: Controller) -> None:
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(mem_size_mib=1 << 25)))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=1 << 24, deflate_on_oom=False)))
    assert err.value.message == ("Balloon config error: Error creating the balloon device: Requested memory "
                                 "should be less than 16777215MiB")
    await ctl.handle(Action(K.SET_BALLOON_DEVICE, BalloonConfig(amount_mib=(1 << 24) - 1, deflate_on_oom=False)))


# -- snapshots: phase rules, LOAD_NOT_ALLOWED, create only when paused ------------------------

SNAP_LOAD = SnapshotLoadConfig(snapshot_path="s", mem_backend=MemoryBackendConfig(backend_type="File",
                                                                                  backend_path="m"))


@pytest.mark.parametrize("resume,state", [(False, "Paused"), (True, "Running")])
async def test_snapshot_load_on_a_fresh_process(ctl: Controller, backend: FakeBackend, resume: bool,
                                                state: str) -> None:
    await ctl.handle(Action(K.CONFIGURE_LOGGER, LoggerConfig(level="Info")))    # not boot-specific
    await ctl.handle(Action(K.LOAD_SNAPSHOT, msgspec.structs.replace(SNAP_LOAD, resume_vm=resume)))
    assert backend.calls[-1][0] == "load_snapshot"
    assert (await ctl.handle(Action(K.GET_INSTANCE_INFO)))["state"] == state
    assert ctl.latencies.load_snapshot >= 0
    with pytest.raises(ControllerError, match="not supported after starting"):
        await ctl.handle(Action(K.LOAD_SNAPSHOT, SNAP_LOAD))


async def test_snapshot_load_after_a_boot_specific_resource_is_refused(ctl: Controller, backend: FakeBackend,
                                                                       kernel: str) -> None:
    await ctl.handle(Action(K.CONFIGURE_BOOT_SOURCE, BootSourceConfig(kernel_image_path=kernel)))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.LOAD_SNAPSHOT, SNAP_LOAD))
    assert err.value.message == ("Load snapshot error: Loading a microVM snapshot not allowed after "
                                 "configuring boot-specific resources.")
    assert not any(name == "load_snapshot" for name, _ in backend.calls)


async def test_a_failed_snapshot_load_leaves_the_vm_not_started(ctl: Controller, backend: FakeBackend) -> None:
    backend.fail["load_snapshot"] = BackendError("the snapshot state file is truncated")
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.LOAD_SNAPSHOT, SNAP_LOAD))
    assert err.value.message == ("Load snapshot error: Failed to restore from snapshot: the snapshot "
                                 "state file is truncated")
    assert ctl.state.value == "Not started"


async def test_every_snapshot_load_option_is_built_and_reaches_the_vmm(ctl: Controller,
                                                                       backend: FakeBackend) -> None:
    # Every SnapshotLoadParams field is built (the Uffd backend, overrides, clock_realtime, dirty
    # tracking): a load asking for all of them at once is not refused and reaches the VMM whole.
    # An option not built would be refused by name here, as the NOT_BUILT_REQUESTS are.
    load = SnapshotLoadConfig(snapshot_path="s", mem_backend=MemoryBackendConfig(backend_type="Uffd",
                                                                                 backend_path="u.sock"),
                              track_dirty_pages=True, resume_vm=True, clock_realtime=True,
                              network_overrides=[NetworkOverrideConfig(iface_id="eth0", host_dev_name="tap9")],
                              vsock_override=VsockOverrideConfig(uds_path="v.sock"))
    assert {name for name in load.__struct_fields__ if getattr(load, name) in (None, False, [])} == {
        "mem_file_path", "enable_diff_snapshots"}      # the deprecated spellings of mem_backend, tracking
    await ctl.handle(Action(K.LOAD_SNAPSHOT, load))
    assert backend.calls == [("load_snapshot", (load,))]
    assert (await ctl.handle(Action(K.GET_INSTANCE_INFO)))["state"] == "Running"


async def test_snapshot_create_only_when_paused(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    create = SnapshotCreateConfig(mem_file_path="m", snapshot_path="s")
    with pytest.raises(ControllerError, match="not supported before starting"):
        await ctl.handle(Action(K.CREATE_SNAPSHOT, create))
    await boot(ctl, kernel)
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.CREATE_SNAPSHOT, create))
    assert err.value.message == ("Create snapshot error: Cannot create a snapshot of a running microVM; "
                                 "pause it first.")
    await ctl.handle(Action(K.PAUSE))
    await ctl.handle(Action(K.CREATE_SNAPSHOT, create))
    assert backend.calls[-1] == ("create_snapshot", (create, ctl.config))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.CREATE_SNAPSHOT, msgspec.structs.replace(create, snapshot_type="Diff")))
    assert err.value.message == "Diff snapshots are not allowed on uVMs with dirty page tracking disabled."


def vhost_user_backend(tmp_path: Any, name: str = "vu.sock") -> tuple[FakeVhostUserBackend, str]:
    backend = FakeVhostUserBackend(features=1 << 32 | 1 << 30, protocol_features=1 << 9)
    path = str(tmp_path / name)
    backend.listen(path)
    return backend, path


async def test_a_vhost_user_drive_is_checked_with_its_back_end_at_put(ctl: Controller, tmp_path: Any) -> None:
    # As Firecracker does at PUT /drives: connect, agree the features, read the config.
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(
            drive_id="vu", is_root_device=True, socket=str(tmp_path / "nobody.sock"))))
    assert err.value.message == (
        "Drive config error: Unable to create the virtio block device: Vhost user backend error: "
        "Vhost-user error: Failed to connect to UDS Unix stream: No such file or directory (os error 2)")
    backend, path = vhost_user_backend(tmp_path)
    drive = DriveConfig(drive_id="vu", is_root_device=True, socket=path, cache_type="Writeback")
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, drive))
    backend.join()                            # the check hung up after its handshake
    assert backend.requests()[:2] == [3, 1]   # SET_OWNER, GET_FEATURES
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["drives"][0]["socket"] == path
    backend.close()


@pytest.mark.parametrize("extra", [
    {"rate_limiter": RateLimiterConfig(ops=TokenBucketConfig(size=1, refill_time=100))},
    {"is_read_only": False},
    {"io_engine": "Async"},
])
async def test_a_vhost_user_drive_takes_none_of_a_file_drives_fields(ctl: Controller, extra: dict) -> None:
    # Firecracker's VhostUserBlockConfig has no rate limiter, read-only flag or engine: the
    # request fits neither kind of drive (BlockError::InvalidBlockConfig).
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(
            drive_id="vu", is_root_device=False, socket="/nonexistent.sock", **extra)))
    assert err.value.message == ("Drive config error: Unable to create the virtio block device: "
                                 "Invalid block config.")
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["drives"] == []


async def test_a_microvm_with_a_vhost_user_drive_is_not_snapshotted(ctl: Controller, backend: FakeBackend,
                                                                    kernel: str, tmp_path: Any) -> None:
    vu, path = vhost_user_backend(tmp_path)
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(drive_id="vu", is_root_device=False,
                                                               socket=path)))
    vu.join()
    vu.close()
    await boot(ctl, kernel)
    await ctl.handle(Action(K.PAUSE))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.CREATE_SNAPSHOT, SnapshotCreateConfig(mem_file_path="m", snapshot_path="s")))
    assert err.value.message == ("Create snapshot error: Snapshotting of vhost-user-blk devices is not "
                                 "supported. vhost-user drives: vu")
    assert not [c for c in backend.calls if c[0] == "create_snapshot"]


async def test_diff_snapshot_with_dirty_page_tracking(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    await ctl.handle(Action(K.UPDATE_MACHINE_CONFIGURATION, MachineConfig(track_dirty_pages=True)))
    await boot(ctl, kernel)
    await ctl.handle(Action(K.PAUSE))
    diff = SnapshotCreateConfig(mem_file_path="m", snapshot_path="s", snapshot_type="Diff")
    await ctl.handle(Action(K.CREATE_SNAPSHOT, diff))
    assert backend.calls[-1] == ("create_snapshot", (diff, ctl.config))
    assert ctl.latencies.diff_create_snapshot >= 0


# -- PCI hot-plug: PUT after boot plugs a device, DELETE unplugs one (--enable-pci) -----------------


@pytest.fixture
def pci(backend: FakeBackend) -> Controller:
    return Controller(backend, pci_enabled=True)


@pytest.fixture
def disk(tmp_path: Any) -> str:
    path = tmp_path / "disk"
    path.write_bytes(b"\0" * 512)
    return str(path)


def data_drive(drive_id: str, path: str, **kw: Any) -> DriveConfig:
    return DriveConfig(drive_id=drive_id, is_root_device=False, path_on_host=path, **kw)


async def boot_with_root(ctl: Controller, kernel: str, disk: str) -> None:
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(drive_id="rootfs", is_root_device=True,
                                                               path_on_host=disk)))
    await ctl.handle(Action(K.INSERT_NETWORK_DEVICE, NetworkInterfaceConfig(
        iface_id="eth0", host_dev_name="tap0", guest_mac="06:00:00:00:00:01")))
    await ctl.handle(Action(K.SET_MMDS_CONFIGURATION, MmdsConfig(network_interfaces=["eth0"])))
    await boot(ctl, kernel)


def unplug(kind: str, device_id: str) -> Action:
    return Action(K.HOT_UNPLUG_DEVICE, VirtioDeviceId(kind, device_id))  # type: ignore[arg-type]


def test_devices_are_configured_before_boot_and_hot_plugged_after() -> None:
    for kind in (K.INSERT_BLOCK_DEVICE, K.INSERT_NETWORK_DEVICE, K.INSERT_PMEM_DEVICE):
        assert RULES[kind] is Phase.ANY
    assert RULES[K.HOT_UNPLUG_DEVICE] is Phase.POST_BOOT


@pytest.mark.parametrize("pci_enabled", [False, True])
async def test_before_boot_put_configures_and_delete_is_refused(backend: FakeBackend, disk: str,
                                                                pci_enabled: bool) -> None:
    ctl = Controller(backend, pci_enabled=pci_enabled)
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, data_drive("d", disk)))
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, data_drive("d", disk, is_read_only=True)))  # replaced
    assert [d.is_read_only for d in ctl.config.drives] == [True]
    for kind, name in (("drive", "d"), ("net", "eth0"), ("pmem", "p0")):
        with pytest.raises(ControllerError) as err:
            await ctl.handle(unplug(kind, name))
        assert err.value.message == NOT_SUPPORTED_PRE_BOOT
    assert backend.calls == []


async def test_without_pci_hot_plug_and_unplug_are_refused(ctl: Controller, backend: FakeBackend,
                                                          kernel: str, disk: str) -> None:
    await boot_with_root(ctl, kernel, disk)
    before, calls = await ctl.handle(Action(K.GET_FULL_VM_CONFIG)), list(backend.calls)
    requests = [
        Action(K.INSERT_BLOCK_DEVICE, data_drive("block0", disk)),
        Action(K.INSERT_BLOCK_DEVICE, data_drive("rootfs", disk)),           # PCI comes before the ID
        Action(K.INSERT_NETWORK_DEVICE, NetworkInterfaceConfig(iface_id="eth1", host_dev_name="tap1")),
        unplug("drive", "block0"), unplug("net", "eth0"), unplug("pmem", "pmem0"),
    ]
    for action in requests:
        with pytest.raises(ControllerError) as err:
            await ctl.handle(action)
        assert err.value.message == "PCI is not enabled" and err.value.status == 400
    assert await ctl.handle(Action(K.GET_FULL_VM_CONFIG)) == before
    assert backend.calls == calls


@pytest.mark.parametrize("paused", [False, True])
async def test_hot_plugged_drive_reaches_the_vmm_and_the_config(pci: Controller, backend: FakeBackend,
                                                                kernel: str, disk: str, paused: bool) -> None:
    await boot_with_root(pci, kernel, disk)
    if paused:
        await pci.handle(Action(K.PAUSE))
    drive = data_drive("block0", disk, rate_limiter=RateLimiterConfig(ops=TokenBucketConfig(size=100, refill_time=100)))
    assert await pci.handle(Action(K.INSERT_BLOCK_DEVICE, drive)) is None
    assert backend.calls[-1] == ("hotplug_drive", (drive,))
    assert [d.drive_id for d in pci.config.drives] == ["rootfs", "block0"]
    shown = (await pci.handle(Action(K.GET_FULL_VM_CONFIG)))["drives"][1]
    assert shown["drive_id"] == "block0" and shown["rate_limiter"]["ops"] == {"size": 100, "refill_time": 100}
    # The hot-plugged drive is a drive like the others: PATCH reaches it.
    await pci.handle(Action(K.UPDATE_BLOCK_DEVICE, DriveUpdateConfig(drive_id="block0", path_on_host=disk)))
    assert backend.calls[-1] == ("update_drive", ("block0", disk, None))


async def test_hot_plugged_drive_is_checked_as_firecracker_does(pci: Controller, backend: FakeBackend,
                                                                kernel: str, disk: str) -> None:
    await boot_with_root(pci, kernel, disk)
    await pci.handle(Action(K.INSERT_BLOCK_DEVICE, data_drive("block0", disk)))
    before, calls = await pci.handle(Action(K.GET_FULL_VM_CONFIG)), list(backend.calls)
    refused = [
        (data_drive("block0", disk), "Device ID in use"),
        (DriveConfig(drive_id="rootfs", is_root_device=True, path_on_host=disk), "Device ID in use"),
        (DriveConfig(drive_id="block_root", is_root_device=True, path_on_host=disk),
         "Drive config error: A root block device already exists!"),
        (data_drive("block_bad", "/nonexistent"),
         "Drive config error: Unable to create the virtio block device: Virtio backend error: Error "
         "manipulating the backing file: No such file or directory (os error 2) /nonexistent"),
        (DriveConfig(drive_id="nopath", is_root_device=False),
         "Drive config error: Unable to create the virtio block device: `path_on_host` is required for a "
         "virtio-block drive."),
        (DriveConfig(drive_id="vu", is_root_device=False, socket="/nonexistent/vhost.sock"),
         "Drive config error: Unable to create the virtio block device: Vhost user backend error: "
         "Vhost-user error: Failed to connect to UDS Unix stream: No such file or directory (os error 2)"),
    ]
    for drive, message in refused:
        with pytest.raises(ControllerError) as err:
            await pci.handle(Action(K.INSERT_BLOCK_DEVICE, drive))
        assert err.value.message == message, drive
    assert await pci.handle(Action(K.GET_FULL_VM_CONFIG)) == before
    assert backend.calls == calls          # refused before the VMM was asked


@pytest.mark.parametrize("error,message", [
    (BackendError("Unable to create the block device block1: Permission denied"),
     "Drive config error: Unable to create the block device block1: Permission denied"),
    (PciError("PCI root error: Could not find an available device slot on the PCI bus."),
     "PCI manager error: PCI root error: Could not find an available device slot on the PCI bus."),
])
async def test_a_failed_drive_hot_plug_leaves_the_config(pci: Controller, backend: FakeBackend, kernel: str,
                                                         disk: str, error: BackendError, message: str) -> None:
    await boot_with_root(pci, kernel, disk)
    backend.fail["hotplug_drive"] = error
    with pytest.raises(ControllerError) as err:
        await pci.handle(Action(K.INSERT_BLOCK_DEVICE, data_drive("block1", disk)))
    assert err.value.message == message
    assert [d.drive_id for d in pci.config.drives] == ["rootfs"]
    del backend.fail["hotplug_drive"]
    await pci.handle(Action(K.INSERT_BLOCK_DEVICE, data_drive("block1", disk)))   # the ID is still free
    assert [d.drive_id for d in pci.config.drives] == ["rootfs", "block1"]


async def test_hot_plugged_network_interface(pci: Controller, backend: FakeBackend, kernel: str,
                                             disk: str) -> None:
    await boot_with_root(pci, kernel, disk)
    eth1 = NetworkInterfaceConfig(iface_id="eth1", host_dev_name="tap1", guest_mac="06:00:00:00:00:02")
    await pci.handle(Action(K.INSERT_NETWORK_DEVICE, eth1))
    assert backend.calls[-1] == ("hotplug_network_interface", (eth1,))
    shown = (await pci.handle(Action(K.GET_FULL_VM_CONFIG)))["network-interfaces"]
    assert [n["iface_id"] for n in shown] == ["eth0", "eth1"]
    calls = list(backend.calls)
    refused = [
        (NetworkInterfaceConfig(iface_id="eth1", host_dev_name="tap2", guest_mac="06:00:00:00:00:03"),
         "Device ID in use"),
        (NetworkInterfaceConfig(iface_id="eth2", host_dev_name="tap2", guest_mac="06:00:00:00:00:02"),
         "Network config error: The MAC address is already in use: 06:00:00:00:00:02"),
        (NetworkInterfaceConfig(iface_id="eth2", host_dev_name="tap2", guest_mac="06:00:00:00:00:01".upper()),
         "Network config error: The MAC address is already in use: 06:00:00:00:00:01"),
    ]
    for iface, message in refused:
        with pytest.raises(ControllerError) as err:
            await pci.handle(Action(K.INSERT_NETWORK_DEVICE, iface))
        assert err.value.message == message, iface
    assert backend.calls == calls
    # The tap is the VMM's to open: one another device holds, or one that cannot be made, fails there.
    backend.fail["hotplug_network_interface"] = BackendError(
        "Could not create the network device: Open tap device failed: Device or resource busy")
    with pytest.raises(ControllerError) as err:
        await pci.handle(Action(K.INSERT_NETWORK_DEVICE, NetworkInterfaceConfig(iface_id="eth2", host_dev_name="tap1")))
    assert err.value.message == ("Network config error: Could not create the network device: Open tap "
                                 "device failed: Device or resource busy")
    assert [n.iface_id for n in pci.config.network_interfaces] == ["eth0", "eth1"]


async def test_hot_unplug(pci: Controller, backend: FakeBackend, kernel: str, disk: str) -> None:
    await boot_with_root(pci, kernel, disk)
    await pci.handle(Action(K.INSERT_BLOCK_DEVICE, data_drive("block0", disk)))
    calls = list(backend.calls)
    for action, message in ((unplug("drive", "nonexistent"), "Device not found"),
                            (unplug("net", "block0"), "Device not found"),      # IDs are per kind
                            (unplug("pmem", "rootfs"), "Device not found"),
                            (unplug("drive", "rootfs"), "Cannot unplug root device")):
        with pytest.raises(ControllerError) as err:
            await pci.handle(action)
        assert err.value.message == message
    assert backend.calls == calls
    assert await pci.handle(unplug("drive", "block0")) is None
    assert backend.calls[-1] == ("unplug_device", ("drive", "block0"))
    assert [d["drive_id"] for d in (await pci.handle(Action(K.GET_FULL_VM_CONFIG)))["drives"]] == ["rootfs"]
    with pytest.raises(ControllerError, match="^Device not found$"):
        await pci.handle(unplug("drive", "block0"))
    # Unplugged, its ID is free again.
    await pci.handle(Action(K.INSERT_BLOCK_DEVICE, data_drive("block0", disk)))
    assert [d.drive_id for d in pci.config.drives] == ["rootfs", "block0"]


async def test_unplugging_the_mmds_interface_takes_it_out_of_mmds_config(pci: Controller, backend: FakeBackend,
                                                                         kernel: str, disk: str) -> None:
    await boot_with_root(pci, kernel, disk)
    await pci.handle(unplug("net", "eth0"))
    assert backend.calls[-1] == ("unplug_device", ("net", "eth0"))
    out = await pci.handle(Action(K.GET_FULL_VM_CONFIG))
    assert out["network-interfaces"] == [] and out["mmds-config"] is None
    decode(msgspec.json.encode(out), VmConfig)        # still a valid --config-file


async def test_a_failed_unplug_keeps_the_device(pci: Controller, backend: FakeBackend, kernel: str,
                                                disk: str) -> None:
    await boot_with_root(pci, kernel, disk)
    backend.fail["unplug_device"] = PciError("Bus error: the device is not on the bus")
    with pytest.raises(ControllerError) as err:
        await pci.handle(unplug("net", "eth0"))
    assert err.value.message == "PCI manager error: Bus error: the device is not on the bus"
    backend.fail["unplug_device"] = BackendError("Device not found")
    with pytest.raises(ControllerError) as err:
        await pci.handle(unplug("net", "eth0"))
    assert err.value.message == "Device not found"
    assert [n.iface_id for n in pci.config.network_interfaces] == ["eth0"]
    assert pci.config.mmds_config is not None


# -- memory hotplug (virtio-mem): Firecracker's phases, validation and messages ---------------

HP_PREFIX = "Memory hotplug config error: "


@pytest.mark.parametrize("cfg,message", [
    (MemoryHotplugConfig(total_size_mib=1024, block_size_mib=1), "Block size must not be lower than 2 MiB"),
    (MemoryHotplugConfig(total_size_mib=1024, block_size_mib=3), "Block size must be a power of 2"),
    (MemoryHotplugConfig(total_size_mib=1024, slot_size_mib=64), "Slot size must not be lower than 128 MiB"),
    (MemoryHotplugConfig(total_size_mib=1024, block_size_mib=4, slot_size_mib=130),
     "Slot size must be a multiple of block size (4 MiB)"),
    (MemoryHotplugConfig(total_size_mib=64), "Total size must not be lower than slot size (128 MiB)"),
    (MemoryHotplugConfig(total_size_mib=0), "Total size must not be lower than slot size (128 MiB)"),
    (MemoryHotplugConfig(total_size_mib=1000), "Total size must be a multiple of slot size (128 MiB)"),
])
async def test_memory_hotplug_config_is_validated_like_firecracker(ctl: Controller, cfg: Any, message: str) -> None:
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.SET_MEMORY_HOTPLUG_DEVICE, cfg))
    assert err.value.message == HP_PREFIX + message and err.value.status == 400
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["memory-hotplug"] is None


async def test_memory_hotplug_is_configured_before_boot_and_operated_after(
        ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    cfg = decode(b'{"total_size_mib": 1024}', MemoryHotplugConfig)       # Firecracker's defaults
    assert (cfg.block_size_mib, cfg.slot_size_mib) == (2, 128)
    await ctl.handle(Action(K.SET_MEMORY_HOTPLUG_DEVICE, cfg))
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["memory-hotplug"] == {
        "total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128}
    for kind, payload in [(K.GET_MEMORY_HOTPLUG_STATUS, None),
                          (K.UPDATE_MEMORY_HOTPLUG_SIZE, MemoryHotplugSizeUpdateConfig(requested_size_mib=2))]:
        with pytest.raises(ControllerError) as err:
            await ctl.handle(Action(kind, payload))
        assert err.value.message == NOT_SUPPORTED_PRE_BOOT
    await boot(ctl, kernel)
    assert backend.calls[-1][1][0].memory_hotplug == cfg                 # the VMM builds it
    status = await ctl.handle(Action(K.GET_MEMORY_HOTPLUG_STATUS))
    assert status["total_size_mib"] == 1024
    await ctl.handle(Action(K.UPDATE_MEMORY_HOTPLUG_SIZE, MemoryHotplugSizeUpdateConfig(requested_size_mib=512)))
    assert backend.calls[-1] == ("update_memory_hotplug_size", (512,))
    backend.fail["update_memory_hotplug_size"] = BackendError(
        "Failed to create memory hotplug device: Size 3145728 is invalid: it must be a multiple of block "
        "size and less than the total size")
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.UPDATE_MEMORY_HOTPLUG_SIZE, MemoryHotplugSizeUpdateConfig(requested_size_mib=3)))
    assert err.value.message == ("Memory hotplug update error: Failed to create memory hotplug device: Size "
                                 "3145728 is invalid: it must be a multiple of block size and less than the "
                                 "total size")
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.SET_MEMORY_HOTPLUG_DEVICE, cfg))
    assert err.value.message == NOT_SUPPORTED_POST_BOOT


async def test_memory_hotplug_operations_without_the_device(ctl: Controller, backend: FakeBackend,
                                                            kernel: str) -> None:
    await boot(ctl, kernel)
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.GET_MEMORY_HOTPLUG_STATUS))
    assert err.value.message == "Internal VMM error: Failed perform action on device: Device not found"
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.UPDATE_MEMORY_HOTPLUG_SIZE, MemoryHotplugSizeUpdateConfig(requested_size_mib=2)))
    assert err.value.message == "Memory hotplug update error: Failed perform action on device: Device not found"
    assert not any(name.startswith(("memory_hotplug", "update_memory")) for name, _ in backend.calls)


async def test_memory_hotplug_from_the_config_file(ctl: Controller, kernel: str) -> None:
    cfg = decode(('{"boot-source": {"kernel_image_path": "%s"}, "memory-hotplug": '
                  '{"total_size_mib": 2048, "slot_size_mib": 256, "block_size_mib": 4}}' % kernel).encode(), VmConfig)
    await ctl.configure(cfg)
    assert (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["memory-hotplug"] == {
        "total_size_mib": 2048, "block_size_mib": 4, "slot_size_mib": 256}
    bad = decode(('{"boot-source": {"kernel_image_path": "%s"}, "memory-hotplug": {"total_size_mib": 100}}'
                  % kernel).encode(), VmConfig)
    with pytest.raises(ControllerError) as err:
        await Controller(FakeBackend()).configure(bad)
    assert err.value.message == HP_PREFIX + "Total size must not be lower than slot size (128 MiB)"


# -- virtio-pmem (Firecracker's rules and messages, docs/pmem.md) ----------------------------

PMEM_ROOT_IS_BLOCK = ("Pmem config error: Attempt to add pmem as a root device while the root device "
                      "defined as a block device")


async def test_pmem_before_boot_keeps_order_and_one_root(ctl: Controller, backend: FakeBackend) -> None:
    # The file is opened at InstanceStart, as in Firecracker: a path that does not exist yet passes.
    await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="a", path_on_host="/not/yet")))
    await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="b", path_on_host="/b", root_device=True,
                                                             read_only=True)))
    await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="a", path_on_host="/a2")))   # replaced in place
    shown = (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["pmem"]
    assert shown == [{"id": "a", "path_on_host": "/a2", "root_device": False, "read_only": False},
                     {"id": "b", "path_on_host": "/b", "root_device": True, "read_only": True}]
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="c", path_on_host="/c", root_device=True)))
    assert err.value.message == "Pmem config error: A root pmem device already exist"
    with pytest.raises(ControllerError) as err:      # nor may "a" become a second root
        await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="a", path_on_host="/a", root_device=True)))
    assert err.value.message == "Pmem config error: A root pmem device already exist"
    # The root itself may be replaced, still as root.
    await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="b", path_on_host="/b2", root_device=True)))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(drive_id="rootfs", is_root_device=True,
                                                                   path_on_host="/dev/null")))
    assert err.value.message == ("Drive config error: Attempt to add block as a root device while the root "
                                 "device defined as a pmem device")
    assert [p.id for p in ctl.config.pmem] == ["a", "b"] and ctl.config.drives == []
    assert backend.calls == []


async def test_pmem_root_after_a_block_root_is_refused(ctl: Controller, disk: str) -> None:
    await ctl.handle(Action(K.INSERT_BLOCK_DEVICE, DriveConfig(drive_id="rootfs", is_root_device=True,
                                                               path_on_host=disk)))
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="p", path_on_host=disk, root_device=True)))
    assert err.value.message == PMEM_ROOT_IS_BLOCK
    await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="p", path_on_host=disk)))
    assert [p.id for p in ctl.config.pmem] == ["p"]


async def test_pmem_from_the_config_file(ctl: Controller, kernel: str) -> None:
    cfg = decode(('{"boot-source": {"kernel_image_path": "%s"}, "pmem": [{"id": "p0", "path_on_host": "/p",'
                  ' "root_device": true}, {"id": "p1", "path_on_host": "/q", "read_only": true}]}'
                  % kernel).encode(), VmConfig)
    await ctl.configure(cfg)
    assert [(p.id, p.root_device, p.read_only) for p in ctl.config.pmem] == [("p0", True, False),
                                                                             ("p1", False, True)]
    bad = decode(b'{"pmem": [{"id": "p-0", "path_on_host": "/p"}]}', VmConfig)
    with pytest.raises(ControllerError, match="API Resource IDs"):
        await Controller(FakeBackend()).configure(bad)


async def test_pmem_patch_changes_the_rate_limiter(ctl: Controller, backend: FakeBackend, kernel: str) -> None:
    await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="p0", path_on_host="/p")))
    with pytest.raises(ControllerError) as err:      # PATCH is for a running microVM
        await ctl.handle(Action(K.UPDATE_PMEM_DEVICE, PmemUpdateConfig(id="p0")))
    assert err.value.message == NOT_SUPPORTED_PRE_BOOT
    await boot(ctl, kernel)
    limiter = RateLimiterConfig(ops=TokenBucketConfig(size=10, refill_time=1000))
    assert await ctl.handle(Action(K.UPDATE_PMEM_DEVICE, PmemUpdateConfig(id="p0", rate_limiter=limiter))) is None
    assert backend.calls[-1] == ("update_pmem", ("p0", limiter))
    shown = (await ctl.handle(Action(K.GET_FULL_VM_CONFIG)))["pmem"][0]
    assert shown["rate_limiter"]["ops"] == {"size": 10, "refill_time": 1000}
    calls = list(backend.calls)
    # No rate limiter: nothing to do, whatever the ID (as Firecracker answers).
    assert await ctl.handle(Action(K.UPDATE_PMEM_DEVICE, PmemUpdateConfig(id="nope"))) is None
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.UPDATE_PMEM_DEVICE, PmemUpdateConfig(id="nope", rate_limiter=limiter)))
    assert err.value.message == ("Pmem config error: Unable to patch the pmem device: Failed perform action "
                                 "on device: Device not found Please verify the request arguments.")
    assert backend.calls == calls


async def test_pmem_after_boot_without_pci_is_refused(ctl: Controller, backend: FakeBackend,
                                                      kernel: str) -> None:
    await boot(ctl, kernel)
    calls = list(backend.calls)
    with pytest.raises(ControllerError) as err:
        await ctl.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="p0", path_on_host="/p")))
    assert err.value.message == "PCI is not enabled"
    assert backend.calls == calls and ctl.config.pmem == []


async def test_hot_plugged_pmem(pci: Controller, backend: FakeBackend, kernel: str, disk: str) -> None:
    await pci.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="root", path_on_host=disk, root_device=True)))
    await boot(pci, kernel)
    pmem = PmemConfig(id="p1", path_on_host=disk, read_only=True)
    assert await pci.handle(Action(K.INSERT_PMEM_DEVICE, pmem)) is None
    assert backend.calls[-1] == ("hotplug_pmem", (pmem,))
    assert [p["id"] for p in (await pci.handle(Action(K.GET_FULL_VM_CONFIG)))["pmem"]] == ["root", "p1"]
    calls = list(backend.calls)
    for cfg, message in ((PmemConfig(id="p1", path_on_host=disk), "Device ID in use"),
                         (PmemConfig(id="p2", path_on_host=disk, root_device=True), PMEM_ROOT_IS_BLOCK)):
        with pytest.raises(ControllerError) as err:
            await pci.handle(Action(K.INSERT_PMEM_DEVICE, cfg))
        assert err.value.message == message
    assert backend.calls == calls
    backend.fail["hotplug_pmem"] = BackendError("Unable to create the virtio-pmem device: Error backing "
                                                "file size is 0")
    with pytest.raises(ControllerError) as err:
        await pci.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="p3", path_on_host=disk)))
    assert err.value.message == ("Pmem config error: Unable to create the virtio-pmem device: Error backing "
                                 "file size is 0")
    del backend.fail["hotplug_pmem"]
    # Unplug: the root one stays, the hot-plugged one goes, and its ID is free again.
    with pytest.raises(ControllerError, match="^Cannot unplug root device$"):
        await pci.handle(unplug("pmem", "root"))
    with pytest.raises(ControllerError, match="^Device not found$"):
        await pci.handle(unplug("drive", "p1"))
    assert await pci.handle(unplug("pmem", "p1")) is None
    assert backend.calls[-1] == ("unplug_device", ("pmem", "p1"))
    assert [p.id for p in pci.config.pmem] == ["root"]
    await pci.handle(Action(K.INSERT_PMEM_DEVICE, PmemConfig(id="p1", path_on_host=disk)))
