"""Helpers for linux-tier tests that use the API socket or a guest network.

* :class:`ApiLauncher` -- asyncvmm with the config file *and* the API socket
  (Firecracker allows both), optionally inside a network namespace.
* :func:`api` -- one HTTP/1.1 request over the Unix socket; :func:`wait_for_api`
  waits until the socket answers.
* :func:`host_network` -- a fresh network namespace with a tap in it, the
  host side addressed; the VMM runs in that namespace (``ip netns exec``,
  the way Firecracker's jailer puts it in one), so the test never touches the
  root namespace's interfaces and nothing is left behind: deleting the
  namespace deletes the tap.
* :func:`metrics_delta` -- asks the VMM to flush its metrics and returns the
  newest line of the metrics file.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.conftest import require_netns_and_taps
from tests.linux.harness import AsyncVmmLauncher

GUEST_MAC = "06:00:AC:10:00:02"


class ApiLauncher(AsyncVmmLauncher):
    """asyncvmm with both the config file and the API socket (Firecracker allows both)."""

    def __init__(self, sock, extra_args: list[str] | None = None, netns: str | None = None) -> None:
        super().__init__(extra_args=extra_args, netns=netns)
        self.sock = sock

    def argv(self, spec, workdir):
        argv = super().argv(spec, workdir)
        argv[argv.index("--no-api")] = "--api-sock"
        argv.insert(argv.index("--api-sock") + 1, str(self.sock))
        return argv


def api(sock_path, method: str, path: str, body: dict | list | None = None) -> tuple[int, str]:
    """One request with ``Connection: close``; (status, body text)."""
    payload = json.dumps(body).encode() if body is not None else b""
    request = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest.decode(errors="replace")


def wait_for_api(sock_path: Path, guest, timeout: float = 60) -> None:
    """Until ``GET /`` answers on the socket (the VMM binds it while it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if api(sock_path, "GET", "/")[0] == 200:
                return
        except OSError:
            pass
        if guest.exited() is not None or time.monotonic() > deadline:
            raise AssertionError(f"API socket {sock_path} never answered; console:\n{guest.tail()}")
        time.sleep(0.1)


def metrics_delta(sock_path: Path, metrics_path: Path) -> dict:
    """Flush the metrics (``PUT /actions FlushMetrics``) and return the line it wrote."""
    before = len(metrics_path.read_text().splitlines()) if metrics_path.exists() else 0
    status, body = api(sock_path, "PUT", "/actions", {"action_type": "FlushMetrics"})
    assert status == 204, body
    lines = metrics_path.read_text().splitlines()
    assert len(lines) > before, f"FlushMetrics wrote no line to {metrics_path}"
    return json.loads(lines[-1])


@dataclass(frozen=True)
class HostNetwork:
    """A namespace with a tap; the host side is ``host_ip``, the guest gets ``guest_ip``."""
    ns: str
    tap: str
    host_ip: str = "172.16.0.1"
    guest_ip: str = "172.16.0.2"
    prefix: int = 30

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    @property
    def boot_args(self) -> str:
        return f"avm.ip={self.guest_ip}/{self.prefix}"

    def interface(self, iface_id: str = "eth0", **limiters) -> dict:
        """A Firecracker ``network-interfaces`` entry on this tap (``rx_rate_limiter=...``)."""
        return {"iface_id": iface_id, "host_dev_name": self.tap, "guest_mac": GUEST_MAC, **limiters}


@contextlib.contextmanager
def host_network() -> Iterator[HostNetwork]:
    require_netns_and_taps()
    from asyncvmm.net.netns import temporary_netns, temporary_tap

    with temporary_netns("avm-linux-") as ns:
        # No IPv6 in the namespace: nothing of the host kernel's own (router solicitations,
        # MLD) reaches the guest, so what is measured is only what the test sends.
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        net = HostNetwork(ns=ns, tap=f"avt{secrets.token_hex(4)}")
        with temporary_tap(net.tap, netns=ns, addr=f"{net.host_ip}/{net.prefix}", up=True):
            yield net
