"""virtio-pci (``--enable-pci``) with Debian's cloud kernel (issue 15).

One microVM -- ``--enable-pci``, the read-only root, one tap (as in
test_net.py) -- is booted once for the module and serves the first tests, in
file order (each inner boot is expensive in the emulated KVM host); the
hotplug test leaves the bus as it found it, and the guest's reboot must end
the VMM with status 0 when the module is done with it:

* enumeration: what the guest's PCI core found, read from sysfs
  (``/sys/bus/pci/devices/*/{vendor,device,class,resource}``, the facts
  ``lspci -n`` prints): the host bridge 8086:0d57 (class 060000) at 00:00.0,
  the root disk (1af4:1042, class 018000) and the NIC (1af4:1041, class
  020000) bound to ``virtio-pci``, each with the 32 KiB 64-bit BAR0 placed in
  the 64-bit window (at or above 256 GiB), nothing else.  ``/dev/vda`` (the
  root, mounted by the initramfs) sits below the disk's PCI function; the
  command line has no ``pci=off``; ECAM is in use (``PCI MMCONFIG`` at
  0xeec00000 in ``/proc/iomem``) and no virtio-mmio device is described
  (no ``LNRO0005`` in ACPI).
* MSI-X: each function's MSI-X capability (walked in its config space, read
  whole from sysfs) is enabled with one vector per queue plus one for
  configuration changes, its interrupt pin is 0 (no INTx), and
  ``/proc/interrupts`` has a ``PCI-MSI`` line per vector named as the
  virtio-pci driver names them (``virtioN-config``, ``virtioN-req.0`` for
  the disk; ``virtioM-input.0`` / ``virtioM-output.0`` for the NIC), on the
  IRQs the function's ``msi_irqs`` lists; the disk's and the NIC's receive
  vectors have fired.
* network: guest and host ping each other over the tap.
* hotplug: ``PUT /drives`` after boot with an ext4 image made on the host;
  ``echo 1 > /sys/bus/pci/rescan`` finds exactly one new function
  (1af4:1042, MSI-X), whose disk has the drive's serial, mounts, and takes a
  write that the host then reads out of the image (debugfs).  Once the guest
  removed the function (``echo 1 > .../remove``) ``DELETE /drives/<id>``
  succeeds and a rescan finds the bus as before boot's.  Firecracker's
  refusals on the way: a second PUT with the same id ("Device ID in use"),
  DELETE of an unknown id ("Device not found").
* ``DELETE /drives/rootfs`` is refused with "Cannot unplug root device" and
  the root disk keeps working.

A second microVM (``--enable-pci``, a writable root) is paused, snapshotted
and killed; a fresh process loads the snapshot (without ``--enable-pci``:
as in Firecracker, the snapshot says the VM has a PCI bus) and resumes it:
the same functions at the same BARs, a rescan works, the disk reads what was
written before and takes new writes, and its request vector keeps firing.

A third microVM has vsock, entropy and a balloon on PCI as well: each is a
virtio-pci function with MSI-X on (the balloon at 00:01.0, Firecracker's
order), the hwrng reads, a host connection carries a token to a guest
listener, and inflating the balloon is reported back.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from tests.linux.api import GUEST_MAC, ApiLauncher, HostNetwork, api, host_network, wait_for_api
from tests.linux.harness import AsyncVmmLauncher, GuestFactory, VmSpec, default_spec
from tests.linux.test_block import e2fs_tool
from tests.linux.test_net import ping_argv

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
ENABLE_PCI = ["--enable-pci"]

VIRTIO_VENDOR = 0x1AF4
VIRTIO_PCI_NET = 0x1041               # 0x1040 + device type 1 (virtio 1.2 §4.1.2.1)
VIRTIO_PCI_BLOCK = 0x1042             # 0x1040 + device type 2
HOST_BRIDGE = (0x8086, 0x0D57, 0x060000)
CLASS_BLOCK, CLASS_NET = 0x018000, 0x020000
BAR0_SIZE = 0x8000
MMIO64_MIN = 256 << 30                # the 64-bit window starts at 256 GiB or above RAM
ECAM_IOMEM = re.compile(r"eec00000-eecfffff : PCI MMCONFIG 0000 \[bus 00(-00)?\]")
PCI_CAPABILITY_LIST, PCI_INTERRUPT_PIN, PCI_CAP_ID_MSIX = 0x34, 0x3D, 0x11
PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_QSIZE = 0x8000, 0x07FF


# --------------------------------------------------------------------------- what the guest sees

@dataclasses.dataclass(frozen=True)
class PciFunction:
    bdf: str                  # 0000:00:01.0
    vendor: int
    device: int
    class_code: int
    driver: str               # "-" when unbound
    bar0: tuple[int, int]     # (start, end) as the kernel placed it; (0, 0) when there is none

    @property
    def ids(self) -> tuple[int, int]:
        return self.vendor, self.device


LIST_FUNCTIONS = (
    'for d in /sys/bus/pci/devices/*; do [ -e "$d" ] || continue; drv=-; '
    '[ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")"); '
    'echo "${d##*/} $(cat "$d/vendor") $(cat "$d/device") $(cat "$d/class") $drv $(head -n 1 "$d/resource")"; done')


def parse_functions(text: str) -> dict[str, PciFunction]:
    out = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 7:
            continue
        bdf, vendor, device, cls, driver, start, end = words[:7]
        out[bdf] = PciFunction(bdf, int(vendor, 16), int(device, 16), int(cls, 16), driver,
                               (int(start, 16), int(end, 16)))
    return out


def pci_functions(guest) -> dict[str, PciFunction]:
    return parse_functions(guest.run(LIST_FUNCTIONS).check().output)


def rescan(guest) -> dict[str, PciFunction]:
    guest.run("echo 1 > /sys/bus/pci/rescan").check()
    return pci_functions(guest)


def function_of(path: str) -> str:
    """The PCI function (``0000:00:NN.F``) a resolved sysfs device path sits below."""
    found = re.findall(r"/(0000:00:[0-9a-f]{2}\.[0-7])/", path)
    assert found, f"{path!r} is not below a PCI function"
    return found[-1]


def config_space(guest, bdf: str) -> bytes:
    """The function's configuration space as the kernel reads it (root reads all of it)."""
    out = guest.run(f"od -An -tx1 -v /sys/bus/pci/devices/{bdf}/config").check().output
    return bytes(int(b, 16) for b in out.split())


def msix_control(config: bytes) -> int | None:
    """Message Control of the MSI-X capability (PCI 3.0 §6.8.2.3), walking the capability list."""
    ptr, seen = config[PCI_CAPABILITY_LIST] & 0xFC, set()
    while ptr and ptr not in seen and ptr + 4 <= len(config):
        seen.add(ptr)
        if config[ptr] == PCI_CAP_ID_MSIX:
            return int.from_bytes(config[ptr + 2:ptr + 4], "little")
        ptr = config[ptr + 1] & 0xFC
    return None


@dataclasses.dataclass(frozen=True)
class IrqLine:
    irq: int
    count: int                # summed over CPUs
    text: str                 # the whole line (chip, hwirq, trigger, name)


def parse_interrupts(text: str) -> dict[str, IrqLine]:
    """``/proc/interrupts``' numbered lines by action name (the last word)."""
    out = {}
    for line in text.splitlines():
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        words = rest.split()
        counts = []
        for w in words:
            if not w.isdigit():
                break
            counts.append(int(w))
        if words:
            out[words[-1]] = IrqLine(int(head), sum(counts), line.strip())
    return out


def interrupts(guest) -> dict[str, IrqLine]:
    return parse_interrupts(guest.run("cat /proc/interrupts").check().output)


def virtio_name(guest, bdf: str) -> str:
    """``virtioN``: the virtio device the driver made for the function."""
    names = guest.run(f"ls -d /sys/bus/pci/devices/{bdf}/virtio*").check().output.split()
    assert len(names) == 1, names
    return names[0].rsplit("/", 1)[-1]


def assert_msix_vectors(guest, bdf: str, vectors: list[str]) -> dict[str, IrqLine]:
    """MSI-X on, one vector per name (``virtioN-<name>``), each a PCI-MSI line on the function's IRQs."""
    config = config_space(guest, bdf)
    assert config[PCI_INTERRUPT_PIN] == 0, f"{bdf} offers INTx pin {config[PCI_INTERRUPT_PIN]}"
    control = msix_control(config)
    assert control is not None, f"{bdf} has no MSI-X capability"
    assert control & PCI_MSIX_FLAGS_ENABLE, f"{bdf}: MSI-X not enabled (Message Control {control:#06x})"
    assert (control & PCI_MSIX_FLAGS_QSIZE) + 1 == len(vectors), (bdf, hex(control), vectors)
    msi_irqs = {int(n) for n in guest.run(f"ls /sys/bus/pci/devices/{bdf}/msi_irqs").check().output.split()}
    dev = virtio_name(guest, bdf)
    lines = interrupts(guest)
    got = {}
    for vector in vectors:
        line = lines.get(f"{dev}-{vector}")
        assert line is not None, f"no {dev}-{vector} in /proc/interrupts:\n" + \
            "\n".join(l.text for l in lines.values())
        assert "PCI-MSI" in line.text and line.irq in msi_irqs, (line.text, msi_irqs)
        got[vector] = line
    assert len(msi_irqs) == len(vectors), (msi_irqs, vectors)
    return got


# --------------------------------------------------------------------------- microVMs

def pci_spec(images, workdir: Path, *, writable_root: bool = False, extra_args: str = "",
             network_interfaces: list[dict] | None = None) -> VmSpec:
    """The tier's guest with PCI left on: the harness's base arguments without ``pci=off``."""
    spec = default_spec(images, workdir, writable_root=writable_root, extra_args=extra_args)
    args = " ".join(w for w in spec.boot_args.split() if w != "pci=off")
    return replace(spec, boot_args=args, network_interfaces=list(network_interfaces or []))


def refused(sock: Path, method: str, path: str, body: dict | None, message: str) -> None:
    status, text = api(sock, method, path, body)
    assert status == 400 and message in text, (method, path, status, text)


@dataclasses.dataclass(frozen=True)
class PciVm:
    guest: object
    sock: Path
    net: HostNetwork
    workdir: Path


@pytest.fixture(scope="module")
def pci_vm(guest_images, tmp_path_factory) -> Iterator[PciVm]:
    """One ``--enable-pci`` microVM with the read-only root and eth0 on a tap, for the module."""
    workdir = tmp_path_factory.mktemp("pci")
    with host_network() as net:
        factory = GuestFactory(guest_images, workdir)
        try:
            sock = workdir / "api.sock"
            spec = pci_spec(guest_images, workdir, extra_args=net.boot_args,
                            network_interfaces=[net.interface()])
            guest = factory.start(ApiLauncher(sock, extra_args=ENABLE_PCI, netns=net.ns), spec)
            guest.wait_for(r"asyncvmm-guest: root /dev/vda mounted \(ext4, ro\)", BOOT_TIMEOUT)
            guest.wait_for(READY, BOOT_TIMEOUT)
            wait_for_api(sock, guest)
            yield PciVm(guest, sock, net, workdir)
            assert guest.stop() == 0, guest.tail()
        finally:
            factory.close()


def root_function(guest) -> str:
    return function_of(guest.run("readlink -f /sys/block/vda").check().output.strip())


def net_function(guest) -> str:
    return function_of(guest.run("readlink -f /sys/class/net/eth0/device").check().output.strip())


# --------------------------------------------------------------------------- one boot, several tests

def test_the_guest_enumerates_the_host_bridge_and_virtio_pci_functions_with_root_on_vda(pci_vm):
    guest = pci_vm.guest
    cmdline = guest.run("cat /proc/cmdline").check().output.split()
    assert "pci=off" not in cmdline, cmdline
    mounts = guest.run("cat /proc/mounts").check().output
    assert any(line.split()[:3] == ["/dev/vda", "/", "ext4"] for line in mounts.splitlines()), mounts

    functions = pci_functions(guest)
    assert sorted(f.ids for f in functions.values()) == sorted(
        [HOST_BRIDGE[:2], (VIRTIO_VENDOR, VIRTIO_PCI_NET), (VIRTIO_VENDOR, VIRTIO_PCI_BLOCK)]), functions
    bridge = functions["0000:00:00.0"]
    assert (bridge.vendor, bridge.device, bridge.class_code) == HOST_BRIDGE, bridge

    disk, nic = functions[root_function(guest)], functions[net_function(guest)]
    assert disk.ids == (VIRTIO_VENDOR, VIRTIO_PCI_BLOCK) and disk.class_code == CLASS_BLOCK, disk
    assert nic.ids == (VIRTIO_VENDOR, VIRTIO_PCI_NET) and nic.class_code == CLASS_NET, nic
    for f in (disk, nic):
        assert f.driver == "virtio-pci", f
        start, end = f.bar0
        assert end - start + 1 == BAR0_SIZE and start >= MMIO64_MIN and start % BAR0_SIZE == 0, f
    assert disk.bar0 != nic.bar0

    iomem = guest.run("cat /proc/iomem").check().output
    assert ECAM_IOMEM.search(iomem), iomem
    lnro = guest.run("ls /sys/bus/acpi/devices/ | grep -c LNRO0005; true").check().output.strip()
    assert lnro == "0", f"{lnro} virtio-mmio devices described in ACPI"


def test_every_virtqueue_and_the_config_change_have_their_own_msix_vector(pci_vm):
    guest = pci_vm.guest
    disk = assert_msix_vectors(guest, root_function(guest), ["config", "req.0"])
    assert disk["req.0"].count > 0, disk["req.0"].text          # the root was read through it
    nic = assert_msix_vectors(guest, net_function(guest), ["config", "input.0", "output.0"])
    guest.run(f"ping -c 2 -W 10 {pci_vm.net.host_ip}", timeout=90).check()
    after = interrupts(guest)[f"{virtio_name(guest, net_function(guest))}-input.0"]
    assert after.count > nic["input.0"].count, (nic["input.0"].text, after.text)


def test_guest_and_host_ping_each_other_over_virtio_pci_net(pci_vm):
    guest, net = pci_vm.guest, pci_vm.net
    assert guest.run("cat /sys/class/net/eth0/address").check().output.strip() == GUEST_MAC.lower()
    out = guest.run(f"ping -c 3 -W 10 {net.host_ip}", timeout=90).check().output
    assert "3 packets received" in out, out
    r = subprocess.run(net.argv([*ping_argv(), "-c", "3", "-W", "10", net.guest_ip]),
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and re.search(r"\b3 (packets )?received", r.stdout), r.stdout + r.stderr


def test_a_drive_put_after_boot_appears_on_rescan_works_and_unplugs(pci_vm):
    guest, sock = pci_vm.guest, pci_vm.sock
    mkfs, debugfs = e2fs_tool("mkfs.ext4"), e2fs_tool("debugfs")
    token = secrets.token_hex(8)
    content = pci_vm.workdir / "hot-content"
    content.mkdir()
    (content / "from-host.txt").write_text(f"host-{token}\n")
    image = pci_vm.workdir / "hot.ext4"
    subprocess.run([mkfs, "-q", "-F", "-t", "ext4", "-d", str(content), str(image), "16M"],
                   check=True, capture_output=True)

    before = rescan(guest)
    status, body = api(sock, "PUT", "/drives/hot", {"drive_id": "hot", "path_on_host": str(image),
                                                    "is_root_device": False, "is_read_only": False})
    assert status == 204, body
    refused(sock, "PUT", "/drives/hot", {"drive_id": "hot", "path_on_host": str(image),
                                         "is_root_device": False, "is_read_only": False}, "Device ID in use")
    after = rescan(guest)
    new = sorted(set(after) - set(before))
    assert len(new) == 1 and set(before) <= set(after), (before, after)
    bdf = new[0]
    hot = after[bdf]
    assert hot.ids == (VIRTIO_VENDOR, VIRTIO_PCI_BLOCK) and hot.driver == "virtio-pci", hot
    assert hot.bar0[1] - hot.bar0[0] + 1 == BAR0_SIZE and hot.bar0[0] >= MMIO64_MIN, hot

    names = guest.run(f"ls /sys/bus/pci/devices/{bdf}/virtio*/block/").check().output.split()
    assert len(names) == 1, names
    dev = f"/dev/{names[0]}"
    assert guest.run(f"cat /sys/block/{names[0]}/serial").check().output.strip() == "hot"
    guest.run(f"i=0; while [ ! -b {dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
              f"mkdir -p /tmp/hot && mount -t ext4 {dev} /tmp/hot").check()
    assert guest.run("cat /tmp/hot/from-host.txt").check().output.strip() == f"host-{token}"
    guest.run(f"echo guest-{token} > /tmp/hot/from-guest.txt && sync && umount /tmp/hot").check()
    assert_msix_vectors(guest, bdf, ["config", "req.0"])
    written = subprocess.run([debugfs, "-R", "cat /from-guest.txt", str(image)],
                             capture_output=True, text=True, check=True).stdout
    assert written.strip() == f"guest-{token}", written

    refused(sock, "DELETE", "/drives/nosuch", None, "Device not found")
    # No unplug notification reaches the guest: it lets go of the function first.
    guest.run(f"echo 1 > /sys/bus/pci/devices/{bdf}/remove").check()
    status, body = api(sock, "DELETE", "/drives/hot")
    assert status == 204, body
    assert set(rescan(guest)) == set(before)
    refused(sock, "DELETE", "/drives/hot", None, "Device not found")


def test_the_root_drive_cannot_be_unplugged(pci_vm):
    guest, sock = pci_vm.guest, pci_vm.sock
    refused(sock, "DELETE", "/drives/rootfs", None, "Cannot unplug root device")
    out = guest.run("dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct").check().output
    assert "16+0 records in" in out, out
    assert root_function(guest) in rescan(guest)


# --------------------------------------------------------------------------- snapshot

class RestoreLauncher(AsyncVmmLauncher):
    """A fresh asyncvmm with only the API socket: what the snapshot holds decides the machine."""

    name = "asyncvmm-restored"

    def __init__(self, sock: Path) -> None:
        super().__init__()
        self.sock = sock

    def argv(self, spec, workdir):
        return [sys.executable, "-m", "asyncvmm.cli", "--api-sock", str(self.sock)]


def test_a_restored_pci_microvm_keeps_its_functions_and_its_disk_works(guests, guest_images, tmp_path):
    token = secrets.token_hex(8)
    snap, mem = tmp_path / "vm.snap", tmp_path / "vm.mem"
    sock1 = tmp_path / "api1.sock"
    spec = pci_spec(guest_images, tmp_path, writable_root=True)
    first = guests.start(ApiLauncher(sock1, extra_args=ENABLE_PCI), spec)
    first.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock1, first)
    first.run(f"echo before-{token} > /root/pci-probe && sync").check()
    functions = pci_functions(first)
    bdf = root_function(first)
    req = f"{virtio_name(first, bdf)}-req.0"
    fired = interrupts(first)[req].count
    assert api(sock1, "PATCH", "/vm", {"state": "Paused"})[0] == 204
    status, body = api(sock1, "PUT", "/snapshot/create",
                       {"snapshot_type": "Full", "snapshot_path": str(snap), "mem_file_path": str(mem)})
    assert status == 204, body
    first.kill()

    sock2 = tmp_path / "api2.sock"
    second = guests.start(RestoreLauncher(sock2), spec)
    wait_for_api(sock2, second)
    status, body = api(sock2, "PUT", "/snapshot/load", {
        "snapshot_path": str(snap), "mem_backend": {"backend_type": "File", "backend_path": str(mem)},
        "resume_vm": True})
    assert status == 204, body
    second._echo_off = True          # the same shell as before the snapshot: echo is still off
    assert second.run("cat /root/pci-probe").check().output.strip() == f"before-{token}"
    assert "asyncvmm-guest: ready" not in second.console                      # no reboot
    assert pci_functions(second) == functions                                 # same functions, same BARs
    assert rescan(second) == functions
    second.run(f"echo after-{token} > /root/pci-probe2 && sync && "
               "dd if=/dev/vda of=/dev/null bs=4k count=64 skip=1024 iflag=direct").check()
    assert second.run("cat /root/pci-probe2").check().output.strip() == f"after-{token}"
    lines = assert_msix_vectors(second, bdf, ["config", "req.0"])
    assert lines["req.0"].count > fired, (fired, lines["req.0"].text)
    assert second.stop() == 0, second.tail()


# --------------------------------------------------------------------------- the other devices on PCI

VIRTIO_PCI_RNG, VIRTIO_PCI_BALLOON, VIRTIO_PCI_VSOCK = 0x1044, 0x1045, 0x1053   # 0x1040 + 4, 5, 19


class DevicesLauncher(ApiLauncher):
    """``--enable-pci`` with vsock, entropy and a balloon besides the root drive."""

    def __init__(self, sock: Path, uds: str) -> None:
        super().__init__(sock, extra_args=ENABLE_PCI)
        self.uds = uds

    def config(self, spec):
        config = super().config(spec)
        config["vsock"] = {"guest_cid": 3, "uds_path": self.uds}
        config["entropy"] = {}
        config["balloon"] = {"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 1}
        return config


def test_vsock_entropy_and_the_balloon_work_over_virtio_pci(guests, guest_images, tmp_path):
    short = Path(tempfile.mkdtemp(prefix="avp", dir="/tmp"))         # sun_path holds 108 bytes
    try:
        sock, uds = short / "api.sock", str(short / "v.sock")
        spec = pci_spec(guest_images, tmp_path)
        guest = guests.start(DevicesLauncher(sock, uds), spec)
        guest.wait_for(READY, BOOT_TIMEOUT)
        wait_for_api(sock, guest)
        functions = pci_functions(guest)
        by_id = {(f.vendor, f.device): f for f in functions.values()}
        for device in (VIRTIO_PCI_BALLOON, VIRTIO_PCI_BLOCK, VIRTIO_PCI_VSOCK, VIRTIO_PCI_RNG):
            assert by_id[(VIRTIO_VENDOR, device)].driver == "virtio-pci", functions
        # Firecracker 1.16's order: the balloon first, then the drives, vsock, entropy.
        assert by_id[(VIRTIO_VENDOR, VIRTIO_PCI_BALLOON)].bdf == "0000:00:01.0", functions
        for device in (VIRTIO_PCI_BALLOON, VIRTIO_PCI_VSOCK, VIRTIO_PCI_RNG):
            assert msix_control(config_space(guest, by_id[(VIRTIO_VENDOR, device)].bdf)) \
                & PCI_MSIX_FLAGS_ENABLE, device

        # entropy: the guest's hwrng is the virtio-pci function and gives bytes
        assert "virtio_rng" in guest.run("cat /sys/class/misc/hw_random/rng_current").check().output
        assert guest.run("head -c 256 /dev/hwrng | wc -c").check().output.strip() == "256"

        # vsock: a host connection to a guest listener carries a token
        token = secrets.token_hex(16)
        guest.run("(socat -u VSOCK-LISTEN:5000 CREATE:/tmp/vsock-in >/dev/null 2>&1 &)").check()
        deadline = time.monotonic() + 60
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(uds)
                s.sendall(b"CONNECT 5000\n")
                reply = s.recv(64)
                if reply.startswith(b"OK "):
                    s.sendall(token.encode())
                    break
            assert time.monotonic() < deadline, (reply, guest.tail())
            time.sleep(0.5)
        for _ in range(60):
            if guest.run("cat /tmp/vsock-in 2>/dev/null").output.strip() == token:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(guest.tail())

        # balloon: inflating to 64 MiB is reported back by the guest's driver
        assert api(sock, "PATCH", "/balloon", {"amount_mib": 64})[0] == 204
        deadline = time.monotonic() + 90
        while True:
            status, body = api(sock, "GET", "/balloon/statistics")
            if status == 200 and json.loads(body).get("actual_mib") == 64:
                break
            assert time.monotonic() < deadline, (status, body, guest.tail())
            time.sleep(1)
        assert guest.stop() == 0, guest.tail()
    finally:
        shutil.rmtree(short, ignore_errors=True)
