"""virtio-balloon driven by the test guest's polling driver on the local /dev/kvm.

The guest touches 32 MiB of its RAM, the host measures the VMM's resident
memory, ``PATCH /balloon`` sets a 24 MiB target, and the guest inflates that
many of the touched pages.  The VMM's RSS drops by about 24 MiB (the pages
went back to the host through KVM's memory mapping), and every inflated page
reads as zero in the guest afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guest.output import find, parse_lines
from tests.kvm.conftest import ApiProcess, wait_until

pytestmark = pytest.mark.kvm

MiB = 1 << 20
TOUCH_MIB = 32
TARGET_MIB = 24


def vmm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_inflate_gives_touched_guest_pages_back_to_the_host(test_guest, tmp_path):
    vmm = ApiProcess(tmp_path)
    try:
        steps = [
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                     "boot_args": f"balloon=16:{TOUCH_MIB}"}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
            ("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]
        vmm.configure(steps)
        vmm.wait_output("balloon touched")
        rss_touched = vmm_rss(vmm.proc.pid)

        def patched():
            status, answer = vmm("PATCH", "/balloon", {"amount_mib": TARGET_MIB})
            # Until the guest's driver has started the device, Firecracker's refusal.
            assert status == 204 or answer["fault_message"] == \
                "Balloon update error: Balloon: Device not activated yet.", answer
            return status == 204
        wait_until(patched, 30, "the guest to start the balloon device", poll_s=0.05)
        vmm.wait_output("balloon inflated")
        rss_inflated = vmm_rss(vmm.proc.pid)
        inflated, = find(parse_lines(vmm.output()), "balloon inflated")
        assert inflated.number("pages") == TARGET_MIB * 256
        assert inflated.number("nonzero") == 0          # each page came back as a fresh zero page
        print(f"balloon: VMM RSS {rss_touched / MiB:.1f} MiB -> {rss_inflated / MiB:.1f} MiB")
        assert rss_touched - rss_inflated >= (TARGET_MIB - 4) * MiB, (rss_touched, rss_inflated)
        assert vmm("GET", "/balloon")[1]["amount_mib"] == TARGET_MIB
    finally:
        vmm.close()
