"""Parse the test guest's console output into structured lines.

Every report line the guest prints is ``testguest: <words> key=value ...``:
the leading words name the event (``blk read``, ``cpu 1 up``, ``done``), the
``key=value`` fields follow.  ``testguest: cmdline <text>`` carries the raw
command line and is kept whole.  Other console text (``echo:...``, anything a
VMM prints) is not a report line and is skipped.

    >>> [l.event for l in parse_lines("x\\ntestguest: blk read sector=0 status=0\\n")]
    ['blk read']
"""

from __future__ import annotations

import dataclasses

PREFIX = "testguest: "


@dataclasses.dataclass(frozen=True)
class GuestLine:
    event: str                   # the words before the first key=value
    fields: dict[str, str]       # key=value pairs, in order
    text: str                    # the line after the prefix

    def number(self, key: str) -> int:
        """A field as a number (decimal or 0x-hex, as the guest prints them)."""
        return int(self.fields[key], 0)


def parse_line(line: str) -> GuestLine | None:
    line = line.rstrip("\r\n")
    at = line.find(PREFIX)
    if at < 0:
        return None
    text = line[at + len(PREFIX):]
    if text.startswith("cmdline"):
        return GuestLine("cmdline", {}, text)
    words: list[str] = []
    fields: dict[str, str] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if eq and key:
            fields[key] = value
        elif not fields:
            words.append(token)
    return GuestLine(" ".join(words), fields, text)


def parse_lines(text: str) -> list[GuestLine]:
    return [p for p in map(parse_line, text.splitlines()) if p is not None]


def find(lines: list[GuestLine], event: str) -> list[GuestLine]:
    """Lines whose event is exactly ``event``."""
    return [line for line in lines if line.event == event]


def cmdline(lines: list[GuestLine]) -> str | None:
    """The command line as the guest read it."""
    for line in lines:
        if line.event == "cmdline":
            return line.text[len("cmdline "):]
    return None
