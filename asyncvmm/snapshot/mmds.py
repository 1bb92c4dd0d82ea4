"""The MMDS data store in a snapshot: the document as compact JSON text, or None when no
``PUT /mmds`` had initialized the store.  The MMDS configuration needs nothing here: it is
part of the ``VmConfig`` the state file holds.

JSON text rather than msgpack keeps every JSON value the store accepts (integers of any
size) and lets the restore check it exactly as ``PUT /mmds`` does.
"""

from __future__ import annotations

import json
from typing import Any

from ..mmds.store import MmdsStore, MmdsStoreError, serialized_size, validate_json


class MmdsStateError(Exception):
    """The snapshot's MMDS data store cannot be restored; the message says why."""


def save_mmds(store: MmdsStore) -> bytes | None:
    if not store.initialized:
        return None
    return json.dumps(store.get(), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def load_mmds(data: bytes | None, limit_bytes: int) -> tuple[bool, Any]:
    """Check a snapshot's data store against this process's size limit before anything is
    built: ``(False, None)`` for a snapshot without one, else ``(True, document)``."""
    if data is None:
        return False, None
    if len(data) > limit_bytes:       # compact JSON: never smaller than what the limit counts
        raise MmdsStateError(f"the snapshot's MMDS data store has {len(data)} bytes, more than "
                             f"this process's MMDS size limit of {limit_bytes} bytes "
                             f"(--mmds-size-limit)")
    try:
        doc = json.loads(data.decode("utf-8"))
        validate_json(doc)
    except (ValueError, RecursionError, MmdsStoreError) as e:
        raise MmdsStateError(f"the snapshot's MMDS data store is not a valid JSON document: "
                             f"{e}") from None
    size = serialized_size(doc)
    if size > limit_bytes:
        raise MmdsStateError(f"the snapshot's MMDS data store has {size} bytes, more than "
                             f"this process's MMDS size limit of {limit_bytes} bytes "
                             f"(--mmds-size-limit)")
    return True, doc
