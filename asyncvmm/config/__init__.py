"""msgspec schemas of Firecracker's API bodies and ``--config-file``, shared by API and builder.

Names follow the swagger definitions with a ``Config`` suffix; field names
are the JSON names.  Everything here is pure data and validation: no I/O.
"""

from asyncvmm.config.common import RateLimiterConfig, TokenBucketConfig, check_id
from asyncvmm.config.decode import decode, to_builtins
from asyncvmm.config.devices import (
    BalloonConfig,
    BalloonStartCmdConfig,
    BalloonStatsUpdateConfig,
    BalloonUpdateConfig,
    DriveConfig,
    DriveUpdateConfig,
    EntropyConfig,
    NetworkInterfaceConfig,
    NetworkInterfaceUpdateConfig,
    PmemConfig,
    PmemUpdateConfig,
    SerialConfig,
    VsockConfig,
)
from asyncvmm.config.cputemplate import CpuConfig
from asyncvmm.config.errors import ConfigError
from asyncvmm.config.machine import (
    BootSourceConfig,
    MachineConfig,
    MachineConfigPut,
    MachineConfigUpdate,
    MemoryHotplugConfig,
    MemoryHotplugSizeUpdateConfig,
)
from asyncvmm.config.service import (
    InstanceActionConfig,
    LoggerConfig,
    MemoryBackendConfig,
    MetricsConfig,
    MmdsConfig,
    NetworkOverrideConfig,
    SnapshotCreateConfig,
    SnapshotLoadConfig,
    VmStateConfig,
    VsockOverrideConfig,
)
from asyncvmm.config.vm import VmConfig

__all__ = [
    "BalloonConfig", "BalloonStartCmdConfig", "BalloonStatsUpdateConfig", "BalloonUpdateConfig",
    "BootSourceConfig", "ConfigError", "CpuConfig", "DriveConfig", "DriveUpdateConfig",
    "EntropyConfig", "InstanceActionConfig", "LoggerConfig", "MachineConfig", "MachineConfigPut",
    "MachineConfigUpdate", "MemoryBackendConfig", "MemoryHotplugConfig",
    "MemoryHotplugSizeUpdateConfig", "MetricsConfig", "MmdsConfig", "NetworkInterfaceConfig",
    "NetworkInterfaceUpdateConfig", "NetworkOverrideConfig", "PmemConfig", "PmemUpdateConfig",
    "RateLimiterConfig", "SerialConfig", "SnapshotCreateConfig", "SnapshotLoadConfig",
    "TokenBucketConfig", "VmConfig", "VmStateConfig", "VsockConfig", "VsockOverrideConfig",
    "check_id", "decode", "to_builtins",
]
