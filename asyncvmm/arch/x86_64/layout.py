"""The x86-64 guest-physical memory map of an asyncvmm microVM.

One table of constants that loaders, ACPI, the MP table, the builder and the
test guest agree on.  Nothing here does I/O.

    0x0000_0500  GDT                     0x0000_9000  PML4
    0x0000_0520  IDT (empty)             0x0000_a000  PDPT
    0x0000_6000  PVH hvm_start_info      0x0000_b000  4 page directories (identity map of 4 GiB)
    0x0000_7000  zero page (boot_params) 0x0002_0000  kernel command line
    0x0000_8ff0  boot stack top          0x0009_fc00  EBDA: MP floating pointer + table
    0x000e_0000  ACPI (RSDP first)       0x0010_0000  HIMEM: kernels load here or above
    0xc000_0000  32-bit MMIO gap: boot timer, then one 4 KiB window per virtio-mmio device
    0xc100_0000  with PCI instead: the 32-bit BAR window, up to the ECAM
    0xeec0_0000  PCI ECAM (MMCONFIG), 256 MiB, e820-reserved; bus 0 decodes its first 1 MiB
    0xfec0_0000  IOAPIC                  0xfee0_0000  local APIC
    0x1_0000_0000  RAM above the gap for guests larger than 3 GiB
    256 GiB (or the first 1 GiB boundary past RAM)  the 64-bit PCI BAR window, 256 GiB
    512 GiB (right after that window)  virtio-pmem regions, 2 MiB aligned, 512 GiB;
                                       the virtio-mem hotplug region at its top

Port I/O: 0x60/0x64 i8042, 0x3f8 COM1, 0xcf8..0xcff PCI configuration mechanism #1.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

GDT_START = 0x500
IDT_START = 0x520
PVH_INFO_START = 0x6000          # struct hvm_start_info, then its memmap table
PVH_MEMMAP_START = 0x6040
ZERO_PAGE_START = 0x7000         # struct boot_params
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000               # 4 pages: 2 MiB pages identity-mapping 0..4 GiB
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 4096          # including the NUL; the kernel's own limit may be lower
EBDA_START = 0x9FC00             # MP floating pointer structure and table live here
LOW_RAM_END = 0xA0000            # 640 KiB: the VGA hole and BIOS area follow
ACPI_START = 0xE0000             # RSDP (found by scanning 0xe0000-0xfffff) then the tables
ACPI_END = 0x100000
HIMEM_START = 0x100000

MMIO32_START = 0xC000_0000       # start of the 32-bit MMIO gap (1 GiB, up to 4 GiB)
MMIO32_END = 1 << 32
BOOT_TIMER_ADDR = 0xC000_0000    # a guest write of 123 here marks boot done
BOOT_TIMER_SIZE = 0x1000
VIRTIO_MMIO_START = 0xC000_1000  # first virtio-mmio window
VIRTIO_MMIO_SIZE = 0x1000        # one window per device
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
RAM_ABOVE_GAP_START = 1 << 32

# PCI (only with --enable-pci; then there are no virtio-mmio windows).  The
# ECAM is the PCI Express enhanced configuration space (PCI Firmware 3.2
# section 4.1.2): 1 MiB per bus = 32 devices x 8 functions x 4 KiB.  256 MiB
# would cover 256 buses; it ends where the IOAPIC starts, and only bus 0 is
# decoded.
PCI_ECAM_START = 0xEEC0_0000
PCI_ECAM_SIZE = 256 * MiB
PCI_ECAM_BUS0_SIZE = 1 * MiB
PCI_MMIO32_START = 0xC100_0000   # 32-bit BAR window: 16 MiB into the gap, clear of the boot timer
PCI_MMIO32_END = PCI_ECAM_START  # exclusive
PCI_MMIO64_MIN_START = 256 * GiB
PCI_MMIO64_ALIGN = 1 * GiB
PCI_MMIO64_SIZE = 256 * GiB
PCI_CONFIG_IO_PORT = 0xCF8       # CONFIG_ADDRESS 0xcf8, CONFIG_DATA 0xcfc..0xcff
PCI_CONFIG_IO_SIZE = 8

# Legacy ISA interrupt lines; virtio-mmio devices take GSIs from IRQ_FIRST_DEVICE.
IRQ_I8042 = 1
IRQ_COM1 = 4
IRQ_FIRST_DEVICE = 5
IRQ_LAST = 23                    # IOAPIC pins 0..23

COM1_PORT = 0x3F8
I8042_PORT = 0x60                # data 0x60, command/status 0x64

# Limits of this layout: the identity map covers 4 GiB and KVM_SET_USER_MEMORY_REGION
# takes any size, but the host must be able to reserve the address space.
MAX_MEM_SIZE = 1 << 40


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """``(guest_addr, size)`` of each RAM region for a guest of ``mem_size`` bytes.

    RAM below 3 GiB is one region; the rest continues above 4 GiB so that the
    32-bit MMIO gap stays free for devices, the IOAPIC and the local APIC.
    """
    if mem_size <= 0:
        raise ValueError("guest memory size must be positive")
    if mem_size > MAX_MEM_SIZE:
        raise ValueError(f"guest memory size {mem_size} exceeds {MAX_MEM_SIZE}")
    if mem_size <= MMIO32_START:
        return [(0, mem_size)]
    return [(0, MMIO32_START), (RAM_ABOVE_GAP_START, mem_size - MMIO32_START)]


def virtio_mmio_window(index: int) -> tuple[int, int, int]:
    """``(base, size, gsi)`` of the ``index``-th virtio-mmio device."""
    gsi = IRQ_FIRST_DEVICE + index
    if gsi > IRQ_LAST:
        raise ValueError(f"no interrupt line left for virtio device #{index}")
    return VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE, gsi

# MSI(-X) interrupts are routed on GSIs after the IOAPIC's pins (KVM_SET_GSI_ROUTING); 4095 is
# the last GSI KVM accepts (KVM_MAX_IRQ_ROUTES is 4096 on x86).
GSI_MSI_START = IRQ_LAST + 1
GSI_MSI_END = 4095


def pci_mmio64_window(ram_end: int) -> tuple[int, int]:
    """``(start, size)`` of the 64-bit PCI BAR window for a guest whose RAM ends at ``ram_end``.

    It starts at 256 GiB, or at the first 1 GiB boundary at or past the end
    of RAM when RAM reaches that far, so the window never overlaps RAM.
    """
    if ram_end < 0:
        raise ValueError(f"RAM end {ram_end:#x} is negative")
    aligned = (ram_end + PCI_MMIO64_ALIGN - 1) & ~(PCI_MMIO64_ALIGN - 1)
    return max(PCI_MMIO64_MIN_START, aligned), PCI_MMIO64_SIZE


# virtio-pmem: each device's file is mapped in guest-physical space past the 64-bit PCI
# window, with or without PCI (where Firecracker puts it: its FIRST_ADDR_PAST_64BITS_MMIO,
# 512 GiB long); the region's start and size are 2 MiB aligned, as the guest's
# memremap of it (devm_memremap_pages, a memory section) wants.
PMEM_ALIGN = 2 * MiB
PMEM_WINDOW_SIZE = 512 * GiB


def pmem_window(ram_end: int) -> tuple[int, int]:
    """``(start, size)`` of the window virtio-pmem regions are placed in, past the 64-bit
    PCI window of a guest whose RAM ends at ``ram_end``."""
    start, size = pci_mmio64_window(ram_end)
    return start + size, PMEM_WINDOW_SIZE


# virtio-mem (memory hotplug): the region sits at the top of the window virtio-pmem regions fill
# from the bottom (past the 64-bit PCI window, with or without PCI, so its address does not
# depend on --enable-pci), on a 1 GiB boundary: slots are 128 MiB or more, and Linux adds
# hotplugged memory in memory blocks (128 MiB, up to 2 GiB for large guests).
MEMORY_HOTPLUG_ALIGN = 1 * GiB


def memory_hotplug_region(ram_end: int, size: int) -> tuple[int, int]:
    """``(start, size)`` of the hotpluggable memory region of ``size`` bytes for a guest whose
    RAM ends at ``ram_end``: the top of :func:`pmem_window`, never over RAM or BARs."""
    window, window_size = pmem_window(ram_end)
    if not 0 < size <= window_size // 2:
        raise ValueError(f"hotpluggable memory of {size} bytes does not fit its window "
                         f"(at most {window_size // 2})")
    start = (window + window_size - size) & ~(MEMORY_HOTPLUG_ALIGN - 1)
    return start, size
