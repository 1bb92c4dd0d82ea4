"""Snapshot and restore of a Debian guest with a disk, a network interface and MMDS (issue 13).

The guest runs a shell loop that writes a counter to the console; the microVM is paused,
snapshotted and its process killed.  A new process, in another network namespace with
another tap, loads the snapshot with ``network_overrides`` pointing ``eth0`` at that tap and
resumes: the loop goes on from the next number (no reboot), the guest pings the host side
of the new tap, reads MMDS (the store PUT before the snapshot, restored
with it) and its disk (a file written before
the snapshot, and new I/O), and its wall clock moved forward, never back.
"""

from __future__ import annotations

import json
import re
import secrets
import sys

from tests.linux.api import ApiLauncher, api, host_network, wait_for_api
from tests.linux.harness import AsyncVmmLauncher, VmSpec, default_spec

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
MMDS = "169.254.169.254"
TICKS = 40


class RestoreLauncher(AsyncVmmLauncher):
    """A fresh asyncvmm with only the API socket (a snapshot load needs a fresh process)."""

    name = "asyncvmm-restored"

    def __init__(self, sock, netns: str) -> None:
        super().__init__(netns=netns)
        self.sock = sock

    def argv(self, spec, workdir):
        return ["ip", "netns", "exec", self.netns, sys.executable, "-m", "asyncvmm.cli",
                "--api-sock", str(self.sock)]


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)\r?\n", text)]


def test_a_restored_guest_continues_its_loop_on_another_tap(guests, guest_images, tmp_path):
    token = secrets.token_hex(4)
    snap, mem = tmp_path / "vm.snap", tmp_path / "vm.mem"
    with host_network() as net1, host_network() as net2:
        sock1 = tmp_path / "api1.sock"
        spec = default_spec(guest_images, tmp_path, writable_root=True, extra_args=net1.boot_args)
        spec = VmSpec(**{**spec.__dict__, "network_interfaces": [net1.interface()],
                         "mmds_config": {"network_interfaces": ["eth0"], "version": "V1"}})
        first = guests.start(ApiLauncher(sock1, netns=net1.ns), spec)
        first.wait_for(READY, BOOT_TIMEOUT)
        wait_for_api(sock1, first)
        first.run(f"ip route add {MMDS} dev eth0").check()
        # The store goes into the snapshot: the restored process is never PUT /mmds.
        assert api(sock1, "PUT", "/mmds", {"restored": {"token": token}})[0] == 204
        first.run(f"echo before-{token} > /root/snapshot-probe && sync").check()
        first.run(f"ping -c 1 -W 5 {net1.host_ip}").check()
        before_s = int(first.run("date +%s").check().output.strip())
        first.run(f"(sleep 1; i=0; while [ $i -lt {TICKS} ]; do i=$((i+1)); echo tick $i > /dev/console; "
                  "sleep 0.25; done) >/dev/null 2>&1 &").check()
        first.wait_for(r"tick 6\r?\n", 60)
        assert api(sock1, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        status, body = api(sock1, "PUT", "/snapshot/create",
                           {"snapshot_type": "Full", "snapshot_path": str(snap), "mem_file_path": str(mem)})
        assert status == 204, body
        last = ticks(first.console)[-1]
        assert last < TICKS
        first.kill()

        sock2 = tmp_path / "api2.sock"
        second = guests.start(RestoreLauncher(sock2, net2.ns), spec)
        wait_for_api(sock2, second)
        status, body = api(sock2, "PUT", "/snapshot/load", {
            "snapshot_path": str(snap), "mem_backend": {"backend_type": "File", "backend_path": str(mem)},
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": net2.tap}], "resume_vm": True})
        assert status == 204, body
        second.wait_for(rf"tick {TICKS}\r?\n", 120)
        # Continued, not restarted: the two consoles together tick 1..TICKS once each (a
        # snapshot may fall mid-line; the restored guest prints the rest of it).
        together = ticks(first.console + second.console)
        assert together == list(range(1, TICKS + 1)), (last, together, second.tail(600))
        assert ticks(second.console), second.tail(600)
        assert "asyncvmm-guest: ready" not in second.console              # no reboot
        second._echo_off = True          # the guest's shell is the same one: echo is still off

        assert second.run("cat /root/snapshot-probe").check().output.strip() == f"before-{token}"
        second.run(f"echo after-{token} > /root/snapshot-probe2 && sync && "
                   "cat /root/snapshot-probe2").check()
        second.run("ip neigh flush all").check()
        second.run(f"ping -c 3 -W 5 {net2.host_ip}").check()
        status, body = api(sock2, "GET", "/mmds")
        assert status == 200 and json.loads(body) == {"restored": {"token": token}}, body
        got = second.run(f"wget -q -O - http://{MMDS}/restored/token").check().output.strip()
        assert got == token
        after_s = int(second.run("date +%s").check().output.strip())
        assert after_s >= before_s, (before_s, after_s)
        status, body = api(sock2, "GET", "/vm/config")
        assert status == 200 and net2.tap in body, body
        assert json.loads(body)["mmds-config"]["network_interfaces"] == ["eth0"], body
        assert second.stop() == 0, second.tail()
