"""ConsoleBuffer: incremental UTF-8, absolute offsets, the size bound, waiting."""

from __future__ import annotations

import asyncio
import re

import pytest

from asyncvmm.client.console import ConsoleBuffer, StreamEndedError


def test_utf8_split_across_chunks_is_decoded_whole():
    buf = ConsoleBuffer()
    data = "héllo ✓\n".encode()
    for i in range(len(data)):
        buf.feed(data[i:i + 1])
    assert buf.text == "héllo ✓\n"


def test_invalid_bytes_are_replaced_not_fatal():
    buf = ConsoleBuffer()
    buf.feed(b"a\xff\xfeb")
    buf.close()
    assert buf.text == "a\ufffd\ufffdb"


def test_the_oldest_text_is_dropped_beyond_the_limit_and_offsets_stay_absolute():
    buf = ConsoleBuffer(limit=10)
    buf.feed(b"0123456789")
    buf.feed(b"abcde")
    assert buf.text == "56789abcde"
    assert (buf.dropped, buf.end) == (5, 15)
    found = buf.search("a")
    assert buf.dropped + found.start() == 10
    assert buf.search("7", start=12) is None     # before the start offset
    assert buf.search("c", start=12).group() == "c"


async def test_wait_for_a_literal_and_a_regex():
    buf = ConsoleBuffer()

    async def writer():
        for chunk in (b"boot ", b"entry=pv", b"h\nready code=42\n"):
            await asyncio.sleep(0.01)
            buf.feed(chunk)

    task = asyncio.create_task(writer())
    assert (await buf.wait_for("entry=pvh", timeout=5)).group() == "entry=pvh"
    match = await buf.wait_for(re.compile(r"code=(\d+)"), timeout=5)
    assert match.group(1) == "42"
    await task


async def test_wait_from_an_offset_ignores_earlier_text():
    buf = ConsoleBuffer()
    buf.feed(b"echo:x\n")
    start = buf.end
    waiter = asyncio.create_task(buf.wait_for("echo:x", timeout=5, start=start))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    buf.feed(b"echo:x\n")
    match = await waiter
    assert buf.dropped + match.start() == start


async def test_wait_times_out():
    buf = ConsoleBuffer()
    buf.feed(b"something else")
    with pytest.raises(TimeoutError):
        await buf.wait_for("never", timeout=0.05)


async def test_end_of_stream_ends_the_wait():
    buf = ConsoleBuffer()
    waiter = asyncio.create_task(buf.wait_for("never", timeout=5))
    await asyncio.sleep(0.01)
    buf.feed(b"last words")
    buf.close()
    with pytest.raises(StreamEndedError):
        await waiter
    assert buf.closed and buf.text == "last words"


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        ConsoleBuffer(limit=0)
