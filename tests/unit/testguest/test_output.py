"""The console-line parser that kvm-tier and QEMU tests use."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.guest.output import cmdline, find, parse_line, parse_lines

SAMPLE = """\
asyncvmm noise
testguest: hello
testguest: boot entry=pvh info=0x6000 magic=ok cmdline_ptr=0x20000
testguest: cmdline blk=read:0:8 foo=bar
testguest: blk read sector=0 count=8 status=0 crc=0x1234abcd first=0xab uniform=1
testguest: cpu 1 up apic=1
echo:hello
testguest: done
"""


def test_events_and_fields():
    lines = parse_lines(SAMPLE)
    assert [l.event for l in lines] == ["hello", "boot", "cmdline", "blk read", "cpu 1 up", "done"]
    read = find(lines, "blk read")[0]
    assert read.fields["crc"] == "0x1234abcd"
    assert read.number("crc") == 0x1234ABCD and read.number("count") == 8
    assert find(lines, "boot")[0].fields["entry"] == "pvh"


def test_cmdline_is_kept_whole():
    assert cmdline(parse_lines(SAMPLE)) == "blk=read:0:8 foo=bar"
    assert cmdline(parse_lines("testguest: hello\n")) is None


def test_prefix_may_follow_other_console_text():
    line = parse_line("\x1b[0mtestguest: blk flush status=0\r\n")
    assert line is not None and line.event == "blk flush" and line.number("status") == 0


@given(st.text())
def test_any_text_parses_without_error(text):
    for line in parse_lines(text):
        assert isinstance(line.fields, dict)
