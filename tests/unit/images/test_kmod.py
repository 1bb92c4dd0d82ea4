"""Module names, .modinfo parsing, modules.dep round trips and load order."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm_tools.images.kmod import (ModuleError, elf_section, format_modules_dep, load_order, modinfo,
                                  modinfo_depends, module_name, parse_modules_dep)


def fake_module(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 LE object with the given sections (plus the null and shstrtab ones)."""
    names = [""] + list(sections) + [".shstrtab"]
    shstrtab = b"\0".join(n.encode() for n in names) + b"\0"
    name_offsets, pos = [], 0
    for n in names:
        name_offsets.append(pos)
        pos += len(n.encode()) + 1
    blobs = [b""] + list(sections.values()) + [shstrtab]
    data, offsets = bytearray(b"\0" * 64), []
    for blob in blobs:
        offsets.append(len(data))
        data += blob
    shoff = len(data)
    for i, blob in enumerate(blobs):
        data += struct.pack("<IIQQQQIIQQ", name_offsets[i], 1, 0, 0, offsets[i], len(blob), 0, 0, 1, 0)
    data[0:4] = b"\x7fELF"
    data[4], data[5] = 2, 1
    struct.pack_into("<Q", data, 0x28, shoff)
    struct.pack_into("<HHH", data, 0x3A, 64, len(blobs), len(blobs) - 1)
    return bytes(data)


def test_module_names_follow_the_kernel():
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
    assert module_name("virtio-rng.ko.xz") == "virtio_rng"
    assert module_name("a/b/ext4.ko.zst") == "ext4"
    with pytest.raises(ModuleError):
        module_name("README")


def test_modinfo_depends_from_an_elf_section():
    elf = fake_module({".text": b"\x90" * 8,
                       ".modinfo": b"license=GPL\0depends=virtio,virtio-ring\0name=virtio_blk\0"})
    assert modinfo(elf)["license"] == ["GPL"]
    assert modinfo_depends(elf) == ["virtio", "virtio_ring"]


def test_empty_depends_means_none():
    assert modinfo_depends(fake_module({".modinfo": b"depends=\0"})) == []


def test_missing_section_and_garbage_are_errors():
    with pytest.raises(ModuleError):
        elf_section(fake_module({".text": b""}), ".modinfo")
    with pytest.raises(ModuleError):
        modinfo(b"not an elf at all" * 8)


@given(st.binary(max_size=300))
def test_hostile_bytes_never_escape_as_other_errors(data):
    try:
        modinfo(b"\x7fELF\x02\x01" + data)
    except ModuleError:
        pass


DEP = """kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
"""


def test_modules_dep_round_trip():
    table = parse_modules_dep(DEP)
    assert parse_modules_dep(format_modules_dep(table)) == table


def test_load_order_puts_dependencies_first_once_and_skips_builtins():
    table = parse_modules_dep(DEP)
    order = load_order(["virtio_blk", "virtio_mmio", "ext4"], table, builtin=frozenset({"ext4"}))
    assert order.index("kernel/drivers/virtio/virtio.ko") < order.index("kernel/drivers/block/virtio_blk.ko")
    assert order.index("kernel/drivers/virtio/virtio_ring.ko") < order.index("kernel/drivers/virtio/virtio_mmio.ko")
    assert len(order) == len(set(order)) == 4


# virtio_pci's lines in Debian 12's cloud kernel (6.1.0-57-cloud-amd64) modules.dep.
PCI_DEP = DEP + "".join(line + "\n" for line in (
    "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko "
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko "
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko:",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko:"))


def test_guest_modules_load_both_transports_and_their_libraries_before_the_drivers():
    from asyncvmm_tools.images.initramfs import GUEST_MODULES
    order = load_order([m for m in GUEST_MODULES if m in ("virtio_mmio", "virtio_pci", "virtio_blk")],
                       parse_modules_dep(PCI_DEP))
    names = [module_name(p) for p in order]
    pci = names.index("virtio_pci")
    assert names.index("virtio_pci_modern_dev") < pci and names.index("virtio_pci_legacy_dev") < pci
    assert pci < names.index("virtio_blk") and names.index("virtio_mmio") < names.index("virtio_blk")
    assert GUEST_MODULES.index("virtio_pci") < GUEST_MODULES.index("virtio_net")


def test_unknown_module_and_cycles_are_errors():
    table = parse_modules_dep(DEP)
    with pytest.raises(ModuleError, match="neither built in nor present"):
        load_order(["nosuch"], table)
    with pytest.raises(ModuleError, match="cycle"):
        load_order(["a"], {"a.ko": ["b.ko"], "b.ko": ["a.ko"]})
    with pytest.raises(ModuleError, match="not in the table"):
        load_order(["a"], {"a.ko": ["zzz.ko"]})


def test_bad_modules_dep_line():
    with pytest.raises(ModuleError):
        parse_modules_dep("no colon here\n")
