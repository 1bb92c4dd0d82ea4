"""AML and resource-descriptor encodings, byte by byte against the ACPI 6.4 specification.

Expected bytes are derived by hand from the grammar (chapter 20) and the
resource descriptor formats (section 6.4); a small decoder written here
checks round trips under hypothesis; and iasl, compiling a reference ASL for
the same constructs, must produce exactly our bytes.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import given, strategies as st

from asyncvmm.arch.x86_64.acpi import aml
from asyncvmm.arch.x86_64.acpi.aml import AmlError
from asyncvmm.arch.x86_64.acpi.resources import (
    dword_memory, end_tag, extended_interrupt, io, irq, memory32_fixed, qword_memory,
    resource_template, word_bus_number)
from tests.conftest import require


# -- a decoder for the subset we emit (test-only) ------------------------------------

def decode_pkg_length(data: bytes, pos: int = 0) -> tuple[int, int]:
    """(value, bytes used) of the PkgLength at ``pos`` (20.2.4)."""
    lead = data[pos]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "bits 5-4 of a multi-byte lead byte are reserved"
    value = lead & 0x0F
    for i in range(follow):
        value |= data[pos + 1 + i] << (4 + 8 * i)
    return value, 1 + follow


def decode_integer(data: bytes, pos: int = 0) -> tuple[int, int]:
    op = data[pos]
    if op == 0x00:
        return 0, 1
    if op == 0x01:
        return 1, 1
    if op == 0xFF:
        return (1 << 64) - 1, 1
    size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
    return int.from_bytes(data[pos + 1:pos + 1 + size], "little"), 1 + size


def decode_name_string(data: bytes, pos: int = 0) -> tuple[str, int]:
    start = pos
    prefix = ""
    if data[pos] == 0x5C:
        prefix, pos = "\\", pos + 1
    while data[pos] == 0x5E:
        prefix, pos = prefix + "^", pos + 1
    if data[pos] == 0x00:
        count, pos = 0, pos + 1
    elif data[pos] == 0x2E:
        count, pos = 2, pos + 1
    elif data[pos] == 0x2F:
        count, pos = data[pos + 1], pos + 2
    else:
        count = 1
    segs = [data[pos + 4 * i:pos + 4 * i + 4].decode("ascii") for i in range(count)]
    return prefix + ".".join(segs), pos + 4 * count - start


def decode_package(data: bytes) -> list[int]:
    assert data[0] == 0x12
    length, used = decode_pkg_length(data, 1)
    assert 1 + length == len(data)
    count, pos = data[1 + used], 2 + used
    values = []
    for _ in range(count):
        value, n = decode_integer(data, pos)
        values.append(value)
        pos += n
    assert pos == len(data)
    return values


# -- PkgLength (20.2.4) ---------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (0, b"\x01"),                           # the length counts its own byte
    (62, b"\x3f"),                          # largest one-byte value, 63
    (63, b"\x41\x04"),                      # 65 = 0x041: lead 01 00 0001, then 0x04
    (4093, b"\x4f\xff"),                    # 4095 = 0xFFF, the two-byte maximum
    (4094, b"\x81\x00\x01"),                # 4097 = 0x1001 needs three bytes
    (0xFFFFC, b"\x8f\xff\xff"),             # 0xFFFFF, the three-byte maximum
    (0xFFFFD, b"\xc1\x00\x00\x01"),         # 0x100001
    (0xFFFFFFB, b"\xcf\xff\xff\xff"),       # 0xFFFFFFF, the 28-bit maximum
])
def test_pkg_length_boundaries(content: int, expected: bytes) -> None:
    assert aml.pkg_length(content) == expected


_PKG_LENGTH_MAX_BY_SIZE = {1: 0x3F, 2: 0xFFF, 3: 0xFFFFF}


@pytest.mark.parametrize("content", [-1, 0xFFFFFFC])
def test_pkg_length_out_of_range(content: int) -> None:
    with pytest.raises(AmlError):
        aml.pkg_length(content)


@given(st.integers(0, 0xFFFFFFB))
def test_pkg_length_round_trip(content: int) -> None:
    encoded = aml.pkg_length(content)
    value, used = decode_pkg_length(encoded)
    assert used == len(encoded)
    assert value == content + len(encoded)
    if len(encoded) > 1:                     # always the shortest: one byte less cannot hold it
        assert content + len(encoded) - 1 > _PKG_LENGTH_MAX_BY_SIZE[len(encoded) - 1]


# -- names (20.2.2) -------------------------------------------------------------------

@pytest.mark.parametrize("path, expected", [
    ("_HID", b"_HID"),
    ("_S5", b"_S5_"),                         # ASL pads short segments with '_'
    ("\\", b"\\\x00"),                        # RootChar NullName
    ("\\_SB", b"\\_SB_"),
    ("\\_SB.COM1", b"\\\x2e_SB_COM1"),        # DualNamePrefix
    ("^FOO", b"^FOO_"),
    ("^^A.B", b"^^\x2eA___B___"),
    ("\\_SB.PCI0.LPC", b"\\\x2f\x03_SB_PCI0LPC_"),   # MultiNamePrefix SegCount
])
def test_name_string(path: str, expected: bytes) -> None:
    assert aml.name_string(path) == expected


@pytest.mark.parametrize("path", ["", "1ABC", "ABCDE", "ab", "A.", ".A", "\\^A", "A-B"])
def test_name_string_rejects(path: str) -> None:
    with pytest.raises(AmlError):
        aml.name_string(path)


_seg = st.from_regex(r"[A-Z_][A-Z0-9_]{3}", fullmatch=True)


@given(st.sampled_from(["", "\\", "^", "^^^"]), st.lists(_seg, min_size=1, max_size=8))
def test_name_string_round_trip(prefix: str, segs: list[str]) -> None:
    path = prefix + ".".join(segs)
    encoded = aml.name_string(path)
    decoded, used = decode_name_string(encoded)
    assert (decoded, used) == (path, len(encoded))


# -- data objects (20.2.3) ------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (0, b"\x00"),                                      # ZeroOp
    (1, b"\x01"),                                      # OneOp
    (2, b"\x0a\x02"),                                  # BytePrefix
    (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"),                          # WordPrefix
    (0xFFFF, b"\x0b\xff\xff"),
    (0x10000, b"\x0c\x00\x00\x01\x00"),                # DWordPrefix
    (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
    (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),  # QWordPrefix
    ((1 << 64) - 2, b"\x0e" + b"\xfe" + b"\xff" * 7),
    ((1 << 64) - 1, b"\xff"),                          # OnesOp (64-bit table)
])
def test_integer(value: int, expected: bytes) -> None:
    assert aml.integer(value) == expected


@pytest.mark.parametrize("value", [-1, 1 << 64, True, 1.0, "1"])
def test_integer_rejects(value: object) -> None:
    with pytest.raises(AmlError):
        aml.integer(value)  # type: ignore[arg-type]


@given(st.integers(0, (1 << 64) - 1))
def test_integer_round_trip(value: int) -> None:
    encoded = aml.integer(value)
    assert decode_integer(encoded) == (value, len(encoded))


def test_string() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.string("") == b"\x0d\x00"
    for bad in ("caf\u00e9", "a\x00b"):
        with pytest.raises(AmlError):
            aml.string(bad)


def test_buffer() -> None:
    # BufferOp PkgLength(1 + BufferSize(2) + 3 bytes = 6) BufferSize ByteList
    assert aml.buffer(b"\x01\x02\x03") == b"\x11\x06\x0a\x03\x01\x02\x03"
    assert aml.buffer(b"") == b"\x11\x02\x00"


def test_package() -> None:
    # PackageOp PkgLength NumElements elements: {5, 0, 0, 0} is \_S5_'s shape.
    assert aml.package(*(aml.integer(v) for v in (5, 0, 0, 0))) == b"\x12\x07\x04\x0a\x05\x00\x00\x00"
    assert aml.package() == b"\x12\x02\x00"


def test_var_package_beyond_255_elements() -> None:
    encoded = aml.package(*[aml.integer(0)] * 256)
    length, used = decode_pkg_length(encoded, 1)
    assert encoded[0] == 0x13 and 1 + length == len(encoded)
    assert encoded[1 + used:1 + used + 3] == b"\x0b\x00\x01"    # NumElements as a TermArg


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=40))
def test_package_round_trip(values: list[int]) -> None:
    assert decode_package(aml.package(*(aml.integer(v) for v in values))) == values


# -- named objects and statements (20.2.5) -------------------------------------------

def test_name() -> None:
    assert aml.name("_UID", aml.integer(1)) == b"\x08_UID\x01"


def test_scope_and_device() -> None:
    inner = aml.name("_UID", aml.integer(0))                 # 6 bytes
    dev = aml.device("VR00", inner)
    assert dev == b"\x5b\x82\x0bVR00" + inner                 # PkgLength 1 + 4 + 6 = 11
    assert aml.scope("\\_SB", dev) == b"\x10\x13\\_SB_" + dev   # 1 + 5 + 13 = 19


def test_method_flags_and_return() -> None:
    body = aml.return_(aml.integer(0x0F))
    assert body == b"\xa4\x0a\x0f"
    assert aml.method("_STA", 0, body) == b"\x14\x09_STA\x00" + body
    # ArgCount 3, SerializeFlag bit 3, SyncLevel 2 in bits 7-4.
    assert aml.method("MTH2", 3, serialized=True, sync_level=2)[6] == 0x2B
    for bad in ({"arg_count": 8}, {"arg_count": 0, "sync_level": 16}):
        with pytest.raises(AmlError):
            aml.method("M", **bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("pnp, value", [
    ("PNP0303", 0x0303D041),     # P=0x10 N=0x0E P=0x10: 0x41D00303 byte-swapped
    ("PNP0501", 0x0105D041),
    ("PNP0C0F", 0x0F0CD041),
    ("ABC1234", 0x34124304),     # A=1 B=2 C=3: 0x04431234 byte-swapped
])
def test_eisa_id(pnp: str, value: int) -> None:
    assert aml.eisa_id_value(pnp) == value
    assert aml.eisa_id(pnp) == b"\x0c" + struct.pack("<I", value)


@pytest.mark.parametrize("pnp", ["PNP030", "pnp0303", "PNP030G", "1NP0303"])
def test_eisa_id_rejects(pnp: str) -> None:
    with pytest.raises(AmlError):
        aml.eisa_id_value(pnp)


# -- resource descriptors (6.4) ---------------------------------------------------------

def test_io_port_descriptor() -> None:
    # Tag 0x47, Information (bit 0: 16-bit decode), min, max, alignment, length.
    assert io(0x3F8, 0x3F8, 1, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert io(0x60, 0x60, 1, 1, decode16=False) == b"\x47\x00\x60\x00\x60\x00\x01\x01"
    for args in ((0x10000, 0, 1, 1), (0x10, 0x0F, 1, 1), (0, 0, 256, 1)):
        with pytest.raises(AmlError):
            io(*args)


def test_irq_descriptors() -> None:
    assert irq(4) == b"\x22\x10\x00"                            # IRQNoFlags() {4}
    assert irq(1, 12) == b"\x22\x02\x10"
    # IRQ (Level, ActiveLow, Shared) {9}: bit 0 edge=0, bit 3 low, bit 4 shared.
    assert irq(9, flags=True, edge=False, active_low=True, shared=True) == b"\x23\x00\x02\x18"
    assert irq(3, flags=True) == b"\x23\x08\x00\x01"
    for bad in ((16,), ()):
        with pytest.raises(AmlError):
            irq(*bad)
    with pytest.raises(AmlError):
        irq(3, edge=False)                                     # not expressible without flags


def test_memory32_fixed_descriptor() -> None:
    # Tag 0x86, length 9, information (bit 0: read-write), base, length.
    assert memory32_fixed(0xC0001000, 0x1000) == (
        b"\x86\x09\x00\x01" + struct.pack("<II", 0xC0001000, 0x1000))
    assert memory32_fixed(0, 1, writeable=False)[3] == 0
    with pytest.raises(AmlError):
        memory32_fixed(0xFFFFF000, 0x2000)


def test_extended_interrupt_descriptor() -> None:
    # Tag 0x89, length 2 + 4n, flags (consumer|edge = 0x03), count, numbers.
    assert extended_interrupt(5) == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    shared_low_level = extended_interrupt(16, 17, edge=False, active_low=True, shared=True)
    assert shared_low_level[:5] == b"\x89\x0a\x00\x0d\x02"
    with pytest.raises(AmlError):
        extended_interrupt()


def test_qword_memory_descriptor() -> None:
    d = qword_memory(0x1_0000_0000, 0x1000)
    assert d[:3] == b"\x8a\x2b\x00" and len(d) == 3 + 0x2B
    rtype, general, specific = d[3:6]
    assert (rtype, general, specific) == (0, 0x0D, 0x01)       # memory; MAF|MIF|consumer; RW
    assert struct.unpack("<5Q", d[6:]) == (0, 0x1_0000_0000, 0x1_0000_0FFF, 0, 0x1000)


def test_qword_memory_producer_and_cacheable() -> None:
    d = qword_memory(0x40_0000_0000, 0x40_0000_0000, consumer=False, cacheable=True, writeable=False)
    assert d[3:6] == b"\x00\x0c\x02"                         # producer: bit 0 clear; _MEM cacheable
    assert struct.unpack("<5Q", d[6:]) == (0, 0x40_0000_0000, 0x7F_FFFF_FFFF, 0, 0x40_0000_0000)
    assert qword_memory((1 << 64) - 0x1000, 0x1000)[-8:] == struct.pack("<Q", 0x1000)
    for args in ((0, 0), ((1 << 64) - 0x1000, 0x2000), (-1, 1)):
        with pytest.raises(AmlError):
            qword_memory(*args)


def test_dword_memory_descriptor() -> None:
    # DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
    #              0, 0xC1000000, 0xEEBFFFFF, 0, 0x2DC00000)
    d = dword_memory(0xC100_0000, 0x2DC0_0000, consumer=False)
    assert d == bytes.fromhex("871700" "000c01" "00000000" "000000c1" "ffffbfee" "00000000"
                              "0000c02d")
    assert dword_memory(0x1000, 0x1000)[3:6] == b"\x00\x0d\x01"   # consumer
    assert dword_memory(0xFFFF_F000, 0x1000)[10:18] == struct.pack("<II", 0xFFFF_F000, 0xFFFF_FFFF)
    for args in ((0xFFFF_F000, 0x2000), (1 << 32, 0x1000), (0x1000, 0), (0x1000, True)):
        with pytest.raises(AmlError):
            dword_memory(*args)


def test_word_bus_number_descriptor() -> None:
    # WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0, 0, 1)
    assert word_bus_number(0, 1) == bytes.fromhex("880d00" "020c00" "0000" "0000" "0000" "0000"
                                                   "0100")
    d = word_bus_number(0x10, 0xF0, consumer=True)
    assert d[3:6] == b"\x02\x0d\x00"
    assert struct.unpack("<5H", d[6:]) == (0, 0x10, 0xFF, 0, 0xF0)
    for args in ((0, 0), (0xFFFF, 2), (0x10000, 1)):
        with pytest.raises(AmlError):
            word_bus_number(*args)


def test_end_tag_and_template() -> None:
    body = memory32_fixed(0xC0001000, 0x1000)
    assert end_tag(body) == b"\x79\x00"
    tagged = body + end_tag(body, checksum=True)
    assert sum(tagged) & 0xFF == 0
    template = resource_template(body)
    assert template == aml.buffer(body + b"\x79\x00")


# -- iasl agrees with us ---------------------------------------------------------------------

def _reference() -> tuple[str, bytes]:
    """The same constructs as ASL source and as our AML, PkgLengths of 1, 2 and 3 bytes included."""
    big2 = bytes(range(256)) * 4                    # 1024 bytes: two-byte PkgLength
    big3 = bytes(i & 0xFF for i in range(5000))     # three-byte PkgLength

    def asl_bytes(data: bytes) -> str:
        return ", ".join(f"0x{b:02X}" for b in data)

    asl = f"""
DefinitionBlock ("", "DSDT", 2, "ASYVMM", "AVMMTEST", 1)
{{
    Name (INT0, 0)
    Name (INT1, 1)
    Name (INTB, 0x2A)
    Name (INTW, 0x1234)
    Name (INTD, 0x12345678)
    Name (INTQ, 0x123456789ABCDEF0)
    Name (STR0, "LNRO0005")
    Name (EIS0, EisaId ("PNP0303"))
    Name (\\_S5, Package () {{ 5, 0, 0, 0 }})
    Name (BUF2, Buffer () {{ {asl_bytes(big2)} }})
    Name (BUF3, Buffer () {{ {asl_bytes(big3)} }})
    Scope (\\_SB)
    {{
        Device (VR00)
        {{
            Name (_HID, "LNRO0005")
            Name (_UID, 0)
            Name (_CRS, ResourceTemplate ()
            {{
                Memory32Fixed (ReadWrite, 0xC0001000, 0x00001000)
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {{ 5 }}
            }})
            Method (_STA, 0, NotSerialized) {{ Return (0x0F) }}
        }}
        Device (COM1)
        {{
            Name (_HID, EisaId ("PNP0501"))
            Name (_CRS, ResourceTemplate ()
            {{
                IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08)
                IRQNoFlags () {{ 4 }}
                IRQ (Level, ActiveLow, Shared) {{ 9 }}
                Interrupt (ResourceConsumer, Level, ActiveLow, Shared) {{ 16, 17 }}
                QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable,
                             ReadWrite, 0, 0x100000000, 0x100000FFF, 0, 0x1000)
            }})
            Method (MTH2, 3, Serialized) {{ Return (One) }}
        }}
        Device (PC00)
        {{
            Name (_CRS, ResourceTemplate ()
            {{
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                               0, 0, 0x3F, 0, 0x40)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
                             ReadWrite, 0, 0xC1000000, 0xEEBFFFFF, 0, 0x2DC00000)
                QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
                             ReadWrite, 0, 0x4000000000, 0x7FFFFFFFFF, 0, 0x4000000000)
                DWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, Cacheable,
                             ReadOnly, 0, 0x1000, 0x1FFF, 0, 0x1000)
            }})
        }}
    }}
}}
"""
    ours = b"".join([
        aml.name("INT0", aml.integer(0)),
        aml.name("INT1", aml.integer(1)),
        aml.name("INTB", aml.integer(0x2A)),
        aml.name("INTW", aml.integer(0x1234)),
        aml.name("INTD", aml.integer(0x12345678)),
        aml.name("INTQ", aml.integer(0x123456789ABCDEF0)),
        aml.name("STR0", aml.string("LNRO0005")),
        aml.name("EIS0", aml.eisa_id("PNP0303")),
        aml.name("\\_S5", aml.package(*(aml.integer(v) for v in (5, 0, 0, 0)))),
        aml.name("BUF2", aml.buffer(big2)),
        aml.name("BUF3", aml.buffer(big3)),
        aml.scope("\\_SB", aml.device(
            "VR00",
            aml.name("_HID", aml.string("LNRO0005")),
            aml.name("_UID", aml.integer(0)),
            aml.name("_CRS", resource_template(memory32_fixed(0xC0001000, 0x1000),
                                               extended_interrupt(5))),
            aml.method("_STA", 0, aml.return_(aml.integer(0x0F)))),
            aml.device(
            "COM1",
            aml.name("_HID", aml.eisa_id("PNP0501")),
            aml.name("_CRS", resource_template(
                io(0x3F8, 0x3F8, 1, 8), irq(4),
                irq(9, flags=True, edge=False, active_low=True, shared=True),
                extended_interrupt(16, 17, edge=False, active_low=True, shared=True),
                qword_memory(0x1_0000_0000, 0x1000))),
            aml.method("MTH2", 3, aml.return_(aml.integer(1)), serialized=True)),
            aml.device(
            "PC00",
            aml.name("_CRS", resource_template(
                word_bus_number(0, 0x40),
                dword_memory(0xC100_0000, 0x2DC0_0000, consumer=False),
                qword_memory(0x40_0000_0000, 0x40_0000_0000, consumer=False),
                dword_memory(0x1000, 0x1000, cacheable=True, writeable=False))))),
    ])
    return asl, ours


def test_iasl_compiles_reference_asl_to_our_bytes(tmp_path) -> None:
    require(shutil.which("iasl") is not None, "iasl (Debian acpica-tools) is not installed")
    asl, ours = _reference()
    src = tmp_path / "ref.asl"
    src.write_text(asl)
    # -on: no namepath optimisation, so \_SB stays a root path as we wrote it.
    proc = subprocess.run(["iasl", "-on", "-p", str(tmp_path / "ref"), str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = (tmp_path / "ref.aml").read_bytes()
    assert struct.unpack_from("<I", compiled, 4)[0] == len(compiled)
    body = compiled[36:]
    if body != ours:
        at = next(i for i, (a, b) in enumerate(zip(body, ours)) if a != b) if len(body) == len(
            ours) else min(len(body), len(ours))
        pytest.fail(f"AML differs from iasl at body offset {at}: iasl {body[at:at + 16].hex()} "
                    f"ours {ours[at:at + 16].hex()} (lengths {len(body)} vs {len(ours)})")
