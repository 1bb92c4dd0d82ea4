"""The guest-physical memory map: the PCI ranges fit the gap and stay clear of each other and RAM."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.layout import GiB, MiB


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def test_pci_ecam_is_the_256_mib_below_the_ioapic() -> None:
    assert layout.PCI_ECAM_START == 0xEEC0_0000
    assert layout.PCI_ECAM_SIZE == 256 * MiB
    assert layout.PCI_ECAM_START + layout.PCI_ECAM_SIZE == layout.IOAPIC_ADDR
    # One bus: 32 devices x 8 functions x 4 KiB of configuration space.
    assert layout.PCI_ECAM_BUS0_SIZE == 32 * 8 * 4096
    assert layout.PCI_ECAM_START % layout.PCI_ECAM_BUS0_SIZE == 0


def test_pci_mmio32_window_lies_between_the_boot_timer_and_the_ecam() -> None:
    assert (layout.PCI_MMIO32_START, layout.PCI_MMIO32_END) == (0xC100_0000, 0xEEC0_0000)
    assert layout.PCI_MMIO32_END == layout.PCI_ECAM_START
    assert layout.BOOT_TIMER_ADDR + layout.BOOT_TIMER_SIZE <= layout.PCI_MMIO32_START
    assert layout.MMIO32_START <= layout.PCI_MMIO32_START < layout.PCI_MMIO32_END
    # RAM below 4 GiB never reaches the gap.
    assert all(gpa + size <= layout.MMIO32_START or gpa >= layout.MMIO32_END
               for gpa, size in layout.ram_layout(layout.MAX_MEM_SIZE))


def test_pci_config_io_ports() -> None:
    assert (layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE) == (0xCF8, 8)
    legacy = [(layout.COM1_PORT, 8), (layout.I8042_PORT, 1), (layout.I8042_PORT + 4, 1)]
    assert not any(overlaps((layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE), r) for r in legacy)


@pytest.mark.parametrize("ram_end, start", [
    (0, 256 * GiB),
    (3 * GiB, 256 * GiB),
    (256 * GiB, 256 * GiB),
    (256 * GiB + 1, 257 * GiB),
    (layout.RAM_ABOVE_GAP_START + layout.MAX_MEM_SIZE - layout.MMIO32_START, 1025 * GiB),
])
def test_pci_mmio64_window(ram_end: int, start: int) -> None:
    assert layout.pci_mmio64_window(ram_end) == (start, 256 * GiB)


def test_pci_mmio64_window_refuses_a_negative_ram_end() -> None:
    with pytest.raises(ValueError):
        layout.pci_mmio64_window(-1)


@given(st.integers(1, layout.MAX_MEM_SIZE))
def test_pci_mmio64_window_is_aligned_and_past_all_ram(mem_size: int) -> None:
    regions = layout.ram_layout(mem_size)
    ram_end = max(gpa + size for gpa, size in regions)
    start, size = layout.pci_mmio64_window(ram_end)
    assert start % GiB == 0 and start >= 256 * GiB and size == 256 * GiB
    assert not any(overlaps((start, size), r) for r in regions)
    assert start - max(ram_end, 256 * GiB) < GiB


def test_memory_hotplug_region_sits_at_the_top_of_the_pmem_window() -> None:
    assert layout.memory_hotplug_region(256 * MiB, 512 * MiB) == (1024 * GiB - 1 * GiB, 512 * MiB)
    assert layout.memory_hotplug_region(256 * MiB, 1 * GiB) == (1023 * GiB, 1 * GiB)
    for size in (0, 256 * GiB + 128 * MiB):
        with pytest.raises(ValueError):
            layout.memory_hotplug_region(256 * MiB, size)


@given(st.integers(1, layout.MAX_MEM_SIZE), st.integers(1, 2048).map(lambda n: n * 128 * MiB))
def test_memory_hotplug_region_is_aligned_and_clear_of_ram_and_bars(mem_size: int, size: int) -> None:
    regions = layout.ram_layout(mem_size)
    ram_end = max(gpa + n for gpa, n in regions)
    start, got = layout.memory_hotplug_region(ram_end, size)
    window, window_size = layout.pmem_window(ram_end)
    assert got == size and start % GiB == 0
    assert window <= start and start + size <= window + window_size
    assert not any(overlaps((start, size), r) for r in [*regions, layout.pci_mmio64_window(ram_end)])
