"""Pre-boot resource rules: how each configuration call changes the :class:`VmConfig`.

Firecracker's ``VmResources`` rules, without I/O: drives keep the root device
first and allow only one root; network interfaces may not share a tap or a
guest MAC; MMDS may only name existing interfaces; balloon and memory sizes
must agree; one root device, a drive or a pmem device.  Each function returns a new
:class:`VmConfig` or raises :class:`ConfigError` with Firecracker's message; the
input is never modified.
"""

from __future__ import annotations

import msgspec

from asyncvmm.config.devices import VHOST_MMDS, BalloonConfig, DriveConfig, NetworkInterfaceConfig, PmemConfig
from asyncvmm.config.errors import ConfigError
from asyncvmm.config.machine import MachineConfig
from asyncvmm.config.service import DEFAULT_MMDS_IPV4, MmdsConfig
from asyncvmm.config.vm import VmConfig

_replace = msgspec.structs.replace

ROOT_DRIVE_EXISTS = "Drive config error: A root block device already exists!"
ROOT_IS_PMEM = ("Drive config error: Attempt to add block as a root device while the root device "
                "defined as a pmem device")
PMEM_CONFIG_ERROR = "Pmem config error: "
PMEM_ROOT_IS_BLOCK = ("Attempt to add pmem as a root device while the root device defined as a "
                      "block device")
PMEM_ROOT_EXISTS = "A root pmem device already exist"
MAC_IN_USE = "Network config error: The MAC address is already in use: "   # + the MAC, lower case
BALLOON_TOO_LARGE = "Balloon config error: Amount of pages requested is too large."
BALLOON_MAX_MIB = 0xFFFF_FFFF // 256
MEM_BELOW_BALLOON = (
    "Machine config error: The memory size (MiB) is smaller than the previously set balloon "
    "device target size."
)
HUGE_PAGES_AND_BALLOON = "Firecracker's huge pages support is incompatible with memory ballooning."
MMDS_UNKNOWN_IFACE = (
    "MMMDS config error: The list of network interface IDs provided contains at least one ID "
    "that does not correspond to any existing network interface."
)


def set_machine_config(cfg: VmConfig, machine: MachineConfig) -> VmConfig:
    machine.validate()
    if cfg.balloon is not None and machine.mem_size_mib < cfg.balloon.amount_mib:
        raise ConfigError(MEM_BELOW_BALLOON)
    if cfg.balloon is not None and machine.huge_pages not in (None, "None"):
        raise ConfigError("Machine config error: " + HUGE_PAGES_AND_BALLOON)
    return _replace(cfg, machine_config=machine)


def insert_drive(cfg: VmConfig, drive: DriveConfig) -> VmConfig:
    """Create or replace by ``drive_id``; the root device is kept first."""
    drive.validate()
    if drive.is_root_device and any(p.root_device for p in cfg.pmem):
        raise ConfigError(ROOT_IS_PMEM)
    drives = list(cfg.drives)
    index = next((i for i, d in enumerate(drives) if d.drive_id == drive.drive_id), None)
    if drive.is_root_device:
        if drives and drives[0].is_root_device and index != 0:
            raise ConfigError(ROOT_DRIVE_EXISTS)
    if index is None:
        drives.insert(0, drive) if drive.is_root_device else drives.append(drive)
    else:
        drives[index] = drive
        if drive.is_root_device and index != 0:
            drives.insert(0, drives.pop(index))
    return _replace(cfg, drives=drives)


def insert_pmem(cfg: VmConfig, pmem: PmemConfig) -> VmConfig:
    """Create or replace by ``id``, in configuration order (``/dev/pmem<n>`` follows it);
    one root device in all."""
    if pmem.root_device and any(d.is_root_device for d in cfg.drives):
        raise ConfigError(PMEM_CONFIG_ERROR + PMEM_ROOT_IS_BLOCK)
    devices = list(cfg.pmem)
    index = next((i for i, p in enumerate(devices) if p.id == pmem.id), None)
    replaces_root = index is not None and devices[index].root_device
    if pmem.root_device and not replaces_root and any(p.root_device for p in devices):
        raise ConfigError(PMEM_CONFIG_ERROR + PMEM_ROOT_EXISTS)
    if index is None:
        devices.append(pmem)
    else:
        devices[index] = pmem
    return _replace(cfg, pmem=devices)


def insert_network_interface(cfg: VmConfig, iface: NetworkInterfaceConfig) -> VmConfig:
    """Create or replace by ``iface_id``; taps and guest MACs stay unique; a vhost-net
    interface has no rate limiter and is not one MMDS serves."""
    iface.validate()
    if iface.vhost and cfg.mmds_config is not None and iface.iface_id in cfg.mmds_config.network_interfaces:
        raise ConfigError(VHOST_MMDS)
    mac = iface.guest_mac.lower() if iface.guest_mac else None
    for other in cfg.network_interfaces:
        if other.iface_id == iface.iface_id:
            continue
        if other.host_dev_name == iface.host_dev_name:
            raise ConfigError(
                f"Network config error: The host device name {iface.host_dev_name} is already in use."
            )
        if mac is not None and other.guest_mac and other.guest_mac.lower() == mac:
            raise ConfigError(MAC_IN_USE + mac)
    ifaces = [i for i in cfg.network_interfaces if i.iface_id != iface.iface_id]
    position = next(
        (n for n, i in enumerate(cfg.network_interfaces) if i.iface_id == iface.iface_id), len(ifaces)
    )
    ifaces.insert(position, iface)
    return _replace(cfg, network_interfaces=ifaces)


def set_balloon(cfg: VmConfig, balloon: BalloonConfig) -> VmConfig:
    """Create or replace the balloon; its target may not exceed guest memory."""
    if balloon.amount_mib > cfg.machine_config.mem_size_mib:
        raise ConfigError(BALLOON_TOO_LARGE)
    if cfg.machine_config.huge_pages not in (None, "None"):
        raise ConfigError("Balloon config error: " + HUGE_PAGES_AND_BALLOON)
    if balloon.amount_mib > BALLOON_MAX_MIB:      # num_pages is a le32 of 4 KiB pages
        raise ConfigError("Balloon config error: Error creating the balloon device: Requested memory "
                          f"should be less than {BALLOON_MAX_MIB}MiB")
    return _replace(cfg, balloon=balloon)


def set_mmds_config(cfg: VmConfig, mmds: MmdsConfig) -> VmConfig:
    mmds.validate()
    known = {i.iface_id for i in cfg.network_interfaces}
    if any(name not in known for name in mmds.network_interfaces):
        raise ConfigError(MMDS_UNKNOWN_IFACE)
    vhost = {i.iface_id for i in cfg.network_interfaces if i.vhost}
    if any(name in vhost for name in mmds.network_interfaces):
        raise ConfigError(VHOST_MMDS)
    return _replace(cfg, mmds_config=_replace(mmds, ipv4_address=mmds.ipv4_address or DEFAULT_MMDS_IPV4))
