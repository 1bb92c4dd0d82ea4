"""benchmarks.api without a VMM: framing, the load client, the canned server, the document."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import api
from benchmarks.launch import connect_unix, launch
from benchmarks.vmms import ControlError

REPO = Path(__file__).resolve().parents[3]
RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": true}'


def test_requests_are_pre_encoded_http_1_1():
    get = api.http_request("GET", "/", None)
    assert get == b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
    put = api.http_request("PUT", "/machine-config", {"vcpu_count": 1})
    head, body = put.split(b"\r\n\r\n")
    assert b"Content-Length: 17" in head and body == b'{"vcpu_count": 1}'
    assert api.http_message_end(put) == len(put)


@given(st.data())
def test_a_response_is_complete_only_with_its_whole_body(data):
    stream = RESPONSE + b"HTTP/1.1 204 No Content\r\n\r\n"
    cut = data.draw(st.integers(0, len(stream)))
    end = api.http_message_end(stream[:cut])
    assert end == (len(RESPONSE) if cut >= len(RESPONSE) else None)


def test_bad_framing_is_a_control_error():
    with pytest.raises(ControlError):
        api.http_message_end(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    with pytest.raises(ControlError, match="chunked"):
        api.http_message_end(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(ControlError):
        api.http_status(b"SSH-2.0 hello")


def test_qmp_replies_events_and_errors():
    assert api.qmp_message_end(b'{"return": {}}\r\n{"ev') == 16
    assert api.qmp_message_end(b'{"return"') is None
    assert api.qmp_is_reply(b'{"return": {"status": "running"}}\r\n')
    assert not api.qmp_is_reply(b'{"event": "RESUME", "timestamp": {}}\r\n')
    with pytest.raises(ControlError, match="GenericError"):
        api.qmp_is_reply(b'{"error": {"class": "GenericError", "desc": "x"}}\n')
    with pytest.raises(ControlError, match="non-JSON"):
        api.qmp_is_reply(b"garbage\n")


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def pinger(exchange: api.Exchange, count: int, ticks: list[int]):
    loop = asyncio.new_event_loop()
    done = loop.create_future()
    clock = iter(ticks)
    p = api.Pinger(exchange, count, done, clock=lambda: next(clock))
    p.connection_made(FakeTransport())
    return p, done, loop


def test_latency_is_stamped_when_the_completing_data_arrives():
    p, done, loop = pinger(api.GET_ROOT, 2, [100, 150, 400, 1000])
    try:
        p.send()                                         # sent at 100
        p.data_received(RESPONSE[:10])                   # 150: incomplete
        p.data_received(RESPONSE[10:])                   # 400: complete -> next request sent at 1000
        assert p.latencies == [300] and not done.done()
        assert len(p.transport.written) == 2
    finally:
        loop.close()


def test_qmp_events_between_replies_are_skipped():
    p, done, loop = pinger(api.QUERY_STATUS, 1, [0, 70])
    try:
        p.send()
        p.data_received(b'{"event": "STOP"}\r\n{"return": {"status": "paused"}}\r\n')
        assert p.latencies == [70] and done.done() and done.exception() is None
    finally:
        loop.close()


def test_an_unexpected_status_fails_the_load():
    p, done, loop = pinger(api.PUT_MACHINE_CONFIG, 5, [0, 10])
    try:
        p.send()
        p.data_received(b'HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}')
        with pytest.raises(ControlError, match="400"):
            done.result()
    finally:
        loop.close()


def test_a_closed_connection_fails_the_load():
    p, done, loop = pinger(api.GET_ROOT, 5, [0])
    try:
        p.connection_lost(None)
        with pytest.raises(ControlError, match="5 requests left"):
            done.result()
    finally:
        loop.close()


def test_canned_replies_answer_every_whole_request_in_order():
    buf = bytearray(api.http_request("GET", "/", None) + api.http_request("PUT", "/x", {"a": 1})[:-3])
    assert api.canned_replies(buf) == api.CANNED_200
    buf += api.http_request("PUT", "/x", {"a": 1})[-3:]
    assert api.canned_replies(buf) == api.CANNED_204 and buf == bytearray()


@pytest.fixture
def canned_server(tmp_path):
    path = tmp_path / "canned.sock"
    server = launch([sys.executable, "-m", "benchmarks.api", "--serve-canned", str(path)], cwd=REPO)
    try:
        connect_unix(path, 30, alive=lambda: server.proc.poll() is None)[0].close()
        yield path
    finally:
        server.stop()


def test_the_load_client_against_the_canned_server(canned_server):
    with api.make_runner() as runner:
        for clients in (1, 3):
            socks = [api.http_connect(canned_server, 10) for _ in range(clients)]
            result = runner.run(api.run_load(api.GET_ROOT, socks, 20, 2, 30))
            assert len(result.latencies_ns) == 20 * clients
            assert all(x > 0 for x in result.latencies_ns)
            assert result.requests == 22 * clients and result.rps > 0 and result.client_cpu_ns > 0


def test_measure_names_every_figure_per_client_count(canned_server):
    opts = api.Options(Path("k"), requests=100, warmup=50, timeout_s=30)
    raw: dict[str, list[int]] = {}
    with api.make_runner() as runner:
        out = api.measure(runner, "put", api.PUT_MACHINE_CONFIG,
                          lambda n: [api.http_connect(canned_server, 10) for _ in range(n)], opts, raw)
    assert set(out) == {f"put_c{c}_{what}" for c in api.CLIENTS
                        for what in ("median", "p99", "rps", "client_cpu")}
    assert len(raw["put_c1"]) == 100 and len(raw["put_c50"]) == 100
    assert out["put_c50_p99"] >= out["put_c50_median"] > 0


def fake_qmp(server: socket.socket, greeting: bytes) -> None:
    conn, _ = server.accept()
    conn.sendall(greeting)
    if conn.recv(4096).startswith(b'{"execute": "qmp_capabilities"}'):
        conn.sendall(b'{"event": "X"}\r\n{"return": {}}\r\n')
    conn.recv(1)
    conn.close()


@pytest.mark.parametrize("greeting, ok", [(b'{"QMP": {"version": {}}}\r\n', True),
                                          (b'{"hello": 1}\r\n', False)])
def test_qmp_connections_are_negotiated_before_timing(tmp_path, greeting, ok):
    path = tmp_path / "q.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    thread = threading.Thread(target=fake_qmp, args=(server, greeting), daemon=True)
    thread.start()
    try:
        if ok:
            api.qmp_connect(path, 10).close()
        else:
            with pytest.raises(ControlError, match="greeting"):
                api.qmp_connect(path, 10)
    finally:
        thread.join(10)
        server.close()


def test_monitors_and_units():
    args = api.qmp_monitor_args([Path("/t/q0.sock"), Path("/t/q1.sock")])
    assert args[0] == "-S" and args.count("-mon") == 2
    assert "socket,id=qmp1,path=/t/q1.sock,server=on,wait=off" in args
    assert api.unit_of("start_to_socket") == "ms"
    assert api.unit_of("status_preboot_c50_rps") == "count"
    assert api.unit_of("status_preboot_c1_p99") == "us"
    assert api.unit_of("cpu_to_first_response") == "ms"
    assert api.unit_of("vmm_private") == api.unit_of("guest_rss") == "KiB"


def test_pooled_percentiles_and_comparison_flags():
    pooled = api.pooled({"status_preboot_c1": list(range(1000, 101000, 1000))})["status_preboot_c1"]
    assert pooled["n"] == 100 and pooled["median_us"] == 50.5 and pooled["p99_us"] == 99.0
    metric = {"unit": "us", "median": 2.0}
    names = ["status_preboot_c1_median", "status_preboot_c50_rps"]
    vdocs = {v: {"metrics": {n: metric for n in names}} for v in ("asyncvmm", "qemu-qmp")}
    comps, notes = api.comparisons(vdocs)
    assert {c["metric"]: c["higher_is_better"] for c in comps} == {
        "status_preboot_c1_median": False, "status_preboot_c50_rps": True}
    assert notes and all("comparison skipped" in n for n in notes)


def test_too_few_requests_for_fifty_clients_is_refused():
    with pytest.raises(SystemExit):
        api.parse_args(["--requests", "10"])


def test_the_canned_floor_is_a_reference_not_a_peer_and_unequal_rows_are_labelled():
    def metric(name):
        return {"unit": api.unit_of(name), "median": 2.0}

    vm_names = ["start_to_first_response", "cpu_to_first_response", "start_to_socket", "vmm_private",
                "status_preboot_c1_median", "put_machine_config_preboot_c1_median"]
    vdocs = {v: {"metrics": {n: metric(n) for n in vm_names}} for v in ("asyncvmm", "qemu-qmp")}
    vdocs["harness-floor"] = {"metrics": {n: metric(n) for n in (
        "status_preboot_c1_median", "put_machine_config_preboot_c1_median")}}
    comps, _ = api.comparisons(vdocs)
    assert {c["peer"] for c in comps} == {"qemu-qmp"}                   # no ratio against the floor
    work = {c["metric"]: c["unequal_work"] for c in comps}
    assert work["start_to_first_response"] == work["cpu_to_first_response"]
    assert "loading the kernel" in work["start_to_first_response"]
    assert "different protocols" in work["status_preboot_c1_median"]
    assert work["start_to_socket"] is None and work["vmm_private"] is None
    refs = api.references(vdocs)
    assert [(r["metric"], r["reference"]) for r in refs] == [
        ("status_preboot_c1_median", "harness-floor"), ("put_machine_config_preboot_c1_median", "harness-floor")]
    assert all("ratio" not in r for r in refs)
    assert api.references({"asyncvmm": vdocs["asyncvmm"]}) == []
