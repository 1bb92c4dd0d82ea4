"""Building blocks shared by the API schemas: integer ranges, resource ids, rate limiters.

Field names are the JSON names of Firecracker's swagger definitions.  The
integer aliases carry the Rust widths Firecracker deserializes into, so an
out-of-range number is rejected while decoding, as serde does.  No I/O here.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from asyncvmm.config.errors import ConfigError

U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
# msgspec bounds must fit in an int64; no real size or time reaches 2**63.
U64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
I32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]

_ID_RE = re.compile(r"[A-Za-z0-9_]+")

EMPTY_ID = "The ID cannot be empty."
INVALID_ID = "API Resource IDs can only contain alphanumeric characters and underscores."


def check_id(resource_id: str) -> str:
    """Firecracker's resource-id rule (drive_id, iface_id, pmem id)."""
    if not resource_id:
        raise ConfigError(EMPTY_ID)
    if not _ID_RE.fullmatch(resource_id):
        raise ConfigError(INVALID_ID)
    return resource_id


class Base(msgspec.Struct, forbid_unknown_fields=True):
    """Every API body rejects unknown fields, like serde's ``deny_unknown_fields``."""

    def validate(self) -> None:
        """Checks that belong to the value itself; raise :class:`ConfigError`."""


class TokenBucketConfig(Base):
    """``TokenBucket``: ``size`` tokens refilled every ``refill_time`` ms."""

    size: U64
    refill_time: U64
    one_time_burst: U64 | None = None


class RateLimiterConfig(Base):
    """``RateLimiter``: independent bytes/s (``bandwidth``) and ops/s buckets; ``{}`` is valid."""

    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None
