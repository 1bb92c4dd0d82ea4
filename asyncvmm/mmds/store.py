"""The MMDS data store: one JSON document, replaced by PUT, merged by PATCH.

Contract:

* :meth:`MmdsStore.put` replaces the document; :meth:`MmdsStore.patch` applies
  an RFC 7396 JSON merge patch and needs a prior ``put`` (Firecracker answers
  a PATCH of a never-written store with "The MMDS data store is not
  initialized.").
* The size of the document is the length in bytes of its compact JSON
  serialisation (no whitespace, UTF-8, non-ASCII left unescaped, the way
  serde_json writes it).  A document larger than ``limit_bytes``
  (``--mmds-size-limit``, default 51200) is refused with
  :class:`DataStoreLimitExceededError` (the API answers 413) and the store is
  left unchanged: a failed PATCH is all-or-nothing.
* :meth:`MmdsStore.get` is what ``GET /mmds`` returns: ``{}`` for a store
  never written.  :meth:`MmdsStore.lookup` is what the guest sees: an RFC 6901
  JSON pointer into the document, where a never-written store is JSON
  ``null``.
* Values handed in are deep-copied and values handed out are copies, so no
  caller can change the document behind the store's back.  A lock makes each
  operation atomic: the guest reads either the old or the new document.

No I/O here.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from typing import Any

DEFAULT_MMDS_SIZE_LIMIT = 51200

# JSON nests this deep at most; deeper documents are refused rather than
# risking Python's recursion limit in the merge and the serialiser.
MAX_DEPTH = 64


class MmdsStoreError(Exception):
    """Base class of data store errors; ``str()`` is the API fault message."""


class DataStoreLimitExceededError(MmdsStoreError):
    def __init__(self, size: int, limit: int) -> None:
        # Firecracker's text (for PUT too); the API prefixes "MMDS limit exceeded error: ".
        super().__init__("The MMDS patch request doesn't fit.")
        self.size = size
        self.limit = limit


class DataStoreNotInitializedError(MmdsStoreError):
    def __init__(self) -> None:
        super().__init__("The MMDS data store is not initialized.")


class InvalidMmdsDataError(MmdsStoreError):
    """The value is not a JSON document (e.g. a set, NaN, non-string keys)."""


class MmdsNotFoundError(MmdsStoreError):
    def __init__(self, pointer: str) -> None:
        super().__init__(f"Resource not found: {pointer}.")
        self.pointer = pointer


def serialized_size(doc: Any) -> int:
    """Bytes of ``doc`` as compact UTF-8 JSON (what the size limit counts)."""
    return len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8"))


def _check_text(text: str) -> None:
    # A lone surrogate (JSON "\ud800") has no UTF-8 form: refuse it here
    # rather than fail later while answering the guest.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMmdsDataError("string is not valid Unicode (lone surrogate)") from None


def validate_json(doc: Any, depth: int = 0) -> None:
    """Raise :class:`InvalidMmdsDataError` unless ``doc`` is plain JSON."""
    if depth > MAX_DEPTH:
        raise InvalidMmdsDataError(f"JSON nested deeper than {MAX_DEPTH} levels")
    if doc is None or isinstance(doc, (bool, int)):
        return
    if isinstance(doc, str):
        _check_text(doc)
        return
    if isinstance(doc, float):
        if not math.isfinite(doc):
            raise InvalidMmdsDataError(f"{doc!r} is not a JSON number")
        return
    if isinstance(doc, list):
        for item in doc:
            validate_json(item, depth + 1)
        return
    if isinstance(doc, dict):
        for key, value in doc.items():
            if not isinstance(key, str):
                raise InvalidMmdsDataError(f"object key {key!r} is not a string")
            _check_text(key)
            validate_json(value, depth + 1)
        return
    raise InvalidMmdsDataError(f"{type(doc).__name__} is not a JSON value")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2: the result of applying ``patch`` to ``target``.

    Neither argument is modified; the result shares no containers with the
    patch.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _array_index(token: str) -> int | None:
    # RFC 6901 section 4: decimal digits, no leading zeros; "-" names no element.
    if not token.isascii() or not token.isdigit() or (token.startswith("0") and token != "0"):
        return None
    return int(token)


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """The value ``pointer`` (RFC 6901) names in ``doc``; MmdsNotFoundError if none."""
    if pointer == "":
        return doc
    if not pointer.startswith("/"):
        raise MmdsNotFoundError(pointer)
    node = doc
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and (i := _array_index(token)) is not None and i < len(node):
            node = node[i]
        else:
            raise MmdsNotFoundError(pointer)
    return node


class MmdsStore:
    """The metadata document shared by the API and every MMDS network stack."""

    def __init__(self, limit_bytes: int = DEFAULT_MMDS_SIZE_LIMIT) -> None:
        if limit_bytes < 0:
            raise ValueError(f"negative MMDS size limit {limit_bytes}")
        self._limit = limit_bytes
        self._lock = threading.Lock()
        self._doc: Any = None
        self._initialized = False

    @property
    def limit_bytes(self) -> int:
        return self._limit

    @property
    def initialized(self) -> bool:
        return self._initialized

    def _checked(self, doc: Any) -> Any:
        size = serialized_size(doc)
        if size > self._limit:
            raise DataStoreLimitExceededError(size, self._limit)
        return doc

    def put(self, doc: Any) -> None:
        """Replace the whole document (``PUT /mmds``)."""
        validate_json(doc)
        new = self._checked(copy.deepcopy(doc))
        with self._lock:
            self._doc = new
            self._initialized = True

    def patch(self, patch: Any) -> None:
        """Merge ``patch`` into the document (``PATCH /mmds``), all or nothing."""
        validate_json(patch)
        with self._lock:
            if not self._initialized:
                raise DataStoreNotInitializedError()
            self._doc = self._checked(merge_patch(self._doc, patch))

    def get(self) -> Any:
        """A copy of the document for ``GET /mmds``; ``{}`` before any PUT."""
        with self._lock:
            return copy.deepcopy(self._doc) if self._initialized else {}

    def size_bytes(self) -> int:
        with self._lock:
            return serialized_size(self._doc) if self._initialized else 0

    def lookup(self, pointer: str) -> Any:
        """A copy of the value at JSON pointer ``pointer``, as the guest sees it.

        Raises :class:`MmdsNotFoundError`.  Before any PUT the document is
        ``null``, so only the empty pointer resolves.
        """
        with self._lock:
            return copy.deepcopy(resolve_pointer(self._doc, pointer))
