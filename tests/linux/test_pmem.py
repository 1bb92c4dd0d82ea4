"""virtio-pmem with Debian's cloud kernel (issue 17, docs/pmem.md).  Two microVMs.

The first (virtio-mmio, the usual read-only root on ``/dev/vda``) has two
pmem devices from the config file: ``data``, an ext4 image made on the host
whose length is not a multiple of 2 MiB (the region is rounded up), and
``ro``, a read-only raw file with a marker.  The guest finds ``/dev/pmem0``
and ``/dev/pmem1`` in configuration order; it mounts ``data`` with ``-o dax``
(Debian's kernel offers DAX on it: ``/sys/block/pmem0/queue/dax``), writes a
file with a token and random data and ``sync``s, which reaches the device as
flush requests (``pmem_data.queue_event_count``).  ``PATCH /pmem/data`` sets a
flush rate limiter (204), an unknown ID is refused with Firecracker's
message.  The guest reads the marker of the read-only device.  After the VMM
has exited the data is in the host file: ``e2fsck`` finds the file system
clean and ``debugfs`` reads the files back (nothing is mounted on the host).

The second (``--enable-pci``) boots from a root file system on pmem
(``root_device``: Firecracker appends ``root=/dev/pmem0 rw``; a copy of the
guest image's root, whose 1 KiB blocks rule out DAX), writes and syncs a file there, and
hot-plugs a read-only pmem device after boot: ``PUT /pmem`` then a PCI rescan
gives ``/dev/pmem1`` with the host's marker; the guest removes the function and
``DELETE /pmem`` unplugs it; the root device cannot be unplugged.  After exit
the root image holds the guest's file.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
from dataclasses import replace
from pathlib import Path

from tests.linux.api import ApiLauncher, api, metrics_delta, wait_for_api
from tests.linux.harness import default_spec
from tests.linux.test_block import e2fs_tool
from tests.linux.test_pci import function_of

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
MiB = 1 << 20
DATA_SIZE = 33 * MiB                 # not a multiple of 2 MiB: the region is 34 MiB
RO_SIZE = 2 * MiB


class PmemLauncher(ApiLauncher):
    """asyncvmm with the API socket and a ``pmem`` list in its config file."""

    def __init__(self, sock, pmem: list[dict], extra_args: list[str] | None = None) -> None:
        super().__init__(sock, extra_args=extra_args)
        self.pmem = pmem

    def config(self, spec) -> dict:
        return {**super().config(spec), "pmem": self.pmem}


def marker_file(path: Path, size: int, marker: bytes) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(marker)
    return path


def read_marker(guest, dev: str, length: int) -> str:
    return guest.run(f"head -c {length} {dev}").check().output.strip()


def refused(sock, method: str, path: str, body, fault: str) -> None:
    status, text = api(sock, method, path, body)
    assert status == 400 and json.loads(text)["fault_message"] == fault, (status, text)


def wait_block(guest, dev: str) -> None:
    guest.run(f"i=0; while [ ! -b {dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
              f"[ -b {dev} ]").check()


def test_ext4_on_pmem_is_written_back_to_the_host_file(guests, guest_images, tmp_path):
    mkfs, e2fsck, debugfs = e2fs_tool("mkfs.ext4"), e2fs_tool("e2fsck"), e2fs_tool("debugfs")
    sock, metrics = tmp_path / "api.sock", tmp_path / "metrics.json"
    token = secrets.token_hex(16)
    data = tmp_path / "data.ext4"
    with open(data, "wb") as f:
        f.truncate(DATA_SIZE)
    # 4 KiB blocks: ext4 offers DAX only with blocks of the page size (mke2fs picks 1 KiB this small).
    subprocess.run([mkfs, "-q", "-F", "-t", "ext4", "-b", "4096", str(data)], check=True, capture_output=True)
    assert data.stat().st_size == DATA_SIZE
    ro = marker_file(tmp_path / "ro.img", RO_SIZE, f"RO-{token}".encode())
    pmem = [{"id": "data", "path_on_host": str(data)},
            {"id": "ro", "path_on_host": str(ro), "read_only": True}]
    spec = default_spec(guest_images, tmp_path)
    guest = guests.start(PmemLauncher(sock, pmem, ["--metrics-path", str(metrics)]), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)

    wait_block(guest, "/dev/pmem0")
    wait_block(guest, "/dev/pmem1")
    # The region is the file rounded up to 2 MiB; the block device covers all of it.
    assert guest.run("cat /sys/block/pmem0/size").check().output.strip() == str(34 * MiB // 512)
    assert guest.run("cat /sys/block/pmem1/size").check().output.strip() == str(RO_SIZE // 512)
    assert read_marker(guest, "/dev/pmem1", len(f"RO-{token}")) == f"RO-{token}"

    # Debian's cloud kernel offers DAX on virtio-pmem (FS_DAX=y, ZONE_DEVICE=y): the mount must use it.
    assert guest.run("cat /sys/block/pmem0/queue/dax").check().output.strip() == "1"
    guest.run("mkdir -p /tmp/pmem && mount -t ext4 -o dax /dev/pmem0 /tmp/pmem").check()
    mount = guest.run("grep ' /tmp/pmem ' /proc/mounts").check().output
    assert "dax" in mount, mount
    metrics_delta(sock, metrics)
    out = guest.run(f"dd if=/dev/urandom of=/tmp/pmem/blob.bin bs=64k count=16 2>/dev/null && "
                    f"echo {token} > /tmp/pmem/token.txt && sync && md5sum /tmp/pmem/blob.bin").check().output
    guest_md5 = out.split()[0]
    counters = metrics_delta(sock, metrics)
    assert counters["pmem_data"]["queue_event_count"] >= 1, counters["pmem_data"]
    assert counters["pmem_data"]["event_fails"] == 0, counters["pmem_data"]
    assert counters["pmem"]["queue_event_count"] >= 1, counters["pmem"]

    limiter = {"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}
    status, body = api(sock, "PATCH", "/pmem/data", {"id": "data", **limiter})
    assert status == 204, body
    refused(sock, "PATCH", "/pmem/nosuch", {"id": "nosuch", **limiter},
            "Pmem config error: Unable to patch the pmem device: Failed perform action on device: "
            "Device not found Please verify the request arguments.")
    guest.run("echo after-patch > /tmp/pmem/after.txt && sync && umount /tmp/pmem").check()
    assert guest.stop() == 0, guest.tail()

    fsck = subprocess.run([e2fsck, "-fn", str(data)], capture_output=True, text=True)
    assert fsck.returncode == 0, f"not clean:\n{fsck.stdout}{fsck.stderr}"
    for name, expected in (("/token.txt", token), ("/after.txt", "after-patch")):
        text = subprocess.run([debugfs, "-R", f"cat {name}", str(data)], capture_output=True, text=True,
                              check=True).stdout
        assert text.strip() == expected, name
    dumped = tmp_path / "blob.bin"
    subprocess.run([debugfs, "-R", f"dump /blob.bin {dumped}", str(data)], capture_output=True, check=True)
    assert hashlib.md5(dumped.read_bytes()).hexdigest() == guest_md5
    assert data.stat().st_size == DATA_SIZE            # the rounding never reached the file
    assert ro.read_bytes()[:len(f"RO-{token}")] == f"RO-{token}".encode()


def test_root_on_pmem_boots_and_a_pmem_device_hot_plugs_on_pci(guests, guest_images, tmp_path):
    debugfs = e2fs_tool("debugfs")
    sock = tmp_path / "api.sock"
    token = secrets.token_hex(16)
    root = tmp_path / "root.ext4"
    subprocess.run(["cp", "--sparse=always", str(guest_images.rootfs), str(root)], check=True)
    spec = default_spec(guest_images, tmp_path)
    spec = replace(spec, drives=[],
                   boot_args=" ".join(w for w in spec.boot_args.split() if w != "pci=off"))
    pmem = [{"id": "rootfs", "path_on_host": str(root), "root_device": True}]
    guest = guests.start(PmemLauncher(sock, pmem, ["--enable-pci"]), spec)
    guest.wait_for(r"asyncvmm-guest: root /dev/pmem0 mounted \(ext4, rw\)", BOOT_TIMEOUT)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    cmdline = guest.run("cat /proc/cmdline").check().output
    assert "root=/dev/pmem0 rw" in cmdline, cmdline
    guest.run(f"echo {token} > /from-guest.txt && sync").check()

    hot = marker_file(tmp_path / "hot.img", RO_SIZE, f"HOT-{token}".encode())
    body = {"id": "hot", "path_on_host": str(hot), "read_only": True}
    status, text = api(sock, "PUT", "/pmem/hot", body)
    assert status == 204, text
    refused(sock, "PUT", "/pmem/hot", body, "Device ID in use")
    refused(sock, "PUT", "/pmem/root2", {"id": "root2", "path_on_host": str(hot), "root_device": True},
            "Pmem config error: Attempt to add pmem as a root device while the root device defined as "
            "a block device")
    guest.run("echo 1 > /sys/bus/pci/rescan").check()
    wait_block(guest, "/dev/pmem1")
    assert read_marker(guest, "/dev/pmem1", len(f"HOT-{token}")) == f"HOT-{token}"
    # The guest lets go of the function first (no unplug notification reaches it), then DELETE.
    bdf = function_of(guest.run("readlink -f /sys/block/pmem1").check().output.strip())
    guest.run(f"echo 1 > /sys/bus/pci/devices/{bdf}/remove").check()
    status, text = api(sock, "DELETE", "/pmem/hot")
    assert status == 204, text
    refused(sock, "DELETE", "/pmem/hot", None, "Device not found")
    refused(sock, "DELETE", "/pmem/rootfs", None, "Cannot unplug root device")
    assert guest.stop() == 0, guest.tail()

    text = subprocess.run([debugfs, "-R", "cat /from-guest.txt", str(root)], capture_output=True, text=True,
                          check=True).stdout
    assert text.strip() == token
