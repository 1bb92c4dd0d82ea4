"""The controller: Firecracker's actions with their phase rules, over a VMM backend.

Contract.  The HTTP layer (and ``--config-file``) hands the controller an
:class:`Action`; the controller checks the phase rule of that action kind
(pre-boot only, post-boot only, any time), applies pre-boot configuration to
the :class:`~asyncvmm.config.VmConfig` it owns, and delegates everything that
needs a VM to a :class:`VmmBackend`.  It returns ``None`` (204) or JSON-ready
data (200), or raises :class:`ControllerError` carrying Firecracker's exact
``fault_message`` and status (400, or 413 for the MMDS limit).  Requests are
handled one at a time, like Firecracker's single VMM thread.

The VM lifecycle is the table :data:`TRANSITIONS` (Not started -> Running
<-> Paused).  A failed InstanceStart leaves the VM configurable.

PCI hot-plug (docs/api.md): with ``--enable-pci`` (``pci_enabled``), a
``PUT /drives/{id}``, ``PUT /network-interfaces/{id}`` or ``PUT /pmem/{id}`` after
boot plugs a new device into the running microVM and ``DELETE`` on them unplugs one; the
controller checks Firecracker's rules in Firecracker's order (PCI enabled, ID
free or device present, not the root device, then the pre-boot validation of
the body) before the backend is asked, and keeps its configuration (``GET
/vm/config``) in step with the devices the microVM has.

Nothing is accepted and then ignored: an action of a feature asyncvmm does
not build (:data:`NOT_BUILT`) is refused in every phase, after its body's
own validation, with a message naming the feature; a built resource whose
body asks for more than is built (a serial rate limiter ...) is
refused by :func:`asyncvmm.config.unbuilt.refuse_unbuilt`.  Each action kind
has exactly one entry: a handler in :meth:`Controller._handler_table` or a
feature name in :data:`NOT_BUILT`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal, Protocol

import msgspec

from asyncvmm import FIRECRACKER_API_VERSION
from asyncvmm.config import (
    ConfigError,
    DriveConfig,
    LoggerConfig,
    MachineConfigUpdate,
    NetworkInterfaceConfig,
    PmemConfig,
    RateLimiterConfig,
    SnapshotCreateConfig,
    SnapshotLoadConfig,
    VmConfig,
    check_id,
    to_builtins,
)
from asyncvmm.config import resources, unbuilt
from asyncvmm.config.common import Base
from asyncvmm.config.devices import VHOST_RATE_LIMITER
from asyncvmm.metrics import MetricGroup
from asyncvmm.mmds.store import DataStoreLimitExceededError, MmdsStore, MmdsStoreError

log = logging.getLogger(__name__)
_replace = msgspec.structs.replace

NOT_SUPPORTED_POST_BOOT = "The requested operation is not supported after starting the microVM."
NOT_SUPPORTED_PRE_BOOT = "The requested operation is not supported before starting the microVM."
MISSING_KERNEL = "Start microvm error: Cannot start microvm without kernel configuration."
NO_BALLOON = "Balloon config error: No balloon device found."
LOAD_NOT_ALLOWED = (
    "Load snapshot error: Loading a microVM snapshot not allowed after configuring "
    "boot-specific resources."
)
CREATE_WHILE_RUNNING = (
    "Create snapshot error: Cannot create a snapshot of a running microVM; pause it first."
)
VHOST_SNAPSHOT = (
    "Create snapshot error: A microVM with a vhost-net interface cannot be snapshotted: the host "
    "kernel writes guest memory and holds queue state the snapshot cannot see. vhost interfaces: "
)
VHOST_USER_SNAPSHOT = (
    "Create snapshot error: Snapshotting of vhost-user-blk devices is not supported. vhost-user drives: "
)
DIFF_WITHOUT_TRACKING = "Diff snapshots are not allowed on uVMs with dirty page tracking disabled."
# Firecracker's answer when a post-boot operation names a device the microVM does not have.
DEVICE_NOT_FOUND = "Failed perform action on device: Device not found"
# PCI hot-plug and hot-unplug (Firecracker's VmmActionError, which adds no category to these).
PCI_NOT_ENABLED = "PCI is not enabled"
DEVICE_ID_IN_USE = "Device ID in use"
HOTPLUG_DEVICE_NOT_FOUND = "Device not found"
CANNOT_UNPLUG_ROOT = "Cannot unplug root device"
PCI_MANAGER_ERROR = "PCI manager error: "

# The kinds of device ``DELETE`` can unplug: ``/drives``, ``/network-interfaces``, ``/pmem``.
DeviceKind = Literal["drive", "net", "pmem"]


class BackendError(Exception):
    """A host-side failure in the VMM; the message reaches the API client."""


class StartError(BackendError):
    """Building or booting the microVM failed."""


class PciError(BackendError):
    """The PCI bus cannot take or give back a device (no free slot, no BAR space ...).

    The client sees ``PCI manager error: <message>``, whatever the call; Firecracker's
    message for a full bus is ``PCI root error: Could not find an available device slot
    on the PCI bus.``
    """


class ControllerError(Exception):
    """A request failed; ``message`` is the ``fault_message``, ``status`` the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclasses.dataclass(frozen=True)
class StartRequest:
    """When InstanceStart was asked for: the boot timer measures from here."""

    monotonic_ns: int
    cpu_ns: int

    @classmethod
    def now(cls) -> "StartRequest":
        return cls(time.monotonic_ns(), time.process_time_ns())


class VmmBackend(Protocol):
    """What the controller needs from the VMM (implemented by :class:`asyncvmm.vmm.Vmm`).

    Every method raises :class:`BackendError` (``start`` raises :class:`StartError`)
    with a message for the API client; the controller adds Firecracker's category prefix.
    """

    async def start(self, config: VmConfig, requested_at: StartRequest) -> None: ...
    async def load_snapshot(self, params: SnapshotLoadConfig) -> VmConfig: ...
    #: Whether the microVM built (or loaded) has a PCI bus: a snapshot decides that itself.
    pci_enabled: bool
    async def create_snapshot(self, params: SnapshotCreateConfig, config: VmConfig) -> None: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def send_ctrl_alt_del(self) -> None: ...
    async def update_drive(
        self, drive_id: str, path_on_host: str | None, rate_limiter: RateLimiterConfig | None
    ) -> None: ...
    async def update_network_interface(
        self, iface_id: str, rx: RateLimiterConfig | None, tx: RateLimiterConfig | None
    ) -> None: ...
    async def update_balloon(self, amount_mib: int) -> None: ...
    async def balloon_stats(self) -> dict[str, Any]: ...
    async def update_balloon_stats(self, interval_s: int) -> None: ...
    async def start_balloon_hinting(self, acknowledge_on_stop: bool) -> None: ...
    async def balloon_hinting_status(self) -> dict[str, Any]: ...
    async def stop_balloon_hinting(self) -> None: ...

    async def hotplug_drive(self, drive: DriveConfig) -> None:
        """Plug a new virtio-block device into the running (or paused) microVM's PCI bus.

        Called only with ``--enable-pci``, after boot, for a drive the controller has checked
        (its ID is free, it is not a root device, its file opens).  The guest finds the device
        when it rescans the bus.  A failure leaves the microVM as it was: :class:`PciError`
        for the bus, :class:`BackendError` for the device (the client sees
        ``Drive config error: <message>``).
        """
        ...

    async def hotplug_network_interface(self, iface: NetworkInterfaceConfig) -> None:
        """Plug a new virtio-net device on the tap ``iface.host_dev_name`` into the PCI bus.

        As :meth:`hotplug_drive` (the ID and the guest MAC are free); a tap that cannot be
        opened is a :class:`BackendError` the client sees as ``Network config error:
        <message>`` (Firecracker's says ``Could not create the network device: Open tap
        device failed: ...``).
        """
        ...

    async def hotplug_pmem(self, pmem: PmemConfig) -> None:
        """Plug a new virtio-pmem device (its file mapped into guest-physical memory).

        As :meth:`hotplug_drive` (the ID is free, it is not a root device); a file that
        cannot be mapped is a :class:`BackendError` the client sees as ``Pmem config error:
        <message>`` (``Unable to create the virtio-pmem device: ...``).
        """
        ...

    async def update_pmem(self, pmem_id: str, rate_limiter: RateLimiterConfig) -> None:
        """New flush rate limiter buckets for the pmem device ``pmem_id`` (absent ones stay)."""
        ...

    async def memory_hotplug_status(self) -> dict[str, Any]:
        """GET /hotplug/memory: the virtio-mem device's sizes (MiB), for a microVM that has one."""
        ...

    async def update_memory_hotplug_size(self, requested_size_mib: int) -> None:
        """PATCH /hotplug/memory: a new target for the driver; :class:`BackendError` reads
        ``Failed to create memory hotplug device: <VirtioMemError>`` as Firecracker's does."""
        ...

    async def unplug_device(self, kind: DeviceKind, device_id: str) -> None:
        """Take the device ``device_id`` of ``kind`` off the PCI bus and release what it holds.

        Called only with ``--enable-pci``, after boot, for a device the microVM has and that is
        not its root device; the guest is expected to have removed it first.  :class:`PciError`
        reads ``PCI manager error: <message>``; any other :class:`BackendError` reaches the
        client as its bare message.
        """
        ...


class MetricsSink(Protocol):
    """The metrics writer as the controller sees it (see :mod:`asyncvmm.metrics_writer`)."""

    def init(self, path: str) -> None: ...
    def flush(self) -> None: ...
    def start_periodic(self) -> None: ...


@dataclasses.dataclass
class LatenciesMetrics(MetricGroup):
    """Firecracker's ``latencies_us``: how long the last lifecycle operations took (stores)."""

    STORE_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "full_create_snapshot", "diff_create_snapshot", "load_snapshot", "pause_vm", "resume_vm",
        "vmm_full_create_snapshot", "vmm_diff_create_snapshot", "vmm_load_snapshot",
        "vmm_pause_vm", "vmm_resume_vm",
    })
    full_create_snapshot: int = 0
    diff_create_snapshot: int = 0
    load_snapshot: int = 0
    pause_vm: int = 0
    resume_vm: int = 0
    vmm_full_create_snapshot: int = 0
    vmm_diff_create_snapshot: int = 0
    vmm_load_snapshot: int = 0
    vmm_pause_vm: int = 0
    vmm_resume_vm: int = 0


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class VmState(enum.Enum):
    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"


class Event(enum.Enum):
    START = "start"
    LOAD = "load"
    LOAD_AND_RESUME = "load and resume"
    PAUSE = "pause"
    RESUME = "resume"


# The VM lifecycle.  Pausing a paused VM and resuming a running one are no-ops.
TRANSITIONS: dict[tuple[VmState, Event], VmState] = {
    (VmState.NOT_STARTED, Event.START): VmState.RUNNING,
    (VmState.NOT_STARTED, Event.LOAD): VmState.PAUSED,
    (VmState.NOT_STARTED, Event.LOAD_AND_RESUME): VmState.RUNNING,
    (VmState.RUNNING, Event.PAUSE): VmState.PAUSED,
    (VmState.PAUSED, Event.PAUSE): VmState.PAUSED,
    (VmState.PAUSED, Event.RESUME): VmState.RUNNING,
    (VmState.RUNNING, Event.RESUME): VmState.RUNNING,
}


class Phase(enum.Enum):
    PRE_BOOT = "pre-boot"
    POST_BOOT = "post-boot"
    ANY = "any"


PRE, POST, ANY = Phase.PRE_BOOT, Phase.POST_BOOT, Phase.ANY


class ActionKind(enum.Enum):
    """Firecracker's ``VmmAction``s, one per thing a client can ask for."""

    GET_INSTANCE_INFO = enum.auto()
    GET_VMM_VERSION = enum.auto()
    GET_MACHINE_CONFIG = enum.auto()
    GET_FULL_VM_CONFIG = enum.auto()
    GET_MMDS = enum.auto()
    PUT_MMDS = enum.auto()
    PATCH_MMDS = enum.auto()
    GET_BALLOON_CONFIG = enum.auto()
    CONFIGURE_BOOT_SOURCE = enum.auto()
    CONFIGURE_LOGGER = enum.auto()
    CONFIGURE_METRICS = enum.auto()
    CONFIGURE_SERIAL = enum.auto()
    PUT_CPU_CONFIGURATION = enum.auto()
    INSERT_BLOCK_DEVICE = enum.auto()
    INSERT_NETWORK_DEVICE = enum.auto()
    INSERT_PMEM_DEVICE = enum.auto()
    SET_BALLOON_DEVICE = enum.auto()
    SET_VSOCK_DEVICE = enum.auto()
    SET_ENTROPY_DEVICE = enum.auto()
    SET_MMDS_CONFIGURATION = enum.auto()
    SET_MEMORY_HOTPLUG_DEVICE = enum.auto()
    UPDATE_MACHINE_CONFIGURATION = enum.auto()
    START_MICRO_VM = enum.auto()
    LOAD_SNAPSHOT = enum.auto()
    CREATE_SNAPSHOT = enum.auto()
    FLUSH_METRICS = enum.auto()
    PAUSE = enum.auto()
    RESUME = enum.auto()
    SEND_CTRL_ALT_DEL = enum.auto()
    GET_BALLOON_STATS = enum.auto()
    UPDATE_BALLOON = enum.auto()
    UPDATE_BALLOON_STATISTICS = enum.auto()
    START_FREE_PAGE_HINTING = enum.auto()
    GET_FREE_PAGE_HINTING_STATUS = enum.auto()
    STOP_FREE_PAGE_HINTING = enum.auto()
    UPDATE_BLOCK_DEVICE = enum.auto()
    UPDATE_NETWORK_INTERFACE = enum.auto()
    UPDATE_PMEM_DEVICE = enum.auto()
    GET_MEMORY_HOTPLUG_STATUS = enum.auto()
    UPDATE_MEMORY_HOTPLUG_SIZE = enum.auto()
    HOT_UNPLUG_DEVICE = enum.auto()


@dataclasses.dataclass(frozen=True)
class VirtioDeviceId:
    """The payload of :attr:`ActionKind.HOT_UNPLUG_DEVICE`: which device to unplug."""

    kind: DeviceKind
    device_id: str


# Phase rule of every action (API-BEHAVIOUR.md "Phases"), built or not: the contract a
# feature meets once it is built.
RULES: dict[ActionKind, Phase] = {
    ActionKind.GET_INSTANCE_INFO: ANY,
    ActionKind.GET_VMM_VERSION: ANY,
    ActionKind.GET_MACHINE_CONFIG: ANY,
    ActionKind.GET_FULL_VM_CONFIG: ANY,
    ActionKind.GET_MMDS: ANY,
    ActionKind.PUT_MMDS: ANY,
    ActionKind.PATCH_MMDS: ANY,
    ActionKind.GET_BALLOON_CONFIG: ANY,
    ActionKind.CONFIGURE_BOOT_SOURCE: PRE,
    ActionKind.CONFIGURE_LOGGER: PRE,
    ActionKind.CONFIGURE_METRICS: PRE,
    ActionKind.CONFIGURE_SERIAL: PRE,
    ActionKind.PUT_CPU_CONFIGURATION: PRE,
    # Devices are configured before boot and hot-plugged after it (PCI only).
    ActionKind.INSERT_BLOCK_DEVICE: ANY,
    ActionKind.INSERT_NETWORK_DEVICE: ANY,
    ActionKind.INSERT_PMEM_DEVICE: ANY,
    ActionKind.SET_BALLOON_DEVICE: PRE,
    ActionKind.SET_VSOCK_DEVICE: PRE,
    ActionKind.SET_ENTROPY_DEVICE: PRE,
    ActionKind.SET_MMDS_CONFIGURATION: PRE,
    ActionKind.SET_MEMORY_HOTPLUG_DEVICE: PRE,
    ActionKind.UPDATE_MACHINE_CONFIGURATION: PRE,
    ActionKind.START_MICRO_VM: PRE,
    ActionKind.LOAD_SNAPSHOT: PRE,
    ActionKind.CREATE_SNAPSHOT: POST,
    ActionKind.FLUSH_METRICS: POST,
    ActionKind.PAUSE: POST,
    ActionKind.RESUME: POST,
    ActionKind.SEND_CTRL_ALT_DEL: POST,
    ActionKind.GET_BALLOON_STATS: POST,
    ActionKind.UPDATE_BALLOON: POST,
    ActionKind.UPDATE_BALLOON_STATISTICS: POST,
    ActionKind.START_FREE_PAGE_HINTING: POST,
    ActionKind.GET_FREE_PAGE_HINTING_STATUS: POST,
    ActionKind.STOP_FREE_PAGE_HINTING: POST,
    ActionKind.UPDATE_BLOCK_DEVICE: POST,
    ActionKind.UPDATE_NETWORK_INTERFACE: POST,
    ActionKind.UPDATE_PMEM_DEVICE: POST,
    ActionKind.GET_MEMORY_HOTPLUG_STATUS: POST,
    ActionKind.UPDATE_MEMORY_HOTPLUG_SIZE: POST,
    ActionKind.HOT_UNPLUG_DEVICE: POST,
}

# The actions of features asyncvmm does not build yet, in every phase: the feature each names.
NOT_BUILT: dict[ActionKind, str] = {
}

# Actions that configure a boot-specific resource: after one of them succeeded, a snapshot
# may no longer be loaded into this process (logger and metrics are fine).
BOOT_SPECIFIC: frozenset[ActionKind] = frozenset({
    ActionKind.CONFIGURE_BOOT_SOURCE,
    ActionKind.CONFIGURE_SERIAL,
    ActionKind.PUT_CPU_CONFIGURATION,
    ActionKind.INSERT_BLOCK_DEVICE,
    ActionKind.INSERT_NETWORK_DEVICE,
    ActionKind.INSERT_PMEM_DEVICE,
    ActionKind.SET_BALLOON_DEVICE,
    ActionKind.SET_VSOCK_DEVICE,
    ActionKind.SET_ENTROPY_DEVICE,
    ActionKind.SET_MMDS_CONFIGURATION,
    ActionKind.SET_MEMORY_HOTPLUG_DEVICE,
    ActionKind.UPDATE_MACHINE_CONFIGURATION,
})


@dataclasses.dataclass(frozen=True)
class Action:
    """One request for the controller; ``payload`` is the decoded body (a Config or JSON)."""

    kind: ActionKind
    payload: Any = None


def _check_vhost(iface: NetworkInterfaceConfig) -> None:
    """A vhost-net interface needs /dev/vhost-net to open (asyncvmm extension, docs/network.md)."""
    if not iface.vhost:
        return
    from asyncvmm.devices.vhost.fd import VhostError, check_vhost_net
    try:
        check_vhost_net()
    except VhostError as err:
        raise ConfigError(f"Network config error: vhost-net is not available for {iface.iface_id}: "
                          f"{err.strerror}") from None


def os_error_text(err: OSError) -> str:
    """An OS error the way Rust's ``io::Error`` prints it, which Firecracker clients see."""
    if err.errno is None:
        return str(err)
    return f"{os.strerror(err.errno)} (os error {err.errno})"


def _check_openable(path: str, writable: bool) -> None:
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    os.close(fd)


class Controller:
    """Owns the pre-boot :class:`VmConfig`, the VM state and the MMDS store."""

    def __init__(
        self,
        backend: VmmBackend,
        *,
        instance_id: str = "anonymous-instance",
        mmds: MmdsStore | None = None,
        metrics: MetricsSink | None = None,
        configure_logger: Callable[[LoggerConfig], None] | None = None,
        latencies: LatenciesMetrics | None = None,
        clock_us: Callable[[], int] = _monotonic_us,
        pci_enabled: bool = False,
    ) -> None:
        self.backend = backend
        self.pci_enabled = pci_enabled    # --enable-pci: devices may be hot-plugged after boot
        self.latencies = latencies if latencies is not None else LatenciesMetrics()
        self.clock_us = clock_us
        self.instance_id = instance_id
        self.mmds = mmds if mmds is not None else MmdsStore()
        self.metrics = metrics
        self.configure_logger = configure_logger
        self.config = VmConfig()
        self.state = VmState.NOT_STARTED
        self._boot_path = False        # a boot-specific resource was configured
        self._lock = asyncio.Lock()
        self._handlers = self._handler_table()

    def _handler_table(self) -> dict[ActionKind, Callable[[Any], Awaitable[Any]]]:
        """The handler of every built action; the others are in :data:`NOT_BUILT`."""
        K = ActionKind
        return {
            K.GET_INSTANCE_INFO: self._get_instance_info,
            K.GET_VMM_VERSION: self._get_vmm_version,
            K.GET_MACHINE_CONFIG: self._get_machine_config,
            K.GET_FULL_VM_CONFIG: self._get_full_vm_config,
            K.GET_MMDS: self._get_mmds,
            K.PUT_MMDS: self._put_mmds,
            K.PATCH_MMDS: self._patch_mmds,
            K.GET_BALLOON_CONFIG: self._get_balloon_config,
            K.CONFIGURE_BOOT_SOURCE: self._configure_boot_source,
            K.CONFIGURE_LOGGER: self._configure_logger,
            K.CONFIGURE_METRICS: self._configure_metrics,
            K.CONFIGURE_SERIAL: self._configure_serial,
            K.PUT_CPU_CONFIGURATION: self._put_cpu_configuration,
            K.INSERT_BLOCK_DEVICE: self._insert_block_device,
            K.INSERT_NETWORK_DEVICE: self._insert_network_device,
            K.INSERT_PMEM_DEVICE: self._insert_pmem_device,
            K.SET_BALLOON_DEVICE: self._set_balloon_device,
            K.SET_VSOCK_DEVICE: self._set_vsock_device,
            K.SET_ENTROPY_DEVICE: self._set_entropy_device,
            K.SET_MMDS_CONFIGURATION: self._set_mmds_configuration,
            K.SET_MEMORY_HOTPLUG_DEVICE: self._set_memory_hotplug_device,
            K.GET_MEMORY_HOTPLUG_STATUS: self._get_memory_hotplug_status,
            K.UPDATE_MEMORY_HOTPLUG_SIZE: self._update_memory_hotplug_size,
            K.UPDATE_MACHINE_CONFIGURATION: self._update_machine_configuration,
            K.START_MICRO_VM: self._start_micro_vm,
            K.LOAD_SNAPSHOT: self._load_snapshot,
            K.CREATE_SNAPSHOT: self._create_snapshot,
            K.FLUSH_METRICS: self._flush_metrics,
            K.PAUSE: self._pause,
            K.RESUME: self._resume,
            K.SEND_CTRL_ALT_DEL: self._send_ctrl_alt_del,
            K.UPDATE_BLOCK_DEVICE: self._update_block_device,
            K.UPDATE_NETWORK_INTERFACE: self._update_network_interface,
            K.UPDATE_PMEM_DEVICE: self._update_pmem_device,
            K.GET_BALLOON_STATS: self._get_balloon_stats,
            K.UPDATE_BALLOON: self._update_balloon,
            K.UPDATE_BALLOON_STATISTICS: self._update_balloon_statistics,
            K.START_FREE_PAGE_HINTING: self._start_free_page_hinting,
            K.GET_FREE_PAGE_HINTING_STATUS: self._get_free_page_hinting_status,
            K.STOP_FREE_PAGE_HINTING: self._stop_free_page_hinting,
            K.HOT_UNPLUG_DEVICE: self._hot_unplug_device,
        }

    async def handle(self, action: Action) -> Any:
        """Run one action; ``None`` means 204, anything else is the 200 JSON body."""
        async with self._lock:
            try:
                feature = NOT_BUILT.get(action.kind)
                if feature is not None:
                    _refuse_not_built(feature, action.payload)
                self._check_phase(RULES[action.kind])
                result = await self._handlers[action.kind](action.payload)
                if action.kind in BOOT_SPECIFIC:
                    self._boot_path = True
                return result
            except ConfigError as err:
                raise ControllerError(err.message) from None

    def _check_phase(self, phase: Phase) -> None:
        started = self.state is not VmState.NOT_STARTED
        if phase is PRE and started:
            raise ControllerError(NOT_SUPPORTED_POST_BOOT)
        if phase is POST and not started:
            raise ControllerError(NOT_SUPPORTED_PRE_BOOT)

    def _transition(self, event: Event) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:  # the phase rules make this unreachable; keep the table honest
            raise ControllerError(f"Cannot {event.value} a microVM that is {self.state.value}.")
        log.info("microVM state %s -> %s", self.state.value, new.value)
        self.state = new

    async def _backend_call(self, prefix: str, call: Awaitable[Any], *timed: str) -> Any:
        """Await a backend call, prefixing its error; store its duration in the ``timed`` latencies."""
        start = self.clock_us()
        try:
            result = await call
        except PciError as err:
            raise ControllerError(PCI_MANAGER_ERROR + str(err)) from None
        except BackendError as err:
            raise ControllerError(prefix + str(err)) from None
        elapsed = self.clock_us() - start
        for name in timed:
            setattr(self.latencies, name, elapsed)
        return result

    # -- any time ---------------------------------------------------------------

    async def _get_instance_info(self, _: None) -> dict[str, str]:
        return {
            "app_name": "Firecracker",
            "id": self.instance_id,
            "state": self.state.value,
            "vmm_version": FIRECRACKER_API_VERSION,
        }

    async def _get_vmm_version(self, _: None) -> dict[str, str]:
        return {"firecracker_version": FIRECRACKER_API_VERSION}

    async def _get_machine_config(self, _: None) -> Any:
        return to_builtins(self.config.machine_config)

    async def _get_full_vm_config(self, _: None) -> Any:
        out = to_builtins(self.config, keep_top_level_nulls=True)
        out["cpu-config"] = None  # Firecracker never shows a custom template here
        if out.get("serial") is None:  # not part of FullVmConfiguration
            out.pop("serial", None)
        return out

    async def _get_mmds(self, _: None) -> Any:
        doc = self.mmds.get()
        return {} if doc is None else doc  # a stored JSON null reads as {}, as in Firecracker

    async def _put_mmds(self, data: Any) -> None:
        self._mmds_call(self.mmds.put, data)

    async def _patch_mmds(self, data: Any) -> None:
        self._mmds_call(self.mmds.patch, data)

    @staticmethod
    def _mmds_call(op: Callable[[Any], None], data: Any) -> None:
        try:
            op(data)
        except DataStoreLimitExceededError as err:
            raise ControllerError(f"MMDS limit exceeded error: {err}", status=413) from None
        except MmdsStoreError as err:
            raise ControllerError(f"MMDS error: {err}") from None

    async def _get_balloon_config(self, _: None) -> Any:
        if self.config.balloon is None:
            if self.state is VmState.NOT_STARTED:
                raise ControllerError(NO_BALLOON)
            raise ControllerError("Internal VMM error: " + DEVICE_NOT_FOUND)
        return to_builtins(self.config.balloon)

    # -- pre-boot configuration ------------------------------------------------

    async def _configure_boot_source(self, boot: Any) -> None:
        boot.validate()
        try:
            _check_openable(boot.kernel_image_path, writable=False)
        except OSError as err:
            raise ConfigError(f"Boot source error: The kernel file cannot be opened: {os_error_text(err)}") from None
        if boot.initrd_path is not None:
            try:
                _check_openable(boot.initrd_path, writable=False)
            except OSError as err:
                raise ConfigError(
                    "Boot source error: The initrd file cannot be opened due to invalid path or "
                    f"invalid permissions. {os_error_text(err)}"
                ) from None
        self.config = _replace(self.config, boot_source=boot)

    async def _configure_logger(self, logger: LoggerConfig) -> None:
        if self.configure_logger is not None:
            try:
                self.configure_logger(logger)
            except OSError as err:
                raise ConfigError(f"Logger error: Failed to open target file: {os_error_text(err)}") from None
        self.config = _replace(self.config, logger=logger)

    async def _configure_metrics(self, metrics: Any) -> None:
        if self.metrics is not None:
            try:
                self.metrics.init(metrics.metrics_path)
            except OSError as err:
                raise ConfigError(f"Metrics error: {os_error_text(err)}") from None
            except RuntimeError as err:
                raise ConfigError(f"Metrics error: {err}") from None
        self.config = _replace(self.config, metrics=metrics)

    async def _configure_serial(self, serial: Any) -> None:
        unbuilt.refuse_unbuilt(serial)
        self.config = _replace(self.config, serial=serial)

    async def _put_cpu_configuration(self, cpu: Any) -> None:
        if isinstance(cpu, str):        # --config-file may name a template file instead
            cpu = _read_cpu_template(cpu)
        # Firecracker keeps one CPU template, static or custom: the last configured wins.
        machine = _replace(self.config.machine_config, cpu_template=None)
        self.config = _replace(self.config, cpu_config=cpu, machine_config=machine)

    async def _insert_block_device(self, drive: Any) -> None:
        if self.state is not VmState.NOT_STARTED:
            return await self._hotplug_drive(drive)
        new = resources.insert_drive(self.config, drive)
        self._check_drive(drive)
        self.config = new

    @staticmethod
    def _check_drive(drive: DriveConfig) -> None:
        """What Firecracker checks when it creates a block device: features built, file opens."""
        unbuilt.refuse_unbuilt(drive)
        if drive.path_on_host is not None:
            try:
                _check_openable(drive.path_on_host, writable=not drive.is_read_only)
            except OSError as err:
                raise ConfigError(
                    "Drive config error: Unable to create the virtio block device: Virtio backend "
                    f"error: Error manipulating the backing file: {os_error_text(err)} {drive.path_on_host}"
                ) from None
        if drive.socket is not None:
            # Firecracker connects here and agrees the features with the back end; so do we (and
            # hang up: InstanceStart connects again), so a path with no back end is refused now.
            from asyncvmm.devices.virtio.block.vhost_user import VhostUserBlock, VhostUserBlockError
            try:
                VhostUserBlock(drive.drive_id, drive.socket, cache_type=drive.cache_type).close()
            except VhostUserBlockError as err:
                raise ConfigError("Drive config error: Unable to create the virtio block device: "
                                  f"Vhost user backend error: {err}") from None
        if drive.io_engine == "Async":
            # Firecracker refuses an Async drive here, at PUT /drives, on a host without io_uring.
            from asyncvmm.devices.virtio.block import UnsupportedEngineError, check_async_engine
            try:
                check_async_engine()
            except UnsupportedEngineError as err:
                raise ConfigError(f"Drive config error: Unable to create the virtio block device: {err}") from None

    async def _insert_network_device(self, iface: Any) -> None:
        if self.state is not VmState.NOT_STARTED:
            return await self._hotplug_network_interface(iface)
        new = resources.insert_network_interface(self.config, iface)
        _check_vhost(iface)
        self.config = new

    async def _insert_pmem_device(self, pmem: PmemConfig) -> None:
        # As in Firecracker, the file is opened and mapped at InstanceStart, not here.
        if self.state is not VmState.NOT_STARTED:
            return await self._hotplug_pmem(pmem)
        self.config = resources.insert_pmem(self.config, pmem)

    async def _set_balloon_device(self, balloon: Any) -> None:
        self.config = resources.set_balloon(self.config, balloon)

    async def _set_vsock_device(self, vsock: Any) -> None:
        vsock.validate()
        # Firecracker binds uds_path here; a path it could not bind is refused now, not at boot.
        from asyncvmm.devices.virtio.vsock.muxer import check_uds_path
        try:
            check_uds_path(vsock.uds_path)
        except OSError as err:
            raise ControllerError("Vsock config error: Cannot create backend for vsock device: Error "
                                  f"binding to the host-side Unix socket: {os_error_text(err)}") from None
        self.config = _replace(self.config, vsock=vsock)

    async def _set_entropy_device(self, entropy: Any) -> None:
        self.config = _replace(self.config, entropy=entropy)

    async def _set_mmds_configuration(self, mmds: Any) -> None:
        self.config = resources.set_mmds_config(self.config, mmds)

    async def _update_machine_configuration(self, update: Any) -> None:
        # PUT brings a whole MachineConfig, PATCH the fields to change.
        current = self.config.machine_config
        machine = update.apply(current) if isinstance(update, MachineConfigUpdate) else update
        # cpu_template: absent keeps the CPU template (static or custom) even on PUT, "None"
        # drops either, a static one replaces a custom one (Firecracker's single template slot).
        asked = update.cpu_template
        template = current.cpu_template if asked is None else (None if asked == "None" else asked)
        new = resources.set_machine_config(self.config, _replace(machine, cpu_template=template))
        self.config = new if asked is None else _replace(new, cpu_config=None)

    async def _start_micro_vm(self, _: None) -> None:
        if self.config.boot_source is None:
            raise ControllerError(MISSING_KERNEL)
        requested_at = StartRequest.now()
        await self._backend_call("Start microvm error: ",
                                 self.backend.start(self.config, requested_at))
        self._transition(Event.START)
        self._after_boot()

    async def _load_snapshot(self, params: SnapshotLoadConfig) -> None:
        if self._boot_path:
            raise ControllerError(LOAD_NOT_ALLOWED)
        config = await self._backend_call(
            "Load snapshot error: Failed to restore from snapshot: ", self.backend.load_snapshot(params),
            "load_snapshot", "vmm_load_snapshot",
        )
        self.config = config
        # The snapshot says whether the microVM has a PCI bus, whatever this process's flag.
        self.pci_enabled = self.backend.pci_enabled
        self._transition(Event.LOAD_AND_RESUME if params.resume_vm else Event.LOAD)
        self._after_boot()

    def _after_boot(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()
            self.metrics.start_periodic()

    # -- post-boot operations --------------------------------------------------

    async def _flush_metrics(self, _: None) -> None:
        if self.metrics is not None:
            try:
                self.metrics.flush()
            except OSError as err:
                raise ControllerError(f"Internal VMM error: Metrics error: {os_error_text(err)}") from None

    async def _pause(self, _: None) -> None:
        if self.state is VmState.RUNNING:
            await self._backend_call("Internal VMM error: ", self.backend.pause(), "pause_vm", "vmm_pause_vm")
        self._transition(Event.PAUSE)

    async def _resume(self, _: None) -> None:
        if self.state is VmState.PAUSED:
            await self._backend_call("Internal VMM error: ", self.backend.resume(), "resume_vm", "vmm_resume_vm")
        self._transition(Event.RESUME)

    async def _create_snapshot(self, params: SnapshotCreateConfig) -> None:
        if self.state is not VmState.PAUSED:
            raise ControllerError(CREATE_WHILE_RUNNING)
        if params.snapshot_type == "Diff" and not self.config.machine_config.track_dirty_pages:
            raise ControllerError(DIFF_WITHOUT_TRACKING)
        vhost = [n.iface_id for n in self.config.network_interfaces if n.vhost]
        if vhost:
            raise ControllerError(VHOST_SNAPSHOT + ", ".join(vhost))
        vhost_user = [d.drive_id for d in self.config.drives if d.socket is not None]
        if vhost_user:       # Firecracker 1.16 cannot either (VhostUserBlockError::SnapshottingNotSupported)
            raise ControllerError(VHOST_USER_SNAPSHOT + ", ".join(vhost_user))
        kind = "full" if params.snapshot_type == "Full" else "diff"
        await self._backend_call(
            "Create snapshot error: ", self.backend.create_snapshot(params, self.config),
            f"{kind}_create_snapshot", f"vmm_{kind}_create_snapshot",
        )

    async def _send_ctrl_alt_del(self, _: None) -> None:
        await self._backend_call("Internal VMM error: ", self.backend.send_ctrl_alt_del())

    async def _update_block_device(self, update: Any) -> None:
        index = next((i for i, d in enumerate(self.config.drives) if d.drive_id == update.drive_id), None)
        prefix = "Drive config error: Unable to patch the block device: "
        if index is None:
            raise ControllerError(prefix + f"Drive `{update.drive_id}` not found. Please verify the request arguments.")
        drive = self.config.drives[index]
        if update.path_on_host is not None:
            try:
                _check_openable(update.path_on_host, writable=not drive.is_read_only)
            except OSError as err:
                raise ControllerError(prefix + f"{os_error_text(err)} {update.path_on_host}") from None
        await self._backend_call(
            prefix, self.backend.update_drive(update.drive_id, update.path_on_host, update.rate_limiter)
        )
        changes = {k: v for k in ("path_on_host", "rate_limiter") if (v := getattr(update, k)) is not None}
        drives = list(self.config.drives)
        drives[index] = _replace(drive, **changes)
        self.config = _replace(self.config, drives=drives)

    async def _update_network_interface(self, update: Any) -> None:
        ifaces = list(self.config.network_interfaces)
        index = next((i for i, n in enumerate(ifaces) if n.iface_id == update.iface_id), None)
        if index is None:
            raise ControllerError("Network config error: Invalid interface ID - not found.")
        if ifaces[index].vhost and (update.rx_rate_limiter is not None or update.tx_rate_limiter is not None):
            raise ControllerError(VHOST_RATE_LIMITER)
        await self._backend_call(
            "Network config error: ",
            self.backend.update_network_interface(update.iface_id, update.rx_rate_limiter, update.tx_rate_limiter),
        )
        changes = {k: v for k in ("rx_rate_limiter", "tx_rate_limiter") if (v := getattr(update, k)) is not None}
        ifaces[index] = _replace(ifaces[index], **changes)
        self.config = _replace(self.config, network_interfaces=ifaces)

    async def _update_pmem_device(self, update: Any) -> None:
        if update.rate_limiter is None:     # nothing to change: Firecracker does not look further
            return
        prefix = resources.PMEM_CONFIG_ERROR + "Unable to patch the pmem device: "
        index = next((i for i, p in enumerate(self.config.pmem) if p.id == update.id), None)
        if index is None:
            raise ControllerError(prefix + DEVICE_NOT_FOUND + " Please verify the request arguments.")
        try:
            await self.backend.update_pmem(update.id, update.rate_limiter)
        except BackendError as err:
            raise ControllerError(prefix + f"{err} Please verify the request arguments.") from None
        pmem = list(self.config.pmem)
        pmem[index] = _replace(pmem[index], rate_limiter=update.rate_limiter)
        self.config = _replace(self.config, pmem=pmem)

    # -- memory hotplug (docs/memory-hotplug.md) -------------------------------------

    async def _set_memory_hotplug_device(self, cfg: Any) -> None:
        cfg.validate()
        self.config = _replace(self.config, memory_hotplug=cfg)

    async def _get_memory_hotplug_status(self, _: None) -> Any:
        prefix = "Internal VMM error: "
        if self.config.memory_hotplug is None:
            raise ControllerError(prefix + DEVICE_NOT_FOUND)
        return await self._backend_call(prefix, self.backend.memory_hotplug_status())

    async def _update_memory_hotplug_size(self, update: Any) -> None:
        prefix = "Memory hotplug update error: "
        if self.config.memory_hotplug is None:
            raise ControllerError(prefix + DEVICE_NOT_FOUND)
        await self._backend_call(prefix, self.backend.update_memory_hotplug_size(update.requested_size_mib))

    def _balloon(self, prefix: str) -> Any:
        if self.config.balloon is None:
            raise ControllerError(prefix + DEVICE_NOT_FOUND)
        return self.config.balloon

    async def _get_balloon_stats(self, _: None) -> Any:
        prefix = "Internal VMM error: "
        self._balloon(prefix)
        return await self._backend_call(prefix, self.backend.balloon_stats())

    async def _update_balloon(self, update: Any) -> None:
        prefix = "Balloon update error: "
        balloon = self._balloon(prefix)
        await self._backend_call(prefix, self.backend.update_balloon(update.amount_mib))
        self.config = _replace(self.config, balloon=_replace(balloon, amount_mib=update.amount_mib))

    async def _update_balloon_statistics(self, update: Any) -> None:
        prefix = "Balloon update error: "
        balloon = self._balloon(prefix)
        interval = update.stats_polling_interval_s
        await self._backend_call(prefix, self.backend.update_balloon_stats(interval))
        self.config = _replace(self.config, balloon=_replace(balloon, stats_polling_interval_s=interval))

    async def _start_free_page_hinting(self, cmd: Any) -> None:
        prefix = "Balloon update error: "
        self._balloon(prefix)
        await self._backend_call(prefix, self.backend.start_balloon_hinting(cmd.acknowledge_on_stop))

    async def _get_free_page_hinting_status(self, _: None) -> Any:
        prefix = "Balloon update error: "
        self._balloon(prefix)
        return await self._backend_call(prefix, self.backend.balloon_hinting_status())

    async def _stop_free_page_hinting(self, _: None) -> None:
        prefix = "Balloon update error: "
        self._balloon(prefix)
        await self._backend_call(prefix, self.backend.stop_balloon_hinting())

    # -- PCI hot-plug (docs/api.md "PCI hot-plug") -----------------------------------

    def _check_pci(self) -> None:
        if not self.pci_enabled:
            raise ControllerError(PCI_NOT_ENABLED)

    async def _hotplug_drive(self, drive: DriveConfig) -> None:
        self._check_pci()
        if any(d.drive_id == drive.drive_id for d in self.config.drives):
            raise ControllerError(DEVICE_ID_IN_USE)
        if drive.is_root_device:       # the root device is on the command line: boot only
            raise ControllerError(resources.ROOT_DRIVE_EXISTS)
        drive.validate()
        self._check_drive(drive)
        await self._backend_call("Drive config error: ", self.backend.hotplug_drive(drive))
        self.config = _replace(self.config, drives=[*self.config.drives, drive])

    async def _hotplug_network_interface(self, iface: NetworkInterfaceConfig) -> None:
        self._check_pci()
        ifaces = self.config.network_interfaces
        if any(n.iface_id == iface.iface_id for n in ifaces):
            raise ControllerError(DEVICE_ID_IN_USE)
        mac = iface.guest_mac.lower() if iface.guest_mac else None
        if mac is not None and any(n.guest_mac and n.guest_mac.lower() == mac for n in ifaces):
            raise ControllerError(resources.MAC_IN_USE + mac)
        iface.validate()
        _check_vhost(iface)
        # A tap another device holds fails to open (EBUSY) in the backend, as in Firecracker.
        await self._backend_call("Network config error: ", self.backend.hotplug_network_interface(iface))
        self.config = _replace(self.config, network_interfaces=[*ifaces, iface])

    async def _hotplug_pmem(self, pmem: PmemConfig) -> None:
        self._check_pci()
        if any(p.id == pmem.id for p in self.config.pmem):
            raise ControllerError(DEVICE_ID_IN_USE)
        if pmem.root_device:           # the root device is on the command line: boot only
            raise ControllerError(resources.PMEM_CONFIG_ERROR + resources.PMEM_ROOT_IS_BLOCK)
        await self._backend_call(resources.PMEM_CONFIG_ERROR, self.backend.hotplug_pmem(pmem))
        self.config = _replace(self.config, pmem=[*self.config.pmem, pmem])

    async def _hot_unplug_device(self, target: VirtioDeviceId) -> None:
        self._check_pci()
        cfg = self.config
        if target.kind == "drive":
            found = next((d for d in cfg.drives if d.drive_id == target.device_id), None)
            root = found is not None and found.is_root_device
        elif target.kind == "net":
            found = next((n for n in cfg.network_interfaces if n.iface_id == target.device_id), None)
            root = False
        else:
            found = next((p for p in cfg.pmem if p.id == target.device_id), None)
            root = found is not None and found.root_device
        if found is None:
            raise ControllerError(HOTPLUG_DEVICE_NOT_FOUND)
        if root:
            raise ControllerError(CANNOT_UNPLUG_ROOT)
        await self._backend_call("", self.backend.unplug_device(target.kind, target.device_id))
        self.config = _without_device(self.config, target)

    # -- --config-file ------------------------------------------------------------

    async def configure(self, cfg: VmConfig) -> None:
        """Apply a whole ``--config-file`` through the same rules as the API calls, in Firecracker's order."""
        try:
            for drive in cfg.drives:
                check_id(drive.drive_id)
            for iface in cfg.network_interfaces:
                check_id(iface.iface_id)
            for pmem in cfg.pmem:
                check_id(pmem.id)
        except ConfigError as err:
            raise ControllerError(err.message) from None
        K = ActionKind
        steps: list[tuple[ActionKind, Any]] = [
            (K.CONFIGURE_LOGGER, cfg.logger),
            (K.CONFIGURE_METRICS, cfg.metrics),
            (K.UPDATE_MACHINE_CONFIGURATION, cfg.machine_config),
            (K.PUT_CPU_CONFIGURATION, cfg.cpu_config),
            (K.CONFIGURE_BOOT_SOURCE, cfg.boot_source),
            *[(K.INSERT_BLOCK_DEVICE, d) for d in cfg.drives],
            *[(K.INSERT_NETWORK_DEVICE, n) for n in cfg.network_interfaces],
            *[(K.INSERT_PMEM_DEVICE, p) for p in cfg.pmem],
            (K.SET_VSOCK_DEVICE, cfg.vsock),
            (K.SET_BALLOON_DEVICE, cfg.balloon),
            (K.SET_ENTROPY_DEVICE, cfg.entropy),
            (K.SET_MMDS_CONFIGURATION, cfg.mmds_config),
            (K.SET_MEMORY_HOTPLUG_DEVICE, cfg.memory_hotplug),
            (K.CONFIGURE_SERIAL, cfg.serial),
        ]
        for kind, payload in steps:
            if payload is not None:
                await self.handle(Action(kind, payload))


def _read_cpu_template(path: str) -> Any:
    """The custom CPU template in the JSON file ``path`` (``cpu-config`` as a path in
    ``--config-file``), with Firecracker's messages for a file it cannot read or parse."""
    from asyncvmm.config import CpuConfig, decode
    try:
        with open(path, "rb") as f:
            body = f.read()
    except OSError as err:
        raise ControllerError(f"File operation error: {os_error_text(err)}") from None
    try:
        return decode(body, CpuConfig)
    except ConfigError as err:
        raise ControllerError(f"Invalid JSON: {err.message}") from None


def _without_device(cfg: VmConfig, target: VirtioDeviceId) -> VmConfig:
    """``cfg`` after the device ``target`` was unplugged: an interface leaves MMDS with it."""
    name = target.device_id
    if target.kind == "drive":
        return _replace(cfg, drives=[d for d in cfg.drives if d.drive_id != name])
    if target.kind == "pmem":
        return _replace(cfg, pmem=[p for p in cfg.pmem if p.id != name])
    cfg = _replace(cfg, network_interfaces=[n for n in cfg.network_interfaces if n.iface_id != name])
    mmds = cfg.mmds_config
    if mmds is not None and name in mmds.network_interfaces:
        # Firecracker derives its mmds-config from the interfaces that serve MMDS: none left, none.
        left = [i for i in mmds.network_interfaces if i != name]
        cfg = _replace(cfg, mmds_config=_replace(mmds, network_interfaces=left) if left else None)
    return cfg


def _refuse_not_built(feature: str, payload: Any) -> None:
    """A body keeps its own validation errors; a valid one still asks for something not built."""
    if isinstance(payload, Base):
        payload.validate()
    raise unbuilt.NotBuiltError(feature)
