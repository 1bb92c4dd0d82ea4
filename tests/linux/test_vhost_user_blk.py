"""A Debian guest whose root is a vhost-user-blk drive served by qemu-storage-daemon (issue 16).

One ``qemu-storage-daemon`` serves a private copy of the ext4 root for the
whole test; two VMM processes in turn are its front end (two guest boots,
the tier's budget):

1. virtio-mmio: the guest boots from ``/dev/vda`` (the drive's ``socket``,
   no ``path_on_host``), writes a file and ``sync``s, and reboots: the VMM
   ends with status 0 and the daemon is left with a disconnected client.
2. a new VMM process, ``--enable-pci``, on the same daemon and image: the
   first boot's file reads back intact; the request queue's MSI-X vector
   fires (``/proc/interrupts``), which on PCI is the daemon writing the
   irqfd the VMM gave it.  A second drive, served by its own daemon, is
   read once, then that daemon is SIGKILLed: a direct read now fails with an
   I/O error in the guest, the VMM logs the lost back end once and answers
   the API.  The guest writes a second file, ``sync``s (fsync of the root
   through the daemon), and the VMM is SIGKILLed.

Then, with the daemon stopped, ``e2fsck`` replays the journal and
``debugfs`` reads both files out of the image, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import require
from tests.linux.api import ApiLauncher, api, wait_for_api
from tests.linux.harness import AsyncVmmLauncher, DriveSpec, default_spec
from tests.linux.test_block import e2fs_tool, sparse_file

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"


def start_qsd(image: Path, sock: Path) -> subprocess.Popen:
    exe = shutil.which("qemu-storage-daemon")
    require(exe is not None, "qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    proc = subprocess.Popen(
        [exe, "--blockdev", f"driver=file,node-name=f,filename={image}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
        assert time.monotonic() < deadline, "qemu-storage-daemon did not create its socket"
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def vhost_user(launcher: AsyncVmmLauncher, sockets: dict[str, Path]) -> AsyncVmmLauncher:
    """The launcher with the drives named in ``sockets`` turned into vhost-user drives."""
    file_config = launcher.config

    def config(spec):
        cfg = file_config(spec)
        for d in cfg["drives"]:
            if d["drive_id"] in sockets:
                for field in ("path_on_host", "is_read_only", "io_engine", "rate_limiter"):
                    d.pop(field, None)
                d["socket"] = str(sockets[d["drive_id"]])
        return cfg

    launcher.config = config
    return launcher


def irq_count(guest, name: str) -> int:
    """Interrupts so far on the /proc/interrupts lines naming ``name``, summed over the CPUs."""
    out = guest.run(f"grep '{name}' /proc/interrupts").check().output
    return sum(int(w) for line in out.splitlines() for w in line.split(":", 1)[1].split()
               if w.isdigit())


def test_root_on_vhost_user_blk_survives_writes_a_reboot_and_a_sigkill(guests, guest_images, tmp_path):
    e2fsck, debugfs = e2fs_tool("e2fsck"), e2fs_tool("debugfs")
    spec = default_spec(guest_images, tmp_path, writable_root=True)
    image = spec.drives[0].path
    root_sock = tmp_path / "root.sock"
    qsd = start_qsd(image, root_sock)
    data_qsd = None
    try:
        # -- 1: virtio-mmio, write, sync, reboot --------------------------------------------
        first = secrets.token_hex(16)
        guest = guests.start(vhost_user(AsyncVmmLauncher(), {"rootfs": root_sock}), spec)
        guest.wait_for(r"asyncvmm-guest: root /dev/vda mounted \(ext4, rw\)", BOOT_TIMEOUT)
        guest.wait_for(READY, BOOT_TIMEOUT)
        assert guest.run(f"echo {first} > /avm-vu-1.txt && sync && cat /avm-vu-1.txt").check().output.strip() == first
        assert guest.stop(60) == 0                      # the guest's reboot ends the VMM with 0

        # -- 2: a new process, --enable-pci, the same back end ------------------------------
        data = sparse_file(tmp_path / "data.img", 8 << 20, {0: b"vhost-user data drive"})
        data_sock = tmp_path / "data.sock"
        data_qsd = start_qsd(data, data_sock)
        args = " ".join(w for w in spec.boot_args.split() if w != "pci=off")
        spec2 = replace(spec, boot_args=args, drives=[spec.drives[0], DriveSpec(data, "data")])
        sock = tmp_path / "api.sock"
        log = tmp_path / "vmm2.log"
        launcher = vhost_user(ApiLauncher(sock, extra_args=["--enable-pci", "--log-path", str(log),
                                                              "--level", "Info"]),
                              {"rootfs": root_sock, "data": data_sock})
        guest = guests.start(launcher, spec2)
        guest.wait_for(READY, BOOT_TIMEOUT)
        wait_for_api(sock, guest)
        assert guest.run("cat /avm-vu-1.txt").check().output.strip() == first
        assert "pci=off" not in guest.run("cat /proc/cmdline").check().output
        assert "/pci0000:00/" in guest.run("readlink -f /sys/block/vda").check().output
        # The request queue's MSI-X irqfd went to the daemon: no VMM in the interrupt path.
        assert "rootfs: queue 0 completions signal the guest's irqfd directly" in log.read_text()
        before = irq_count(guest, "req.0")
        guest.run("dd if=/dev/vda of=/dev/null bs=4k count=64 skip=1000 iflag=direct 2>/dev/null").check()
        assert irq_count(guest, "req.0") > before       # the daemon signalled the MSI-X irqfd

        # The data drive's back end dies: the guest gets I/O errors, the VMM lives on.
        head = guest.run("dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c 21").check()
        assert head.output.strip() == "vhost-user data drive"
        data_qsd.kill()
        data_qsd.wait()
        deadline = time.monotonic() + 30
        while "lost the back end" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        failed = guest.run("dd if=/dev/vdb of=/dev/null bs=4k count=1 skip=7 iflag=direct", timeout=120)
        assert failed.status != 0 and ("Input/output error" in failed.output
                                       or "I/O error" in failed.output), failed.output
        assert api(sock, "GET", "/")[0] == 200
        assert log.read_text().count("lost the back end") == 1

        # fsync, then SIGKILL: what was synced is the daemon's, not the VMM's.
        second = guest.run("dd if=/dev/urandom of=/avm-vu-2.bin bs=64k count=16 2>/dev/null && "
                           "sync && md5sum /avm-vu-2.bin").check().output.split()[0]
        os.kill(guest.pid, signal.SIGKILL)
        assert guest.wait_exit(30) == -signal.SIGKILL
    finally:
        stop(qsd)
        if data_qsd is not None:
            stop(data_qsd)

    fsck = subprocess.run([e2fsck, "-fy", str(image)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), f"e2fsck -fy exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}"
    clean = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)
    assert clean.returncode == 0, f"not clean after journal replay:\n{clean.stdout}{clean.stderr}"
    text = subprocess.run([debugfs, "-R", "cat /avm-vu-1.txt", str(image)],
                          capture_output=True, text=True, check=True).stdout
    assert text.strip() == first
    dumped = tmp_path / "avm-vu-2.bin"
    subprocess.run([debugfs, "-R", f"dump /avm-vu-2.bin {dumped}", str(image)], capture_output=True, check=True)
    assert hashlib.md5(dumped.read_bytes()).hexdigest() == second
