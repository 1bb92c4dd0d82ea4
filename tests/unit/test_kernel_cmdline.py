"""The guest command line: boot_args, then what Firecracker v1.16 appends, in its order."""

from __future__ import annotations

import json

from asyncvmm.builder import DEFAULT_KERNEL_CMDLINE, kernel_cmdline
from asyncvmm.config import VmConfig, decode


def _config(**doc) -> VmConfig:
    base = {"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}
    return decode(json.dumps(base | doc).encode(), VmConfig)


def test_boot_args_then_pci_off_then_root_then_virtio_devices():
    cfg = _config(**{"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0 reboot=k"},
                     "drives": [{"drive_id": "root", "path_on_host": "/r", "is_root_device": True,
                                 "is_read_only": True}]})
    line = kernel_cmdline(cfg, [(0xC000_1000, 0x1000, 5), (0xC000_2000, 0x1000, 6)])
    assert line == ("console=ttyS0 reboot=k pci=off root=/dev/vda ro "
                    "virtio_mmio.device=4K@0xc0001000:5 virtio_mmio.device=4K@0xc0002000:6")


def test_default_command_line_without_boot_args_and_no_root_without_a_root_drive():
    line = kernel_cmdline(_config(), [])
    assert line == f"{DEFAULT_KERNEL_CMDLINE} pci=off"


def test_writable_root_by_partuuid():
    cfg = _config(drives=[{"drive_id": "root", "path_on_host": "/r", "is_root_device": True,
                           "is_read_only": False, "partuuid": "0eaa91a0-01"}])
    assert kernel_cmdline(cfg, []).endswith(" pci=off root=PARTUUID=0eaa91a0-01 rw")


def test_empty_boot_args_are_kept_empty():
    cfg = _config(**{"boot-source": {"kernel_image_path": "/k", "boot_args": ""}})
    assert kernel_cmdline(cfg, []) == "pci=off"


def test_firecracker_1_16_default_has_no_pci_off_of_its_own():
    assert "pci=off" not in DEFAULT_KERNEL_CMDLINE
    assert DEFAULT_KERNEL_CMDLINE.endswith("i8042.dumbkbd swiotlb=noforce")


def test_pci_machines_get_no_pci_off_and_no_virtio_mmio_devices():
    cfg = _config(drives=[{"drive_id": "root", "path_on_host": "/r", "is_root_device": True,
                           "is_read_only": False}])
    line = kernel_cmdline(cfg, [], pci=True)
    assert line == f"{DEFAULT_KERNEL_CMDLINE} root=/dev/vda rw"
    assert "pci=off" not in kernel_cmdline(_config(**{"boot-source": {"kernel_image_path": "/k",
                                                                      "boot_args": "quiet"}}), [], pci=True)


def test_pmem_root_is_named_by_its_position_in_the_pmem_list():
    pmem = [{"id": "data", "path_on_host": "/d"},
            {"id": "root", "path_on_host": "/r", "root_device": True, "read_only": True}]
    assert kernel_cmdline(_config(pmem=pmem), []).endswith(" pci=off root=/dev/pmem1 ro")
    pmem[1]["read_only"] = False
    assert kernel_cmdline(_config(pmem=pmem), [], pci=True).endswith(" root=/dev/pmem1 rw")
    assert "root=" not in kernel_cmdline(_config(pmem=pmem[:1]), [])
