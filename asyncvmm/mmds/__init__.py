"""The microVM metadata service: data store, session tokens, and the tiny
network stack that answers the guest's HTTP requests inside the VMM.

Composition (done by the builder): one :class:`MmdsStore` per VM (the API
writes it), one :class:`TokenAuthority`, one :class:`MmdsHttpHandler` with
the configured version, and one :class:`MmdsNetworkStack` per network
interface listed in ``PUT /mmds/config``, all sharing one
:class:`MmdsMetrics` registered as ``"mmds"``.  See ``docs/mmds.md``.
"""

from asyncvmm.mmds.http_handler import MmdsHttpHandler, MmdsVersion
from asyncvmm.mmds.metrics import MmdsMetrics
from asyncvmm.mmds.stack import DEFAULT_MMDS_IPV4, DEFAULT_MMDS_MAC, MmdsNetworkStack
from asyncvmm.mmds.store import (DEFAULT_MMDS_SIZE_LIMIT, DataStoreLimitExceededError,
                                 DataStoreNotInitializedError, InvalidMmdsDataError, MmdsStore,
                                 MmdsStoreError)
from asyncvmm.mmds.token import TokenAuthority, TokenTtlError

__all__ = [
    "DEFAULT_MMDS_IPV4", "DEFAULT_MMDS_MAC", "DEFAULT_MMDS_SIZE_LIMIT",
    "DataStoreLimitExceededError", "DataStoreNotInitializedError", "InvalidMmdsDataError",
    "MmdsHttpHandler", "MmdsMetrics", "MmdsNetworkStack", "MmdsStore", "MmdsStoreError",
    "MmdsVersion", "TokenAuthority", "TokenTtlError",
]
