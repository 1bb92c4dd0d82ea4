"""benchmarks.boot without KVM: the metrics of one run (a fake VMM child), the document's rows."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import boot, report
from benchmarks.launch import launch
from benchmarks.vmms import GuestSpec

GUEST_MIB = 64

# A stand-in VMM: maps "guest RAM" anonymous and private like both VMMs do, touches 1 MiB of it,
# burns some CPU, prints the guest's markers and idles.
FAKE_VMM = f"""
import mmap, sys, time
ram = mmap.mmap(-1, {GUEST_MIB} << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
ram.madvise(mmap.MADV_DONTFORK)          # its own VMA: never merged with a neighbouring anonymous one
ram[:1 << 20] = b"g" * (1 << 20)
end = time.process_time() + 0.05
while time.process_time() < end:
    pass
sys.stdout.write("testguest: hello\\ntestguest: boottimer written\\n")
sys.stdout.flush()
sys.stdout.write("testguest: done\\n")
sys.stdout.flush()
time.sleep(600)
"""


def test_one_run_measures_private_memory_and_cpu_time_at_the_boot_timer(tmp_path):
    opts = boot.Options(GuestSpec(tmp_path / "kernel", "", mem_mib=GUEST_MIB), settle_s=0.0, timeout_s=60)
    with launch([sys.executable, "-c", FAKE_VMM], probes=boot.PROBES) as vmm:
        m = boot._finish(vmm, opts, {})
    assert m["guest_rss"] >= 1024 and m["guest_private"] >= 1024          # the touched MiB, subtracted
    assert 0 < m["vmm_private_dirty"] <= m["vmm_private"] <= m["vmm_rss"]
    assert m["vmm_private"] + m["guest_private"] > 1024                   # the process total held both
    assert 30 <= m["cpu_to_boottimer"] <= m["cpu_to_idle"]             # the 50 ms burnt before the line
    assert m["start_to_first_output"] <= m["start_to_boottimer"]


def comparison_doc(tmp_path: Path) -> dict:
    api_side = dict(start_to_socket=70, start_to_first_response=400, cpu_to_first_response=380,
                    socket_to_running=450, instance_start_request=90, start_request_to_boottimer=120,
                    start_to_boottimer=550, vmm_rss=40000, vmm_pss=35000, vmm_private=30000,
                    vmm_private_dirty=28000, cpu_to_boottimer=500, cpu_to_idle=520)
    variants = [boot.Variant(name, "", boot.run_qemu) for name in ("asyncvmm-api", "qemu-microvm-qmp")]
    for v in variants:
        v.add(api_side)
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\x7fELF")
    opts = boot.Options(GuestSpec(kernel, boot.CMDLINE), settle_s=0.5, timeout_s=10)
    return boot.build_document(variants, opts, 1, [], [0.0, 0.0, 0.0], [[0.0, 0.0, 0.0]])


def test_rows_where_instance_start_and_cont_do_unequal_work_are_labelled(tmp_path):
    doc = comparison_doc(tmp_path)
    work = {c["metric"]: c["unequal_work"] for c in doc["comparisons"]}
    for name in ("socket_to_running", "instance_start_request", "start_request_to_boottimer"):
        assert "InstanceStart loads the kernel" in work[name]
    for name in ("start_to_first_response", "cpu_to_first_response"):
        assert "QEMU did more work" in work[name]
    for name in ("start_to_socket", "start_to_boottimer", "vmm_private", "vmm_private_dirty",
                 "cpu_to_boottimer", "cpu_to_idle"):
        assert work[name] is None
    text = "\n".join(report.render_document(doc))
    assert "| instance_start_request | `asyncvmm-api` | 90.0 ms | `qemu-microvm-qmp` | 90.0 ms | 1.00x | lower | no (2) |" in text
    assert "| vmm_private | `asyncvmm-api` | 29.3 MiB |" in text
    assert not any("comparison skipped" in n for n in doc["notes"])       # the absent config pair is not noise
