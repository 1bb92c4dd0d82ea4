"""asyncvmm boots Debian's stock cloud kernel: ACPI-described virtio-mmio, root on /dev/vda.

The kernel has no VIRTIO_MMIO_CMDLINE_DEVICES, so finding /dev/vda proves the
DSDT's LNRO0005 devices; two online CPUs prove the MADT.  Both the bzImage
(64-bit boot protocol) and the extracted ELF vmlinux (PVH entry) are booted.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import require
from tests.linux.api import ApiLauncher, api
from tests.linux.harness import AsyncVmmLauncher, VmSpec, default_spec

BOOT_TIMEOUT = 300


def _assert_root_on_vda(guest, kernel_version: str) -> None:
    guest.wait_for(r"asyncvmm-guest: root /dev/vda mounted \(ext4, ro\)", BOOT_TIMEOUT)
    guest.wait_for(r"asyncvmm-guest: ready \(rootfs\)", BOOT_TIMEOUT)
    mounts = guest.run("cat /proc/mounts").check().output
    assert any(line.split()[:3] == ["/dev/vda", "/", "ext4"] for line in mounts.splitlines()), mounts
    assert guest.run("uname -r").check().output.strip() == kernel_version
    # The device came from the DSDT (LNRO0005), not from the command line.
    acpi = guest.run("ls /sys/bus/acpi/devices/ | grep -c LNRO0005").check().output.strip()
    assert int(acpi) >= 1


def test_bzimage_boots_to_root_on_vda_and_reboot_exits_0(guests, guest_images):
    guest = guests.start(AsyncVmmLauncher())
    _assert_root_on_vda(guest, guest_images.kernel_version)
    guest.send(b"\nreboot -f\n")
    assert guest.wait_exit(BOOT_TIMEOUT) == 0, guest.tail()


def test_vmlinux_boots_through_pvh(guests, guest_images, tmp_path):
    spec = default_spec(guest_images, tmp_path)
    spec = VmSpec(**{**spec.__dict__, "kernel": guest_images.vmlinux})
    guest = guests.start(AsyncVmmLauncher(), spec)
    _assert_root_on_vda(guest, guest_images.kernel_version)
    assert guest.stop() == 0, guest.tail()


def test_two_vcpus_are_online(guests, guest_images, tmp_path):
    spec = default_spec(guest_images, tmp_path)
    spec = VmSpec(**{**spec.__dict__, "vcpus": 2})
    guest = guests.start(AsyncVmmLauncher(), spec)
    guest.wait_for(r"asyncvmm-guest: ready \(rootfs\)", BOOT_TIMEOUT)
    assert guest.run("cat /sys/devices/system/cpu/online").check().output.strip() == "0-1"
    assert guest.run("nproc").check().output.strip() == "2"
    assert guest.stop() == 0, guest.tail()


def test_send_ctrl_alt_del_reboots_the_guest_and_ends_the_vmm(guests, guest_images, tmp_path):
    sock = tmp_path / "api.sock"
    guest = guests.start(ApiLauncher(sock))
    guest.wait_for(r"asyncvmm-guest: ready \(rootfs\)", BOOT_TIMEOUT)
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    status, body = api(sock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert status == 204, body
    guest.wait_for(r"asyncvmm-guest: ctrl-alt-del", BOOT_TIMEOUT)
    assert guest.wait_exit(BOOT_TIMEOUT) == 0, guest.tail()


@pytest.mark.minikernel
def test_kernel_with_acpi_and_command_line_devices_uses_the_dsdt_ones(guests, guest_images, tmp_path):
    """A kernel built like Firecracker's guests (ACPI, PCI, VIRTIO_MMIO_CMDLINE_DEVICES, no modules)
    is offered every virtio device twice, as under Firecracker: the DSDT's LNRO0005 device binds,
    the command line's copy finds its window taken and gives up; the root disk works."""
    require(guest_images.minikernel is not None,
            "the minimal kernel is not built (asyncvmm-images build --only minikernel)")
    spec = default_spec(guest_images, tmp_path, initrd=False)
    spec = VmSpec(**{**spec.__dict__, "kernel": guest_images.minikernel, "vcpus": 2})
    guest = guests.start(AsyncVmmLauncher(), spec)
    guest.wait_for(r"asyncvmm-guest: ready \(rootfs\)", BOOT_TIMEOUT)
    # grep in the guest: the whole log crawls over the nested serial console.
    assert guest.run("dmesg | grep -c 'ACPI: Interpreter enabled'").check().output.strip() == "1"
    assert "virtio_mmio.device=4K@0xc0001000:5" in guest.run("cat /proc/cmdline").check().output
    acpi = guest.run("ls /sys/bus/acpi/devices/ | grep -c LNRO0005").check().output.strip()
    assert int(acpi) >= 1
    # virtio0 is bound to the ACPI platform device, not to the command line's virtio-mmio.0.
    bound = guest.run("readlink -f /sys/bus/virtio/devices/virtio0").check().output
    assert "LNRO0005" in bound, bound
    refused = guest.run("dmesg | grep -c 'probe of virtio-mmio.0 failed with error -16'").check()
    assert refused.output.strip() == "1"
    mounts = guest.run("cat /proc/mounts").check().output
    assert any(line.split()[:2] == ["/dev/root", "/"] or line.split()[:2] == ["/dev/vda", "/"]
               for line in mounts.splitlines()), mounts
    assert guest.run("cat /sys/devices/system/cpu/online").check().output.strip() == "0-1"
    assert guest.stop() == 0, guest.tail()
