"""Boot a real guest under a real VMM on a real /dev/kvm and drive its serial console.

Launchers say how to start a VMM; :class:`Guest` runs one, watches its console
and stops it, never leaving a process behind (own session, PDEATHSIG,
``killpg`` on stop and on failure).

* :class:`AsyncVmmLauncher` -- asyncvmm exactly as Firecracker is run:
  ``asyncvmm --no-api --config-file vm.json`` (``[sys.executable, "-m",
  "asyncvmm.cli", ...]`` by default, or the ``asyncvmm`` console script),
  serial console on stdin/stdout.
* :class:`QemuMicrovmLauncher` -- QEMU ``microvm`` with ACPI and virtio-mmio:
  the reference VMM for the tier's self-check and for benchmarks.

Console protocol (:class:`ConsoleProtocol`, pure): after the guest prints
``asyncvmm-guest: ready``, echo is turned off and each command is sent as a
base64 script written to ``/tmp`` in chunks (a tty line holds at most 4095
bytes) and run with stdin from /dev/null, framed by
``AVMCMD:<n>:begin`` / ``AVMCMD:<n>:end:<status>`` lines that ``printf``
assembles from pieces, so the echoed command line never looks like a marker.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from asyncvmm_tools.hostvm.process import Child
from asyncvmm_tools.hostvm.qemu import MICROVM_OPTS, Disk, MachineSpec, machine_argv
from asyncvmm_tools.images import GuestImages

READY = "asyncvmm-guest: ready"
CHUNK = 1500
BASE_ARGS = "console=ttyS0 panic=-1 mitigations=off quiet loglevel=4 8250.nr_uarts=1 pci=off"


class GuestError(AssertionError):
    """The guest did not do what the test waited for; carries the console tail."""


@dataclass(frozen=True)
class CommandResult:
    status: int
    output: str

    def check(self) -> "CommandResult":
        if self.status != 0:
            raise GuestError(f"guest command exited {self.status}:\n{self.output}")
        return self


class ConsoleProtocol:
    """Builds console input for a command and finds its framed result in console output."""

    def __init__(self) -> None:
        self.seq = 0

    def encode(self, command: str) -> tuple[int, bytes]:
        self.seq += 1
        n = self.seq
        b64 = base64.b64encode(command.encode()).decode()
        script = f"/tmp/.avmcmd{n}"
        lines = [f"rm -f {script}.b64"]
        lines += [f"echo '{b64[i:i + CHUNK]}' >> {script}.b64" for i in range(0, len(b64), CHUNK)]
        lines.append(f"base64 -d {script}.b64 > {script}; printf '%s:%s:begin\\n' AVMCMD {n}; "
                     f"sh {script} </dev/null; printf '\\n%s:%s:end:%s\\n' AVMCMD {n} $?")
        return n, ("\n".join(lines) + "\n").encode()

    @staticmethod
    def find(text: str, n: int) -> CommandResult | None:
        text = text.replace("\r\n", "\n")
        begin = re.search(rf"AVMCMD:{n}:begin\n", text)
        if not begin:
            return None
        end = re.search(rf"\nAVMCMD:{n}:end:(\d+)\n", text[begin.end() - 1:])
        if not end:
            return None
        output = text[begin.end():begin.end() - 1 + end.start()]
        return CommandResult(int(end.group(1)), output)


@dataclass
class DriveSpec:
    path: Path
    drive_id: str
    read_only: bool = False
    is_root_device: bool = False
    # Firecracker drive fields; None leaves them out of the config (the VMM's default).
    cache_type: str | None = None        # "Unsafe" | "Writeback"
    io_engine: str | None = None         # "Sync" | "Async"
    rate_limiter: dict | None = None     # {"bandwidth": {...}, "ops": {...}}


@dataclass
class VmSpec:
    """What to boot, independent of which VMM boots it."""
    kernel: Path
    boot_args: str
    initrd: Path | None = None
    drives: list[DriveSpec] = field(default_factory=list)
    vcpus: int = 1
    mem_mib: int = 256
    # Firecracker "network-interfaces" entries and "mmds-config" (asyncvmm only; QEMU ignores them).
    network_interfaces: list[dict] = field(default_factory=list)
    mmds_config: dict | None = None


class Launcher(Protocol):
    name: str

    def argv(self, spec: VmSpec, workdir: Path) -> list[str]:
        ...


class AsyncVmmLauncher:
    """asyncvmm with a Firecracker config file (root drive adds ``root=/dev/vda``, as Firecracker does).

    ``netns`` runs the VMM inside that network namespace (``ip netns exec``, as
    Firecracker's jailer would), so it can open a tap the test made there.
    """
    name = "asyncvmm"

    def __init__(self, console_script: bool = False, extra_args: list[str] | None = None,
                 netns: str | None = None) -> None:
        self.console_script = console_script
        self.extra_args = extra_args or []
        self.netns = netns

    @staticmethod
    def _drive(d: DriveSpec) -> dict:
        drive = {"drive_id": d.drive_id, "path_on_host": str(d.path),
                 "is_root_device": d.is_root_device, "is_read_only": d.read_only}
        optional = {"cache_type": d.cache_type, "io_engine": d.io_engine, "rate_limiter": d.rate_limiter}
        drive.update({k: v for k, v in optional.items() if v is not None})
        return drive

    @classmethod
    def config(cls, spec: VmSpec) -> dict:
        boot = {"kernel_image_path": str(spec.kernel), "boot_args": spec.boot_args}
        if spec.initrd:
            boot["initrd_path"] = str(spec.initrd)
        config = {
            "boot-source": boot,
            "drives": [cls._drive(d) for d in spec.drives],
            "machine-config": {"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib},
            "network-interfaces": list(spec.network_interfaces),
        }
        if spec.mmds_config is not None:
            config["mmds-config"] = spec.mmds_config
        return config

    def argv(self, spec: VmSpec, workdir: Path) -> list[str]:
        # Firecracker guests reboot through the i8042 reset line; that ends the VMM.
        spec = VmSpec(**{**spec.__dict__, "boot_args": spec.boot_args + " reboot=k"})
        config = workdir / "vm.json"
        config.write_text(json.dumps(self.config(spec), indent=2))
        exe = [shutil.which("asyncvmm") or "asyncvmm"] if self.console_script else \
            [sys.executable, "-m", "asyncvmm.cli"]
        # `ip netns exec` execs the VMM in place, so the child's pid, session and PDEATHSIG are the VMM's.
        netns = ["ip", "netns", "exec", self.netns] if self.netns else []
        return netns + exe + ["--no-api", "--config-file", str(config), *self.extra_args]


class QemuMicrovmLauncher:
    """QEMU microvm, ACPI on, virtio-mmio disks in drive order (the root first: /dev/vda)."""
    name = "qemu-microvm"

    def __init__(self, accel: str = "kvm", acpi: bool = True) -> None:
        # acpi=False: no DSDT; QEMU then appends virtio_mmio.device=... to the command line
        # itself (only kernels with VIRTIO_MMIO_CMDLINE_DEVICES, e.g. the minimal kernel, can use it).
        self.accel = accel
        self.acpi = acpi

    def argv(self, spec: VmSpec, workdir: Path) -> list[str]:
        # QEMU microvm with rtc=off does not set the FADT's "CMOS RTC not present" flag, and
        # the Debian kernel then spins ~40 s (nested) probing the absent RTC.  With pci=off the
        # ACPI reset did not end QEMU (the kernel fell through to a BIOS jump, a KVM emulation
        # failure); a triple fault does, under -no-reboot.
        args = spec.boot_args + " initcall_blacklist=cmos_init reboot=t"
        root = [d for d in spec.drives if d.is_root_device]
        if root:
            args += f" root=/dev/vda {'ro' if root[0].read_only else 'rw'}"
        drives = root + [d for d in spec.drives if not d.is_root_device]
        disks = tuple(Disk(d.path, re.sub(r"[^A-Za-z0-9]", "", d.drive_id)[:20] or "disk", d.read_only)
                      for d in drives)
        return machine_argv(MachineSpec(
            kernel=spec.kernel, initrd=spec.initrd, cmdline=args, disks=disks, mem_mib=spec.mem_mib,
            vcpus=spec.vcpus, accel=self.accel, cpu="host" if self.accel == "kvm" else "max",
            serial="stdio,signal=off",
            machine=MICROVM_OPTS if self.acpi else MICROVM_OPTS.replace("acpi=on", "acpi=off")))


def default_spec(images: GuestImages, workdir: Path, writable_root: bool = False,
                 extra_args: str = "", initrd: bool = True, mem_mib: int = 256) -> VmSpec:
    """The cloud kernel + our initramfs + the ext4 root (a private copy when writable)."""
    rootfs = images.rootfs
    if writable_root:
        rootfs = workdir / "rootfs.ext4"
        subprocess.run(["cp", "--sparse=always", str(images.rootfs), str(rootfs)], check=True)
    return VmSpec(kernel=images.bzimage, boot_args=f"{BASE_ARGS} {extra_args}".strip(),
                  initrd=images.initramfs if initrd else None, mem_mib=mem_mib,
                  drives=[DriveSpec(rootfs, "rootfs", read_only=not writable_root, is_root_device=True)])


class Guest:
    """One running VMM process and its console."""

    def __init__(self, launcher: Launcher, spec: VmSpec, workdir: Path) -> None:
        self.launcher, self.spec, self.workdir = launcher, spec, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "console.log"
        self._log = open(self.log_path, "wb")
        self._text: list[str] = []
        self._cond = threading.Condition()
        self._protocol = ConsoleProtocol()
        self._echo_off = False
        self.argv = launcher.argv(spec, workdir)
        self._child = Child(self.argv, self._sink, stdin=subprocess.PIPE)

    def _sink(self, data: bytes) -> None:
        self._log.write(data)
        self._log.flush()
        with self._cond:
            self._text.append(data.decode(errors="replace"))
            self._cond.notify_all()

    @property
    def console(self) -> str:
        with self._cond:
            return "".join(self._text)

    def tail(self, n: int = 3000) -> str:
        return self.console[-n:]

    @property
    def pid(self) -> int:
        """The VMM process's pid (the launcher's argv execs the VMM in place)."""
        return self._child.pid

    def exited(self) -> int | None:
        return self._child.proc.poll()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Wait until ``pattern`` (regex) appears on the console."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search("".join(self._text))
                if m:
                    return m
                if self._child.proc.poll() is not None:
                    self._cond.wait(0.2)   # let the pump deliver the last bytes
                    m = rx.search("".join(self._text))
                    if m:
                        return m
                    raise GuestError(f"{self.launcher.name} exited ({self._child.proc.returncode}) "
                                     f"before {pattern!r}; console:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"no {pattern!r} within {timeout:.0f} s; console:\n{self.tail()}")
                self._cond.wait(min(left, 1.0))

    def send(self, data: bytes) -> None:
        stdin = self._child.proc.stdin
        assert stdin is not None
        stdin.write(data)
        stdin.flush()

    def run(self, command: str, timeout: float = 60) -> CommandResult:
        """Run ``command`` in the guest shell; its status and output (stdin is /dev/null)."""
        if not self._echo_off:
            self.wait_for(READY, timeout)
            self.send(b"stty -echo\n")
            self._echo_off = True
        n, data = self._protocol.encode(command)
        self.send(data)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = ConsoleProtocol.find("".join(self._text), n)
                if result is not None:
                    return result
                if self._child.proc.poll() is not None:
                    raise GuestError(f"VMM exited during {command!r}; console:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"{command!r} did not finish in {timeout:.0f} s; console:\n{self.tail()}")
                self._cond.wait(min(left, 1.0))

    def wait_exit(self, timeout: float) -> int:
        rc = self._child.wait(timeout)
        if rc is None:
            raise GuestError(f"{self.launcher.name} still running after {timeout:.0f} s; console:\n{self.tail()}")
        return rc

    def stop(self, timeout: float = 60) -> int | None:
        """Ask the guest to reboot (which ends a Firecracker-style VMM), then make sure it is gone."""
        rc = self.exited()
        if rc is None:
            try:
                self.send(b"\nreboot -f\n")
                rc = self._child.wait(timeout)
            except (BrokenPipeError, OSError):
                rc = None
        self.kill()
        return rc if rc is not None else self._child.proc.returncode

    def kill(self) -> None:
        self._child.kill()
        if self._child.proc.stdin:
            try:
                self._child.proc.stdin.close()
            except OSError:
                pass
        self._log.close() if not self._log.closed else None

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


class GuestFactory:
    """Starts guests for one test and kills them all at teardown."""

    def __init__(self, images: GuestImages, workdir: Path) -> None:
        self.images, self.workdir = images, workdir
        self.guests: list[Guest] = []

    def start(self, launcher: Launcher, spec: VmSpec | None = None, **spec_kw) -> Guest:
        wd = self.workdir / f"vm{len(self.guests)}-{launcher.name}"
        wd.mkdir(parents=True, exist_ok=True)
        guest = Guest(launcher, spec or default_spec(self.images, wd, **spec_kw), wd)
        self.guests.append(guest)
        return guest

    def close(self) -> None:
        for g in self.guests:
            g.kill()


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)
