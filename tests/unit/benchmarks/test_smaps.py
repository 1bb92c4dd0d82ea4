import pytest

from benchmarks.smaps import (SmapsError, guest_mappings, parse_rollup, parse_smaps, private_kib,
                              vmm_memory)

MIB = 1024


def entry(start: int, size_kib: int, name: str, rss: int, pss: int, anon: int, perms: str = "rw-p",
          clean: int = 0, dirty: int = 0) -> str:
    end = start + size_kib * 1024
    return (f"{start:012x}-{end:012x} {perms} 00000000 00:00 0          {name}\n"
            f"Size:           {size_kib} kB\nKernelPageSize:        4 kB\n"
            f"Rss:            {rss} kB\nPss:            {pss} kB\n"
            f"Private_Clean:  {clean} kB\nPrivate_Dirty:  {dirty} kB\n"
            f"Anonymous:      {anon} kB\nTHPeligible:    1\nVmFlags: rd wr mr mw me ac sd\n")


SMAPS = (
    entry(0x5600_0000_0000, 4000, "/usr/bin/qemu-system-x86_64", 3000, 1500, 0, "r-xp")
    + entry(0x5600_1000_0000, 8000, "[heap]", 4000, 4000, 4000)
    + entry(0x7F00_0000_0000, 128 * MIB + 2048, "", 2048, 2048, 2048)    # QEMU's RAM block
    + entry(0x7F10_0000_0000, 1024, "", 1000, 1000, 1000)
)


def test_parse_reads_headers_and_kb_fields():
    maps = parse_smaps(SMAPS)
    assert [m.name for m in maps] == ["/usr/bin/qemu-system-x86_64", "[heap]", "", ""]
    assert maps[0].perms == "r-xp" and maps[0].kib("Rss") == 3000
    assert maps[2].anonymous and not maps[1].anonymous
    assert "THPeligible" not in maps[2].fields                 # not a kB field


def test_vmm_memory_subtracts_the_guest_ram_mapping():
    mem = vmm_memory(parse_smaps(SMAPS), [128 * MIB])
    assert mem.rss_kib == 3000 + 4000 + 2048 + 1000
    assert mem.guest_rss_kib == 2048
    assert mem.vmm_rss_kib == 8000
    assert mem.vmm_pss_kib == 1500 + 4000 + 1000
    assert mem.vmm_anon_kib == 5000
    assert mem.as_dict()["vmm_rss_kib"] == 8000


def test_exact_size_is_preferred_over_an_aligned_one():
    text = entry(0x7F00_0000_0000, 64 * MIB + 2048, "", 10, 10, 10) + entry(0x7F20_0000_0000, 64 * MIB, "", 5, 5, 5)
    [m] = guest_mappings(parse_smaps(text), [64 * MIB])
    assert m.size_kib == 64 * MIB


def test_two_regions_pick_two_different_mappings():
    text = entry(0x7F00_0000_0000, 3072 * MIB, "", 7, 7, 7) + entry(0x7F00_0000_0000 + 2**40, 1024 * MIB, "", 3, 3, 3)
    mem = vmm_memory(parse_smaps(text), [3072 * MIB, 1024 * MIB])
    assert mem.guest_rss_kib == 10 and mem.vmm_rss_kib == 0


@pytest.mark.parametrize("text", [
    entry(0x7F00_0000_0000, 64 * MIB, "/memfd:guest (deleted)", 1, 1, 0),   # file-backed
    entry(0x7F00_0000_0000, 64 * MIB, "", 1, 1, 1, perms="r--p"),           # not writable
    entry(0x7F00_0000_0000, 32 * MIB, "", 1, 1, 1),                         # too small
])
def test_no_guest_like_mapping_is_a_typed_error(text):
    with pytest.raises(SmapsError):
        guest_mappings(parse_smaps(text), [64 * MIB])


def test_a_field_before_any_header_is_an_error():
    with pytest.raises(SmapsError):
        parse_smaps("Rss:  4 kB\n")


# A real kernel's smaps_rollup layout (values made up).
ROLLUP = """5610e5349000-7ffcbf589000 ---p 00000000 00:00 0                          [rollup]
Rss:               34304 kB
Pss:               32356 kB
Pss_Dirty:         14000 kB
Shared_Clean:       2048 kB
Shared_Dirty:          0 kB
Private_Clean:     18000 kB
Private_Dirty:     14256 kB
Anonymous:         14256 kB
AnonHugePages:      2048 kB
Private_Hugetlb:       0 kB
"""

# QEMU-like: its binary (some pages private), heap, and a guest RAM block with a 2 MiB huge page touched.
PRIVATE_SMAPS = (
    entry(0x5600_0000_0000, 4000, "/usr/bin/qemu-system-x86_64", 3000, 2000, 0, "r-xp", clean=1000)
    + entry(0x5600_1000_0000, 8000, "[heap]", 4000, 4000, 4000, dirty=4000)
    + entry(0x7F00_0000_0000, 128 * MIB + 2048, "", 2048, 2048, 2048, dirty=2048)
)


def test_parse_rollup_reads_the_kb_fields_and_skips_the_header():
    fields = parse_rollup(ROLLUP)
    assert fields["Private_Clean"] == 18000 and fields["Private_Dirty"] == 14256
    assert fields["Rss"] == 34304 and "rollup" not in " ".join(fields)
    assert private_kib(fields) == 32256


@pytest.mark.parametrize("text", ["", "garbage\n", "Rss: 4 MB\n"])
def test_a_rollup_without_kb_fields_is_a_typed_error(text):
    with pytest.raises(SmapsError):
        parse_rollup(text)


def test_private_total_comes_from_the_rollup_minus_the_guest_mappings_private_pages():
    rollup = {"Private_Clean": 1000 + 50, "Private_Dirty": 4000 + 2048 + 30}   # 80 kB more than smaps
    mem = vmm_memory(parse_smaps(PRIVATE_SMAPS), [128 * MIB], rollup)
    assert mem.guest_private_kib == 2048 and mem.guest_private_dirty_kib == 2048
    assert mem.vmm_private_kib == 1000 + 50 + 4000 + 30
    assert mem.vmm_private_dirty_kib == 4030
    assert mem.metrics() == {"vmm_rss": 7000, "vmm_pss": 6000, "vmm_anon": 4000, "vmm_private": 5080,
                             "vmm_private_dirty": 4030, "guest_rss": 2048, "guest_private": 2048}


def test_without_a_rollup_the_private_total_is_summed_from_smaps():
    mem = vmm_memory(parse_smaps(PRIVATE_SMAPS), [128 * MIB])
    assert (mem.private_kib, mem.vmm_private_kib, mem.vmm_private_dirty_kib) == (7048, 5000, 4000)


def test_no_guest_regions_subtract_nothing():
    mem = vmm_memory(parse_smaps(PRIVATE_SMAPS), [])
    assert mem.vmm_private_kib == 7048 and mem.guest_rss_kib == 0


def test_a_rollup_lacking_the_private_fields_is_refused():
    with pytest.raises(SmapsError):
        vmm_memory(parse_smaps(PRIVATE_SMAPS), [128 * MIB], {"Rss": 1})
