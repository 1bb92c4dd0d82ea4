"""Schemas of the guest devices: drives, network interfaces, vsock, entropy, balloon, pmem, serial.

Field names are the JSON names of Firecracker's swagger definitions;
defaults are the ones Firecracker applies.  ``check()`` is syntax that
Firecracker's deserializer enforces, ``validate()`` a semantic rule whose
message carries Firecracker's category prefix.  No I/O here.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from asyncvmm.config.common import U16, U32, Base, RateLimiterConfig, TokenBucketConfig
from asyncvmm.config.errors import ConfigError

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
VHOST_RATE_LIMITER = (
    "Network config error: A vhost-net interface (`vhost`: true) cannot have a rate limiter: the "
    "host kernel moves its frames and does not rate-limit them."
)
VHOST_MMDS = (
    "Network config error: A vhost-net interface (`vhost`: true) cannot serve the MMDS: its frames "
    "never reach the VMM. Name another interface in the MMDS config."
)
# A drive with `socket` and a field of a file drive (Firecracker's BlockError::InvalidBlockConfig).
VHOST_USER_INVALID = "Drive config error: Unable to create the virtio block device: Invalid block config."
# The virtio vsock spec reserves CIDs 0-2 (hypervisor, local, host).
VSOCK_MIN_GUEST_CID = 3


class DriveConfig(Base):
    """``Drive``: a virtio-block device backed by ``path_on_host`` (or a vhost-user ``socket``)."""

    drive_id: str
    is_root_device: bool
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] = "Unsafe"
    is_read_only: bool | None = None
    path_on_host: str | None = None
    rate_limiter: RateLimiterConfig | None = None
    io_engine: Literal["Sync", "Async"] = "Sync"
    socket: str | None = None

    def validate(self) -> None:
        prefix = "Drive config error: "
        if self.socket is not None and self.path_on_host is not None:
            raise ConfigError(
                prefix + "Unable to create the virtio block device: `path_on_host` and "
                "`socket` are mutually exclusive."
            )
        if self.socket is None and self.path_on_host is None:
            raise ConfigError(
                prefix + "Unable to create the virtio block device: `path_on_host` is "
                "required for a virtio-block drive."
            )
        # A vhost-user drive is the back end's: Firecracker takes none of the file drive's
        # fields with it (its VhostUserBlockConfig); "Sync", the default, cannot be told apart
        # from an absent io_engine here.
        if self.socket is not None and (self.rate_limiter is not None or self.is_read_only is not None
                                        or self.io_engine != "Sync"):
            raise ConfigError(VHOST_USER_INVALID)


class DriveUpdateConfig(Base):
    """``PartialDrive``: after boot only the backing file and the rate limiter change."""

    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiterConfig | None = None


class NetworkInterfaceConfig(Base):
    """``NetworkInterface``: a virtio-net device bridged to the host tap ``host_dev_name``."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: Annotated[int, msgspec.Meta(ge=68, le=65535)] | None = None
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None
    # asyncvmm extension (docs/network.md): true puts the data path in the host kernel
    # (/dev/vhost-net).  Unset reads back as absent, so GET /vm/config stays Firecracker's.
    vhost: bool | None = None

    def check(self) -> None:
        if self.guest_mac is not None and not _MAC_RE.fullmatch(self.guest_mac):
            raise ConfigError(f"invalid value: string \"{self.guest_mac}\", expected a MAC address")

    def validate(self) -> None:
        if self.vhost and (self.rx_rate_limiter is not None or self.tx_rate_limiter is not None):
            raise ConfigError(VHOST_RATE_LIMITER)


class NetworkInterfaceUpdateConfig(Base):
    """``PartialNetworkInterface``: after boot only the rate limiters change."""

    iface_id: str
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None


class VsockConfig(Base):
    """``Vsock``: the guest's CID and the host Unix socket that proxies connections."""

    guest_cid: U32
    uds_path: str
    vsock_id: str | None = None  # deprecated; accepted and ignored

    def validate(self) -> None:
        if self.guest_cid < VSOCK_MIN_GUEST_CID:
            raise ConfigError(
                f"Vsock config error: The guest CID must be at least {VSOCK_MIN_GUEST_CID}."
            )


class EntropyConfig(Base):
    """``EntropyDevice``: a virtio-rng device, optionally rate limited."""

    rate_limiter: RateLimiterConfig | None = None


class BalloonConfig(Base):
    """``Balloon``: a virtio-balloon device with target ``amount_mib``."""

    amount_mib: U32
    deflate_on_oom: bool
    stats_polling_interval_s: U16 = 0
    free_page_hinting: bool = False
    free_page_reporting: bool = False


class BalloonUpdateConfig(Base):
    """``BalloonUpdate``: a new target size after boot."""

    amount_mib: U32


class BalloonStatsUpdateConfig(Base):
    """``BalloonStatsUpdate``: a new statistics polling interval after boot."""

    stats_polling_interval_s: U16


class BalloonStartCmdConfig(Base):
    """``BalloonStartCmd``: starts a free page hinting run."""

    acknowledge_on_stop: bool = True   # Firecracker's default: DONE follows the guest's STOP


class PmemConfig(Base):
    """``Pmem``: a virtio-pmem device backed by a host file."""

    id: str
    path_on_host: str
    root_device: bool = False
    read_only: bool = False
    rate_limiter: RateLimiterConfig | None = None


class PmemUpdateConfig(Base):
    """``PartialPmem``: after boot only the rate limiter changes."""

    id: str
    rate_limiter: RateLimiterConfig | None = None


class SerialConfig(Base):
    """``SerialDevice``: where the guest's serial output goes instead of stdout."""

    serial_out_path: str | None = None
    rate_limiter: TokenBucketConfig | None = None
