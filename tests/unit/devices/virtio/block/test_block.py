"""virtio-block through the transport: every request type, any framing, both engines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings

from asyncvmm.devices.virtio import mmio as r
from asyncvmm.devices.virtio.block import Block, BlockFileError, UnsupportedEngineError
from asyncvmm.devices.virtio.block import device as block_device
from asyncvmm.devices.virtio.block import handler as block_handler
from asyncvmm.devices.virtio.block import request as rq
from asyncvmm.devices.virtio.block.device import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
)
from asyncvmm.devices.virtio.spec import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    bit,
)
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.block import no_io_uring
from tests.unit.devices.virtio.block.conftest import (
    ENGINES,
    SECTORS,
    disk_bytes,
    make_block_rig,
    require_io_uring,
)
from tests.unit.devices.virtio.block.helpers import cuts, header

OK, IOERR, UNSUPP = rq.VIRTIO_BLK_S_OK, rq.VIRTIO_BLK_S_IOERR, rq.VIRTIO_BLK_S_UNSUPP
hypothesis_settings = settings(max_examples=40, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_features_and_config(disk):
    dev = Block("d", str(disk), read_only=False)
    assert dev.avail_features == (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX)
                                  | bit(VIRTIO_F_INDIRECT_DESC) | bit(VIRTIO_BLK_F_SEG_MAX))
    assert int.from_bytes(dev.read_config(0, 8), "little") == SECTORS
    assert int.from_bytes(dev.read_config(12, 4), "little") == 254
    ro = Block("d", str(disk), read_only=True, cache_type="Writeback")
    assert ro.avail_features & bit(VIRTIO_BLK_F_RO) and ro.avail_features & bit(VIRTIO_BLK_F_FLUSH)
    dev.file.retire()
    ro.file.retire()


def test_config_reads_past_the_end_count_as_cfg_fails(disk):
    dev = Block("d", str(disk), read_only=False)
    assert dev.read_config(14, 4) == dev.read_config(14, 2) + b"\0\0"
    assert dev.metrics.cfg_fails == 1
    dev.write_config(0, b"\1")
    assert dev.metrics.cfg_fails == 2 and int.from_bytes(dev.read_config(0, 8), "little") == SECTORS
    dev.file.retire()


def test_missing_file_is_a_host_error_naming_the_os_error(tmp_path):
    with pytest.raises(BlockFileError, match="No such file"):
        Block("d", str(tmp_path / "nope"), read_only=False)


async def test_read_and_write_simple(blk):
    status, data = await blk.read(2, 1024)
    assert status == OK and data == disk_bytes()[1024:2048]
    assert await blk.write(5, b"\xAB" * 512) == OK
    with open(blk.dev.path, "rb") as f:
        f.seek(5 * 512)
        assert f.read(512) == b"\xAB" * 512
    m = blk.dev.metrics
    assert (m.read_count, m.read_bytes, m.write_count, m.write_bytes) == (1, 1024, 1, 512)


@hypothesis_settings
@given(sector=cuts.map(lambda c: len(c) * 7 % 60), rcuts=cuts, wcuts=cuts)
async def test_reads_over_every_split(blk, sector, rcuts, wcuts):
    for indirect in (False, True):
        status, data = await blk.read(sector, 2048, rcuts=rcuts, wcuts=wcuts, indirect=indirect)
        assert status == OK
        assert data == disk_bytes()[sector * 512:sector * 512 + 2048]


@hypothesis_settings
@given(rcuts=cuts, wcuts=cuts)
async def test_writes_over_every_split(blk, rcuts, wcuts):
    payload = os.urandom(1536)
    for indirect in (False, True):
        assert await blk.write(10, payload, rcuts=rcuts, wcuts=wcuts, indirect=indirect) == OK
        status, back = await blk.read(10, 1536)
        assert back == payload


async def test_get_id_returns_the_drive_id(blk):
    used, answer = await blk.request(rq.VIRTIO_BLK_T_GET_ID, read_len=20, wcuts=[3, 17])
    assert used == 21 and answer == b"disk0" + bytes(15) + bytes([OK])


async def test_malformed_requests_get_an_error_status_and_are_counted(blk):
    used, answer = await blk.request(rq.VIRTIO_BLK_T_IN, SECTORS, read_len=512)
    assert answer[-1] == IOERR and used == 1
    assert answer[:-1] == b"\xEE" * 512                    # no data written
    used, answer = await blk.request(99)
    assert answer == bytes([UNSUPP])
    used, answer = await blk.request(rq.VIRTIO_BLK_T_FLUSH)   # Unsafe: no flush feature
    assert answer == bytes([UNSUPP])
    assert blk.dev.metrics.invalid_reqs_count == 3
    assert not blk.needs_reset()


async def test_chain_without_any_writable_byte_is_returned_with_length_zero(blk):
    bufs, _ = blk.lay_out(b"\0" * 16, 0)
    bufs = [b for b in bufs if not b.write]
    head = blk.offer(bufs)
    assert await blk.driver.wait_used(blk.vq, 1) == [(head, 0)]
    assert blk.dev.metrics.invalid_reqs_count == 1


@pytest.mark.parametrize("engine", list(ENGINES))
async def test_read_only_drive_refuses_writes(disk, engine):
    if engine == "Async":
        require_io_uring()
    b = await make_block_rig(disk, **{**ENGINES[engine], "read_only": True})
    assert b.driver.device_features() & bit(VIRTIO_BLK_F_RO)
    assert await b.write(0, b"x" * 512) == IOERR
    assert disk.read_bytes() == disk_bytes()
    status, data = await b.read(0, 512)
    assert status == OK and data == disk_bytes()[:512]
    b.dev.close()
    b.rig.close()


async def test_writeback_flush_reaches_fdatasync_before_completion(disk):
    calls = []

    def fdatasync(fd):
        calls.append(fd)
        os.fdatasync(fd)

    b = await make_block_rig(disk, io_engine="Sync", cache_type="Writeback", fdatasync=fdatasync)
    assert b.driver.device_features() & bit(VIRTIO_BLK_F_FLUSH)
    assert await b.write(0, b"y" * 512) == OK
    assert calls == []                                      # a write alone does not sync
    used, answer = await b.request(rq.VIRTIO_BLK_T_FLUSH)
    assert answer == bytes([OK]) and used == 1
    assert calls == [b.dev.file.fd]
    assert b.dev.metrics.flush_count == 1
    b.dev.close()
    b.rig.close()


async def test_writeback_flush_goes_through_io_uring_on_async(disk):
    require_io_uring()
    b = await make_block_rig(disk, io_engine="Async", cache_type="Writeback")
    assert await b.write(0, b"y" * 512) == OK
    used, answer = await b.request(rq.VIRTIO_BLK_T_FLUSH)
    assert answer == bytes([OK]) and used == 1
    m = b.dev.metrics
    assert (m.write_count, m.flush_count, m.io_uring_count) == (1, 1, 2)
    assert disk.read_bytes()[:512] == b"y" * 512
    b.dev.close()
    b.rig.close()


async def test_io_uring_count_counts_the_answers_io_uring_gave(blk):
    await blk.read(0, 512)
    await blk.write(1, b"z" * 512)
    await blk.request(rq.VIRTIO_BLK_T_GET_ID, read_len=20)     # answered by the device itself
    await blk.read(SECTORS, 512)                               # out of range: refused, no I/O
    m = blk.dev.metrics
    assert (m.read_count, m.write_count, m.invalid_reqs_count) == (1, 1, 1)
    assert m.io_uring_count == (2 if blk.dev.io_engine == "Async" else 0)
    assert m.discarded_reqs_count == 0


def test_async_drive_is_refused_where_io_uring_is_missing(disk, monkeypatch):
    monkeypatch.setattr(block_device, "why_io_uring_unavailable",
                        lambda: "io_uring_setup failed: Function not implemented (os error 38)")
    with pytest.raises(UnsupportedEngineError, match="io_engine Async: it needs io_uring.*os error 38"):
        Block("d", str(disk), read_only=False, io_engine="Async")
    Block("d", str(disk), read_only=False, io_engine="Sync").close()       # Sync needs nothing


def test_the_probe_names_what_the_host_refused():
    """Under a seccomp filter failing io_uring_setup (as a kernel without io_uring does)."""
    code = "from asyncvmm.devices.virtio.block.uring import why_io_uring_unavailable as w; print(w())"
    out = subprocess.run([*no_io_uring.prefix(), sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "io_uring_setup failed: Function not implemented (os error 38)"


async def test_host_io_error_is_ioerr_and_execute_fails(blk):
    os.truncate(blk.dev.path, 4 * 512)                     # the file shrinks under the device
    status, _ = await blk.read(8, 512)
    assert status == IOERR
    assert blk.dev.metrics.execute_fails == 1
    assert not blk.needs_reset()


async def test_path_swap_changes_size_content_and_raises_a_config_interrupt(blk, tmp_path):
    new = tmp_path / "new.img"
    new.write_bytes(disk_bytes(128, seed=3))
    d = blk.driver
    d.ack_interrupts()
    gen = d.read32(r.VIRTIO_MMIO_CONFIG_GENERATION)
    old_fd = blk.dev.file.fd
    blk.dev.update_path(str(new))
    assert d.read32(r.VIRTIO_MMIO_CONFIG_GENERATION) == gen + 1
    assert d.ack_interrupts() == r.VIRTIO_MMIO_INT_CONFIG
    assert int.from_bytes(blk.rig.transport.read(r.VIRTIO_MMIO_CONFIG, 8), "little") == 128
    status, data = await blk.read(100, 512)
    assert status == OK and data == disk_bytes(128, seed=3)[100 * 512:101 * 512]
    with pytest.raises(OSError):
        os.fstat(old_fd)                                   # the old file was closed
    assert blk.dev.metrics.update_count == 1


async def test_failed_path_swap_keeps_the_old_file(blk, tmp_path):
    with pytest.raises(BlockFileError):
        blk.dev.update_path(str(tmp_path / "missing"))
    assert blk.dev.metrics.update_fails == 1
    status, data = await blk.read(0, 512)
    assert status == OK and data == disk_bytes()[:512]


async def test_two_drives_side_by_side(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"d{i}.img"
        p.write_bytes(disk_bytes(seed=i * 50))
        paths.append(p)
    require_io_uring()
    a = await make_block_rig(paths[0], drive_id="a", io_engine="Async")
    b = await make_block_rig(paths[1], drive_id="b", io_engine="Sync")
    (sa, da), (sb, db) = await a.read(1, 512), await b.read(1, 512)
    assert da == disk_bytes(seed=0)[512:1024] and db == disk_bytes(seed=50)[512:1024]
    assert a.dev.metrics.read_count == b.dev.metrics.read_count == 1
    for x in (a, b):
        x.dev.close()
        x.rig.close()


async def test_a_burst_of_requests_gets_one_interrupt_per_batch(blk):
    heads = []
    for i in range(16):
        bufs, _ = blk.lay_out(rq.VIRTIO_BLK_T_IN.to_bytes(4, "little") + bytes(4) + i.to_bytes(8, "little"), 513)
        heads.append(blk.offer(bufs, kick=False))
    blk.driver.kick(blk.vq)
    used = await blk.driver.wait_used(blk.vq, 16)
    assert sorted(h for h, _ in used) == sorted(heads)
    assert all(n == 513 for _, n in used)
    if blk.dev.io_engine == "Sync":
        assert blk.rig.irq.count == 1
    else:
        assert 1 <= blk.rig.irq.count <= 16


async def test_a_mixed_batch_is_answered_under_one_interrupt(disk, loop_errors):
    """I/O, GET_ID and a refused request in one kick: one batch, one interrupt, even without
    EVENT_IDX to merge them (Sync always; Async when the kernel finishes inside the submit)."""
    for engine in ENGINES:
        if engine == "Async":
            require_io_uring()
        b = await make_block_rig(disk, **ENGINES[engine], features_mask=~bit(VIRTIO_F_EVENT_IDX))
        heads = []
        for req_type, sector, data, read_len in ((rq.VIRTIO_BLK_T_IN, 0, b"", 512),
                                                  (rq.VIRTIO_BLK_T_GET_ID, 0, b"", 20),
                                                  (99, 0, b"", 8),
                                                  (rq.VIRTIO_BLK_T_OUT, 3, b"w" * 512, 0)):
            bufs, _ = b.lay_out(req_type.to_bytes(4, "little")
                                + bytes(4) + sector.to_bytes(8, "little") + data, read_len + 1)
            heads.append(b.offer(bufs, kick=False))
        b.driver.kick(b.vq)
        used = await b.driver.wait_used(b.vq, 4)
        assert sorted(h for h, _ in used) == sorted(heads)
        await settle()
        # Async: a read served from the page cache completes inside the submit, in the batch;
        # one that waits on the disk comes in a batch of its own.
        assert b.rig.irq.count == 1 or (engine == "Async" and b.rig.irq.count == 2), engine
        m = b.dev.metrics
        assert (m.read_count, m.write_count, m.invalid_reqs_count) == (1, 1, 1)
        b.dev.close()
        b.rig.close()
    assert loop_errors == []


async def test_event_idx_suppresses_interrupts_until_used_event(blk):
    assert blk.rig.transport.driver_features & bit(VIRTIO_F_EVENT_IDX)
    blk.vq.set_used_event(2)                 # interrupt once the third request is used
    for i in range(3):
        before = blk.rig.irq.count
        await blk.read(i, 512)
        await settle()
        assert blk.rig.irq.count - before == (1 if i == 2 else 0)
    # The device asks to be kicked for the next slot it will read.
    assert blk.vq.avail_event == blk.vq.avail_idx


async def test_without_event_idx_every_batch_interrupts(disk):
    b = await make_block_rig(disk, features_mask=~bit(VIRTIO_F_EVENT_IDX))
    for i in range(3):
        await b.read(i, 512)
        # As Linux's handler: an edge is sent only when InterruptStatus was clear (mmio.py).
        assert b.driver.ack_interrupts()
    assert b.rig.irq.count == 3
    b.dev.close()
    b.rig.close()


async def test_unnegotiated_indirect_chain_is_refused(disk):
    b = await make_block_rig(disk, features_mask=~bit(VIRTIO_F_INDIRECT_DESC))
    bufs, answer = b.lay_out(rq.VIRTIO_BLK_T_IN.to_bytes(16, "little"), 513)
    head = b.offer(bufs, indirect=True)
    assert await b.driver.wait_used(b.vq, 1) == [(head, 0)]
    assert b.dev.metrics.invalid_reqs_count == 1
    b.dev.close()
    b.rig.close()


async def test_kick_with_nothing_available_counts_no_avail_buffer(blk):
    blk.driver.kick(blk.vq)
    await settle()
    assert blk.dev.metrics.queue_event_count == 1
    assert blk.dev.metrics.no_avail_buffer == 1


async def test_avail_index_jump_needs_reset_and_counts_event_fails(blk):
    blk.vq.set_avail_idx(1000)
    blk.driver.kick(blk.vq)
    await settle()
    assert blk.needs_reset()
    assert blk.dev.metrics.event_fails == 1
    assert blk.driver.ack_interrupts() == r.VIRTIO_MMIO_INT_CONFIG
    await blk.driver.reset()
    assert blk.dev.handler is None


# -- the usual framing (header, data, status: a descriptor each) ---------------

@pytest.fixture
def framed_spy(monkeypatch):
    """The requests parse_framed or parse_framed_at took (Sync runs them in place as it pops
    them, Async builds their Request)."""
    taken = []

    def spying(parser):
        def spy(*args):
            framed = parser(*args)
            if framed is not None:
                taken.append(framed)
            return framed
        return spy
    monkeypatch.setattr(block_handler, "parse_framed", spying(rq.parse_framed))
    monkeypatch.setattr(block_handler, "parse_framed_at", spying(rq.parse_framed_at))
    return taken


async def test_usual_framing_reads_and_writes(blk, framed_spy):
    payload = os.urandom(2048)
    assert await blk.write(12, payload, rcuts=[16]) == OK
    status, data = await blk.read(12, 2048, wcuts=[2048])
    assert status == OK and data == payload
    used, _ = await blk.request(rq.VIRTIO_BLK_T_IN, 3, read_len=512, wcuts=[512])
    assert used == 513
    m = blk.dev.metrics
    assert (m.read_count, m.read_bytes, m.write_count, m.write_bytes) == (2, 2560, 1, 2048)
    assert len(framed_spy) == 3               # both engines read these in the usual framing


async def test_usual_framing_beside_other_chains_in_one_kick(blk, framed_spy):
    """Framed reads and writes, a GET_ID and a two-descriptor read in one kick: each is
    answered as it would be alone, in ring order on Sync (whose drain runs framed ones as it
    pops them and hands the others to handle_chain)."""
    payload = os.urandom(512)
    assert await blk.write(4, payload, rcuts=[16]) == rq.VIRTIO_BLK_S_OK   # before the reads of it
    framed_spy.clear()
    offered = []
    for req_type, sector, data, read_len, wcuts in (
            (rq.VIRTIO_BLK_T_OUT, 9, payload, 0, []),
            (rq.VIRTIO_BLK_T_GET_ID, 0, b"", 20, []),
            (rq.VIRTIO_BLK_T_IN, 4, b"", 512, [512]),        # framed: data, then status
            (rq.VIRTIO_BLK_T_IN, 4, b"", 512, [])):          # data and status in one descriptor
        bufs, answer = blk.lay_out(header(req_type, sector) + data, read_len + 1,
                                   [16] if data else [], wcuts)
        offered.append((blk.offer(bufs, kick=False), answer))
    blk.driver.kick(blk.vq)
    used = await blk.driver.wait_used(blk.vq, 4)
    if blk.dev.io_engine != "Sync":             # io_uring may finish them in any order
        used.sort(key=lambda e: [h for h, _ in offered].index(e[0]))
    assert [h for h, _ in used] == [h for h, _ in offered]
    assert [n for _, n in used] == [1, 21, 513, 513]
    answers = [answer.read(blk.mem) for _, answer in offered]
    assert answers[1] == rq.device_id("disk0") + bytes([rq.VIRTIO_BLK_S_OK])
    assert answers[2] == answers[3] == payload + bytes([rq.VIRTIO_BLK_S_OK])
    assert len(framed_spy) == 2 if blk.dev.io_engine == "Sync" else len(framed_spy) >= 2


async def test_usual_framing_host_error_and_short_read_are_ioerr(blk):
    os.truncate(blk.dev.path, 4 * 512)                     # the file shrinks under the device
    status, _ = await blk.read(8, 512, wcuts=[512])        # at end of file: nothing read
    assert status == IOERR
    status, _ = await blk.read(3, 1024, wcuts=[1024])      # half of it read, then end of file
    assert status == IOERR
    assert blk.dev.metrics.execute_fails == 2 and blk.dev.metrics.read_count == 0
    assert not blk.needs_reset()


async def test_usual_framing_write_to_read_only_drive_is_refused(disk, framed_spy):
    b = await make_block_rig(disk, io_engine="Sync", read_only=True)
    assert await b.write(0, b"x" * 512, rcuts=[16]) == IOERR
    assert disk.read_bytes() == disk_bytes()
    assert b.dev.metrics.invalid_reqs_count == 1 and framed_spy == []
    b.dev.close()
    b.rig.close()
