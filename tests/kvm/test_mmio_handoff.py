"""vCPU threads hand MMIO register accesses to the loop: pause, resume and exit still work while a
guest keeps the hand-off busy.

The test guest writes QueueSel (a valid virtio-mmio register, answered on the loop) in a long loop
(``mmioflood``).  Pausing must complete while a vCPU is waiting for an answer, the guest must make
no progress while paused and finish after resume, and SIGTERM in the middle of a flood must end the
process cleanly (the pending hand-off is cancelled, not waited for).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.guest.output import find, parse_lines
from tests.kvm.conftest import ApiProcess, wait_until

pytestmark = pytest.mark.kvm

QUEUE_SEL = 0xC000_1000 + 0x30
WRITES = 40_000


def _boot(vmm: ApiProcess, guest, metrics, cmdline: str) -> None:
    steps = [
        ("PUT", "/metrics", {"metrics_path": str(metrics)}),
        ("PUT", "/boot-source", {"kernel_image_path": str(guest.elf_pvh), "boot_args": cmdline}),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
        ("PUT", "/entropy", {}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ]
    vmm.configure(steps)


def _mmio_writes(vmm: ApiProcess, metrics) -> int:
    return sum(r["vcpu"]["exit_mmio_write"] for r in vmm.flush_metrics(metrics))


def test_pause_and_resume_while_the_guest_floods_handed_off_registers(test_guest, tmp_path):
    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path)
    try:
        _boot(vmm, test_guest, metrics, f"mmioflood={QUEUE_SEL:#x}:{WRITES} exit=halt")
        wait_until(lambda: _mmio_writes(vmm, metrics) > 100, 60, "the flood to start")
        status, body = vmm("PATCH", "/vm", {"state": "Paused"})
        assert status == 204, body
        paused_at = _mmio_writes(vmm, metrics)
        time.sleep(0.5)                       # a paused vCPU takes no exit, however long we look
        assert _mmio_writes(vmm, metrics) == paused_at
        assert "testguest: mmioflood" not in vmm.output()
        status, body = vmm("PATCH", "/vm", {"state": "Resumed"})
        assert status == 204, body
        vmm.wait_output("testguest: exit halt", timeout=240)
        total = _mmio_writes(vmm, metrics)
    finally:
        vmm.close()
    flood, = find(parse_lines(vmm.output()), "mmioflood")
    assert flood.number("count") == WRITES
    assert total >= WRITES


def test_sigterm_during_a_flood_ends_the_vmm_cleanly(test_guest, tmp_path):
    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path)
    try:
        _boot(vmm, test_guest, metrics, f"mmioflood={QUEUE_SEL:#x}:{WRITES * 50} exit=halt")
        wait_until(lambda: _mmio_writes(vmm, metrics) > 100, 60, "the flood to start")
        vmm.proc.send_signal(signal.SIGTERM)
        code = vmm.proc.wait(timeout=20)
    finally:
        vmm.close()
    assert code == 0, vmm.log.read_text()
    assert "did not stop" not in vmm.log.read_text()
