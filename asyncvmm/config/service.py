"""Schemas of VMM services and one-shot operations: MMDS, logger, metrics, snapshots, VM state, actions.

Field names are the JSON names of Firecracker's swagger definitions.  No I/O here.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

import msgspec

from asyncvmm.config.common import Base
from asyncvmm.config.errors import ConfigError

DEFAULT_MMDS_IPV4 = "169.254.169.254"


class MmdsConfig(Base):
    """``MmdsConfig``: which interfaces reach MMDS, at which link-local address, which version."""

    network_interfaces: list[str]
    version: Literal["V1", "V2"] = "V1"
    ipv4_address: str | None = None
    imds_compat: bool = False

    def check(self) -> None:
        if self.ipv4_address is not None:
            try:
                ipaddress.IPv4Address(self.ipv4_address)
            except ValueError:
                raise ConfigError(
                    f"invalid value: string \"{self.ipv4_address}\", expected an IPv4 address"
                ) from None

    def validate(self) -> None:
        # Firecracker's own prefix, typo included, so clients matching on it keep working.
        prefix = "MMMDS config error: "
        if not self.network_interfaces:
            raise ConfigError(
                prefix + "The list of network interface IDs that allow forwarding MMDS requests is empty."
            )
        address = ipaddress.IPv4Address(self.ipv4_address or DEFAULT_MMDS_IPV4)
        # Firecracker accepts 169.254.1.0 .. 169.254.254.255 (RFC 3927 usable range).
        if not address.is_link_local or not 1 <= address.packed[2] <= 254:
            raise ConfigError(prefix + "The MMDS IPv4 address is not link local.")


LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]
LOG_LEVELS: dict[str, LogLevel] = {
    "error": "Error", "warning": "Warning", "warn": "Warning", "info": "Info",
    "debug": "Debug", "trace": "Trace", "off": "Off",
}


class LoggerConfig(Base):
    """``Logger``: where human-readable logs go, at which level, with which prefix fields."""

    log_path: str | None = None
    level: str | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None

    def check(self) -> None:
        if self.level is not None and self.level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"unknown variant `{self.level}`, expected one of `Error`, `Warning`, `Info`, "
                "`Debug`, `Trace`, `Off`"
            )


class MetricsConfig(Base):
    """``Metrics``: the file or named pipe receiving one JSON object per flush."""

    metrics_path: str


class MemoryBackendConfig(Base):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverrideConfig(Base):
    iface_id: str
    host_dev_name: str


class VsockOverrideConfig(Base):
    uds_path: str


class SnapshotCreateConfig(Base):
    """``SnapshotCreateParams``."""

    mem_file_path: str
    snapshot_path: str
    snapshot_type: Literal["Full", "Diff"] = "Full"


SNAPSHOT_LOAD_TOO_MANY_FIELDS = (
    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required."
)
SNAPSHOT_LOAD_MISSING_FIELD = "missing field: either `mem_backend` or `mem_file_path` is required"


class SnapshotLoadConfig(Base):
    """``SnapshotLoadParams``; exactly one of ``mem_backend`` / ``mem_file_path`` (deprecated)."""

    snapshot_path: str
    mem_file_path: str | None = None
    mem_backend: MemoryBackendConfig | None = None
    enable_diff_snapshots: bool | None = None
    track_dirty_pages: bool | None = None
    resume_vm: bool = False
    network_overrides: list[NetworkOverrideConfig] = msgspec.field(default_factory=list)
    vsock_override: VsockOverrideConfig | None = None
    clock_realtime: bool = False

    def check(self) -> None:
        if self.mem_file_path is not None and self.mem_backend is not None:
            raise ConfigError(SNAPSHOT_LOAD_TOO_MANY_FIELDS)
        if self.mem_file_path is None and self.mem_backend is None:
            raise ConfigError(SNAPSHOT_LOAD_MISSING_FIELD)

    def memory_backend(self) -> MemoryBackendConfig:
        """The memory source, with the deprecated ``mem_file_path`` folded in."""
        if self.mem_backend is not None:
            return self.mem_backend
        return MemoryBackendConfig(backend_type="File", backend_path=self.mem_file_path or "")

    def dirty_page_tracking(self) -> bool:
        return bool(self.track_dirty_pages or self.enable_diff_snapshots)


class VmStateConfig(Base):
    """``Vm``: the requested run state for ``PATCH /vm``."""

    state: Literal["Paused", "Resumed"]


class InstanceActionConfig(Base):
    """``InstanceActionInfo`` for ``PUT /actions``."""

    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]
