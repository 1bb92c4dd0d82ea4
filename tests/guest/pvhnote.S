/*
 * The PVH entry note (xen/include/public/elfnote.h: XEN_ELFNOTE_PHYS32_ENTRY
 * = 18, owner "Xen").  Linked only into the PVH variant of the ELF image.
 *
 * The descriptor is 8 bytes, as Linux emits it on x86-64 (_ASM_PTR); the
 * 32-bit physical entry is its low half, so readers that take a u32 and
 * readers that take a u64 agree.
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* n_namesz: "Xen\0" */
        .long   8                       /* n_descsz */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
        .asciz  "Xen"
        .balign 4
        .quad   start32

        .section .note.GNU-stack, "", @progbits
