"""The one error type of configuration values.

A :class:`ConfigError` carries the exact text a Firecracker client sees in
``fault_message``; the controller puts it on the wire unchanged.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; ``str(err)`` is the client-facing message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
