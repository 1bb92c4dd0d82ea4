"""asyncvmm-jailer with the Debian guest: a disk, a tap, and the jail checked (docs/jailer.md).

The jailer (root) builds ``<base>/asyncvmm/<id>/root``, joins a network
namespace holding a tap owned by the VMM's uid, places itself in a cgroup v2
(``pids.max``; the emulated host mounts no cgroup hierarchy, so the test
mounts cgroup2 there), drops to the uid and execs the VMM with its API
socket in the jail.  The kernel, initramfs and root disk are then put in the
jail and the guest is configured and started through the API; it boots to
its root on the disk and pings the host over the tap.  The checks are the
kvm tier's: uid/gid, the root, ``Seccomp: 2`` on every thread, the cgroup,
host paths unreachable, the runtime read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import require, require_netns_and_taps
from tests.linux.api import GUEST_MAC, api, wait_for_api
from tests.linux.harness import VmSpec, default_spec

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
UID = GID = 46124
HOST_IP, GUEST_IP = "172.16.0.1", "172.16.0.2"


def cgroup2_root() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    require(os.environ.get("ASYNCVMM_IN_HOSTVM") == "1", "no cgroup2 hierarchy mounted")
    # The emulated host is disposable and mounts none: mount the unified hierarchy.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", b"/sys/fs/cgroup", b"cgroup2", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mounting cgroup2 on /sys/fs/cgroup")
    return Path("/sys/fs/cgroup")


class JailedLauncher:
    """asyncvmm-jailer in place of asyncvmm; the VMM it execs keeps the jailer's pid and stdio."""
    name = "jailed-asyncvmm"

    def __init__(self, base: Path, jail_id: str, netns: str) -> None:
        self.base, self.id, self.netns = base, jail_id, netns

    def argv(self, spec: VmSpec, workdir: Path) -> list[str]:
        return [sys.executable, "-m", "asyncvmm.jailer", "--id", self.id,
                "--exec-file", str(Path(sys.executable).with_name("asyncvmm")), "--uid", str(UID),
                "--gid", str(GID), "--chroot-base-dir", str(self.base), "--netns", f"/var/run/netns/{self.netns}",
                "--cgroup-version", "2", "--cgroup", "pids.max=512",
                "--", "--api-sock", "/run/api.sock", "--level", "Debug"]


def _into_jail(src: Path, jail: Path, name: str) -> str:
    target = jail / name
    try:
        os.link(src, target)
    except OSError:
        subprocess.run(["cp", "--sparse=always", str(src), str(target)], check=True)
    os.chmod(target, 0o644)
    return f"/{name}"


def test_jailed_vmm_boots_debian_with_a_disk_and_a_tap(guests, guest_images, tmp_path):
    require(os.geteuid() == 0, "the jailer needs root")
    require_netns_and_taps()
    from asyncvmm.net.netns import temporary_netns

    cgroups = cgroup2_root()
    require("pids" in (cgroups / "cgroup.controllers").read_text().split(), "the pids controller (cgroup v2)")
    jail_id = f"deb{uuid.uuid4().hex[:10]}"
    base = Path("/tmp") / f"avj{uuid.uuid4().hex[:6]}"    # short: the socket path must fit sun_path
    base.mkdir()
    jail = base / "asyncvmm" / jail_id / "root"
    with temporary_netns("avm-jail-") as ns:
        tap = "jtap0"
        for argv in (["ip", "tuntap", "add", "dev", tap, "mode", "tap", "user", str(UID), "group", str(GID),
                      "vnet_hdr"], ["ip", "addr", "add", f"{HOST_IP}/30", "dev", tap],
                     ["ip", "link", "set", tap, "up"], ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *argv], check=True)
        spec = default_spec(guest_images, tmp_path, extra_args=f"avm.ip={GUEST_IP}/30")
        guest = guests.start(JailedLauncher(base, jail_id, ns), spec)
        try:
            sock = jail / "run" / "api.sock"
            wait_for_api(sock, guest)
            kernel = _into_jail(guest_images.bzimage, jail, "vmlinuz")
            initrd = _into_jail(guest_images.initramfs, jail, "initrd.img")
            rootfs = _into_jail(guest_images.rootfs, jail, "rootfs.ext4")
            for method, path, body in [
                ("PUT", "/boot-source", {"kernel_image_path": kernel, "initrd_path": initrd,
                                         "boot_args": spec.boot_args + " reboot=k"}),
                ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": rootfs,
                                           "is_root_device": True, "is_read_only": True}),
                ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": tap,
                                                     "guest_mac": GUEST_MAC}),
                ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}),
                ("PUT", "/actions", {"action_type": "InstanceStart"}),
            ]:
                status, text = api(sock, method, path, body)
                assert status == 204, (path, text, guest.tail())
            guest.wait_for(READY, BOOT_TIMEOUT)
            assert "/dev/vda" in guest.run("cat /proc/mounts").check().output
            out = guest.run(f"ping -c 3 -W 10 {HOST_IP}", timeout=90).check().output
            assert "3 packets received" in out, out

            pid = guest.pid
            status_lines = dict(line.split(":", 1) for line in
                                Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
            assert status_lines["Uid"].split() == [str(UID)] * 4
            assert status_lines["Gid"].split() == [str(GID)] * 4
            jail_root, chroot = os.stat(f"/proc/{pid}/root"), os.stat(jail)
            assert (jail_root.st_dev, jail_root.st_ino) == (chroot.st_dev, chroot.st_ino)
            modes = {t.name: next(int(line.split()[1]) for line in (t / "status").read_text().splitlines()
                                  if line.startswith("Seccomp:"))
                     for t in Path(f"/proc/{pid}/task").iterdir()}
            assert len(modes) >= 3 and set(modes.values()) == {2}, modes
            assert f"0::/asyncvmm/{jail_id}" in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/var/run/netns/{ns}").st_ino
            root = Path(f"/proc/{pid}/root")
            # The jail binds the runtime at its host paths (a clone under /tmp puts a /tmp/...
            # skeleton in it), so the checks name host paths beside it.
            host_only = tmp_path / "host-only"
            host_only.write_text("x")
            project = Path(__file__).resolve().parents[2]
            for host_path in ("/etc/hostname", "/etc/passwd", "/proc", "/sys", str(host_only),
                              str(project / "tests")):
                assert not (root / host_path.lstrip("/")).exists(), host_path
            assert host_only.exists() and (project / "tests").is_dir()   # there on the host
            try:
                (root / Path(sys.prefix).relative_to("/") / "x").write_text("x")
                raise AssertionError("the runtime in the jail is writable")
            except OSError as e:
                assert e.errno == 30, e      # EROFS
            assert guest.stop() == 0, guest.tail()
        finally:
            guest.kill()
            shutil.rmtree(base, ignore_errors=True)
            cg = cgroups / "asyncvmm" / jail_id
            if cg.exists():
                cg.rmdir()
