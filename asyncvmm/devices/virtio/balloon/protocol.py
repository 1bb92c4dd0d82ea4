"""virtio-balloon's numbers and formats (virtio 1.2 §5.5): features, queues, PFNs, statistics.

No I/O here: pure functions over bytes, testable on their own.
"""

from __future__ import annotations

import struct

from asyncvmm.devices.virtio.spec import bit

# §5.5.3 Feature bits (bit numbers).
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_PAGE_REPORTING = 5

# Balloon page frame numbers count 4 KiB pages whatever the guest's page size (§5.5.6).
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT
PAGES_PER_MIB = (1 << 20) >> VIRTIO_BALLOON_PFN_SHIFT
# Linux sends at most VIRTIO_BALLOON_ARRAY_PFNS_MAX (256) PFNs per buffer; more is refused.
MAX_PFNS_PER_CHAIN = 256

INFLATE = "inflate"
DEFLATE = "deflate"
STATS = "stats"
HINTING = "hinting"
REPORTING = "reporting"

# §5.5.6.4 Free page hinting: the command ids the device writes to ``free_page_hint_cmd_id``;
# every other value starts a hinting run with that id.
VIRTIO_BALLOON_CMD_ID_STOP = 0
VIRTIO_BALLOON_CMD_ID_DONE = 1


def queue_roles(acked_features: int) -> dict[int, str]:
    """Which queue index does what: absent queues take no index (§5.5.2, as Linux numbers them)."""
    roles = {0: INFLATE, 1: DEFLATE}
    index = 2
    if acked_features & bit(VIRTIO_BALLOON_F_STATS_VQ):
        roles[index] = STATS
        index += 1
    if acked_features & bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT):
        roles[index] = HINTING
        index += 1
    if acked_features & bit(VIRTIO_BALLOON_F_PAGE_REPORTING):
        roles[index] = REPORTING
    return roles


def pfn_ranges(data: bytes) -> list[tuple[int, int]]:
    """An array of le32 PFNs as ``(guest address, bytes)`` ranges, sorted, duplicates merged."""
    pfns = sorted(set(struct.unpack(f"<{len(data) // 4}I", data)))
    ranges: list[tuple[int, int]] = []
    start = prev = None
    for pfn in pfns:
        if start is not None and pfn == prev + 1:
            prev = pfn
            continue
        if start is not None:
            ranges.append((start << VIRTIO_BALLOON_PFN_SHIFT, (prev - start + 1) << VIRTIO_BALLOON_PFN_SHIFT))
        start = prev = pfn
    if start is not None:
        ranges.append((start << VIRTIO_BALLOON_PFN_SHIFT, (prev - start + 1) << VIRTIO_BALLOON_PFN_SHIFT))
    return ranges


# §5.5.6.3 Memory Statistics: ``struct virtio_balloon_stat { le16 tag; le64 val; }`` (packed),
# tags as the spec and Linux number them, named as Firecracker's API names them.
STAT = struct.Struct("<HQ")
STAT_NAMES: dict[int, str] = {
    0: "swap_in",               # VIRTIO_BALLOON_S_SWAP_IN
    1: "swap_out",              # VIRTIO_BALLOON_S_SWAP_OUT
    2: "major_faults",          # VIRTIO_BALLOON_S_MAJFLT
    3: "minor_faults",          # VIRTIO_BALLOON_S_MINFLT
    4: "free_memory",           # VIRTIO_BALLOON_S_MEMFREE
    5: "total_memory",          # VIRTIO_BALLOON_S_MEMTOT
    6: "available_memory",      # VIRTIO_BALLOON_S_AVAIL
    7: "disk_caches",           # VIRTIO_BALLOON_S_CACHES
    8: "hugetlb_allocations",   # VIRTIO_BALLOON_S_HTLB_PGALLOC
    9: "hugetlb_failures",      # VIRTIO_BALLOON_S_HTLB_PGFAIL
    10: "oom_kill",             # VIRTIO_BALLOON_S_OOM_KILL
    11: "alloc_stall",          # VIRTIO_BALLOON_S_ALLOC_STALL
    12: "async_scan",           # VIRTIO_BALLOON_S_ASYNC_SCAN
    13: "direct_scan",          # VIRTIO_BALLOON_S_DIRECT_SCAN
    14: "async_reclaim",        # VIRTIO_BALLOON_S_ASYNC_RECLAIM
    15: "direct_reclaim",       # VIRTIO_BALLOON_S_DIRECT_RECLAIM
}
# A statistics buffer larger than every tag twice over is not parsed (a guest cannot make
# the loop walk megabytes); it is still held and returned, so the protocol goes on.
MAX_STATS_BYTES = 2 * len(STAT_NAMES) * STAT.size


def parse_stats(data: bytes) -> tuple[dict[str, int], int]:
    """The known statistics in ``data`` by API name, and how many entries had unknown tags.

    A trailing partial entry is ignored; a repeated tag keeps its last value.
    """
    values: dict[str, int] = {}
    unknown = 0
    for offset in range(0, len(data) - STAT.size + 1, STAT.size):
        tag, value = STAT.unpack_from(data, offset)
        name = STAT_NAMES.get(tag)
        if name is None:
            unknown += 1
        else:
            values[name] = value
    return values, unknown
