import pytest

from benchmarks.smaps import SmapsError, guest_mappings, parse_smaps, vmm_memory

MIB = 1024


def entry(start: int, size_kib: int, name: str, rss: int, pss: int, anon: int, perms: str = "rw-p") -> str:
    end = start + size_kib * 1024
    return (f"{start:012x}-{end:012x} {perms} 00000000 00:00 0          {name}\n"
            f"Size:           {size_kib} kB\nKernelPageSize:        4 kB\n"
            f"Rss:            {rss} kB\nPss:            {pss} kB\n"
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
