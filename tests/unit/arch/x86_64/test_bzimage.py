"""bzImage loading through the setup header: version gates, placement, init_size, hostile headers."""

from __future__ import annotations

import ctypes
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.bootparams import setup_header
from asyncvmm.arch.x86_64.loader import KernelLoad, LoaderError, load_kernel
from asyncvmm.memory import GuestMemory
from tests.conftest import require

from .kernel_images import find_real_kernels, make_bzimage

MiB = 1 << 20
PAYLOAD = bytes(range(256)) * 16


def guest(size: int = 64 * MiB) -> GuestMemory:
    return GuestMemory.from_buffers([(0, bytearray(b"\xaa") * size)])


def load(mem: GuestMemory, image: bytes) -> KernelLoad:
    return load_kernel(mem, io.BytesIO(image))


def test_protected_mode_kernel_goes_to_pref_address():
    image = make_bzimage(PAYLOAD, init_size=0x800000)
    mem = guest()
    k = load(mem, image)
    assert mem.read(0x1000000, len(PAYLOAD)) == PAYLOAD
    assert mem.read_u8(0x1000000 + len(PAYLOAD)) == 0xAA
    assert (k.kind, k.load_addr, k.entry) == ("bzimage", 0x1000000, 0x1000200)
    assert k.kernel_end == 0x1000000 + 0x800000
    assert k.pvh_entry is None
    assert k.setup_header == image[0x1F1:0x26C]
    assert k.initrd_addr_max == 0x7FFFFFFF
    assert k.cmdline_max_len == 2047


def test_cmdline_limit_is_also_capped_by_the_layout():
    k = load(guest(), make_bzimage(PAYLOAD, cmdline_size=0x10000))
    assert k.cmdline_max_len == layout.CMDLINE_MAX_SIZE - 1


@pytest.mark.parametrize("setup_sects, offset", [(0, 5 * 512), (4, 5 * 512), (30, 31 * 512)])
def test_setup_sects_locates_the_kernel(setup_sects, offset):
    image = make_bzimage(PAYLOAD, setup_sects=setup_sects)
    mem = guest()
    load(mem, image)
    assert len(image) == offset + len(PAYLOAD)
    assert mem.read(0x1000000, len(PAYLOAD)) == PAYLOAD


def test_no_pref_address_loads_at_1mib_rounded_to_alignment():
    k = load(guest(), make_bzimage(PAYLOAD, pref_address=0, kernel_alignment=0x200000))
    assert (k.load_addr, k.entry) == (0x200000, 0x200200)


def test_init_size_counts_from_the_aligned_runtime_address():
    # A relocatable kernel loaded off-alignment decompresses at the next aligned address.
    k = load(guest(), make_bzimage(PAYLOAD, pref_address=0x1100000, kernel_alignment=0x1000000,
                                   init_size=0x100000))
    assert k.load_addr == 0x1100000
    assert k.kernel_end == 0x2000000 + 0x100000


def test_payload_larger_than_init_size_sets_the_end():
    k = load(guest(), make_bzimage(PAYLOAD, init_size=0x10))
    assert k.kernel_end == 0x1000000 + len(PAYLOAD)


def test_init_size_that_does_not_fit_is_refused_untouched():
    mem = guest(24 * MiB)
    with pytest.raises(LoaderError, match="does not fit"):
        load(mem, make_bzimage(PAYLOAD, init_size=16 * MiB))
    assert mem.read(0x1000000, 16) == b"\xaa" * 16


@pytest.mark.parametrize("version", [0x0200, 0x0205, 0x0206, 0x020A, 0x020B])
def test_protocols_before_2_12_are_refused(version):
    with pytest.raises(LoaderError, match="too old"):
        load(guest(), make_bzimage(PAYLOAD, version=version))


@pytest.mark.parametrize("fields, match", [
    ({"loadflags": 0}, "LOADED_HIGH"),
    ({"xloadflags": 0}, "XLF_KERNEL_64"),
    ({"kernel_alignment": 0x300000}, "power of two"),
    ({"kernel_alignment": 0}, "power of two"),
    ({"pref_address": 0x80000}, "below 1 MiB"),
    ({"pref_address": 1 << 33}, "above 4 GiB"),
    ({"syssize": 0x10000}, "truncated"),
    ({"boot_flag": 0x1234}, "neither"),
])
def test_bad_header_fields_are_refused(fields, match):
    with pytest.raises(LoaderError, match=match):
        load(guest(), make_bzimage(PAYLOAD, **fields))


@pytest.mark.parametrize("header_end", [0x240, 0x2A0])
def test_header_extent_from_the_jump_is_checked(header_end):
    with pytest.raises(LoaderError, match="setup header ends"):
        load(guest(), make_bzimage(PAYLOAD, header_end=header_end))


def test_longer_header_of_a_future_protocol_is_kept_whole():
    image = bytearray(make_bzimage(PAYLOAD, header_end=0x280))
    image[0x26C:0x280] = b"\x5a" * 0x14
    k = load(guest(), bytes(image))
    assert k.setup_header == bytes(image[0x1F1:0x280])


def test_missing_short_jump_is_refused():
    image = bytearray(make_bzimage(PAYLOAD))
    image[0x200] = 0xE9
    with pytest.raises(LoaderError, match="short jump"):
        load(guest(), bytes(image))


def test_truncated_images_are_refused():
    image = make_bzimage(PAYLOAD)
    for cut in (0x210, 0x28F, 5 * 512, 5 * 512 + 0x100):
        with pytest.raises(LoaderError, match="truncated|neither"):
            load(guest(), image[:cut])


_VALID = make_bzimage(b"\x90" * 0x400, init_size=0x100000)
_MEM = GuestMemory.from_buffers([(0, bytearray(24 * MiB))])
_FIELDS = [(name, ctype) for name, ctype in setup_header._fields_]


@settings(max_examples=400)
@given(st.lists(st.tuples(st.sampled_from(_FIELDS), st.integers(0, (1 << 64) - 1)), min_size=1, max_size=4))
def test_random_header_fields_load_or_are_a_loader_error(changes):
    hdr = setup_header.from_buffer_copy(_VALID, 0x1F1)
    for (name, ctype), value in changes:
        setattr(hdr, name, value & ((1 << (8 * ctypes.sizeof(ctype))) - 1))
    image = bytearray(_VALID)
    image[0x1F1:0x1F1 + len(bytes(hdr))] = bytes(hdr)
    try:
        k = load_kernel(_MEM, io.BytesIO(bytes(image)))
    except LoaderError:
        return
    assert layout.HIMEM_START <= k.load_addr < k.entry < k.kernel_end <= 24 * MiB


@settings(max_examples=300)
@given(st.binary(min_size=0x290, max_size=0x1000))
def test_garbage_with_a_bzimage_signature_is_a_loader_error(data):
    image = bytearray(data)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    try:
        k = load_kernel(_MEM, io.BytesIO(bytes(image)))
    except LoaderError:
        return
    assert layout.HIMEM_START <= k.load_addr < k.entry < k.kernel_end <= 24 * MiB


def test_real_bzimage_loads():
    kernels = [p for p in find_real_kernels() if p.read_bytes()[0x202:0x206] == b"HdrS"]
    require(bool(kernels), "no real bzImage (build images: python -m asyncvmm_tools.images build)")
    mem = GuestMemory.anonymous(layout.ram_layout(256 * MiB))
    k = load_kernel(mem, kernels[0])
    hdr = setup_header.from_buffer_copy(k.setup_header.ljust(0x7B, b"\0"))
    assert k.kind == "bzimage" and hdr.version >= 0x020C
    assert k.load_addr == hdr.pref_address and k.entry == k.load_addr + 0x200
    assert k.kernel_end >= k.load_addr + hdr.init_size
    raw = kernels[0].read_bytes()
    offset = ((raw[0x1F1] or 4) + 1) * 512
    assert mem.read(k.load_addr, 4096) == raw[offset:offset + 4096]
