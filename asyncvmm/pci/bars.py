"""Where memory BARs may live: the host bridge's windows, the VMM's placements, the mappings in effect.

The host bridge forwards to bus 0 only the guest-physical ranges ACPI
gives it as producer windows (``_CRS`` of PNP0A08: a 32-bit window below
the ECAM range and a 64-bit one above RAM).  The VMM places each BAR in the
64-bit window (:meth:`BarSpace.allocate`, first fit, aligned to its size as
PCI 3.0 §6.2.5.1 requires of a BAR); the guest may then move it (Linux
reassigns BARs it does not like, e.g. with ``pci=realloc``).  Before the
glue maps a BAR where the guest put it, :meth:`BarSpace.check` says whether
that place is sane: aligned, inside one window (so never over RAM or
another device's MMIO) and clear of every *other* function's mapping.  The
answer is the reason for the guest-fault log, or ``None``.

Sans-I/O bookkeeping: no bus, no KVM; the glue maps and unmaps.
"""

from __future__ import annotations


class BarAllocationError(Exception):
    """No room in the 64-bit window for a BAR of that size."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _overlaps(a: int, a_size: int, b: int, b_size: int) -> bool:
    return a < b + b_size and b < a + a_size


class BarSpace:
    """The BAR windows of the host bridge and what is placed and mapped in them."""

    def __init__(self, windows: list[tuple[int, int]]) -> None:
        if not windows:
            raise ValueError("no BAR windows")
        for start, size in windows:
            if start < 0 or size <= 0:
                raise ValueError(f"BAR window {start:#x}+{size:#x} is empty")
        ordered = sorted(windows)
        for (a, a_size), (b, _) in zip(ordered, ordered[1:]):
            if a + a_size > b:
                raise ValueError(f"BAR windows at {a:#x} and {b:#x} overlap")
        self.windows = list(windows)
        self._allocated: dict[int, int] = {}                 # addr -> size, the VMM's placements
        self._claims: list[tuple[object, int, int]] = []     # (owner, addr, size) mapped now

    # -- the VMM's placements --------------------------------------------------------------------

    def allocate(self, size: int) -> int:
        """The lowest address in the last window, aligned to ``size``, free of placements and mappings."""
        if not _is_pow2(size):
            raise ValueError(f"BAR size {size:#x} is not a power of two")
        start, window_size = self.windows[-1]
        end = start + window_size
        taken = sorted([*self._allocated.items(), *((a, s) for _, a, s in self._claims)])
        candidate = -(-start // size) * size
        for addr, used in taken:
            if candidate + size <= addr:
                break
            if addr + used > candidate:
                candidate = -(-(addr + used) // size) * size
        if candidate + size > end:
            raise BarAllocationError(f"no room for a BAR of {size:#x} bytes in "
                                     f"{start:#x}+{window_size:#x}")
        self._allocated[candidate] = size
        return candidate

    def free(self, addr: int, size: int) -> None:
        if self._allocated.get(addr) != size:
            raise ValueError(f"no BAR of {size:#x} bytes was allocated at {addr:#x}")
        del self._allocated[addr]

    # -- the guest's placements, as mapped -------------------------------------------------------

    def check(self, owner: object, addr: int, size: int) -> str | None:
        """``None`` if ``owner`` may map ``[addr, addr+size)``, else why not."""
        if not _is_pow2(size):
            return f"size {size:#x} is not a power of two"
        if addr % size:
            return f"{addr:#x} is not aligned to the BAR's size {size:#x}"
        if not any(start <= addr and addr + size <= start + wsize for start, wsize in self.windows):
            return f"{addr:#x}+{size:#x} is outside the host bridge's windows"
        for other, a, s in self._claims:
            if other is not owner and _overlaps(addr, size, a, s):
                return f"{addr:#x}+{size:#x} overlaps another device's BAR at {a:#x}+{s:#x}"
        return None

    def claim(self, owner: object, addr: int, size: int) -> None:
        """Record that ``owner`` has ``[addr, addr+size)`` mapped; refused unless :meth:`check` passes."""
        reason = self.check(owner, addr, size)
        if reason is not None:
            raise ValueError(reason)
        self._claims.append((owner, addr, size))

    def release(self, owner: object) -> None:
        """Forget every mapping of ``owner`` (its BARs were unmapped)."""
        self._claims = [c for c in self._claims if c[0] is not owner]

    def mappings(self, owner: object) -> list[tuple[int, int]]:
        """The ``(addr, size)`` ranges ``owner`` has claimed."""
        return [(a, s) for o, a, s in self._claims if o is owner]
