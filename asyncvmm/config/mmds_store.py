"""The MMDS data store behind ``PUT/PATCH/GET /mmds`` and ``--metadata``.

A JSON document with a size limit (``--mmds-size-limit``, measured as the
compact JSON encoding, like Firecracker), replaced by ``put`` and updated by
``patch`` with JSON Merge Patch (RFC 7396: objects merge key by key, ``null``
deletes a key, anything else replaces).  The guest-facing MMDS network stack
reads it through :meth:`MmdsStore.get`.  No I/O here.
"""

from __future__ import annotations

from typing import Any

import msgspec

DEFAULT_MMDS_SIZE_LIMIT = 51200


class MmdsStoreError(Exception):
    """Base class; ``str(err)`` is Firecracker's text for the failure."""


class MmdsLimitExceededError(MmdsStoreError):
    def __init__(self) -> None:
        super().__init__("The MMDS patch request doesn't fit.")


class MmdsNotInitializedError(MmdsStoreError):
    def __init__(self) -> None:
        super().__init__("The MMDS data store is not initialized.")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2 MergePatch(Target, Patch); the inputs are not modified."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class MmdsStore:
    """Tiny interface: :meth:`get`, :meth:`put`, :meth:`patch`."""

    def __init__(self, limit: int = DEFAULT_MMDS_SIZE_LIMIT) -> None:
        self.limit = limit
        self._data: Any = None
        self._initialized = False

    def get(self) -> Any:
        """The document; an empty store reads as ``{}``."""
        return {} if self._data is None else self._data

    def put(self, data: Any) -> None:
        self._check_size(data)
        self._data = data
        self._initialized = True

    def patch(self, patch: Any) -> None:
        if not self._initialized:
            raise MmdsNotInitializedError()
        merged = merge_patch(self._data, patch)
        self._check_size(merged)
        self._data = merged

    def _check_size(self, data: Any) -> None:
        if len(msgspec.json.encode(data)) > self.limit:
            raise MmdsLimitExceededError()
