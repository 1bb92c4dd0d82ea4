"""A bounded, searchable record of a byte stream (the guest's serial console, the VMM's stderr).

No I/O here: the owner feeds bytes as they arrive and calls :meth:`close` at
end of file; waiters block on :meth:`wait_for` until a pattern shows up, the
stream ends, or their timeout passes.  Offsets are absolute (counted from the
first character ever fed) so they stay valid when the oldest text is dropped
to keep the record under ``limit`` characters: a guest printing without end
cannot grow the host's memory.
"""

from __future__ import annotations

import asyncio
import codecs
import re

DEFAULT_LIMIT_CHARS = 4 << 20


class StreamEndedError(EOFError):
    """The stream ended before the awaited pattern appeared."""


class ConsoleBuffer:
    def __init__(self, limit: int = DEFAULT_LIMIT_CHARS) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = limit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._dropped = 0     # characters discarded from the front
        self._closed = False
        self._changed = asyncio.Event()

    # -- feeding -----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._append(self._decoder.decode(data))

    def close(self) -> None:
        self._append(self._decoder.decode(b"", final=True))
        self._closed = True
        self._wake()

    def _append(self, text: str) -> None:
        if not text:
            return
        self._text += text
        excess = len(self._text) - self.limit
        if excess > 0:
            self._text = self._text[excess:]
            self._dropped += excess
        self._wake()

    def _wake(self) -> None:
        # Waiters hold the old event; a fresh one serves the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- reading -----------------------------------------------------------------

    @property
    def text(self) -> str:
        """What is still held (everything, unless more than ``limit`` characters arrived)."""
        return self._text

    @property
    def end(self) -> int:
        """The absolute offset just past the last character: pass it as ``start`` to wait for
        text that arrives from now on."""
        return self._dropped + len(self._text)

    @property
    def closed(self) -> bool:
        return self._closed

    def search(self, pattern: str | re.Pattern[str], start: int = 0) -> re.Match[str] | None:
        """The first match at or after absolute offset ``start`` among the characters held
        (match positions are relative to :attr:`text`; add :attr:`dropped` for absolute ones)."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        return regex.search(self._text, max(0, start - self._dropped))

    @property
    def dropped(self) -> int:
        return self._dropped

    async def wait_for(self, pattern: str | re.Pattern[str], timeout: float | None,
                       start: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (a literal string or a compiled regex) appears at or after
        ``start``.  Raises ``TimeoutError`` or :class:`StreamEndedError`."""
        async def poll() -> re.Match[str]:
            while True:
                changed = self._changed
                found = self.search(pattern, start)
                if found is not None:
                    return found
                if self._closed:
                    raise StreamEndedError(str(pattern))
                await changed.wait()

        return await asyncio.wait_for(poll(), timeout)
