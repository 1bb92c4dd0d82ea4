"""The linux tier proves itself with QEMU microvm as the VMM, before asyncvmm boots Linux.

Debian's cloud kernel (virtio-mmio found only through ACPI) + our initramfs +
our ext4 root, on /dev/kvm (nested SVM inside the emulated host, or hardware
KVM directly).  If these pass, a failing asyncvmm test beside them is
asyncvmm's fault, not the tier's.
"""

from __future__ import annotations

import pytest

from asyncvmm_tools.images.guestinit import run_flag
from tests.conftest import require
from tests.linux.harness import QemuMicrovmLauncher, default_spec

BOOT_TIMEOUT = 240   # nested under TCG on a loaded 2-core machine: ~30 s typical


def test_console_markers_and_root_on_vda(guests, guest_images, qemu_available):
    guest = guests.start(QemuMicrovmLauncher())
    guest.wait_for(r"asyncvmm-guest: initramfs up", BOOT_TIMEOUT)
    guest.wait_for(r"asyncvmm-guest: root /dev/vda mounted \(ext4, ro\)", BOOT_TIMEOUT)
    guest.wait_for(r"asyncvmm-guest: ready \(rootfs\)", BOOT_TIMEOUT)

    mounts = guest.run("cat /proc/mounts").check().output
    assert any(line.split()[:3] == ["/dev/vda", "/", "ext4"] for line in mounts.splitlines()), mounts
    assert guest.run("uname -r").check().output.strip() == guest_images.kernel_version
    modules = guest.run("cat /proc/modules").check().output
    for name in ("virtio_mmio", "virtio_blk", "virtio_net", "vsock"):
        assert f"{name} " in modules, modules
    assert guest.run("exit 7").status == 7
    big = "x" * 5000   # longer than one tty line: exercises the chunked upload
    assert guest.run(f"echo {big} | wc -c").check().output.strip() == "5001"
    assert guest.run("iperf3 --version && socat -V | grep -c VSOCK").status == 0

    assert guest.stop() == 0, guest.tail()


def test_run_flag_reports_status_and_reboots(guests, guest_images, tmp_path, qemu_available):
    spec = default_spec(guest_images, tmp_path, extra_args=run_flag("echo hello-from-guest; exit 3"))
    guest = guests.start(QemuMicrovmLauncher(), spec)
    guest.wait_for(r"asyncvmm-guest: run-begin", BOOT_TIMEOUT)
    guest.wait_for(r"hello-from-guest", BOOT_TIMEOUT)
    guest.wait_for(r"asyncvmm-guest: run-exit=3", BOOT_TIMEOUT)
    # After the command the guest reboots, which ends a -no-reboot QEMU (and a Firecracker-style VMM).
    assert guest.wait_exit(BOOT_TIMEOUT) == 0


def test_writable_root_keeps_the_cached_image_pristine(guests, guest_images, qemu_available):
    before = guest_images.rootfs.stat().st_mtime_ns
    guest = guests.start(QemuMicrovmLauncher(), writable_root=True)
    guest.wait_for(r"root /dev/vda mounted \(ext4, rw\)", BOOT_TIMEOUT)
    guest.run("echo data > /written && sync").check()
    assert guest.run("cat /written").check().output.strip() == "data"
    guest.stop()
    assert guest_images.rootfs.stat().st_mtime_ns == before


@pytest.mark.minikernel
def test_minikernel_boots_the_rootfs_without_an_initramfs(guests, guest_images, tmp_path, qemu_available):
    """The optional built-in-drivers kernel: virtio-mmio from the command line, no modules.

    The machine has ACPI off, so QEMU lists the devices on the command line and the kernel
    finds them there only: the path of kernels built without ACPI.
    """
    require(guest_images.minikernel_bzimage is not None,
            "the minimal kernel is not built (asyncvmm-images build --only minikernel)")
    spec = default_spec(guest_images, tmp_path, initrd=False,
                        extra_args=run_flag("cat /proc/mounts; cat /proc/cmdline"))
    spec.kernel = guest_images.minikernel_bzimage
    guest = guests.start(QemuMicrovmLauncher(acpi=False), spec)
    guest.wait_for(r"asyncvmm-guest: rootfs up", BOOT_TIMEOUT)
    guest.wait_for(r"/dev/root / ext4|/dev/vda / ext4", BOOT_TIMEOUT)
    guest.wait_for(r"virtio_mmio.device=", BOOT_TIMEOUT)
    guest.wait_for(r"asyncvmm-guest: run-exit=0", BOOT_TIMEOUT)
    assert "initramfs up" not in guest.console
    assert guest.wait_exit(BOOT_TIMEOUT) == 0
