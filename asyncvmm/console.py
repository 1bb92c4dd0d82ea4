"""The serial console's host side: stdin into the UART, stdout (or a file) out of it.

Runs on the loop.  Input is read only while the UART has room (the UART
calls back when its FIFO drains), so a paste larger than the FIFO is
delivered in order rather than dropped.  When stdin is a terminal it is put
in raw mode, so keys reach the guest unprocessed, and restored on close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import termios
import tty

from .devices.legacy.serial import Serial

log = logging.getLogger(__name__)


class SerialConsole:
    def __init__(self, loop: asyncio.AbstractEventLoop, in_fd: int | None = 0) -> None:
        self._loop = loop
        self._in_fd = in_fd
        self._serial: Serial | None = None
        self._pending = b""
        self._reading = False
        self._saved_tty = None
        self._tty_fd = -1

    def attach(self, serial: Serial) -> None:
        self._serial = serial
        if self._in_fd is None:
            return
        try:
            os.set_blocking(self._in_fd, False)
        except OSError:
            return
        if os.isatty(self._in_fd):
            try:
                self._saved_tty = termios.tcgetattr(self._in_fd)
                self._tty_fd = self._in_fd
                tty.setraw(self._in_fd)
            except termios.error:
                self._saved_tty = None
        self._start_reading()

    def on_rx_space(self) -> None:
        """Called by the UART (on a vCPU thread) when its receive FIFO drained."""
        self._loop.call_soon_threadsafe(self._feed)

    def _start_reading(self) -> None:
        if not self._reading and self._in_fd is not None:
            try:
                self._loop.add_reader(self._in_fd, self._on_readable)
                self._reading = True
            except (OSError, ValueError, NotImplementedError, PermissionError):
                # e.g. stdin is a regular file or /dev/null, which epoll refuses:
                # read it once and feed it all.
                self._read_all_blocking()

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._in_fd)
            self._reading = False

    def _read_all_blocking(self) -> None:
        try:
            os.set_blocking(self._in_fd, True)
            chunks = []
            while data := os.read(self._in_fd, 65536):
                chunks.append(data)
            self._pending += b"".join(chunks)
        except OSError:
            pass
        self._in_fd = None
        self._feed()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._in_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:                       # EOF: nothing more will come
            self._stop_reading()
            self._in_fd = None
            return
        self._pending += data
        self._feed()

    def _feed(self) -> None:
        if self._serial is None:
            return
        if self._pending:
            n = self._serial.enqueue_input(self._pending)
            self._pending = self._pending[n:]
        if self._pending:
            self._stop_reading()           # resumes from on_rx_space
        else:
            self._start_reading()

    def close(self) -> None:
        if self._in_fd is not None:
            self._stop_reading()
        if self._saved_tty is not None:
            try:
                termios.tcsetattr(self._tty_fd, termios.TCSADRAIN, self._saved_tty)
            except (termios.error, OSError):
                pass
            self._saved_tty = None
