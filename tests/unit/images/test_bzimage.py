"""Locating and decompressing the payload of synthetic bzImages."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm_tools.images.bzimage import BzImageError, check_elf64, compression_of, decompress, locate_payload
from tests.conftest import require

ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HH", 2, 62) + b"payload-body" * 50


def bzimage(compressed: bytes, setup_sects: int = 4, version: int = 0x20F, payload_offset: int = 0x100,
            size: int = len(ELF)) -> bytes:
    blob = compressed + struct.pack("<I", size)
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<II", setup, 0x248, payload_offset, len(blob))
    return bytes(setup) + b"\0" * payload_offset + blob + b"trailing"


def test_locates_the_payload_after_the_setup_sectors():
    image = bzimage(gzip.compress(ELF), setup_sects=3)
    p = locate_payload(image)
    assert p.offset == 4 * 512 + 0x100
    assert p.compression == "gzip" and p.version == 0x20F


def test_setup_sects_zero_means_four():
    assert locate_payload(bzimage(gzip.compress(ELF), setup_sects=0)).offset == 5 * 512 + 0x100


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_decompresses_stdlib_formats(compress):
    assert decompress(bzimage(compress(ELF))) == ELF


@pytest.mark.parametrize("tool,argv", [("lz4", ["lz4", "-l", "-c"]), ("zstd", ["zstd", "-q", "-c"])])
def test_decompresses_with_the_cli_tools(tool, argv):
    require(shutil.which(tool) is not None, f"{tool} not installed")
    compressed = subprocess.run(argv, input=ELF, capture_output=True, check=True).stdout
    assert compression_of(compressed) == tool
    assert decompress(bzimage(compressed)) == ELF


def test_size_word_mismatch_is_an_error():
    image = bytearray(bzimage(gzip.compress(ELF)))
    p = locate_payload(bytes(image))
    struct.pack_into("<I", image, p.offset + p.length - 4, 12345)
    with pytest.raises(BzImageError, match="header says"):
        decompress(bytes(image))


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:0x100], "too short"),
    (lambda b: b[:0x1FE] + b"\0\0" + b[0x200:], "boot flag"),
    (lambda b: b[:0x202] + b"XXXX" + b[0x206:], "HdrS"),
])
def test_not_a_bzimage(mutate, msg):
    with pytest.raises(BzImageError, match=msg):
        locate_payload(mutate(bzimage(gzip.compress(ELF))))


def test_old_protocol_and_out_of_bounds_payload():
    with pytest.raises(BzImageError, match="predates"):
        locate_payload(bzimage(gzip.compress(ELF), version=0x206))
    image = bytearray(bzimage(gzip.compress(ELF)))
    struct.pack_into("<I", image, 0x248, 10_000_000)
    with pytest.raises(BzImageError, match="outside"):
        locate_payload(bytes(image))


def test_payload_must_be_x86_64_elf64():
    with pytest.raises(BzImageError):
        check_elf64(b"\x7fELF\x01\x01" + b"\0" * 20)
    with pytest.raises(BzImageError, match="x86-64"):
        check_elf64(b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HH", 2, 183))
    with pytest.raises(BzImageError, match="not an ELF"):
        decompress(bzimage(gzip.compress(b"MZ" + b"\0" * 100), size=102))


@given(st.binary(min_size=0, max_size=2000))
def test_hostile_images_only_raise_bzimage_errors(data):
    try:
        decompress(data)
    except BzImageError:
        pass
