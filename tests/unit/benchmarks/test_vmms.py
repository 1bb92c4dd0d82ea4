import socket
from pathlib import Path

import pytest

from benchmarks.vmms import (ApiClient, ControlError, GuestSpec, QmpClient, parse_boot_time_us,
                             parse_startup_us, qemu_microvm_argv)


def test_parses_asyncvmm_log_lines():
    log = ("2026-01-01T00:00:00.000000000 [anonymous-instance:main] Process start-up took 463067 us "
           "(202864 CPU us).\n2026-01-01T00:00:01.000000000 [anonymous-instance:fc_vcpu 0] "
           "Guest-boot-time =  69927 us 69 ms,  24108 CPU us 24 CPU ms\n")
    assert parse_boot_time_us(log) == 69927
    assert parse_startup_us(log) == 463067
    assert parse_boot_time_us("nothing") is None


def test_qemu_is_paused_for_qmp_only():
    guest = GuestSpec(Path("/k.elf"), "boottimer=1 exit=halt")
    plain = qemu_microvm_argv(guest)
    assert "-S" not in plain and plain[plain.index("-append") + 1] == "boottimer=1 exit=halt"
    assert plain[plain.index("-m") + 1] == "128"
    qmp = qemu_microvm_argv(guest, qmp_sock=Path("/tmp/q.sock"))
    assert "-S" in qmp and "unix:/tmp/q.sock,server=on,wait=off" in qmp


def test_guest_ram_regions_split_at_the_mmio_gap():
    assert GuestSpec(Path("k"), "", mem_mib=128).region_sizes_kib == [128 * 1024]
    assert GuestSpec(Path("k"), "", mem_mib=4096).region_sizes_kib == [3072 * 1024, 1024 * 1024]


def test_qmp_negotiates_and_skips_events():
    ours, theirs = socket.socketpair()
    theirs.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n'
                   b'{"return": {}}\r\n'
                   b'{"event": "RESUME", "timestamp": {}}\r\n{"return": {}}\r\n'
                   b'{"error": {"class": "GenericError", "desc": "nope"}}\r\n')
    qmp = QmpClient(ours, timeout=30)
    assert qmp.execute("qmp_capabilities") == {}
    assert qmp.execute("cont") == {}
    with pytest.raises(ControlError, match="nope"):
        qmp.execute("bad")
    sent = theirs.recv(4096)
    assert b'"execute": "qmp_capabilities"' in sent
    qmp.close()
    theirs.close()


def test_qmp_refuses_a_non_qmp_peer():
    ours, theirs = socket.socketpair()
    theirs.sendall(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ControlError):
        QmpClient(ours, timeout=30)
    ours.close()
    theirs.close()


def test_api_put_accepts_204_and_reports_errors():
    ours, theirs = socket.socketpair()
    api = ApiClient(ours, timeout=30)
    # One response at a time, as a server answers: http.client reads responses buffered.
    theirs.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    api.put("/actions", {"action_type": "InstanceStart"})
    request = theirs.recv(4096)
    assert request.startswith(b"PUT /actions HTTP/1.1\r\n")
    assert request.endswith(b'{"action_type": "InstanceStart"}')
    body = b'{"fault_message": "bad in"}'
    theirs.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with pytest.raises(ControlError, match="400"):
        api.put("/boot-source", {})
    api.close()
    theirs.close()
