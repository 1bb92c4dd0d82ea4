"""The host file behind a virtio-block device.

:class:`BackingFile` opens the file (or block device) once, knows its size,
and counts the I/O operations using its descriptor, so a runtime path swap
can retire the old file while operations on it are still in flight: the
descriptor is closed when the last one finishes.  Used on the loop only.
"""

from __future__ import annotations

import logging
import os

from asyncvmm.devices.virtio.block.request import SECTOR_SHIFT, SECTOR_SIZE

log = logging.getLogger(__name__)


class BlockFileError(Exception):
    """The backing file could not be opened or measured (a host failure)."""


class BackingFile:
    def __init__(self, path: str, *, read_only: bool) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise BlockFileError(f"Unable to open the backing file {path}: {e.strerror} (os error {e.errno})") from e
        try:
            # lseek works for regular files and block devices alike; fstat's size does not.
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            os.close(self.fd)
            raise BlockFileError(f"Unable to get the size of {path}: {e.strerror}") from e
        self.path = path
        self.read_only = read_only
        self._users = 0
        self._retired = False
        if self.size % SECTOR_SIZE:
            log.warning("%s: size %d is not a multiple of %d; the tail is not visible to the guest",
                        path, self.size, SECTOR_SIZE)

    @property
    def capacity(self) -> int:
        """Whole 512-byte sectors."""
        return self.size >> SECTOR_SHIFT

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def acquire(self) -> int:
        """Take the descriptor for one operation."""
        if self.fd < 0:
            raise BlockFileError(f"{self.path} is closed")
        self._users += 1
        return self.fd

    def release(self) -> None:
        self._users -= 1
        if self._retired and self._users == 0:
            self._close()

    def retire(self) -> None:
        """No new operations; close once the running ones are done."""
        self._retired = True
        if self._users == 0:
            self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1
