"""A guest cannot flood the host's log: faults it triggers are counted, and logged only a few times.

The test guest writes a read-only virtio-mmio register (MagicValue of the
first window) and an address no device claims, tens of thousands of times
each (``mmioflood=<addr>:<count>``).  Every write is counted in the
``guest_faults`` metrics group; the log holds a handful of lines per kind.
Before the reporter existed, 50,000 such writes made 7 MB of log.
"""

from __future__ import annotations

import pytest

from tests.guest.output import find, parse_lines
from tests.kvm.conftest import ApiProcess

pytestmark = pytest.mark.kvm

FIRST_VIRTIO_WINDOW = 0xC000_1000        # MagicValue: read-only
UNCLAIMED_MMIO = 0xD000_0000             # in the MMIO gap, no device
READ_ONLY_WRITES = 50_000
UNCLAIMED_WRITES = 20_000
LOG_LIMIT_BYTES = 32 * 1024              # the burst lines of two kinds, the boot's own lines


def test_a_flood_of_bad_register_writes_is_counted_and_the_log_stays_small(test_guest, tmp_path):
    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path)
    try:
        steps = [
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
            ("PUT", "/boot-source", {
                "kernel_image_path": str(test_guest.elf_pvh),
                "boot_args": f"mmioflood={FIRST_VIRTIO_WINDOW:#x}:{READ_ONLY_WRITES} "
                             f"mmioflood={UNCLAIMED_MMIO:#x}:{UNCLAIMED_WRITES} exit=halt"}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
            ("PUT", "/entropy", {}),                   # a virtio device in the first window
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]
        vmm.configure(steps)
        vmm.wait_output("testguest: exit halt", timeout=240)
        reports = vmm.flush_metrics(metrics)
    finally:
        vmm.close()
    floods = find(parse_lines(vmm.output()), "mmioflood")
    assert [f.number("count") for f in floods] == [READ_ONLY_WRITES, UNCLAIMED_WRITES], vmm.output()

    faults = {k: sum(r["guest_faults"][k] for r in reports) for k in reports[-1]["guest_faults"]}
    assert faults["virtio_mmio_access"] == READ_ONLY_WRITES, faults
    assert faults["mmio_unclaimed"] == UNCLAIMED_WRITES, faults
    assert faults["log_lines_suppressed"] >= READ_ONLY_WRITES + UNCLAIMED_WRITES - 40, faults
    # Every write was a vCPU exit (counted per vCPU thread, reported summed).
    assert sum(r["vcpu"]["exit_mmio_write"] for r in reports) >= READ_ONLY_WRITES + UNCLAIMED_WRITES

    log = vmm.log.read_text(errors="replace")
    assert len(log.encode()) < LOG_LIMIT_BYTES, log[-4000:]
    assert "read-only or unknown register 0x0 ignored" in log
    assert 0 < log.count("guest fault virtio_mmio_access") <= 12, log
    assert 0 < log.count("guest fault mmio_unclaimed") <= 12, log
