import os
import signal
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.launch import Chunk, StreamRecorder, arrival_of, first_arrivals, launch


def chunks_of(*parts: bytes) -> list[Chunk]:
    return [Chunk(t_ns=(i + 1) * 100, data=p) for i, p in enumerate(parts)]


def test_marker_inside_one_chunk():
    chunks = chunks_of(b"noise ", b"testguest: hello\n", b"more")
    assert first_arrivals(chunks, [b"testguest: hello"]) == {b"testguest: hello": 200}


def test_marker_straddling_chunks_arrives_with_its_last_byte():
    chunks = chunks_of(b"test", b"guest: he", b"llo\n")
    assert first_arrivals(chunks, [b"testguest: hello"]) == {b"testguest: hello": 300}
    assert first_arrivals(chunks, [b"testguest: hello"], edge="start") == {b"testguest: hello": 100}


def test_first_occurrence_wins_and_missing_markers_are_absent():
    chunks = chunks_of(b"done\n", b"done\n")
    assert first_arrivals(chunks, [b"done", b"never", b""]) == {b"done": 100}


def test_arrival_of_offset_past_the_end_is_none():
    chunks = chunks_of(b"ab", b"c")
    assert [arrival_of(chunks, i) for i in range(4)] == [100, 100, 200, None]


@given(st.binary(min_size=1, max_size=200), st.data())
def test_arrival_does_not_depend_on_how_the_stream_was_chunked(stream, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=20)))
    bounds = [0, *[c for c in cuts if c < len(stream)], len(stream)]
    chunks = [Chunk(t_ns=i, data=stream[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    start = data.draw(st.integers(0, len(stream) - 1))
    marker = stream[start:start + data.draw(st.integers(1, 8))]
    last = stream.find(marker) + len(marker) - 1
    expected = next(i for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if a <= last < b)
    assert first_arrivals(chunks, [marker]) == {marker: expected}


def test_recorder_stamps_each_read_with_the_injected_clock():
    r, w = os.pipe()
    ticks = iter(range(1000, 2000))
    rec = StreamRecorder(r, "test", clock=lambda: next(ticks))
    os.write(w, b"testguest: hello\n")
    rec.start()
    assert rec.wait_for(b"hello", timeout=30)
    os.write(w, b"testguest: done\n")
    os.close(w)
    rec.join(30)
    os.close(r)
    assert rec.eof
    assert rec.data == b"testguest: hello\ntestguest: done\n"
    assert rec.arrivals([b"hello"]) == {b"hello": rec.chunks[0].t_ns}
    assert not rec.wait_for(b"absent", timeout=30)     # EOF answers at once, no waiting


def test_launch_records_output_and_stop_kills_the_child():
    code = "import sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(600)"
    vmm = launch([sys.executable, "-c", code])
    assert vmm.stdout.wait_for(b"ready", timeout=60)
    assert vmm.stdout.arrivals([b"ready"])[b"ready"] >= vmm.t_start_ns
    assert vmm.stop() == -signal.SIGTERM
    assert vmm.proc.poll() is not None


def test_stat_cpu_ticks_survive_a_command_name_with_spaces_and_parens():
    from benchmarks.launch import parse_stat_cpu_ticks
    fields = ["S", "1", "2", "3", "0", "-1", "4194560", "10", "0", "0", "0", "37", "5"] + ["0"] * 30
    assert parse_stat_cpu_ticks("1234 (qemu) sys (x)) " + " ".join(fields)) == 42


# A real /proc/<pid>/stat line of a QEMU process (52 fields), utime 37 and stime 5 ticks.
QEMU_STAT = ("4242 (qemu-system-x86) S 4000 4242 4000 0 -1 4194560 2817 0 0 0 37 5 0 0 20 0 3 0 "
             "1234 1126400000 8700 18446744073709551615 1 1 0 0 0 0 0 4096 17642 0 0 0 17 1 0 0 12 0 0 "
             "0 0 0 0 0 0 0")


def test_stat_cpu_ms_is_utime_plus_stime_in_milliseconds():
    from benchmarks.launch import parse_stat_cpu_ticks, stat_cpu_ms
    assert parse_stat_cpu_ticks(QEMU_STAT) == 42
    assert stat_cpu_ms(QEMU_STAT, 100) == 420.0
    assert stat_cpu_ms(QEMU_STAT, 250) == 168.0


@pytest.mark.parametrize("stat", ["", "4242 (qemu) S 1 2 3", "no parenthesis at all 1 2 3 4 5 6 7 8 9 10 11 12 13"])
def test_a_truncated_stat_line_is_a_value_error(stat):
    from benchmarks.launch import parse_stat_cpu_ticks
    with pytest.raises(ValueError):
        parse_stat_cpu_ticks(stat)


def record(parts, probes):
    """Feed ``parts`` through a pipe into a StreamRecorder with ``probes``; return it at EOF."""
    r, w = os.pipe()
    rec = StreamRecorder(r, "test", probes=probes)
    rec.start()
    sent = b""
    for part in parts:
        os.write(w, part)
        sent += part
        assert rec.wait_for(sent, timeout=30)           # read before the next write: one chunk per part
    os.close(w)
    rec.join(30)
    os.close(r)
    return rec


def test_a_probe_runs_once_when_its_marker_completes_even_across_chunks():
    calls = []

    def probe():
        calls.append(len(calls))
        return 7.5

    rec = record([b"testguest: boot", b"timer written\n", b"testguest: boottimer written\n"],
                 {b"boottimer written": probe, b"never": probe})
    assert calls == [0]
    assert rec.probed == {b"boottimer written": 7.5}
    assert len(rec.chunks) == 3


def test_a_failing_probe_is_kept_as_its_exception():
    def probe():
        raise FileNotFoundError("/proc/4242/stat")

    rec = record([b"testguest: boottimer written\n"], {b"boottimer": probe})
    assert isinstance(rec.probed[b"boottimer"], FileNotFoundError)


def test_launch_binds_the_child_pid_to_its_probes():
    code = "import sys, time; sys.stdout.write('marker\\n'); sys.stdout.flush(); time.sleep(600)"
    vmm = launch([sys.executable, "-c", code], probes={b"marker": lambda pid: pid})
    assert vmm.stdout.wait_for(b"marker", timeout=60)
    assert vmm.stdout.probed == {b"marker": vmm.pid}
    vmm.stop()
