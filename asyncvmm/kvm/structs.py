"""The KVM userspace ABI as ctypes structures, in kernel field order.

Each class mirrors one C struct of ``<linux/kvm.h>`` or ``<asm/kvm.h>`` (x86)
and is named after it.  Flexible-array structs (``kvm_cpuid2``, ``kvm_msrs``,
``kvm_msr_list``, ``kvm_irq_routing``) are declared as their fixed header;
:func:`with_entries` builds a sized variant for one call.  The unit tier
compares every size and offset here with the kernel headers compiled by gcc.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64
from functools import lru_cache

u8, u16, u32, u64, s32, s64 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32, c_int64


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_
                           if not n.startswith(("pad", "reserved")))
        return f"{type(self).__name__}({fields})"


# --- <linux/kvm.h> -----------------------------------------------------------

class kvm_userspace_memory_region(_Struct):
    """struct kvm_userspace_memory_region { __u32 slot; __u32 flags;
    __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr; };"""
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_irq_level(_Struct):
    """struct kvm_irq_level { union { __u32 irq; __s32 status; }; __u32 level; };"""
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_irqfd(_Struct):
    """struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; __u8 pad[16]; };"""
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(_Struct):
    """struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd;
    __u32 flags; __u8 pad[36]; };"""
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
                ("flags", u32), ("pad", u8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_clock_data(_Struct):
    """struct kvm_clock_data { __u64 clock; __u32 flags; __u32 pad0; __u64 realtime;
    __u64 host_tsc; __u32 pad[4]; };"""
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_enable_cap(_Struct):
    """struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]; };"""
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_mp_state(_Struct):
    """struct kvm_mp_state { __u32 mp_state; };"""
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_signal_mask(_Struct):
    """struct kvm_signal_mask { __u32 len; __u8 sigset[0]; };"""
    _fields_ = [("len", u32)]


class kvm_dirty_log(_Struct):
    """struct kvm_dirty_log { __u32 slot; __u32 padding1;
    union { void __user *dirty_bitmap; __u64 padding2; }; };"""
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_irq_routing_irqchip(_Struct):
    """struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };"""
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(_Struct):
    """struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data;
    union { __u32 pad; __u32 devid; }; };"""
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _kvm_irq_routing_u(ctypes.Union):
    # The other members (s390 adapter, Hyper-V SINT, Xen event channel) are not used on x86 here.
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi),
                ("pad", u32 * 8)]


class kvm_irq_routing_entry(_Struct):
    """struct kvm_irq_routing_entry { __u32 gsi; __u32 type; __u32 flags; __u32 pad;
    union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi;
    struct kvm_irq_routing_s390_adapter adapter; struct kvm_irq_routing_hv_sint hv_sint;
    struct kvm_irq_routing_xen_evtchn xen_evtchn; __u32 pad[8]; } u; };"""
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32),
                ("u", _kvm_irq_routing_u)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2


class kvm_irq_routing(_Struct):
    """struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; };"""
    _fields_ = [("nr", u32), ("flags", u32)]


class kvm_msi(_Struct):
    """struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags;
    __u32 devid; __u8 pad[12]; };"""
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32),
                ("devid", u32), ("pad", u8 * 12)]


# --- <asm/kvm.h> (x86) -------------------------------------------------------

class kvm_regs(_Struct):
    """struct kvm_regs: the general-purpose registers, rip and rflags."""
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_Struct):
    """struct kvm_segment { __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl; __u8 unusable; __u8 padding; };"""
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_Struct):
    """struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };"""
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):
    """struct kvm_sregs: segments, descriptor tables, control registers, efer,
    apic_base and the pending-interrupt bitmap."""
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(_Struct):
    """struct kvm_fpu { __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u8 pad1;
    __u16 last_opcode; __u64 last_ip; __u64 last_dp; __u8 xmm[16][16];
    __u32 mxcsr; __u32 pad2; };"""
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(_Struct):
    """struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };"""
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    """struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };"""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(_Struct):
    """struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };"""
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(_Struct):
    """struct kvm_cpuid_entry2 { __u32 function; __u32 index; __u32 flags;
    __u32 eax, ebx, ecx, edx; __u32 padding[3]; };"""
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling


class kvm_cpuid2(_Struct):
    """struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };"""
    _fields_ = [("nent", u32), ("padding", u32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(_Struct):
    """struct kvm_lapic_state { char regs[KVM_APIC_REG_SIZE]; };"""
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_pit_config(_Struct):
    """struct kvm_pit_config { __u32 flags; __u32 pad[15]; };"""
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_pit_channel_state(_Struct):
    """struct kvm_pit_channel_state: one i8254 channel."""
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8),
                ("status_latched", u8), ("status", u8), ("read_state", u8),
                ("write_state", u8), ("write_latch", u8), ("rw_mode", u8), ("mode", u8),
                ("bcd", u8), ("gate", u8), ("count_load_time", s64)]


class kvm_pit_state2(_Struct):
    """struct kvm_pit_state2 { struct kvm_pit_channel_state channels[3]; __u32 flags;
    __u32 reserved[9]; };"""
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irqchip(_Struct):
    """struct kvm_irqchip { __u32 chip_id; __u32 pad; union { char dummy[512];
    struct kvm_pic_state pic; struct kvm_ioapic_state ioapic; } chip; };

    The chip state is kept as opaque bytes: the VMM only saves and restores it.
    """
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class _exception(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _triple_fault(_Struct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(_Struct):
    """struct kvm_vcpu_events: pending exception, interrupt, NMI, SIPI and SMI state."""
    _fields_ = [("exception", _exception), ("interrupt", _interrupt), ("nmi", _nmi),
                ("sipi_vector", u32), ("flags", u32), ("smi", _smi),
                ("triple_fault", _triple_fault), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_debugregs(_Struct):
    """struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; __u64 reserved[9]; };"""
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_xsave(_Struct):
    """struct kvm_xsave { __u32 region[1024]; __u32 extra[]; };"""
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(_Struct):
    """struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; };"""
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(_Struct):
    """struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[KVM_MAX_XCRS];
    __u64 padding[16]; };"""
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


# --- struct kvm_run, the page shared with KVM_RUN ------------------------------

class _run_io(_Struct):
    """KVM_EXIT_IO: { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; }"""
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class _run_mmio(_Struct):
    """KVM_EXIT_MMIO: { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; }"""
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_msr(_Struct):
    """KVM_EXIT_X86_RDMSR/WRMSR: { __u8 error; __u8 pad[7]; __u32 reason; __u32 index; __u64 data; }"""
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class _run_exit(ctypes.Union):
    _fields_ = [("hardware_exit_reason", u64), ("fail_entry", _run_fail_entry),
                ("io", _run_io), ("mmio", _run_mmio), ("internal", _run_internal),
                ("system_event", _run_system_event), ("msr", _run_msr),
                ("padding", ctypes.c_char * 256)]


class kvm_run(_Struct):
    """struct kvm_run, up to the exit union (the sync-regs tail is not used)."""
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", _run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64)]


# --- flexible arrays ----------------------------------------------------------

@lru_cache(maxsize=None)
def with_entries(header: type[ctypes.Structure], entry: type, n: int) -> type[ctypes.Structure]:
    """``header`` followed by ``entries[n]`` of ``entry``: one call's variable-size buffer."""
    return type(f"{header.__name__}_{n}", (_Struct,),
                {"_fields_": list(header._fields_) + [("entries", entry * n)]})
