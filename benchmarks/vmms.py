"""How the benchmarks start each VMM, and the two control protocols they speak.

asyncvmm is started exactly like Firecracker (``--no-api --config-file`` or
``--api-sock`` plus ``PUT /boot-source``, ``PUT /machine-config``,
``PUT /actions InstanceStart``); its logs go to ``--log-path`` so stdout
carries only the guest console, as QEMU's ``-serial stdio`` does.

The peer is QEMU's ``microvm`` machine trimmed to what the test guest uses:
no option ROMs, PIT, PIC or RTC, one ISA serial port on stdio, 1 vCPU,
``-enable-kvm -cpu host,-arch-capabilities`` (kvm_pvm does not implement
MSR 0x10a, and QEMU aborts reading it), ``-no-reboot`` so a guest reset ends
the process.  Its API peer is QMP: QEMU started with ``-S`` (paused), then
``qmp_capabilities`` and ``cont`` over a Unix socket.

QEMU microvm has no i8042, so an ``exit=reset`` guest cannot leave it:
benchmarks use ``exit=halt`` and stop the process themselves, or
``exit=poweroff`` (both VMMs implement the ACPI sleep register).
"""

from __future__ import annotations

import compileall
import dataclasses
import functools
import http.client
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

QEMU = "qemu-system-x86_64"
QEMU_MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on"
QEMU_CPU = "host,-arch-capabilities"

GUEST_PREFIX = b"testguest: "
HELLO = b"testguest: hello"
BOOTTIMER_WRITTEN = b"testguest: boottimer written"
DONE = b"testguest: done"

_BOOT_TIME_RE = re.compile(r"Guest-boot-time = +(\d+) us")
_STARTUP_RE = re.compile(r"Process start-up took (\d+) us")


class ControlError(RuntimeError):
    """The VMM's API or QMP answered with an error or not at all."""


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    kernel: Path
    cmdline: str
    mem_mib: int = 128
    vcpus: int = 1

    @property
    def region_sizes_kib(self) -> list[int]:
        """Guest RAM regions as both VMMs lay them out (one below the 3 GiB MMIO gap)."""
        low = min(self.mem_mib, 3 * 1024)
        regions = [low * 1024]
        if self.mem_mib > low:
            regions.append((self.mem_mib - low) * 1024)
        return regions


def asyncvmm_executable() -> str:
    """The venv's ``asyncvmm`` script (next to this interpreter), its package byte-compiled.

    An editable install leaves the package as source; with ``PYTHONDONTWRITEBYTECODE`` set
    every start would compile it again (~180 ms here), which a regular install never does.
    """
    script = Path(sys.executable).with_name("asyncvmm")
    if not script.exists():
        raise FileNotFoundError(f"{script} is missing: install the package into the venv")
    _byte_compile_package()
    return str(script)


@functools.cache
def _byte_compile_package() -> None:
    import asyncvmm
    compileall.compile_dir(Path(asyncvmm.__file__).parent, quiet=1)


def load_test_guest(*, need_kvm: bool = True) -> Any:
    """The kvm-tier test guest's images (built when missing), or None after saying on stderr why
    not: the build failed, or ``need_kvm`` and /dev/kvm is missing or not accessible."""
    from tests.guest.build import TestGuestBuildError, build_test_guest
    try:
        images = build_test_guest()
    except TestGuestBuildError as err:
        print(f"cannot build the test guest: {err}", file=sys.stderr)
        return None
    if need_kvm and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("/dev/kvm is missing or not accessible", file=sys.stderr)
        return None
    return images


def asyncvmm_config(guest: GuestSpec) -> dict[str, Any]:
    return {"boot-source": {"kernel_image_path": str(guest.kernel), "boot_args": guest.cmdline},
            "machine-config": {"vcpu_count": guest.vcpus, "mem_size_mib": guest.mem_mib}}


def asyncvmm_config_argv(config_path: Path, log_path: Path, *, boot_timer: bool = True) -> list[str]:
    argv = [asyncvmm_executable(), "--no-api", "--config-file", str(config_path),
            "--log-path", str(log_path), "--level", "Info"]
    return argv + (["--boot-timer"] if boot_timer else [])


def asyncvmm_api_argv(sock_path: Path, log_path: Path, *, boot_timer: bool = True) -> list[str]:
    argv = [asyncvmm_executable(), "--api-sock", str(sock_path),
            "--log-path", str(log_path), "--level", "Info"]
    return argv + (["--boot-timer"] if boot_timer else [])


def qemu_microvm_argv(guest: GuestSpec, *, qmp_sock: Path | None = None,
                      extra: Sequence[str] = ()) -> list[str]:
    """QEMU microvm for ``guest``; ``extra`` arguments (devices, monitors) go before ``-S``/``-qmp``."""
    argv = [QEMU, "-M", QEMU_MACHINE, "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-enable-kvm", "-cpu", QEMU_CPU,
            "-smp", str(guest.vcpus), "-m", str(guest.mem_mib),
            "-kernel", str(guest.kernel), "-append", guest.cmdline, "-no-reboot", *extra]
    if qmp_sock is not None:
        argv += ["-S", "-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    return argv


def parse_boot_time_us(log_text: str) -> int | None:
    """asyncvmm's ``Guest-boot-time`` (microseconds since InstanceStart), if logged."""
    m = _BOOT_TIME_RE.search(log_text)
    return int(m[1]) if m else None


def parse_startup_us(log_text: str) -> int | None:
    """asyncvmm's ``Process start-up took`` (microseconds since its own first import)."""
    m = _STARTUP_RE.search(log_text)
    return int(m[1]) if m else None


class ApiClient:
    """HTTP/1.1 over one already connected Unix socket (kept alive across requests)."""

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        sock.settimeout(timeout)
        self._conn = http.client.HTTPConnection("localhost", timeout=timeout)
        self._conn.sock = sock               # http.client only connects when sock is None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            self._conn.request(method, path, body=payload, headers=headers)
            resp = self._conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as err:
            raise ControlError(f"{method} {path}: {err}") from err

    def put(self, path: str, body: Any) -> None:
        status, data = self.request("PUT", path, body)
        if status != 204:
            raise ControlError(f"PUT {path} -> {status}: {data[:300]!r}")

    def close(self) -> None:
        self._conn.close()


class QmpClient:
    """Just enough QMP: the greeting, capability negotiation, and commands."""

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        sock.settimeout(timeout)
        self._sock = sock
        self._file = sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise ControlError(f"not a QMP greeting: {greeting}")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except OSError as err:
            raise ControlError(f"QMP read: {err}") from err
        if not line:
            raise ControlError("QMP connection closed")
        try:
            return json.loads(line)
        except ValueError as err:
            raise ControlError(f"QMP sent non-JSON {line[:200]!r}") from err

    def execute(self, command: str) -> Any:
        try:
            self._sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        except OSError as err:
            raise ControlError(f"QMP {command}: {err}") from err
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise ControlError(f"QMP {command}: {msg['error']}")
            # anything else is an asynchronous event (e.g. RESUME): skip it

    def close(self) -> None:
        self._file.close()
        self._sock.close()
