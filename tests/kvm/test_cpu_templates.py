"""CPU templates as the guest sees them: the test guest's ``cpuid=`` command against the template.

The guest executes CPUID from ring 0 (``cpuid ring=0`` lines; see tests/guest/cpuid.c) and
prints the registers; each run is compared with a run without a template on the same host:
the template's bits must read as the template says, the others as before.

Under kvm_pvm (this machine's /dev/kvm) the emulated CPUID answers the feature registers of
leaves 0x1 (ECX, EDX), 0x7 and 0xD from the host CPU whatever the vCPU's table says, so there
only the registers PVM takes from the table are compared (``PVM_TABLE_REGISTERS``); on
hardware KVM every register a template changes is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncvmm.arch.x86_64 import cputemplate
from asyncvmm.kvm.kind import software_kvm_reason
from tests.guest.output import find, parse_lines
from tests.kvm.conftest import ApiProcess, guest_config, run_vmm

pytestmark = pytest.mark.kvm

PVM_TABLE_REGISTERS = {(0x1, 0, "eax"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"),
                       (0x80000008, 0, "ebx")}
# Bits normalization owns whatever a template says (asyncvmm/arch/x86_64/cpuid.py).
NORMALIZED = {(0x1, 0, "ecx"): 1 << 31, (0x1, 0, "edx"): 1 << 28, (0x1, 0, "ebx"): 0xFFFF_FF00,
              (0x80000001, 0, "ecx"): 1 << 1}
START_ERROR = "Start microvm error: "


def _on_pvm() -> bool:
    reason = software_kvm_reason()
    return reason is not None and "pvm" in reason


def _leaves(template: cputemplate.CpuTemplate) -> str:
    return " ".join(f"cpuid={m.leaf:#x}.{m.subleaf:#x}" for m in template.cpuid)


def _read_cpuid(tmp_path: Path, kernel: Path, cmdline: str, **extra) -> dict:
    """``(leaf, subleaf) -> {register: value}`` of the ring-0 CPUID lines of one guest run."""
    tmp_path.mkdir(exist_ok=True)
    run = run_vmm(tmp_path, guest_config(kernel, cmdline + " exit=reset", **extra))
    assert run.returncode == 0, run.all_output
    lines = find(parse_lines(run.stdout), "cpuid")
    out = {}
    for line in lines:
        if line.fields.get("ring") == "0":
            out[(line.number("leaf"), line.number("subleaf"))] = {
                r: line.number(r) for r in ("eax", "ebx", "ecx", "edx")}
    return out


def _as_custom(template: cputemplate.CpuTemplate) -> dict:
    """``template`` as a PUT /cpu-config body (bitmaps of 0, 1 and x)."""
    def bitmap(f, bits):
        return "0b" + "".join("x" if not (f.mask >> i) & 1 else str((f.value >> i) & 1)
                              for i in reversed(range(bits)))
    return {
        "cpuid_modifiers": [{"leaf": hex(m.leaf), "subleaf": hex(m.subleaf), "flags": m.flags,
                             "modifiers": [{"register": r, "bitmap": bitmap(f, 32)} for r, f in m.registers]}
                            for m in template.cpuid],
        "msr_modifiers": [{"addr": hex(a), "bitmap": bitmap(f, 64)} for a, f in template.msrs],
    }


def _compare(template: cputemplate.CpuTemplate, before: dict, after: dict) -> int:
    """Check every comparable register; return how many were compared."""
    compared = 0
    for mod in template.cpuid:
        key = (mod.leaf, mod.subleaf)
        for register, f in mod.registers:
            if _on_pvm() and (*key, register) not in PVM_TABLE_REGISTERS:
                continue
            owned = NORMALIZED.get((*key, register), 0)
            old, new = before[key][register], after[key][register]
            mask = f.mask & ~owned
            assert new & mask == f.value & mask, (hex(mod.leaf), register, hex(new), hex(f.value), hex(mask))
            assert new & ~f.mask == old & ~f.mask, (hex(mod.leaf), register, hex(new), hex(old))
            compared += 1
    return compared


def test_t2a_bits_reach_the_guest(test_guest, tmp_path):
    """T2A where Firecracker permits it (AMD Milan); elsewhere its bits, as the custom template
    Firecracker ships as T2A.json, must read the same in the guest."""
    t2a = cputemplate.STATIC_TEMPLATES["T2A"][2]
    cmd = _leaves(t2a)
    before = _read_cpuid(tmp_path / "none", test_guest.elf_pvh, cmd)
    try:
        cputemplate.select_template("T2A", None, _host_cpuid())
        extra = {"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2A"}}
    except cputemplate.CpuTemplateError:
        extra = {"cpu-config": _as_custom(t2a)}
    after = _read_cpuid(tmp_path / "t2a", test_guest.elf_pvh, cmd, **extra)
    assert _compare(t2a, before, after) >= 4
    # The version T2A shows is Firecracker's: family 6, model 0x3F, stepping 2.
    assert after[(0x1, 0)]["eax"] & 0x0FFF_3FFF == 0x0003_06F2


def test_custom_template_clears_and_sets_visible_bits(test_guest, tmp_path):
    body = {"cpuid_modifiers": [
        # LAHF/SAHF (ECX[0]) hidden and long mode (EDX[29]) kept as it is.
        {"leaf": "0x80000001", "subleaf": "0x0", "flags": 0,
         "modifiers": [{"register": "ecx", "bitmap": "0b0"}, {"register": "edx", "bitmap": "0b0"}]},
        # Stepping 0xA, whatever the host's.
        {"leaf": "0x1", "subleaf": "0x0", "flags": 0,
         "modifiers": [{"register": "eax", "bitmap": "0b1010"}]},
    ]}
    template = cputemplate.CpuTemplate.from_config(_decode(body))
    cmd = "cpuid=0x80000001 cpuid=0x1"
    before = _read_cpuid(tmp_path / "none", test_guest.elf_pvh, cmd)
    after = _read_cpuid(tmp_path / "custom", test_guest.elf_pvh, cmd, **{"cpu-config": body})
    assert before[(0x80000001, 0)]["ecx"] & 1, "the host has LAHF/SAHF: nothing to hide"
    assert after[(0x80000001, 0)]["ecx"] & 1 == 0
    assert after[(0x1, 0)]["eax"] & 0xF == 0xA
    assert _compare(template, before, after) == 3


def test_static_template_refused_on_this_cpu_leaves_the_vm_configurable(test_guest, tmp_path):
    """An Intel template on AMD (or T2A off Milan) fails InstanceStart with Firecracker's
    message; with the template dropped the same microVM starts."""
    vm = ApiProcess(tmp_path)
    try:
        vm.configure([("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                               "boot_args": "cpuid=0x1 exit=halt"})])
        host = _host_cpuid()
        amd = cputemplate.vendor(host) == cputemplate.VENDOR_AMD
        refusals = dict.fromkeys(["C3", "T2", "T2S", "T2CL"] if amd else ["T2A"],
                                 cputemplate.VENDOR_MISMATCH)
        if amd and cputemplate.CpuModel.from_eax(cputemplate.find(host, 0x1).eax) != cputemplate.MILAN:
            refusals["T2A"] = cputemplate.MODEL_NOT_PERMITTED     # this EPYC is not a Milan
        for name, message in refusals.items():
            vm.configure([("PUT", "/machine-config",
                           {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": name})])
            status, body = vm("PUT", "/actions", {"action_type": "InstanceStart"})
            assert (status, body["fault_message"]) == (400, START_ERROR + message), name
        status, body = vm("GET", "/")
        assert body["state"] == "Not started"
        vm.configure([("PATCH", "/machine-config", {"cpu_template": "None"}),
                      ("PUT", "/actions", {"action_type": "InstanceStart"})])
        vm.wait_output("testguest: done")
    finally:
        vm.close()


@pytest.mark.parametrize("body,fault", [
    ({"kvm_capabilities": ["4000"]}, "Kvm error: Missing KVM capabilities: 0xfa0"),
    ({"cpuid_modifiers": [{"leaf": "0x7ffffff0", "subleaf": "0x0", "flags": 0, "modifiers": []}]},
     "System configuration error: Failed to create guest config: Template changes a CPUID entry not "
     "supported by KVM: Leaf: 7ffffff0, Subleaf: 0"),
    ({"msr_modifiers": [{"addr": "0x9999", "bitmap": "0b1"}]},
     "System configuration error: Failed to create guest config: KVM vcpu ioctl failed: Failed to get "
     "KVM vcpu msr: 0x9999"),
])
def test_custom_template_kvm_cannot_honour_fails_instance_start(test_guest, tmp_path, body, fault):
    vm = ApiProcess(tmp_path)
    try:
        vm.configure([("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh)}),
                      ("PUT", "/cpu-config", body)])
        status, answer = vm("PUT", "/actions", {"action_type": "InstanceStart"})
        assert (status, answer["fault_message"]) == (400, START_ERROR + fault)
    finally:
        vm.close()


def _host_cpuid():
    from asyncvmm.kvm import Kvm
    kvm = Kvm()
    try:
        return kvm.supported_cpuid()
    finally:
        kvm.close()


def _decode(body: dict):
    import json

    from asyncvmm.config import CpuConfig, decode
    return decode(json.dumps(body).encode(), CpuConfig)


async def test_a_restored_guest_keeps_its_templated_cpuid(test_guest, tmp_path):
    """A snapshot restore gives the vCPUs the template's CPUID again (Firecracker restores the
    CPUID it saved): the guest asks after the restore and reads what it read at boot."""
    from asyncvmm.client import MicroVM
    from tests.kvm.conftest import asyncvmm_argv
    body = {"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                                 "modifiers": [{"register": "eax", "bitmap": "0b1010"}]}]}
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    async with MicroVM(test_guest.elf_pvh, "cpuid=0x1 serialecho=1 cpuid=0x1 exit=halt",
                       binary=asyncvmm_argv(),
                       config={"machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                               "cpu-config": body}) as vm:
        await vm.wait_for_console("testguest: serialecho ready")
        await vm.client.pause()
        await vm.client.create_snapshot(snapshot_path=snap, mem_file_path=mem)
    async with MicroVM(start=False, binary=asyncvmm_argv()) as restored:
        await restored.client.load_snapshot(snapshot_path=snap, resume_vm=True,
                                            mem_backend={"backend_type": "File", "backend_path": mem})
        await restored.write_console("go\n")
        await restored.wait_for_console("testguest: done")
    booted = [line for line in find(parse_lines(vm.console.text), "cpuid") if line.fields["ring"] == "0"]
    after = [line for line in find(parse_lines(restored.console.text), "cpuid")
             if line.fields["ring"] == "0"]
    assert len(booted) == 1 and len(after) == 1, restored.console.text
    assert booted[0].number("eax") & 0xF == 0xA
    assert after[0].number("eax") == booted[0].number("eax")
