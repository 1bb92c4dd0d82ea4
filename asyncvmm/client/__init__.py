"""An async Python SDK for Firecracker's API, to drive asyncvmm or a real ``firecracker``.

* :class:`Client`: one typed coroutine per endpoint of the v1.16.1 API over the
  Unix socket (aiohttp's ``UnixConnector``); errors become :class:`ApiError`.
* :class:`MicroVM`: one VMM process, ``async with MicroVM(kernel, boot_args) as vm:``
  spawns, configures and starts it, captures its console, and cleans up.

Importing this package loads neither aiohttp (until the first request) nor any
part of the VMM.  See docs/sdk.md.
"""

from asyncvmm.client.api import ApiDeprecationWarning, Client, RateLimiter, TokenBucket
from asyncvmm.client.config import ConfigShapeError, apply_config
from asyncvmm.client.console import ConsoleBuffer
from asyncvmm.client.errors import (
    ApiConnectionError,
    ApiError,
    ApiTimeoutError,
    ConsoleTimeoutError,
    VmmExitedError,
)
from asyncvmm.client.microvm import MicroVM, default_binary

__all__ = [
    "ApiConnectionError", "ApiDeprecationWarning", "ApiError", "ApiTimeoutError", "Client",
    "ConfigShapeError", "ConsoleBuffer", "ConsoleTimeoutError", "MicroVM", "RateLimiter",
    "TokenBucket", "VmmExitedError", "apply_config", "default_binary",
]
