"""virtio-vsock driven by the test guest's polling driver on the local /dev/kvm.

The guest (tests/guest/vsock.c) speaks the vsock protocol itself, with credit
flow control, through the virtio-mmio window the builder placed: queue kicks
go through KVM ioeventfds, the data through guest memory, exactly the
production path.  The host side is Firecracker's hybrid model: a host
program connects to ``uds_path`` and says ``CONNECT <port>``; the guest's
connection to host port P reaches the program listening on ``<uds_path>_P``.
"""

from __future__ import annotations

import os
import socket
import threading
import zlib

import pytest

from tests.guest.output import find, parse_lines
from tests.kvm.conftest import ApiProcess, wait_until

pytestmark = pytest.mark.kvm

NBYTES = 1 << 20
GUEST_PORT, HOST_PORT, NOBODY_PORT = 5000, 6000, 6001


def pattern(n: int) -> bytes:
    """The guest's vsock_pattern(i) for i in 0..n-1."""
    return bytes((i * 31 + (i >> 9) + 7) & 0xFF for i in range(n))


def exchange(sock: socket.socket, data: bytes, out: dict) -> None:
    """Send ``data`` while receiving as much, as the guest does; the received bytes go in ``out``."""
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    got = bytearray()
    while len(got) < len(data):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    sender.join(30)
    out["received"] = bytes(got)
    out["eof"] = sock.recv(1) == b""         # the guest's SHUTDOWN ends the stream


def test_both_directions_refused_port_and_nothing_left_open(test_guest, tmp_path):
    data = pattern(NBYTES)
    uds = str(tmp_path / "v.sock")
    host_srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_srv.bind(f"{uds}_{HOST_PORT}")
    host_srv.listen(1)
    host_srv.settimeout(60)
    from_guest_connect: dict = {}

    def serve() -> None:
        conn, _ = host_srv.accept()
        with conn:
            exchange(conn, data, from_guest_connect)
    server = threading.Thread(target=serve, daemon=True)
    server.start()

    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path)
    try:
        cmdline = (f"vsock=accept:{GUEST_PORT}:{NBYTES} vsock=connect:{HOST_PORT}:{NBYTES} "
                   f"vsock=connect:{NOBODY_PORT}:16 exit=halt")
        for method, path, body in [
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh), "boot_args": cmdline}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
            ("PUT", "/vsock", {"guest_cid": 7, "uds_path": uds}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]:
            status, answer = vmm(method, path, body)
            assert status == 204, (path, answer)
        vmm.wait_output(f"vsock listen port={GUEST_PORT}")
        fds_idle = len(os.listdir(f"/proc/{vmm.proc.pid}/fd"))
        # A host program connects to the guest's listener.
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.settimeout(60)
        host.connect(uds)
        host.sendall(f"CONNECT {GUEST_PORT}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            line += host.recv(1)
        assert line.startswith(b"OK ") and int(line[3:]) > 0, line
        from_guest_accept: dict = {}
        with host:
            exchange(host, data, from_guest_accept)
        server.join(60)
        vmm.wait_output("testguest: exit halt", timeout=120)
        # Every host socket of the three connections is closed again.
        wait_until(lambda: len(os.listdir(f"/proc/{vmm.proc.pid}/fd")) <= fds_idle, 10,
                   "the VMM's file descriptors to return to their idle count")
        reports = vmm.flush_metrics(metrics)
    finally:
        vmm.close()
        host_srv.close()
    lines = parse_lines(vmm.output())
    assert find(lines, "vsock device")[0].number("cid") == 7
    accepted, = find(lines, "vsock accept")
    connected, refused = find(lines, "vsock connect")
    expected_crc = zlib.crc32(data)
    for report in (accepted, connected):
        assert report.fields["result"] == "ok", report.text
        assert report.number("sent") == report.number("received") == NBYTES, report.text
        assert report.number("crc") == expected_crc, report.text
        assert report.number("closed") == 1, report.text
    assert from_guest_accept["received"] == data and from_guest_accept["eof"]
    assert from_guest_connect["received"] == data and from_guest_connect["eof"]
    assert refused.fields["result"] == "reset" and refused.number("port") == NOBODY_PORT
    vsock = {}
    for r in reports:
        for k, v in r.get("vsock", {}).items():
            vsock[k] = vsock.get(k, 0) + v
    assert vsock["conns_added"] == 2 and vsock["conns_removed"] == 2, vsock
    assert vsock["rx_bytes_count"] == vsock["tx_bytes_count"] == 2 * NBYTES, vsock
    assert not os.path.exists(uds)          # the VMM removed its listener's path on exit
