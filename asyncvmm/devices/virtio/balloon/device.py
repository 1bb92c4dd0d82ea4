"""The virtio memory balloon device (virtio 1.2 §5.5), as Firecracker 1.16 offers it.

Primer.  The host sets a target, ``num_pages`` (4 KiB pages) in the config
space; the guest driver gives pages to the balloon by sending their page
frame numbers (le32, guest-physical address >> 12) on the *inflate* queue and
takes them back through the *deflate* queue, and writes how many it holds to
``actual``.  The device gives an inflated page's host memory back
(``MADV_DONTNEED`` through :meth:`GuestMemory.discard`); a deflated page
needs nothing: the guest's next access faults in a fresh zero page.

Queues are numbered in order of the features the driver accepted (Linux
skips absent ones): 0 inflate, 1 deflate, then the *stats* queue with
``VIRTIO_BALLOON_F_STATS_VQ`` (offered when ``stats_polling_interval_s`` is
not 0), the *hinting* queue with ``VIRTIO_BALLOON_F_FREE_PAGE_HINT``
(``free_page_hinting``), then the *reporting* queue with
``VIRTIO_BALLOON_F_PAGE_REPORTING`` (``free_page_reporting``).
``VIRTIO_BALLOON_F_DEFLATE_ON_OOM`` lets the guest deflate on its own under
memory pressure.

Free page hinting (§5.5.6.4): the API starts a run by writing a new command
id (2 and up) to ``free_page_hint_cmd_id``; the driver answers with that id,
then hands over free pages it holds meanwhile (given back to the host), then
sends ``STOP``.  Writing ``DONE`` (``/balloon/hinting/stop``, or at the
guest's ``STOP`` when the run asked for ``acknowledge_on_stop``) lets the
guest use those pages again.

Config space (§5.5.4): ``le32 num_pages`` (device-written), ``le32 actual``
(driver-written), ``le32 free_page_hint_cmd_id`` (device-written).
Everything here runs on the loop.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from asyncvmm.devices.virtio.balloon.handler import BalloonHandler
from asyncvmm.devices.virtio.balloon.metrics import BalloonMetrics
from asyncvmm.devices.virtio.balloon.protocol import (
    PAGES_PER_MIB,
    STAT_NAMES,
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    queue_roles,
)
from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.spec import VIRTIO_F_VERSION_1, VIRTIO_ID_BALLOON, bit

QUEUE_SIZE = 256
CONFIG = struct.Struct("<III")       # num_pages, actual, free_page_hint_cmd_id


class BalloonState(msgspec.Struct, forbid_unknown_fields=True, tag="balloon-v1"):
    """The balloon in a snapshot (untrusted on load): target and actual sizes, the free page
    hinting command state, and the statistics the guest last sent."""

    num_pages: int
    actual_pages: int
    hint_cmd_id: int
    last_run_id: int
    guest_cmd: int | None
    acknowledge_on_stop: bool
    latest_stats: dict[str, int]
ACTUAL_OFFSET = 4

# Firecracker's BalloonError texts (the API prefixes them).
DEVICE_NOT_ACTIVE = "Device not activated yet."
STATS_DISABLED = "Received stats query when stats are disabled."
STATS_STATE_CHANGE = "Statistics cannot be enabled/disabled after activation."
HINTING_NOT_ENABLED = "Attempting to use hinting when not enabled"


class BalloonError(Exception):
    """An operation on the balloon the API asked for and the device refuses."""


def too_much_memory(amount_mib: int) -> BalloonError:
    return BalloonError(f"Requested memory should be less than {amount_mib}MiB")


class Balloon(VirtioDevice):
    device_type = VIRTIO_ID_BALLOON

    def __init__(self, *, amount_mib: int, deflate_on_oom: bool, stats_polling_interval_s: int,
                 free_page_reporting: bool, mem_size_mib: int, free_page_hinting: bool = False,
                 metrics: BalloonMetrics | None = None) -> None:
        super().__init__()
        self.deflate_on_oom = deflate_on_oom
        self.free_page_hinting = free_page_hinting
        self.free_page_reporting = free_page_reporting
        self.hint_cmd_id = VIRTIO_BALLOON_CMD_ID_STOP    # what the device asks of the driver
        self.last_run_id = 0
        self.guest_cmd: int | None = None               # what the driver last said
        self.acknowledge_on_stop = True
        self.stats_polling_interval_s = stats_polling_interval_s
        self.mem_size_mib = mem_size_mib
        self.metrics = metrics or BalloonMetrics()
        self.num_pages = amount_mib * PAGES_PER_MIB
        self.actual_pages = 0
        #: The latest value of each statistic the guest sent, by API name.
        self.latest_stats: dict[str, int] = {}
        self.handler: BalloonHandler | None = None
        extra = int(stats_polling_interval_s > 0) + int(free_page_hinting) + int(free_page_reporting)
        self.queue_max_sizes = (QUEUE_SIZE,) * (2 + extra)
        self._update_config()

    @property
    def avail_features(self) -> int:
        features = bit(VIRTIO_F_VERSION_1)
        if self.stats_polling_interval_s:
            features |= bit(VIRTIO_BALLOON_F_STATS_VQ)
        if self.deflate_on_oom:
            features |= bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        if self.free_page_hinting:
            features |= bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT)
        if self.free_page_reporting:
            features |= bit(VIRTIO_BALLOON_F_PAGE_REPORTING)
        return features

    # -- config space -------------------------------------------------------

    def _update_config(self) -> None:
        self._config = CONFIG.pack(self.num_pages, self.actual_pages, self.hint_cmd_id)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only ``actual`` is the driver's to write (§5.5.6: the driver SHOULD update it).
        if offset < ACTUAL_OFFSET or offset + len(data) > ACTUAL_OFFSET + 4:
            super().write_config(offset, data)
            return
        raw = bytearray(self._config)
        raw[offset:offset + len(data)] = data
        self.actual_pages = CONFIG.unpack(raw)[1]
        self._update_config()

    # -- the API's operations -------------------------------------------------

    def update_size(self, amount_mib: int) -> None:
        """PATCH /balloon: a new target, told to the driver by a config-change interrupt."""
        if self.handler is None:
            raise BalloonError(DEVICE_NOT_ACTIVE)
        if amount_mib > self.mem_size_mib:
            raise too_much_memory(amount_mib)
        if amount_mib * PAGES_PER_MIB > 0xFFFF_FFFF:   # num_pages is a le32
            raise too_much_memory(0xFFFF_FFFF // PAGES_PER_MIB)
        self.num_pages = amount_mib * PAGES_PER_MIB
        self._update_config()
        self.config_changed()

    def update_stats_polling_interval(self, interval_s: int) -> None:
        """PATCH /balloon/statistics: a new interval; statistics cannot be turned on or off."""
        if interval_s == self.stats_polling_interval_s:
            return
        if interval_s == 0 or self.stats_polling_interval_s == 0:
            raise BalloonError(STATS_STATE_CHANGE)
        self.stats_polling_interval_s = interval_s
        if self.handler is not None:
            self.handler.request_stats()       # the first update at once, as Firecracker does
            self.handler.arm_stats_timer()

    def stats(self) -> dict[str, Any]:
        """GET /balloon/statistics: target and actual sizes, then what the guest last sent."""
        if self.stats_polling_interval_s == 0:
            raise BalloonError(STATS_DISABLED)
        out: dict[str, Any] = {
            "target_pages": self.num_pages,
            "actual_pages": self.actual_pages,
            "target_mib": self.num_pages // PAGES_PER_MIB,
            "actual_mib": self.actual_pages // PAGES_PER_MIB,
        }
        out.update((name, self.latest_stats[name]) for name in STAT_NAMES.values() if name in self.latest_stats)
        return out

    # -- free page hinting (the API) -------------------------------------------

    def start_hinting(self, acknowledge_on_stop: bool) -> None:
        """PATCH /balloon/hinting/start: a new run, with the next command id (2 and up)."""
        self._check_hinting()
        run_id = (self.last_run_id + 1) & 0xFFFF_FFFF
        self.last_run_id = run_id if run_id > VIRTIO_BALLOON_CMD_ID_DONE else 2
        self.acknowledge_on_stop = acknowledge_on_stop
        self.set_hint_cmd(self.last_run_id)

    def stop_hinting(self) -> None:
        """PATCH /balloon/hinting/stop: DONE, so the guest takes its hinted pages back."""
        self._check_hinting()
        self.set_hint_cmd(VIRTIO_BALLOON_CMD_ID_DONE)

    def hinting_status(self) -> dict[str, int]:
        if not self.free_page_hinting:
            raise BalloonError(HINTING_NOT_ENABLED)
        status = {"host_cmd": self.hint_cmd_id}
        if self.guest_cmd is not None:
            status["guest_cmd"] = self.guest_cmd
        return status

    def _check_hinting(self) -> None:
        if not self.free_page_hinting:
            raise BalloonError(HINTING_NOT_ENABLED)
        if self.handler is None:
            raise BalloonError(DEVICE_NOT_ACTIVE)

    def set_hint_cmd(self, cmd_id: int) -> None:
        """Write ``free_page_hint_cmd_id`` and tell the driver (a config-change interrupt)."""
        self.hint_cmd_id = cmd_id
        self._update_config()
        self.config_changed()

    def config(self) -> dict[str, Any]:
        """The device as configured now (GET /balloon after boot)."""
        return {
            "amount_mib": self.num_pages // PAGES_PER_MIB,
            "deflate_on_oom": self.deflate_on_oom,
            "stats_polling_interval_s": self.stats_polling_interval_s,
            "free_page_hinting": self.free_page_hinting,
            "free_page_reporting": self.free_page_reporting,
        }

    # -- lifecycle ----------------------------------------------------------

    def activate(self, activation: Activation) -> None:
        roles = queue_roles(activation.acked_features)
        for index in roles:
            if index >= len(activation.queues) or not activation.queues[index].ready:
                raise ActivationError(f"balloon: queue {index} not ready")
        self.deactivate()
        self.handler = BalloonHandler(self, activation, roles)
        self.handler.start()

    def deactivate(self) -> None:
        if self.handler is not None:
            self.handler.stop()
            self.handler = None

    # -- snapshots ------------------------------------------------------------------

    def held_chains(self, queue_index: int) -> int:
        """The statistics buffer the device keeps until its next poll."""
        h = self.handler
        return int(h is not None and queue_index == h.stats_index and h.held_stats is not None)

    def save_state(self) -> BalloonState:
        return BalloonState(num_pages=self.num_pages, actual_pages=self.actual_pages,
                            hint_cmd_id=self.hint_cmd_id, last_run_id=self.last_run_id,
                            guest_cmd=self.guest_cmd, acknowledge_on_stop=self.acknowledge_on_stop,
                            latest_stats=dict(self.latest_stats))

    def restore_state(self, state: BalloonState) -> None:
        """Take a snapshot's balloon state, each value checked; nothing changes if one is bad."""
        limit = self.mem_size_mib * PAGES_PER_MIB
        for name in ("num_pages", "actual_pages"):
            if not 0 <= getattr(state, name) <= min(limit, 0xFFFF_FFFF):
                raise ValueError(f"balloon state: {name} {getattr(state, name)} outside 0..{limit}")
        for name in ("hint_cmd_id", "last_run_id", "guest_cmd"):
            value = getattr(state, name)
            if value is not None and not 0 <= value <= 0xFFFF_FFFF:
                raise ValueError(f"balloon state: {name} {value} is not a u32")
        known = set(STAT_NAMES.values())
        if not set(state.latest_stats) <= known or any(
                not 0 <= v < 1 << 64 for v in state.latest_stats.values()):
            raise ValueError("balloon state: unknown or out-of-range statistics")
        self.num_pages, self.actual_pages = state.num_pages, state.actual_pages
        # A hinting run never survives a restore (Firecracker's rule): the device asks for DONE,
        # so the guest gives its held free pages back instead of waiting for a stop.
        self.hint_cmd_id = None if state.hint_cmd_id is None else VIRTIO_BALLOON_CMD_ID_DONE
        self.last_run_id = state.last_run_id
        self.guest_cmd, self.acknowledge_on_stop = state.guest_cmd, state.acknowledge_on_stop
        self.latest_stats = dict(state.latest_stats)
        self._update_config()
