"""benchmarks.block without a VMM: access pattern, file, page cache, report lines, ratios."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import block, report
from benchmarks.block import RunFailed, Window, Workload
from benchmarks.launch import Chunk


def test_workload_tokens_and_units():
    rand = Workload("r", "randread", 4096, 1000, 8)
    seq = Workload("s", "seqread", 1 << 20, 8 << 20, 4)
    assert rand.token == "blkbench=randread:4096:1000:8" and rand.ops == 1000
    assert seq.token == "blkbench=seqread:1048576:8388608:4" and seq.ops == 8
    assert (rand.metric, seq.metric) == ("r_iops", "s_mib_s")
    assert rand.rate(1000, 500_000_000) == 2000.0
    assert seq.rate(8, 1_000_000_000) == 8.0
    assert seq.scaled(0.25).amount == 2 << 20          # whole blocks only
    assert rand.scaled(0.0001).amount == 1


@given(st.sampled_from(["randread", "seqread"]), st.integers(1, 64), st.integers(0, 300))
def test_offsets_are_whole_blocks_inside_the_file(mode, blocks, ops):
    offsets = list(block.block_offsets(mode, 4096, ops, blocks))
    assert len(offsets) == ops
    assert all(o % 4096 == 0 and 0 <= o < blocks * 4096 for o in offsets)
    assert offsets == list(block.block_offsets(mode, 4096, ops, blocks))     # deterministic


def test_sequential_offsets_wrap_at_the_last_whole_block():
    assert list(block.block_offsets("seqread", 512, 7, 3)) == [0, 512, 1024, 0, 512, 1024, 0]


def test_random_offsets_follow_xorshift64_13_7_17():
    x = block.SEED
    x ^= (x << 13) & block.U64
    x ^= x >> 7
    x ^= (x << 17) & block.U64
    assert next(block.block_offsets("randread", 512, 1, 1000)) == (x % 1000) * 512


def test_a_file_without_a_whole_block_is_refused():
    with pytest.raises(ValueError):
        list(block.block_offsets("seqread", 4096, 1, 0))


def test_expected_check_sums_the_first_eight_bytes_of_each_block(tmp_path):
    path = tmp_path / "disk"
    blocks = [struct.pack("<Q", (i + 1) << 60) + bytes(504) for i in range(4)]
    path.write_bytes(b"".join(blocks))
    fd = os.open(path, os.O_RDONLY)
    try:
        w = Workload("s", "seqread", 512, 512 * 6, 1)          # wraps: blocks 0 1 2 3 0 1
        want = sum(((i % 4) + 1) << 60 for i in range(6)) & block.U64
        assert block.expected_check(fd, w, 2048) == want
    finally:
        os.close(fd)


def test_the_disk_is_created_once_and_remade_when_its_size_is_wrong(tmp_path):
    path = tmp_path / "sub" / "disk.img"
    block.ensure_disk(path, size=(1 << 20) + 5)
    first = path.read_bytes()
    assert len(first) == (1 << 20) + 5 and first != bytes(len(first))
    block.ensure_disk(path, size=(1 << 20) + 5)
    assert path.read_bytes() == first
    block.ensure_disk(path, size=4096)
    assert path.stat().st_size == 4096


def test_page_cache_residency_of_a_sparse_file_before_and_after_warming(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(1 << 20)                     # a hole: nothing cached until read
    assert block.resident_fraction(path) == 0.0
    block.warm_page_cache(path)
    assert block.resident_fraction(path) == 1.0


def chunks_of(*parts: bytes) -> list[Chunk]:
    return [Chunk(t_ns=(i + 1) * 1000, data=p) for i, p in enumerate(parts)]


START = b"testguest: blkbench start mode=randread block=4096 ops=10 depth=2 queue_size=256\n"
DONE = b"testguest: blkbench done mode=randread ops=10 bytes=40960 errors=0 tsc=3000 check=0x2a glitches=1\n"


def test_windows_run_from_the_end_of_start_to_the_first_byte_of_done():
    chunks = chunks_of(b"testguest: hello\n" + START[:-1], b"\n", b"testguest: blk", DONE[14:-3], DONE[-3:])
    win, = block.bench_windows(chunks)
    assert (win.t_begin_ns, win.t_end_ns, win.ns) == (2000, 3000, 1000)
    assert win.start["depth"] == "2" and win.done["check"] == "0x2a"


def test_runs_pair_in_order():
    wins = block.bench_windows(chunks_of(START, DONE, START, DONE))
    assert [(w.t_begin_ns, w.t_end_ns) for w in wins] == [(1000, 2000), (3000, 4000)]


@pytest.mark.parametrize("stream", [
    START,                                              # never finished
    DONE,                                               # done without start
    START + START + DONE,                               # nested
    START + b"testguest: blkbench error=bad-used-id id=3\n",
])
def test_broken_reports_fail_the_run(stream):
    with pytest.raises(RunFailed):
        block.bench_windows(chunks_of(stream))


def window(done_fields: dict[str, str], ns: int = 1_000_000) -> Window:
    base = {"mode": "randread", "ops": "10", "errors": "0", "tsc": "3000", "check": "0x2a", "glitches": "0"}
    return Window({}, base | done_fields, 0, ns)


RAND = Workload("r", "randread", 4096, 10, 2)


def test_window_metrics_give_rates_clock_ratio_and_glitches():
    out = block.window_metrics([RAND, RAND], [window({"glitches": "2"}), window({"glitches": "3"})],
                               [0x2A, 0x2A])
    assert out["r_iops"] == pytest.approx(10_000.0)
    assert out["r_tsc_mhz"] == pytest.approx(3.0)
    assert out["used_idx_glitches"] == 5


@pytest.mark.parametrize("fields, ns, match", [
    ({"check": "0x2b"}, 1, "wrong data"),
    ({"errors": "1"}, 1, "failed"),
    ({"ops": "9"}, 1, "reported"),
    ({"mode": "seqread"}, 1, "reported"),
    ({}, 0, "before the start"),
])
def test_window_metrics_refuse_a_run_that_did_not_do_what_was_asked(fields, ns, match):
    with pytest.raises(RunFailed, match=match):
        block.window_metrics([RAND], [window(fields, ns)], [0x2A])


def test_window_metrics_need_one_window_per_workload():
    with pytest.raises(RunFailed, match="expected"):
        block.window_metrics([RAND, RAND], [window({})], [0x2A, 0x2A])


def test_host_pass_checks_one_full_pass_and_stops_at_its_budget(tmp_path):
    path = tmp_path / "disk"
    path.write_bytes(b"".join(struct.pack("<Q", i) + bytes(4088) for i in range(8)))
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = [4096 * i for i in (3, 1, 7)]
        buf = memoryview(bytearray(4096))
        done, ns, check = block.host_pass(fd, offsets, buf, min_s=0)
        assert (done, check) == (3, 11) and ns >= 0
        ticks = iter(range(0, 10**12, 10**9))                      # one second per clock read
        done, _, check = block.host_pass(fd, offsets * 100, buf, min_s=0, max_s=1.5,
                                         clock=lambda: next(ticks))
        assert done == 128 and check == -1     # clock read every 64 requests: 1 s, then 2 s > 1.5 s
    finally:
        os.close(fd)


def test_qemu_reads_through_the_page_cache_with_its_thread_pool(tmp_path):
    args = block.qemu_drive(tmp_path / "d.img", "threads")
    drive = args[args.index("-drive") + 1]
    assert "cache=writeback" in drive and "aio=threads" in drive and "readonly=on" in drive
    assert "virtio-blk-device,drive=bench" in args
    assert "virtio-mmio.force-legacy=false" in args


def test_vhost_user_variants_share_one_daemon_export_and_qemu_shares_its_ram(tmp_path):
    sock = tmp_path / "vu.sock"
    args = block.storage_daemon_args(tmp_path / "d.img", sock)
    export = args[args.index("--export") + 1]
    assert export.startswith("type=vhost-user-blk,") and f"addr.path={sock}" in export
    assert "writable=off" in export and "cache.direct" not in " ".join(args)     # page cache, read-only
    drive = block.vhost_user_drive(sock)
    assert drive["socket"] == str(sock) and "path_on_host" not in drive and "is_read_only" not in drive
    qemu = block.qemu_vhost_user(sock)
    assert f"memory-backend-memfd,id=ram,size={block.MEM_MIB}M,share=on" in qemu
    assert "memory-backend=ram" in qemu and "vhost-user-blk,chardev=vu,num-queues=1" in qemu
    assert {"asyncvmm-vhost-user", "qemu-microvm-vhost-user"} <= set(block.DEFAULT_VARIANTS)


def test_rate_comparisons_say_higher_is_better():
    metric = {"unit": "count", "median": 0.0}
    vdocs = {name: {"metrics": {"r_iops": metric | {"median": m}}}
             for name, m in [("asyncvmm-sync", 50.0), ("asyncvmm-async", 80.0), ("qemu-microvm", 100.0)]}
    comps, notes = block.comparisons(vdocs, [RAND])
    ratios = {(c["subject"], c["peer"]): c["ratio"] for c in comps}
    assert ratios == {("asyncvmm-sync", "qemu-microvm"): 0.5, ("asyncvmm-async", "qemu-microvm"): 0.8,
                      ("asyncvmm-async", "asyncvmm-sync"): 1.6}
    assert all(c["higher_is_better"] for c in comps) and notes == []


def test_variant_selection():
    variants = block.make_variants()
    default = block.DEFAULT_VARIANTS
    assert [v.name for v in report.select_variants(variants, None, default)] == list(default)
    assert [v.name for v in report.select_variants(variants, "qemu-microvm-io_uring", default)] == \
        ["qemu-microvm-io_uring"]
    assert len(report.select_variants(variants, None)) == len(variants)
    with pytest.raises(ValueError, match="nope"):
        report.select_variants(variants, "asyncvmm-sync,nope", default)


def test_pci_variants_run_the_same_loop_on_virtio_pci(tmp_path):
    opts = block.Options(tmp_path / "k", tmp_path / "d.img", (RAND,), (0,), 1.0)
    assert opts.cmdline(pci=True) == "pci-" + RAND.token + " exit=halt"
    assert opts.cmdline() == RAND.token + " exit=halt"
    args = block.qemu_pci_drive(tmp_path / "d.img", "threads")
    drive = args[args.index("-drive") + 1]
    assert "cache=writeback" in drive and "aio=threads" in drive and "readonly=on" in drive
    assert "virtio-blk-pci,drive=bench,disable-legacy=on" in args
    assert not any(a.startswith("virtio-mmio.") for a in args)
    argv = block.with_pcie(["qemu", "-M", "microvm,x-option-roms=off", "-m", "128"])
    assert argv == ["qemu", "-M", "microvm,x-option-roms=off,pcie=on", "-m", "128"]
    with pytest.raises(ValueError, match="q35"):
        block.with_pcie(["qemu", "-M", "q35"])
    # QEMU microvm's ECAM and 32-bit PCIe window; asyncvmm's are the test guest's defaults
    assert block.MICROVM_PCIE == "pci_ecam=0xe0000000 pci_mmio=0xc0000000"
    assert {"asyncvmm-sync-pci", "qemu-microvm-pci"} <= set(block.DEFAULT_VARIANTS)


def test_pci_ratios_pair_each_transport_with_its_peer_and_with_virtio_mmio():
    metric = {"unit": "count", "median": 0.0}
    vdocs = {name: {"metrics": {"r_iops": metric | {"median": m}}}
             for name, m in [("asyncvmm-sync", 50.0), ("asyncvmm-sync-pci", 60.0), ("qemu-microvm", 100.0),
                             ("qemu-microvm-pci", 120.0)]}
    comps, _ = block.comparisons(vdocs, [RAND])
    ratios = {(c["subject"], c["peer"]): c["ratio"] for c in comps}
    assert ratios[("asyncvmm-sync-pci", "qemu-microvm-pci")] == 0.5
    assert ratios[("asyncvmm-sync-pci", "asyncvmm-sync")] == 1.2
    assert ratios[("qemu-microvm-pci", "qemu-microvm")] == 1.2
