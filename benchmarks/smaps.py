"""How much memory a VMM process uses for itself, apart from its guest's RAM.

``/proc/<pid>/smaps`` lists every mapping with its ``Size`` and ``Rss`` (kB);
``smaps_rollup`` is the same summed.  A VMM's guest RAM is one anonymous
private mapping per RAM region, of exactly the region's size (asyncvmm's
``mmap`` of ``mem_size_mib``; QEMU's RAM block, which QEMU may over-reserve
by an alignment of up to 2 MiB plus a guard page).  Its resident part is
whatever the guest touched, which says nothing about the VMM, so

    VMM RSS = process Rss - Rss of the guest mappings

and the same for Pss and for private anonymous memory (``Anonymous``).
Parsing is pure (text in, numbers out); only ``read_process_memory`` reads
``/proc``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

ALIGN_SLACK_KIB = 2048 + 4 * 4         # QEMU's RAM block alignment plus guard pages

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")
_FIELD = re.compile(r"^(\w+):\s+(\d+) kB$")


class SmapsError(ValueError):
    """The smaps text is malformed, or no mapping looks like the guest's RAM."""


@dataclasses.dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    name: str                           # path, "[heap]", or "" for anonymous
    fields: dict[str, int]              # kB values: Size, Rss, Pss, Anonymous, ...

    @property
    def size_kib(self) -> int:
        return self.fields.get("Size", (self.end - self.start) // 1024)

    def kib(self, field: str) -> int:
        return self.fields.get(field, 0)

    @property
    def anonymous(self) -> bool:
        return self.name == "" or self.name.startswith("[anon")


@dataclasses.dataclass(frozen=True)
class VmmMemory:
    """kB figures for one process; ``vmm_*`` exclude the guest RAM mappings."""

    rss_kib: int
    pss_kib: int
    anon_kib: int
    guest_size_kib: int
    guest_rss_kib: int
    guest_pss_kib: int
    guest_anon_kib: int

    @property
    def vmm_rss_kib(self) -> int:
        return self.rss_kib - self.guest_rss_kib

    @property
    def vmm_pss_kib(self) -> int:
        return self.pss_kib - self.guest_pss_kib

    @property
    def vmm_anon_kib(self) -> int:
        return self.anon_kib - self.guest_anon_kib

    def as_dict(self) -> dict[str, int]:
        d = dataclasses.asdict(self)
        d.update(vmm_rss_kib=self.vmm_rss_kib, vmm_pss_kib=self.vmm_pss_kib,
                 vmm_anon_kib=self.vmm_anon_kib)
        return d


def parse_smaps(text: str) -> list[Mapping]:
    maps: list[Mapping] = []
    current: tuple[int, int, str, str] | None = None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head:
            if current is not None:
                maps.append(Mapping(*current, fields))
            current = (int(head[1], 16), int(head[2], 16), head[3], head[4].strip())
            fields = {}
            continue
        field = _FIELD.match(line)
        if field:
            if current is None:
                raise SmapsError(f"field before any mapping: {line!r}")
            fields[field[1]] = int(field[2])
    if current is not None:
        maps.append(Mapping(*current, fields))
    return maps


def guest_mappings(maps: Sequence[Mapping], region_sizes_kib: Sequence[int],
                   slack_kib: int = ALIGN_SLACK_KIB) -> list[Mapping]:
    """One anonymous writable mapping per guest RAM region, exact size preferred.

    A region matches a mapping of its size up to ``slack_kib`` larger; among
    candidates the closest in size wins, then the most resident (the RAM
    block rather than an equally sized idle reservation).
    """
    chosen: list[Mapping] = []
    for size in sorted(region_sizes_kib, reverse=True):
        candidates = [m for m in maps
                      if m.anonymous and "w" in m.perms and m not in chosen
                      and size <= m.size_kib <= size + slack_kib]
        if not candidates:
            raise SmapsError(f"no anonymous mapping of {size} kB (the guest RAM) in smaps")
        chosen.append(min(candidates, key=lambda m: (m.size_kib - size, -m.kib("Rss"))))
    return chosen


def vmm_memory(maps: Sequence[Mapping], region_sizes_kib: Sequence[int]) -> VmmMemory:
    guest = guest_mappings(maps, region_sizes_kib)
    return VmmMemory(
        rss_kib=sum(m.kib("Rss") for m in maps),
        pss_kib=sum(m.kib("Pss") for m in maps),
        anon_kib=sum(m.kib("Anonymous") for m in maps),
        guest_size_kib=sum(m.size_kib for m in guest),
        guest_rss_kib=sum(m.kib("Rss") for m in guest),
        guest_pss_kib=sum(m.kib("Pss") for m in guest),
        guest_anon_kib=sum(m.kib("Anonymous") for m in guest),
    )


def read_process_memory(pid: int, region_sizes_kib: Sequence[int]) -> VmmMemory:
    """Read ``/proc/<pid>/smaps`` once and split it into VMM and guest memory.

    Totals come from the same smaps read as the guest mappings, not from a
    separate ``smaps_rollup`` read, so both halves describe one instant.
    """
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        return vmm_memory(parse_smaps(f.read()), region_sizes_kib)


def read_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` as kB fields (a cross-check for the totals)."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as f:
        return {m[1]: int(m[2]) for m in map(_FIELD.match, f.read().splitlines()) if m}
