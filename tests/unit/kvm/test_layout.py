"""The ctypes mirrors and ioctl numbers agree with the kernel's own headers.

gcc compiles a small program against <linux/kvm.h> that prints sizeof,
offsetof and the ioctl macros; no /dev/kvm is needed.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from asyncvmm.kvm import ioctls, structs as s
from tests.conftest import require

STRUCTS = [
    "kvm_userspace_memory_region", "kvm_irq_level", "kvm_irqfd", "kvm_ioeventfd", "kvm_clock_data",
    "kvm_enable_cap", "kvm_mp_state", "kvm_signal_mask", "kvm_dirty_log", "kvm_regs", "kvm_segment",
    "kvm_dtable", "kvm_sregs", "kvm_fpu", "kvm_msr_entry", "kvm_msrs", "kvm_msr_list",
    "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_lapic_state", "kvm_pit_config", "kvm_pit_channel_state",
    "kvm_pit_state2", "kvm_irqchip", "kvm_vcpu_events", "kvm_debugregs", "kvm_xsave", "kvm_xcr",
    "kvm_xcrs", "kvm_irq_routing_irqchip", "kvm_irq_routing_msi", "kvm_irq_routing_entry",
    "kvm_irq_routing", "kvm_msi",
]

OFFSETS = [
    ("kvm_run", "immediate_exit"), ("kvm_run", "exit_reason"), ("kvm_run", "cr8"),
    ("kvm_run", "apic_base"), ("kvm_run", "kvm_valid_regs"), ("kvm_run", "kvm_dirty_regs"),
    ("kvm_sregs", "gdt"), ("kvm_sregs", "cr0"), ("kvm_sregs", "efer"), ("kvm_sregs", "apic_base"),
    ("kvm_sregs", "interrupt_bitmap"), ("kvm_segment", "selector"), ("kvm_segment", "unusable"),
    ("kvm_fpu", "fcw"), ("kvm_fpu", "last_ip"), ("kvm_fpu", "xmm"), ("kvm_fpu", "mxcsr"),
    ("kvm_ioeventfd", "fd"), ("kvm_ioeventfd", "flags"), ("kvm_vcpu_events", "sipi_vector"),
    ("kvm_vcpu_events", "smi"), ("kvm_vcpu_events", "triple_fault"),
    ("kvm_vcpu_events", "exception_has_payload"), ("kvm_vcpu_events", "exception_payload"),
    ("kvm_pit_channel_state", "count_load_time"), ("kvm_pit_state2", "flags"),
    ("kvm_irqchip", "chip"), ("kvm_clock_data", "realtime"), ("kvm_clock_data", "host_tsc"),
    ("kvm_xcrs", "xcrs"), ("kvm_xcrs", "padding"), ("kvm_debugregs", "dr7"),
    ("kvm_irq_routing_entry", "u"), ("kvm_irq_routing_msi", "data"), ("kvm_msi", "flags"),
    ("kvm_msi", "devid"),
]

RUN_EXIT_OFFSETS = [
    ("io.port", "io", "port"), ("io.count", "io", "count"), ("io.data_offset", "io", "data_offset"),
    ("mmio.phys_addr", "mmio", "phys_addr"), ("mmio.data", "mmio", "data"), ("mmio.len", "mmio", "len"),
    ("mmio.is_write", "mmio", "is_write"), ("system_event.type", "system_event", "type"),
    ("system_event.ndata", "system_event", "ndata"), ("system_event.data", "system_event", "data"),
    ("internal.suberror", "internal", "suberror"), ("internal.data", "internal", "data"),
    ("fail_entry.cpu", "fail_entry", "cpu"),
]

IOCTLS = [name for name in dir(ioctls) if name.startswith("KVM_") and not name.startswith("KVM_CAP_")]
CAPS = [name for name in dir(ioctls) if name.startswith("KVM_CAP_")]
# Constants kept beside their structs (compared with the same-named macros).
STRUCT_CONSTANTS = ["KVM_IRQ_ROUTING_IRQCHIP", "KVM_IRQ_ROUTING_MSI", "KVM_IRQCHIP_PIC_MASTER",
                    "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC", "KVM_IRQFD_FLAG_DEASSIGN"]


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory) -> dict[str, int]:
    require(shutil.which("gcc") is not None, "gcc is needed to read the kernel headers")
    d = tmp_path_factory.mktemp("kvmh")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in STRUCTS + ["kvm_run"]:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for st, field in OFFSETS:
        lines.append(f'printf("offsetof {st}.{field} %zu\\n", offsetof(struct {st}, {field}));')
    for label, *_ in RUN_EXIT_OFFSETS:
        lines.append(f'printf("runexit {label} %zu\\n", offsetof(struct kvm_run, {label}));')
    for name in IOCTLS + CAPS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    for name in STRUCT_CONSTANTS:
        lines.append(f'printf("const {name} %lu\\n", (unsigned long)({name}));')
    lines += ["return 0;", "}"]
    src = d / "probe.c"
    src.write_text("\n".join(lines))
    exe = d / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {" ".join(l.split()[:2]): int(l.split()[2]) for l in out.splitlines()}


def _ctype(name):
    return getattr(s, name)


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_sizes(kernel_values, name):
    assert ctypes.sizeof(_ctype(name)) == kernel_values[f"sizeof {name}"]


def test_kvm_run_covers_the_exit_union(kernel_values):
    # Our kvm_run stops after kvm_dirty_regs; the kernel's continues with sync regs.
    assert s.kvm_run.kvm_dirty_regs.offset + 8 <= kernel_values["sizeof kvm_run"]


@pytest.mark.parametrize("st,field", OFFSETS)
def test_field_offsets(kernel_values, st, field):
    assert getattr(_ctype(st), field).offset == kernel_values[f"offsetof {st}.{field}"]


@pytest.mark.parametrize("label,member,field", RUN_EXIT_OFFSETS)
def test_kvm_run_exit_offsets(kernel_values, label, member, field):
    member_type = dict(s._run_exit._fields_)[member]
    ours = s.kvm_run.exit.offset + getattr(s._run_exit, member).offset + getattr(member_type, field).offset
    assert ours == kernel_values[f"runexit {label}"]


@pytest.mark.parametrize("name", IOCTLS + CAPS)
def test_ioctl_numbers(kernel_values, name):
    assert getattr(ioctls, name) == kernel_values[f"ioctl {name}"]


@pytest.mark.parametrize("name", STRUCT_CONSTANTS)
def test_struct_constants(kernel_values, name):
    assert getattr(s, name) == kernel_values[f"const {name}"]


def test_with_entries_appends_the_array():
    t = s.with_entries(s.kvm_cpuid2, s.kvm_cpuid_entry2, 3)
    assert ctypes.sizeof(t) == 8 + 3 * 40
    assert t.entries.offset == 8
    assert s.with_entries(s.kvm_cpuid2, s.kvm_cpuid_entry2, 3) is t
