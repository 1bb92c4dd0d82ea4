/*
 * Shared declarations of the test guest (see docs/testguest.md).
 *
 * Everything in C runs in ring 3 with IOPL=3 and interrupts masked: port I/O
 * is allowed, MMIO goes through the user-accessible identity map built in
 * entry.S, and devices are polled.  The only privileged operations left,
 * halting and a deliberate triple fault, go through guest_syscall().
 */
#ifndef TESTGUEST_H
#define TESTGUEST_H

/* boot_kind: which entry the VMM used */
#define BOOT_LINUX64    1       /* 64-bit Linux boot protocol (ELF e_entry, bzImage +0x200) */
#define BOOT_PVH        2       /* PVH 32-bit entry from the Xen ELF note */
#define BOOT_LINUX32    3       /* 32-bit Linux boot protocol (bzImage real-mode stub) */

/* guest_syscall() numbers: eax for a ring-3 ud2, handled by ud_entry in
 * entry.S.  SYS_HALT is a magic value so that a stray ud2 is fatal. */
#define SYS_HALT        0x7e570001
#define SYS_TRIPLE_FAULT 0x7e570002
#define SYS_CPUID       0x7e570003      /* esi = leaf, ecx = subleaf; returns eax..edx */

/* Real-mode AP trampoline page (SIPI vector TRAMP_ADDR >> 12).  0x1000..0x5fff
 * is unused by asyncvmm's layout (GDT 0x500, PVH info 0x6000, zero page 0x7000). */
#define TRAMP_ADDR      0x3000
#define MAX_CPUS        32

/* What entry.S maps uncached for devices: the 3..4 GiB MMIO gap, and the first
 * GiB of asyncvmm's 64-bit PCI BAR window (pci_mmio64_window() in
 * asyncvmm/arch/x86_64/layout.py: 256 GiB for guests below 256 GiB of RAM). */
#define MMIO32_MAP_START        0xC0000000
#define MMIO32_MAP_END          0x100000000
#define MMIO64_MAP_START        0x4000000000
#define MMIO64_MAP_SIZE         0x40000000

#ifndef __ASSEMBLER__
#include <stddef.h>
#include <stdint.h>

/* ---- entry.S ---- */
extern uint64_t boot_info;
extern uint32_t boot_kind;
extern uint64_t ap_boot_rsp;
extern const uint8_t ap_tramp[], ap_tramp_end[];

/* A compiler barrier.  x86 is TSO (stores are seen in program order by
 * devices and other CPUs), so ordering our own stores and loads against each
 * other only needs the compiler not to reorder them. */
#define barrier() __asm__ __volatile__("" ::: "memory")

static inline void outb(uint16_t port, uint8_t v)
{
        __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline void outw(uint16_t port, uint16_t v)
{
        __asm__ __volatile__("outw %0, %1" : : "a"(v), "Nd"(port));
}
static inline void outl(uint16_t port, uint32_t v)
{
        __asm__ __volatile__("outl %0, %1" : : "a"(v), "Nd"(port));
}
static inline uint16_t inw(uint16_t port)
{
        uint16_t v;
        __asm__ __volatile__("inw %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}
static inline uint32_t inl(uint16_t port)
{
        uint32_t v;
        __asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}
static inline uint8_t inb(uint16_t port)
{
        uint8_t v;
        __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}
static inline void cpu_relax(void)
{
        __asm__ __volatile__("pause" ::: "memory");
}
static inline uint64_t rdtsc(void)
{
        uint32_t lo, hi;
        __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
        return ((uint64_t)hi << 32) | lo;
}

/* Guest-physical memory is identity-mapped, so a physical address is a pointer. */
static inline volatile void *phys(uint64_t addr)
{
        return (volatile void *)(uintptr_t)addr;
}
static inline uint32_t mmio_read32(uint64_t addr)
{
        return *(volatile uint32_t *)phys(addr);
}
static inline void mmio_write32(uint64_t addr, uint32_t v)
{
        *(volatile uint32_t *)phys(addr) = v;
}
static inline void mmio_write8(uint64_t addr, uint8_t v)
{
        *(volatile uint8_t *)phys(addr) = v;
}
static inline uint8_t mmio_read8(uint64_t addr)
{
        return *(volatile uint8_t *)phys(addr);
}
static inline uint16_t mmio_read16(uint64_t addr)
{
        return *(volatile uint16_t *)phys(addr);
}
static inline void mmio_write16(uint64_t addr, uint16_t v)
{
        *(volatile uint16_t *)phys(addr) = v;
}

__attribute__((noreturn)) void guest_syscall(uint64_t nr);
__attribute__((noreturn)) void ring3_triple_fault(void);       /* entry.S */

/* ---- lib.c ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
uint32_t crc32_update(uint32_t crc, const volatile uint8_t *p, size_t n);
/* Parses a decimal or 0x-hex number spanning exactly [s, s+n). */
int parse_u64(const char *s, size_t n, uint64_t *out);
/* Splits "a:b:c" into up to max fields (pointer, length); returns how many. */
int split_fields(const char *s, size_t n, const char **f, size_t *fl, int max);
/* Whether [s, s+n) is exactly the NUL-terminated word. */
int word_is(const char *s, size_t n, const char *word);

/* ---- console.c (COM1) ---- */
void con_putc(char c);
void con_puts(const char *s);
void con_write(const char *s, size_t n);
void con_hex(uint64_t v);               /* 0x1f */
void con_hex32(uint32_t v);             /* 0x0000001f */
void con_dec(uint64_t v);
void con_bytes_hex(const volatile uint8_t *p, size_t n);       /* "deadbeef" */
void con_line(const char *s);           /* "testguest: " s "\n" */
void con_begin(const char *s);          /* "testguest: " s, line continues */
void con_kv(const char *key, uint64_t v);       /* " key=<dec>" */
void con_kvx(const char *key, uint64_t v);      /* " key=0x<hex>" */
void con_end(void);                     /* "\n" */
void serial_echo(void);

/* ---- acpi.c ---- */
struct acpi_sleep_reg {
        int found;
        int is_io;              /* 1: port I/O, 0: MMIO */
        uint64_t addr;
};
uint64_t acpi_find_rsdp(void);
/* Fills apic_ids[] with enabled local APICs of the MADT; returns the count or -1. */
int acpi_madt_cpus(uint64_t rsdp, uint32_t *apic_ids, int max);
struct acpi_sleep_reg acpi_fadt_sleep_control(uint64_t rsdp);

/* ---- smp.c ---- */
void smp_boot(uint64_t cpus);
void ap_main(void);

/* ---- virtio.c, vdev.c ---- */
struct virtio_params {
        uint64_t base;          /* first virtio-mmio window */
        uint64_t stride;        /* distance between windows */
        uint64_t count;         /* windows to probe */
};
void vdev_configure(const struct virtio_params *p);
void blk_select(uint64_t index);
void blk_action(const char *arg, size_t n);
void rng_action(const char *arg, size_t n);
void net_action(const char *arg, size_t n);
void blkbench_action(const char *arg, size_t n);        /* blkbench.c */
void blkreset_action(const char *arg, size_t n);        /* blkreset.c */
void vsock_configure(const struct virtio_params *p);    /* vsock.c */
void balloon_configure(const struct virtio_params *p);  /* balloon.c */
void balloon_action(const char *arg, size_t n);

/* ---- cpuid.c ---- */
void cpuid_action(const char *v, size_t vn);
void vsock_action(const char *arg, size_t n);

/* ---- pci.c: PCI bus 0 through ECAM, virtio-pci ---- */
void pci_configure(uint64_t ecam_base, uint64_t mmio_base);
void pci_rng_action(const char *arg, size_t n);
void pci_blk_action(const char *arg, size_t n);
void pci_move_action(const char *arg, size_t n);
void pci_bad_bar_action(const char *arg, size_t n);
void pci_kick_action(const char *arg, size_t n);
void pci_msix_action(const char *arg, size_t n);
void pci_cf8_action(const char *arg, size_t n);
void pci_wait_action(const char *arg, size_t n);
void pci_hostile_action(const char *arg, size_t n);
void pci_cfgwin_action(const char *arg, size_t n);
void pci_blk_resize_action(const char *arg, size_t n);
void pci_blkbench_action(const char *arg, size_t n);

#endif /* __ASSEMBLER__ */
#endif /* TESTGUEST_H */
