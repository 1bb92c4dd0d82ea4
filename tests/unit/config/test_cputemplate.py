"""Custom CPU templates (PUT /cpu-config) parse as Firecracker 1.16's deserializers do."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from asyncvmm.config import ConfigError, CpuConfig, decode
from asyncvmm.config.cputemplate import (
    BitmapFilter,
    parse_bitmap,
    parse_kvm_capability,
    parse_number,
)


def test_bitmap_sets_clears_and_leaves_bits_from_the_last_character() -> None:
    # Firecracker's own example: 0bxxxx000000000011xx00011011110010 on leaf 1 EAX.
    f = parse_bitmap("0bxxxx000000000011xx00011011110010", 32)
    assert f == BitmapFilter(mask=0x0FFF_3FFF, value=0x0003_06F2)
    assert f.apply(0xFFFF_FFFF) == 0xF003_C6F2
    assert f.apply(0) == 0x0003_06F2


def test_short_bitmaps_underscores_and_no_prefix_are_valid() -> None:
    assert parse_bitmap("0b1", 32) == BitmapFilter(1, 1)
    assert parse_bitmap("0b0_x1", 32) == BitmapFilter(0b101, 0b001)
    assert parse_bitmap("10", 8) == BitmapFilter(0b11, 0b10)
    assert parse_bitmap("0b", 64) == BitmapFilter(0, 0)     # changes nothing
    assert parse_bitmap("0b" + "1" * 32 + "_" * 40, 32) == BitmapFilter(0xFFFF_FFFF, 0xFFFF_FFFF)
    # Once the register is full, even a separator is one character too many (as in Firecracker).
    with pytest.raises(ConfigError, match="string is too long"):
        parse_bitmap("0b_" + "1" * 32, 32)


@pytest.mark.parametrize("text,bits,message", [
    ("0b" + "1" * 33, 32, "Failed to parse string [0b" + "1" * 33 + "] as a bitmap - string is too long"),
    ("0b" + "x" * 65, 64, "Failed to parse string [0b" + "x" * 65 + "] as a bitmap - string is too long"),
    ("0b0X1", 32, "Failed to parse string [0b0X1] as a bitmap - unknown character: 88"),
    ("0bx0?1_0", 32, "Failed to parse string [0bx0?1_0] as a bitmap - unknown character: 63"),
    # Read from the end: the 33rd bit is "too long" before its character is looked at.
    ("?" + "1" * 32, 32, "Failed to parse string [?" + "1" * 32 + "] as a bitmap - string is too long"),
    ("0b1é", 32, "Failed to parse string [0b1é] as a bitmap - unknown character: 169"),
])
def test_bad_bitmaps_are_refused_in_firecrackers_words(text: str, bits: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_bitmap(text, bits)
    assert err.value.message == message


@given(st.lists(st.sampled_from("01x"), max_size=32))
def test_bitmap_apply_changes_only_the_given_bits(chars: list[str]) -> None:
    text = "0b" + "".join(chars)
    f = parse_bitmap(text, 32)
    for register in (0, 0xFFFF_FFFF, 0x1234_5678):
        out = f.apply(register)
        for i, ch in enumerate(reversed(chars)):
            expected = (register >> i) & 1 if ch == "x" else int(ch)
            assert (out >> i) & 1 == expected
        assert out >> len(chars) == register >> len(chars)


@pytest.mark.parametrize("text,value", [("0x1", 1), ("0x80000001", 0x80000001), ("0b101", 5),
                                        ("0x+1f", 0x1F), ("0xFFFFFFFF", 0xFFFF_FFFF)])
def test_numbers_need_a_prefix(text: str, value: int) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize("text,message", [
    ("1", "No supported number system prefix found in value [1]. Make sure to prefix the number "
          "with '0x' for hexadecimal numbers or '0b' for binary numbers."),
    ("0x", "Failed to parse string [0x] as a number for CPU template - ParseIntError { kind: Empty }"),
    ("0xg", "Failed to parse string [0xg] as a number for CPU template - ParseIntError { kind: InvalidDigit }"),
    ("0b2", "Failed to parse string [0b2] as a number for CPU template - ParseIntError { kind: InvalidDigit }"),
    ("0x100000000",
     "Failed to parse string [0x100000000] as a number for CPU template - ParseIntError { kind: PosOverflow }"),
])
def test_bad_numbers_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_number(text)
    assert err.value.message == message


def test_kvm_capabilities_add_or_remove() -> None:
    assert parse_kvm_capability("171") == (True, 171)
    assert parse_kvm_capability("!56") == (False, 56)
    for text, why in (("!", "cannot parse integer from empty string"), ("0x10", "invalid digit found in string"),
                      ("4294967296", "number too large to fit in target type")):
        with pytest.raises(ConfigError) as err:
            parse_kvm_capability(text)
        assert err.value.message == (f"Failed to parse string [{text}] as a kvm capability - can not "
                                     f"convert to numeric: {why}")


def test_a_whole_template_decodes_and_unknown_modifier_fields_are_ignored() -> None:
    body = b'''{"kvm_capabilities": ["!56"],
      "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "note": "ignored",
                           "modifiers": [{"register": "eax", "bitmap": "0bxxxx000000000011xx00011011110010"}]}],
      "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b0"}]}'''
    cpu = decode(body, CpuConfig)
    assert cpu.kvm_capabilities == ["!56"]
    assert cpu.cpuid_modifiers[0].modifiers[0].register == "eax"
    assert decode(b"{}", CpuConfig) == CpuConfig()


@pytest.mark.parametrize("body,message", [
    (b'{"reg_modifiers": []}',
     "unknown field `reg_modifiers`, expected one of `kvm_capabilities`, `cpuid_modifiers`, `msr_modifiers`"),
    (b'{"vcpu_features": []}',
     "unknown field `vcpu_features`, expected one of `kvm_capabilities`, `cpuid_modifiers`, `msr_modifiers`"),
    (b'{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": '
     b'[{"register": "ekx", "bitmap": "0b1"}]}]}', "Invalid CPUID register. Must be one of [eax, ebx, ecx, edx]"),
    (b'{"cpuid_modifiers": [{"leaf": "k", "subleaf": "0x0", "flags": 0, "modifiers": []}]}',
     "No supported number system prefix found in value [k]."),
    (b'{"msr_modifiers": [{"addr": "0x200", "bitmap": "0bx00100x0x1xxxx05xxx1xxxxxxxxxxx1"}]}',
     "Failed to parse string [0bx00100x0x1xxxx05xxx1xxxxxxxxxxx1] as a bitmap"),
    (b'{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": -1, "modifiers": []}]}', "flags"),
    (b'{"msr_modifiers": [{"addr": "0x10a"}]}', "missing field `bitmap`"),
])
def test_bad_templates_are_refused_naming_the_field(body: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        decode(body, CpuConfig)
    assert message in err.value.message
