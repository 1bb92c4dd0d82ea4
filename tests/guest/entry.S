/*
 * Ring-0 part of the test guest: every way in, and the way down to ring 3.
 *
 * Primer.  kvm_pvm emulates guest ring-0 code at roughly a million
 * instructions per second but runs ring 3 natively, so everything here is
 * straight-line code that gets out of ring 0 as fast as it can:
 *
 *   0x100000  start32   32-bit entry: PVH (ebx = struct hvm_start_info) or the
 *                       32-bit Linux boot protocol (ebx = 0, esi = boot_params).
 *                       Turns on PAE + long mode with the static page tables.
 *   0x100200  start64   64-bit Linux boot protocol entry (rsi = boot_params),
 *                       the ELF e_entry and the bzImage "payload + 0x200".
 *   common64            own GDT, IDT and TSS, own CR3, then iretq to ring 3
 *                       with IOPL=3 and IF=0.
 *   ud_entry            the only way back up: ring 3 executes ud2 with eax =
 *                       SYS_HALT (hlt forever), SYS_CPUID (CPUID in ring 0,
 *                       then back to ring 3) or anything else (triple fault).
 *   ap_tramp            real-mode AP trampoline, copied below 1 MiB by ring 3
 *                       (smp.c); real mode -> ap_start32 -> ap_start64.
 *
 * The IDT covers vectors 0..6 and only #UD (6) is present, so every other
 * exception in either ring escalates to #DF and then to a triple fault (a VM
 * shutdown): a crashing test guest is loud, never silent.  Interrupts stay
 * masked (IF=0) for the whole life of the guest; drivers poll.
 *
 * Why ud2 and neither syscall nor int $0x80: on kvm_pvm a guest's syscall
 * lands in PVM's native supervisor mode, where cli/hlt fault instead of
 * being emulated, and a software int from ring 3 is reflected as #NP; an
 * exception, however, is delivered through the guest IDT into emulated
 * ring 0.  The gate's stack switch needs a TSS (RSP0), shared by all CPUs:
 * nothing ever returns from ring 0, so sharing the stack is harmless.
 */

#include "guest.h"

#define MSR_EFER        0xC0000080
#define EFER_LME        (1 << 8)
#define CR0_PE          (1 << 0)
#define CR0_PG          (1 << 31)
#define CR4_PAE         (1 << 5)

/* Selectors of gdt below. */
#define KERNEL_CS64     0x08
#define KERNEL_DS       0x10
#define USER_DS         0x1b
#define USER_CS64       0x23
#define KERNEL_CS32     0x28
#define TSS_SEL         0x30
#define TSS_TYPE_BUSY   0x02    /* in the descriptor's type byte (offset 5) */
#define UD_VECTOR       6
/* IOPL=3 (port I/O from ring 3), IF=0, bit 1 is reserved-as-one. */
#define USER_RFLAGS     0x3002

/* 32-bit code: enable PAE, load our PML4, set EFER.LME, enable paging,
 * then far-jump into the 64-bit code segment.  Needs flat 32-bit CS/DS. */
.macro ENTER_LONG_MODE target
        movl    %cr4, %eax
        orl     $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_LME, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $(CR0_PE | CR0_PG), %eax
        movl    %eax, %cr0
        ljmp    $KERNEL_CS64, $\target
.endm

        .section .head, "ax"
        .code32
        .globl  start32
start32:
        cli
        /* PVH guarantees ebx = hvm_start_info; the Linux 32-bit protocol
         * guarantees ebx = 0 and esi = boot_params. */
        testl   %ebx, %ebx
        jz      1f
        movl    %ebx, boot_info
        movl    $BOOT_PVH, boot_kind
        jmp     2f
1:      movl    %esi, boot_info
        movl    $BOOT_LINUX32, boot_kind
2:      lgdt    gdt_ptr
        ENTER_LONG_MODE common64

        /* The 64-bit entry sits at payload offset 0x200, as in a bzImage. */
        .org    0x200
        .code64
        .globl  start64
start64:
        cli
        movq    %rsi, boot_info(%rip)
        movl    $BOOT_LINUX64, boot_kind(%rip)
        lgdt    gdt_ptr(%rip)
        /* fall through */
common64:
        lidt    idt_ptr(%rip)
        movl    $KERNEL_DS, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movq    $pml4, %rax
        movq    %rax, %cr3
        leaq    bsp_kstack_top(%rip), %rsp
        leaq    ring3_start(%rip), %r12
        leaq    bsp_ustack_top(%rip), %r13
        /* fall through */

/* r12 = ring-3 rip, r13 = ring-3 rsp (16-byte aligned).  Per CPU. */
enter_ring3:
        movl    $TSS_SEL, %eax
        ltr     %ax
        pushq   $USER_DS
        pushq   %r13
        pushq   $USER_RFLAGS
        pushq   $USER_CS64
        pushq   %r12
        iretq

/* #UD from either ring (an interrupt gate: IF stays clear), eax = SYS_*.
 * Returns only for SYS_CPUID.  The numbers are magic, so a stray ud2 is fatal. */
        .globl  ud_entry
ud_entry:
        cmpl    $SYS_CPUID, %eax
        je      3f
        cmpl    $SYS_HALT, %eax
        jne     1f
2:      hlt
        jmp     2b
1:      lidt    no_idt_ptr(%rip)
        ud2     /* no IDT left: #UD -> #DF -> triple fault */
/* SYS_CPUID: CPUID leaf esi, subleaf ecx, executed here in ring 0 (which a
 * hypervisor always answers from the vCPU's table; on kvm_pvm ring 3 runs
 * CPUID natively), results in eax..edx; back past the ud2 (2 bytes) in the
 * caller's ring.  #UD pushes no error code: (%rsp) is the saved RIP. */
3:      movl    %esi, %eax
        cpuid
        addq    $2, (%rsp)
        iretq

        .text
/* exit=triplefault from ring 3: hlt is privileged, so #GP, which has no
 * gate -> #DF -> triple fault without ever entering ring 0. */
        .globl  ring3_triple_fault
ring3_triple_fault:
        hlt
        jmp     ring3_triple_fault

/* Ring-3 entry of the BSP and of every AP: a call keeps the ABI's stack
 * alignment; the C mains never return (and ud2 would triple-fault). */
ring3_start:
        call    guest_main
        ud2
ap_ring3_start:
        call    ap_main
        ud2

/* AP in 32-bit protected mode, flat segments from the trampoline. */
        .code32
ap_start32:
        movl    $KERNEL_DS, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        ENTER_LONG_MODE ap_start64
        .code64
ap_start64:
        lidt    idt_ptr(%rip)
        /* Every CPU loads the one TSS; ltr refuses a busy one, so clear it. */
        andb    $~TSS_TYPE_BUSY, gdt + TSS_SEL + 5(%rip)
        /* smp.c starts one AP at a time and waits until it has left ring 0,
         * so the APs can share one ring-0 stack. */
        leaq    ap_kstack_top(%rip), %rsp
        leaq    ap_ring3_start(%rip), %r12
        movq    ap_boot_rsp(%rip), %r13
        jmp     enter_ring3

/*
 * Real-mode AP trampoline.  smp.c copies [ap_tramp, ap_tramp_end) to
 * TRAMP_ADDR and sends SIPI vector TRAMP_ADDR >> 12, so the AP starts here
 * with CS = TRAMP_ADDR >> 4 and IP = 0.  Only CS-relative data is used.
 */
        .section .rodata
        .code16
        .globl  ap_tramp, ap_tramp_end
ap_tramp:
        cli
        lgdtl   %cs:(ap_tramp_gdt_ptr - ap_tramp)
        movl    %cr0, %eax
        orl     $CR0_PE, %eax
        movl    %eax, %cr0
        ljmpl   $KERNEL_CS32, $ap_start32
        .balign 4
ap_tramp_gdt_ptr:
        .word   gdt_end - gdt - 1
        .long   gdt
ap_tramp_end:
        .code64

        /* Accessed bits are preset so that loading a selector never makes
         * the CPU (or kvm_pvm's emulator) write to the table; ltr still
         * sets the TSS busy bit, so the table lives in .data. */
        .data
        .balign 8
gdt:
        .quad   0
        .quad   0x00AF9B000000FFFF      /* 0x08 ring-0 code, 64-bit */
        .quad   0x00CF93000000FFFF      /* 0x10 ring-0 data, flat */
        .quad   0x00CFF3000000FFFF      /* 0x18 ring-3 data, flat */
        .quad   0x00AFFB000000FFFF      /* 0x20 ring-3 code, 64-bit */
        .quad   0x00CF9B000000FFFF      /* 0x28 ring-0 code, 32-bit flat (APs) */
        /* 0x30: 64-bit TSS, available; link.ld splits the base into tss_base_* */
        .word   tss_end - tss - 1, tss_base_0_15
        .byte   tss_base_16_23, 0x89, 0x00, tss_base_24_31
        .long   0, 0
gdt_end:
        .balign 4
        .word   0
gdt_ptr:                                /* lgdt reads 6 bytes in 32-bit mode, 10 in 64 */
        .word   gdt_end - gdt - 1
        .quad   gdt
        .word   0
idt_ptr:                                /* gates 0..6, only #UD present */
        .word   idt_end - idt - 1
        .quad   idt
        .word   0
no_idt_ptr:                             /* limit 0: nothing can be delivered */
        .word   0
        .quad   0

/*
 * Identity map of 0..4 GiB in 2 MiB pages, built by the assembler (no loop
 * runs in ring 0).  U/S is set at every level so ring 3 reaches RAM, the
 * virtio-mmio windows and the local APIC; the 3..4 GiB gigabyte (MMIO gap)
 * is mapped uncached (PCD|PWT), and so is the gigabyte at MMIO64_MAP_START
 * (guest.h), where PCI BARs live above 4 GiB.  Accessed/dirty bits are preset so the
 * page walker never has to write them back.
 */
#define PTE_P   0x001
#define PTE_RW  0x002
#define PTE_US  0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_A   0x020
#define PTE_D   0x040
#define PTE_PS  0x080
#define PTE_DIR (PTE_P | PTE_RW | PTE_US | PTE_A)
#define PTE_2M  (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS)
        .data
        .balign 4096
pml4:
        .quad   pdpt + PTE_DIR
        .fill   511, 8, 0
pdpt:
        .quad   pd + 0x0000 + PTE_DIR
        .quad   pd + 0x1000 + PTE_DIR
        .quad   pd + 0x2000 + PTE_DIR
        .quad   pd + 0x3000 + PTE_DIR
        .fill   MMIO64_MAP_START / 0x40000000 - 4, 8, 0
        .quad   pd_mmio64 + PTE_DIR
        .fill   511 - MMIO64_MAP_START / 0x40000000, 8, 0
pd:
        .set    addr, 0
        .rept   1536
        .quad   addr + PTE_2M
        .set    addr, addr + 0x200000
        .endr
        .rept   512
        .quad   addr + (PTE_2M | PTE_PWT | PTE_PCD)
        .set    addr, addr + 0x200000
        .endr
pd_mmio64:                              /* PCI BARs (--enable-pci), uncached */
        .set    addr, MMIO64_MAP_START
        .rept   MMIO64_MAP_SIZE / 0x200000
        .quad   addr + (PTE_2M | PTE_PWT | PTE_PCD)
        .set    addr, addr + 0x200000
        .endr

        .balign 16
idt:
        .fill   UD_VECTOR * 16, 1, 0
        /* 64-bit interrupt gate, DPL 0, to ud_entry (split by link.ld) */
        .word   ud_entry_0_15, KERNEL_CS64
        .byte   0, 0x8E
        .word   ud_entry_16_31
        .long   0, 0
idt_end:

        /* struct tss_struct (x86-64): RSP0 for the gate's stack switch, then
         * an all-zero I/O permission bitmap (every port allowed).  IOPL=3
         * alone should be enough, but kvm_pvm consults the bitmap of a
         * loaded TSS for ring-3 port I/O. */
        .balign 16
        .globl  tss
tss:
        .long   0
        .quad   int_stack_top           /* RSP0 */
        .fill   104 - 12 - 2, 1, 0
        .word   104                     /* I/O map base: the bitmap follows */
        .fill   65536 / 8, 1, 0
        .byte   0xff                    /* the bitmap's required terminator */
tss_end:

        .globl  boot_kind, boot_info, ap_boot_rsp
        .balign 8
boot_info:      .quad 0         /* physical address of hvm_start_info or boot_params */
boot_kind:      .long 0         /* BOOT_* */
        .balign 8
ap_boot_rsp:    .quad 0         /* ring-3 stack of the AP being started (smp.c) */

        .bss
        .balign 16
        .space  1024
int_stack_top:
        .space  1024
bsp_kstack_top:
        .space  1024
ap_kstack_top:
        .space  16384
bsp_ustack_top:

        .section .note.GNU-stack, "", @progbits
