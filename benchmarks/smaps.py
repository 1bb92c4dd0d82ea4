"""How much memory a VMM process uses for itself, apart from its guest's RAM.

``/proc/<pid>/smaps`` lists every mapping with its ``Size`` and ``Rss`` (kB);
``smaps_rollup`` is the same summed.  A VMM's guest RAM is one anonymous
private mapping per RAM region, of exactly the region's size (asyncvmm's
``mmap`` of ``mem_size_mib``; QEMU's RAM block, which QEMU may over-reserve
by an alignment of up to 2 MiB plus a guard page).  Its resident part is
whatever the guest touched, which says nothing about the VMM, so

    VMM RSS = process Rss - Rss of the guest mappings

and the same for Pss and for private anonymous memory (``Anonymous``).

Private memory (``Private_Clean + Private_Dirty``, the "unique set size")
is the part no other process maps: what the host gets back when the VMM
exits, and what one more VMM costs when others already run.  Its process
total comes from ``smaps_rollup``; both VMMs map guest RAM anonymous and
``MAP_PRIVATE``, so every page the guest touched is private to the VMM and
the guest mappings' private pages are subtracted, as for Rss.  A clean
file page counts as private only while no other process maps it (an
interpreter shared with another Python process, a QEMU binary with another
QEMU), so ``Private_Dirty`` alone (written pages, which sharing cannot
hide) is kept beside it.

Parsing is pure (text in, numbers out); only ``read_process_memory`` reads
``/proc``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping as FieldMap
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
    private_kib: int                    # Private_Clean + Private_Dirty, whole process
    private_dirty_kib: int
    guest_private_kib: int
    guest_private_dirty_kib: int

    @property
    def vmm_rss_kib(self) -> int:
        return self.rss_kib - self.guest_rss_kib

    @property
    def vmm_private_kib(self) -> int:
        return self.private_kib - self.guest_private_kib

    @property
    def vmm_private_dirty_kib(self) -> int:
        return self.private_dirty_kib - self.guest_private_dirty_kib

    @property
    def vmm_pss_kib(self) -> int:
        return self.pss_kib - self.guest_pss_kib

    @property
    def vmm_anon_kib(self) -> int:
        return self.anon_kib - self.guest_anon_kib

    def as_dict(self) -> dict[str, int]:
        d = dataclasses.asdict(self)
        d.update(vmm_rss_kib=self.vmm_rss_kib, vmm_pss_kib=self.vmm_pss_kib,
                 vmm_anon_kib=self.vmm_anon_kib, vmm_private_kib=self.vmm_private_kib,
                 vmm_private_dirty_kib=self.vmm_private_dirty_kib)
        return d

    def metrics(self) -> dict[str, int]:
        """The figures a benchmark result keeps (KiB), by metric name."""
        return {"vmm_rss": self.vmm_rss_kib, "vmm_pss": self.vmm_pss_kib, "vmm_anon": self.vmm_anon_kib,
                "vmm_private": self.vmm_private_kib, "vmm_private_dirty": self.vmm_private_dirty_kib,
                "guest_rss": self.guest_rss_kib, "guest_private": self.guest_private_kib}


def private_kib(fields: FieldMap[str, int]) -> int:
    """Private_Clean + Private_Dirty of one mapping's (or the rollup's) kB fields."""
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


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


def vmm_memory(maps: Sequence[Mapping], region_sizes_kib: Sequence[int],
               rollup: FieldMap[str, int] | None = None) -> VmmMemory:
    """Split ``maps`` into VMM and guest memory; the private totals come from ``rollup``
    (``smaps_rollup``'s fields) when given, else from summing ``maps``."""
    guest = guest_mappings(maps, region_sizes_kib)
    if rollup is None:
        rollup = {"Private_Clean": sum(m.kib("Private_Clean") for m in maps),
                  "Private_Dirty": sum(m.kib("Private_Dirty") for m in maps)}
    elif "Private_Clean" not in rollup or "Private_Dirty" not in rollup:
        raise SmapsError(f"smaps_rollup lacks Private_Clean/Private_Dirty: {sorted(rollup)}")
    return VmmMemory(
        rss_kib=sum(m.kib("Rss") for m in maps),
        pss_kib=sum(m.kib("Pss") for m in maps),
        anon_kib=sum(m.kib("Anonymous") for m in maps),
        guest_size_kib=sum(m.size_kib for m in guest),
        guest_rss_kib=sum(m.kib("Rss") for m in guest),
        guest_pss_kib=sum(m.kib("Pss") for m in guest),
        guest_anon_kib=sum(m.kib("Anonymous") for m in guest),
        private_kib=private_kib(rollup),
        private_dirty_kib=rollup["Private_Dirty"],
        guest_private_kib=sum(private_kib(m.fields) for m in guest),
        guest_private_dirty_kib=sum(m.kib("Private_Dirty") for m in guest),
    )


def read_process_memory(pid: int, region_sizes_kib: Sequence[int]) -> VmmMemory:
    """Read ``/proc/<pid>/smaps`` and, right after it, ``smaps_rollup``; split into VMM and guest.

    Rss, Pss, Anonymous and the guest mappings come from the one smaps read,
    so they describe one instant; the private totals from the rollup read
    that follows it (the benchmarks read while the guest is halted and the
    VMM idle, so the two agree but for a few pages).
    """
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        maps = parse_smaps(f.read())
    return vmm_memory(maps, region_sizes_kib, read_rollup(pid))


def parse_rollup(text: str) -> dict[str, int]:
    """The kB fields of ``smaps_rollup`` text (its header line, the summed range, is skipped)."""
    fields = {m[1]: int(m[2]) for m in map(_FIELD.match, text.splitlines()) if m}
    if not fields:
        raise SmapsError(f"no kB fields in smaps_rollup: {text[:200]!r}")
    return fields


def read_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` as kB fields."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as f:
        return parse_rollup(f.read())
