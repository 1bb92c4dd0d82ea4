"""MMDS session tokens (``PUT /latest/api/token``): unforgeable, self-expiring.

A token is ``base64url(version | expiry | nonce | tag)`` without padding:

* ``version`` (1 byte) names this layout;
* ``expiry`` (8 bytes, big endian) is the instant, in milliseconds of the
  injected monotonic clock, from which the token is no longer valid;
* ``nonce`` (16 random bytes) makes every token distinct;
* ``tag`` is HMAC-SHA256 over the first three fields, keyed with 32 random
  bytes drawn once per :class:`TokenAuthority` (i.e. per VMM process).

Nothing is stored per token, so a guest that asks for millions of tokens costs
no memory.  Without the key a guest cannot make a tag, and it cannot stretch a
token's life because the expiry is under the tag.  The key dies with the
process, which is why tokens do not survive a snapshot restore (as in
Firecracker).  Nor does a key cross a fork: a process forked from one that
holds authorities (the fork server's children, docs/forkserver.md) draws new
keys for them at once, so no two VMM processes ever share a key.  Tags are compared with :func:`hmac.compare_digest`.

The TTL bounds are Firecracker's: 1 to 21600 seconds.  No I/O here; the clock
is injected (``time.monotonic`` by default).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
import time
import weakref
from typing import Callable

MIN_TOKEN_TTL_SECONDS = 1
MAX_TOKEN_TTL_SECONDS = 21600

_VERSION = 1
_KEY_BYTES = 32
_HEAD = struct.Struct(">BQ16s")
_TAG_BYTES = hashlib.sha256().digest_size
_TOKEN_BYTES = _HEAD.size + _TAG_BYTES
# 57 bytes, a multiple of 3, so the base64 form has no padding and no unused
# bits: each 76-character string decodes to exactly one byte string.
TOKEN_LENGTH = _TOKEN_BYTES // 3 * 4
assert _TOKEN_BYTES % 3 == 0
_TOKEN_SHAPE = re.compile(f"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")


class TokenTtlError(ValueError):
    def __init__(self, ttl: int) -> None:
        super().__init__(
            f"Invalid time to live value provided for token: {ttl}. Please provide a value "
            f"between {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}.")
        self.ttl = ttl


class TokenAuthority:
    """Issues and checks session tokens against an injected monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 key: bytes | None = None) -> None:
        if key is not None and len(key) < 16:
            raise ValueError("token key must be at least 16 bytes")
        self._clock = clock
        self._key = key if key is not None else os.urandom(_KEY_BYTES)
        if key is None:
            _drawn_keys.add(self)

    def _now_ms(self) -> int:
        return max(0, int(self._clock() * 1000))

    def _tag(self, head: bytes) -> bytes:
        return hmac.new(self._key, head, hashlib.sha256).digest()

    def generate(self, ttl_seconds: int) -> str:
        """A token valid for ``ttl_seconds``; :class:`TokenTtlError` if out of range."""
        if not MIN_TOKEN_TTL_SECONDS <= ttl_seconds <= MAX_TOKEN_TTL_SECONDS:
            raise TokenTtlError(ttl_seconds)
        head = _HEAD.pack(_VERSION, self._now_ms() + ttl_seconds * 1000, os.urandom(16))
        return base64.urlsafe_b64encode(head + self._tag(head)).rstrip(b"=").decode("ascii")

    def is_valid(self, token: str) -> bool:
        """True iff ``token`` was issued by this authority and has not expired."""
        if not _TOKEN_SHAPE.fullmatch(token):
            return False
        raw = base64.urlsafe_b64decode(token)
        head, tag = raw[:_HEAD.size], raw[_HEAD.size:]
        if not hmac.compare_digest(tag, self._tag(head)):
            return False
        version, expiry_ms, _nonce = _HEAD.unpack(head)
        return version == _VERSION and self._now_ms() < expiry_ms


# Authorities whose key this process drew; a forked child redraws them all.
_drawn_keys: "weakref.WeakSet[TokenAuthority]" = weakref.WeakSet()


def _redraw_keys_after_fork() -> None:
    for authority in list(_drawn_keys):
        authority._key = os.urandom(_KEY_BYTES)


os.register_at_fork(after_in_child=_redraw_keys_after_fork)
