"""asyncvmm-jailer with the test guest: the jailed VMM boots, and is jailed.

The jailer runs as root (this tier runs as root); the VMM it execs runs as an
unprivileged uid in ``<base>/asyncvmm/<id>/root``, in its own mount
namespace and cgroup, every thread filtered.  The kernel is copied into the
jail once the API socket is up (the chroot must not exist before).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from benchmarks.launch import stop_process
from tests.conftest import require
from tests.kvm.conftest import accepts, api_call, wait_until
from tests.kvm.test_seccomp import seccomp_modes

pytestmark = pytest.mark.kvm

UID = GID = 46123
CGROUP2 = Path("/sys/fs/cgroup/unified")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def jailer_argv() -> list[str]:
    return [sys.executable, "-m", "asyncvmm.jailer"]


def vmm_exec_file() -> str:
    return str(Path(sys.executable).with_name("asyncvmm"))


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


class Jailed:
    def __init__(self, tmp_path: Path, *jailer_args: str) -> None:
        require(os.geteuid() == 0, "the jailer needs root")
        self.id = f"t{uuid.uuid4().hex[:12]}"
        # Short: the API socket's host path must fit sun_path (108 bytes).
        self.base = Path(tempfile.mkdtemp(prefix="avj", dir="/tmp"))
        self.chroot = self.base / "asyncvmm" / self.id / "root"
        self.out_path = tmp_path / "out"
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(
            [*jailer_argv(), "--id", self.id, "--exec-file", vmm_exec_file(), "--uid", str(UID), "--gid", str(GID),
             "--chroot-base-dir", str(self.base), *jailer_args, "--", "--api-sock", "/run/api.sock",
             "--level", "Debug"],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)
        self.sock = str(self.chroot / "run" / "api.sock")
        if "--new-pid-ns" in jailer_args:
            # The jailer exits 0 once its child (pid 1 in the new namespace) runs the VMM;
            # the pid file in the jail names it.
            assert self.proc.wait(60) == 0, self.output()
            self.proc = _Adopted(int((self.chroot / "asyncvmm.pid").read_text()))
        wait_until(lambda: accepts(self.sock) or self.proc.poll() is not None, 60, "the jailed API socket")
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def boot(self, kernel: Path) -> None:
        shutil.copy(kernel, self.chroot / "kernel.elf")
        os.chmod(self.chroot / "kernel.elf", 0o644)
        for method, path, body in [
            ("PUT", "/boot-source", {"kernel_image_path": "/kernel.elf", "boot_args": "exit=halt"}),
            ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]:
            status, answer = api_call(self.sock, method, path, body)
            assert status == 204, (path, answer, self.output())

        def halted() -> bool:
            assert self.proc.poll() is None, self.output()
            return "testguest: exit halt" in self.output()
        wait_until(halted, 60, "the jailed guest to run")
        wait_until(lambda: self.output().count("vcpu filter installed") == 2, 10, "the vCPU filters")

    def close(self) -> None:
        stop_process(self.proc, 10)
        self._out.close()
        shutil.rmtree(self.base, ignore_errors=True)


def status_ids(pid: int, field: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(field)


def check_jailed(vmm: Jailed) -> None:
    pid = vmm.proc.pid
    assert status_ids(pid, "Uid") == [UID] * 4
    assert status_ids(pid, "Gid") == [GID] * 4
    assert status_ids(pid, "Groups") == []
    # After pivot_root the root is its mount namespace's own ("/" to readlink): the same
    # directory as the chroot on the host, not the host's root.
    jail_root, chroot, host_root = (os.stat(p) for p in (f"/proc/{pid}/root", vmm.chroot, "/"))
    assert (jail_root.st_dev, jail_root.st_ino) == (chroot.st_dev, chroot.st_ino)
    assert (jail_root.st_dev, jail_root.st_ino) != (host_root.st_dev, host_root.st_ino)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    modes = seccomp_modes(pid)
    assert len(modes) >= 3 and set(modes.values()) == {2}, modes
    root = Path(f"/proc/{pid}/root")
    # The host outside the jail: unreachable from the VMM's root.  The jail binds the runtime at
    # its host paths (a clone under /tmp puts a /tmp/... skeleton in the jail), so the checks name
    # host paths beside it: this test's own output file, this project's tests and .git.
    project = Path(__file__).resolve().parents[2]
    for host_path in ("/etc/hostname", "/etc/passwd", "/proc", "/sys", str(vmm.out_path),
                      str(project / "tests"), str(project / ".git")):
        assert not (root / host_path.lstrip("/")).exists(), host_path
    assert vmm.out_path.exists() and (project / "tests").is_dir()      # there on the host
    # What the jail holds: the launcher, the devices, the read-only Python runtime.
    assert (root / "asyncvmm").is_file() and (root / "dev/kvm").exists() and (root / "dev/net/tun").exists()
    assert os.stat(root / "dev/kvm").st_uid == UID
    with pytest.raises(OSError) as err:
        (root / Path(sys.prefix).relative_to("/") / "written-by-the-vmm").write_text("x")
    assert err.value.errno == 30   # EROFS: the runtime is bound read-only


def test_jailed_vmm_boots_in_cgroup_v2(test_guest, tmp_path):
    mount = cgroup2_mount()
    require(mount is not None and "hugetlb" in (mount / "cgroup.controllers").read_text().split(),
            "a cgroup2 hierarchy with a controller available (hugetlb)")
    vmm = Jailed(tmp_path, "--cgroup-version", "2", "--cgroup", "hugetlb.2MB.max=0",
                 "--resource-limit", "no-file=1024")
    try:
        vmm.boot(test_guest.elf_pvh)
        check_jailed(vmm)
        cgroup = mount / "asyncvmm" / vmm.id
        assert f"0::/asyncvmm/{vmm.id}" in Path(f"/proc/{vmm.proc.pid}/cgroup").read_text().splitlines()
        assert (cgroup / "hugetlb.2MB.max").read_text().strip() == "0"
        limits = Path(f"/proc/{vmm.proc.pid}/limits").read_text()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["1024", "1024"]
                   for line in limits.splitlines()), limits
    finally:
        vmm.close()
        (mount / "asyncvmm" / vmm.id).rmdir()


def test_jailed_vmm_boots_in_cgroup_v1_new_pid_ns(test_guest, tmp_path):
    require(CGROUP_V1_CPU.is_dir(), "a cgroup v1 cpu hierarchy")
    vmm = Jailed(tmp_path, "--cgroup", "cpu.shares=512", "--parent-cgroup", "asyncvmm-test", "--new-pid-ns")
    pid = vmm.proc.pid
    try:
        vmm.boot(test_guest.elf_pvh)
        check_jailed(vmm)
        assert f"cpu:/asyncvmm-test/{vmm.id}" in Path(f"/proc/{pid}/cgroup").read_text()
        assert (CGROUP_V1_CPU / "asyncvmm-test" / vmm.id / "cpu.shares").read_text().strip() == "512"
        nspid = status_ids(pid, "NSpid")
        assert nspid[-1] == 1, nspid                     # pid 1 in its own PID namespace
    finally:
        vmm.close()
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the VMM to end")
        (CGROUP_V1_CPU / "asyncvmm-test" / vmm.id).rmdir()


class _Adopted:
    """A process we did not start (the jailer's child): enough of Popen for the helpers."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self):
        return None if Path(f"/proc/{self.pid}").exists() else 0

    @property
    def returncode(self):
        return self.poll()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None):
        wait_until(lambda: self.poll() is not None, timeout or 10, "the VMM to end")
        return 0

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def test_jailed_vmm_joins_the_netns_and_opens_a_tap_there(test_guest, tmp_path):
    """--netns: the VMM lives in the given namespace and opens a tap made there for its uid."""
    from tests.conftest import require_netns_and_taps
    require_netns_and_taps()
    from asyncvmm.net.netns import temporary_netns

    with temporary_netns("asyncvmm-jail-") as ns:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", "jtap0", "mode", "tap",
                        "user", str(UID), "group", str(GID), "vnet_hdr"], check=True)
        vmm = Jailed(tmp_path, "--netns", f"/var/run/netns/{ns}")
        try:
            assert os.stat(f"/proc/{vmm.proc.pid}/ns/net").st_ino == os.stat(f"/var/run/netns/{ns}").st_ino
            status, answer = api_call(vmm.sock, "PUT", "/network-interfaces/eth0",
                                      {"iface_id": "eth0", "host_dev_name": "jtap0"})
            assert status == 204, (answer, vmm.output())
            vmm.boot(test_guest.elf_pvh)
            check_jailed(vmm)
        finally:
            vmm.close()


def test_bad_input_as_root_creates_no_chroot_and_no_cgroup(tmp_path):
    require(os.geteuid() == 0, "the jailer needs root")
    base = Path(tempfile.mkdtemp(prefix="avj", dir="/tmp"))
    try:
        argv = [*jailer_argv(), "--id", "bad-cg", "--exec-file", vmm_exec_file(), "--uid", str(UID), "--gid",
                str(GID), "--chroot-base-dir", str(base), "--cgroup-version", "2", "--cgroup", "cpu.shares=1",
                "--cgroup", "nosuchcontroller.x=1"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out
        assert "Jailer error: Controller " in out.stderr and "is unavailable" in out.stderr
        assert list(base.iterdir()) == []
        mount = cgroup2_mount()
        assert mount is None or not (mount / "asyncvmm" / "bad-cg").exists()
    finally:
        shutil.rmtree(base)


def test_a_fork_server_child_jails_itself(test_guest, tmp_path):
    """asyncvmm-jailer with ASYNCVMM_FORKSERVER set: the server's forked child runs the jail's
    steps on itself and then the VMM in place; the jailer process relays, as a launcher does."""
    from tests.kvm.test_forkserver import Zygote
    from asyncvmm.forkserver.launcher import ENV_VAR

    require(os.geteuid() == 0, "the jailer needs root")
    zygote = Zygote(tmp_path)
    base = Path(tempfile.mkdtemp(prefix="avj", dir="/tmp"))
    jail_id = f"z{uuid.uuid4().hex[:12]}"
    chroot = base / "asyncvmm" / jail_id / "root"
    out_path = tmp_path / "out"
    mount = cgroup2_mount()
    require(mount is not None and "hugetlb" in (mount / "cgroup.controllers").read_text().split(),
            "a cgroup2 hierarchy with a controller available (hugetlb)")
    with open(out_path, "wb") as out:
        launcher = subprocess.Popen(
            [*jailer_argv(), "--id", jail_id, "--exec-file", vmm_exec_file(), "--uid", str(UID),
             "--gid", str(GID), "--chroot-base-dir", str(base), "--cgroup-version", "2",
             "--cgroup", "hugetlb.2MB.max=0", "--", "--api-sock", "/run/api.sock", "--level", "Debug"],
            env=dict(os.environ, **{ENV_VAR: zygote.path}), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        sock = str(chroot / "run" / "api.sock")
        wait_until(lambda: accepts(sock) or launcher.poll() is not None, 60, "the jailed API socket")
        assert launcher.poll() is None, out_path.read_text()
        children = zygote.children()
        assert len(children) == 1, children
        vmm = Jailed.__new__(Jailed)          # the helpers, on the fork server's child
        vmm.id, vmm.base, vmm.chroot, vmm.sock, vmm.out_path = jail_id, base, chroot, sock, out_path
        vmm.proc = _Adopted(children[0])
        vmm._out = open(os.devnull, "wb")
        vmm.boot(test_guest.elf_pvh)
        check_jailed(vmm)
        assert f"0::/asyncvmm/{jail_id}" in Path(f"/proc/{children[0]}/cgroup").read_text().splitlines()
        launcher.send_signal(signal.SIGTERM)      # relayed to the VMM, which exits 0
        assert launcher.wait(10) == 0, out_path.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        zygote.close()
        shutil.rmtree(base, ignore_errors=True)
        cg = mount / "asyncvmm" / jail_id
        if cg.exists():
            wait_until(lambda: not (cg / "cgroup.procs").read_text().strip(), 10, "the cgroup to empty")
            cg.rmdir()
