/*
 * Real-mode setup stub of the bzImage variant (Documentation/arch/x86/boot.rst,
 * "Running the kernel" for the 16-bit protocol).  VMMs using the 64-bit
 * protocol never run it; QEMU and classic boot loaders do.
 *
 * build.py places this code at STUB_OFFSET of the setup area and puts a
 * short jump to it at offset 0x200.  A loader enters with CS = setup segment
 * + 0x20 and IP = 0 (i.e. at that jump); DS is recomputed from CS.  The stub
 * switches to flat 32-bit protected mode and enters code32_start with the
 * 32-bit protocol's registers: esi = boot_params (this setup area, whose
 * header the loader has filled in), ebx = ebp = edi = 0, and CS 0x10 /
 * DS 0x18 as boot.rst prescribes.  It is position-independent: the GDT base
 * is patched at run time, and the file has no relocations.
 */
#ifndef STUB_OFFSET
#error "build.py passes -DSTUB_OFFSET"
#endif

#define HDR_CODE32_START 0x214
/* offsets of stub labels relative to DS (setup base) and CS (setup base + 0x200) */
#define DS_OFF(label)   (STUB_OFFSET + ((label) - stub_start))
#define CS_OFF(label)   (STUB_OFFSET - 0x200 + ((label) - stub_start))

        .code16
        .text
stub_start:
        cli
        cld
        movw    %cs, %ax
        subw    $0x20, %ax
        movw    %ax, %ds
        movzwl  %ax, %esi
        shll    $4, %esi                        /* esi = linear address of boot_params */
        leal    DS_OFF(gdt)(%esi), %eax
        movl    %eax, DS_OFF(gdt_ptr) + 2
        movl    HDR_CODE32_START, %eax
        movl    %eax, DS_OFF(far_ptr)
        lgdtl   DS_OFF(gdt_ptr)
        movl    %cr0, %eax
        orb     $1, %al                         /* CR0.PE */
        movl    %eax, %cr0
        movw    $0x18, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorl    %ebx, %ebx
        xorl    %ebp, %ebp
        xorl    %edi, %edi
        /* CS still has its real-mode base until this jump reloads it. */
        ljmpl   *%cs:CS_OFF(far_ptr)

        .balign 8
gdt:
        .quad   0
        .quad   0
        .quad   0x00CF9B000000FFFF              /* 0x10 flat 32-bit code */
        .quad   0x00CF93000000FFFF              /* 0x18 flat data */
gdt_ptr:
        .word   4 * 8 - 1
        .long   0                               /* patched: linear address of gdt */
far_ptr:
        .long   0                               /* patched: code32_start */
        .word   0x10

        .section .note.GNU-stack, "", @progbits
