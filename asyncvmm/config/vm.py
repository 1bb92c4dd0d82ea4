"""The whole VM configuration: Firecracker's ``FullVmConfiguration`` and ``--config-file`` shape.

:class:`VmConfig` is what the controller builds from API calls (or decodes
from ``--config-file``) and what the VMM builder reads at InstanceStart.
Top-level keys are kebab-case (``boot-source``, ``machine-config`` ...);
``GET /vm/config`` shows absent items as ``null``.  No I/O here.
"""

from __future__ import annotations

import msgspec

from asyncvmm.config.devices import (
    BalloonConfig,
    DriveConfig,
    EntropyConfig,
    NetworkInterfaceConfig,
    PmemConfig,
    SerialConfig,
    VsockConfig,
)
from asyncvmm.config.cputemplate import CpuConfig
from asyncvmm.config.machine import BootSourceConfig, MachineConfig, MemoryHotplugConfig
from asyncvmm.config.service import LoggerConfig, MetricsConfig, MmdsConfig

_RENAMES = {
    "boot_source": "boot-source",
    "cpu_config": "cpu-config",
    "machine_config": "machine-config",
    "memory_hotplug": "memory-hotplug",
    "mmds_config": "mmds-config",
    "network_interfaces": "network-interfaces",
}


class VmConfig(msgspec.Struct, forbid_unknown_fields=True, rename=_RENAMES):
    """Every configurable resource of one microVM; the builder reads it, never writes it."""

    balloon: BalloonConfig | None = None
    drives: list[DriveConfig] = msgspec.field(default_factory=list)
    boot_source: BootSourceConfig | None = None
    cpu_config: CpuConfig | str | None = None     # --config-file: inline, or a file's path
    logger: LoggerConfig | None = None
    machine_config: MachineConfig = msgspec.field(default_factory=MachineConfig)
    metrics: MetricsConfig | None = None
    memory_hotplug: MemoryHotplugConfig | None = None
    mmds_config: MmdsConfig | None = None
    network_interfaces: list[NetworkInterfaceConfig] = msgspec.field(default_factory=list)
    pmem: list[PmemConfig] = msgspec.field(default_factory=list)
    vsock: VsockConfig | None = None
    entropy: EntropyConfig | None = None
    serial: SerialConfig | None = None
