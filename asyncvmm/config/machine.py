"""Schemas of the machine itself: vCPUs and memory, boot source, CPU templates, memory hotplug.

Field names are the JSON names of Firecracker's swagger definitions
(``MachineConfiguration``, ``BootSource``, ``CpuConfig``, ``MemoryHotplugConfig``).
``check()`` is the syntax Firecracker's deserializer enforces (it fails as a
bad request body); ``validate()`` is the semantic rule whose message carries
Firecracker's category prefix ("Machine config error: ...").  No I/O here.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from asyncvmm.config.common import U8, U64, Base
from asyncvmm.config.errors import ConfigError

MAX_SUPPORTED_VCPUS = 32
DEFAULT_MEM_SIZE_MIB = 128
# x86_64 boot protocol: the command line buffer holds 2048 bytes including its NUL.
CMDLINE_MAX_SIZE = 2048
# Firecracker 1.16's command line when boot_args is not given (``pci=off`` is appended to it
# separately, and only without --enable-pci).
DEFAULT_KERNEL_CMDLINE = (
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 "
    "i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce"
)

# Firecracker 1.16 on x86_64, in its order (serde lists them so in "unknown variant"); V1N1 is aarch64.
CpuTemplate = Literal["C3", "T2", "T2S", "None", "T2CL", "T2A"]
HugePages = Literal["None", "2M"]

INVALID_VCPU_COUNT = (
    "Machine config error: The number of vCPUs must be greater than 0, less than "
    f"{MAX_SUPPORTED_VCPUS} and must be 1 or an even number if SMT is enabled."
)
INVALID_MEM_SIZE = (
    "Machine config error: The memory size (MiB) is either 0, or not a multiple of the "
    "configured page size."
)


class MachineConfig(Base):
    """``MachineConfiguration`` as stored: every field has its value (defaults 1 vCPU, 128 MiB)."""

    vcpu_count: U8 = 1
    mem_size_mib: U64 = DEFAULT_MEM_SIZE_MIB
    smt: bool = False
    # Deprecated static template; None means "no template" and is not serialized.
    cpu_template: CpuTemplate | None = None
    track_dirty_pages: bool = False
    huge_pages: HugePages = "None"

    def validate(self) -> None:
        if not 1 <= self.vcpu_count <= MAX_SUPPORTED_VCPUS:
            raise ConfigError(INVALID_VCPU_COUNT)
        if self.smt and self.vcpu_count > 1 and self.vcpu_count % 2 == 1:
            raise ConfigError(INVALID_VCPU_COUNT)
        page_mib = 2 if self.huge_pages == "2M" else 1
        if self.mem_size_mib == 0 or self.mem_size_mib % page_mib:
            raise ConfigError(INVALID_MEM_SIZE)


class MachineConfigPut(Base):
    """Body of ``PUT /machine-config``: both sizes required, the rest back to defaults."""

    vcpu_count: U8
    mem_size_mib: U64
    smt: bool = False
    cpu_template: CpuTemplate | None = None
    track_dirty_pages: bool = False
    huge_pages: HugePages = "None"

    def to_config(self) -> MachineConfig:
        """The new MachineConfig; ``cpu_template`` stays as given (``"None"`` or absent), because
        the controller keeps the current template when the field is absent (Firecracker does)."""
        return MachineConfig(
            vcpu_count=self.vcpu_count,
            mem_size_mib=self.mem_size_mib,
            smt=self.smt,
            cpu_template=self.cpu_template,
            track_dirty_pages=self.track_dirty_pages,
            huge_pages=self.huge_pages,
        )


class MachineConfigUpdate(Base):
    """Body of ``PATCH /machine-config``: only the given fields change; ``{}`` is an error."""

    vcpu_count: U8 | None = None
    mem_size_mib: U64 | None = None
    smt: bool | None = None
    cpu_template: CpuTemplate | None = None
    track_dirty_pages: bool | None = None
    huge_pages: HugePages | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__struct_fields__)

    def apply(self, current: MachineConfig) -> MachineConfig:
        changes = {f: getattr(self, f) for f in self.__struct_fields__ if getattr(self, f) is not None}
        if changes.get("cpu_template") == "None":
            changes["cpu_template"] = None
        return msgspec.structs.replace(current, **changes)


class BootSourceConfig(Base):
    """``BootSource``: the kernel, an optional initrd and command line."""

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None

    def validate(self) -> None:
        args = self.boot_args if self.boot_args is not None else DEFAULT_KERNEL_CMDLINE
        if "\0" in args or not args.isascii():
            raise ConfigError(
                "Boot source error: The kernel command line is invalid: "
                "String contains an invalid character"
            )
        if len(args.encode()) >= CMDLINE_MAX_SIZE:
            raise ConfigError(
                "Boot source error: The kernel command line is invalid: "
                "Command line string is too large"
            )


class MemoryHotplugConfig(Base):
    """``MemoryHotplugConfig``: a virtio-mem region of ``total_size_mib`` (docs/memory-hotplug.md)."""

    total_size_mib: U64
    block_size_mib: U64 = 2
    slot_size_mib: U64 = 128

    def validate(self) -> None:
        """Firecracker's checks, in its order, with its messages."""
        prefix = "Memory hotplug config error: "
        if self.block_size_mib < 2:
            raise ConfigError(prefix + "Block size must not be lower than 2 MiB")
        if self.block_size_mib & (self.block_size_mib - 1):
            raise ConfigError(prefix + "Block size must be a power of 2")
        if self.slot_size_mib < 128:
            raise ConfigError(prefix + "Slot size must not be lower than 128 MiB")
        if self.slot_size_mib % self.block_size_mib:
            raise ConfigError(prefix + f"Slot size must be a multiple of block size ({self.block_size_mib} MiB)")
        if self.total_size_mib < self.slot_size_mib:
            raise ConfigError(prefix + f"Total size must not be lower than slot size ({self.slot_size_mib} MiB)")
        if self.total_size_mib % self.slot_size_mib:
            raise ConfigError(prefix + f"Total size must be a multiple of slot size ({self.slot_size_mib} MiB)")


class MemoryHotplugSizeUpdateConfig(Base):
    """``MemoryHotplugSizeUpdate``: the new target size of the hotplug region."""

    requested_size_mib: U64
