"""One microVM process driven over Firecracker's API: spawn, configure, start, watch, stop.

``async with MicroVM(kernel, "console=ttyS0") as vm:`` spawns the VMM (by
default asyncvmm; ``binary=`` names any Firecracker-compatible executable),
waits until its API answers ``GET /``, applies the configuration, sends
``InstanceStart``, and on leaving the block always ends the process and
removes the API socket and the files it made.  The guest's serial console
(the VMM's stdout) and the VMM's stderr are captured into bounded buffers
while the VM runs; the VMM's stdin is a pipe (:meth:`MicroVM.write_console`).

Everything runs on the caller's event loop; no threads are started here.
The environment is passed through to the VMM (plus ``env=``), so settings
read from the environment, such as a fork-server mode, apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asyncvmm.client.api import DEFAULT_TIMEOUT_S, Client
from asyncvmm.client.config import apply_config, check_config
from asyncvmm.client.console import DEFAULT_LIMIT_CHARS, ConsoleBuffer, StreamEndedError
from asyncvmm.client.errors import ApiConnectionError, ConsoleTimeoutError, VmmExitedError

StrPath = str | os.PathLike[str]
STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 2.0     # output still in the pipes after the process ended
_POLL_S = 0.005


def default_binary() -> list[str]:
    """The ``asyncvmm`` console script next to this Python, else ``python -m asyncvmm.cli``."""
    script = Path(sys.executable).with_name("asyncvmm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "asyncvmm.cli"]


def parse_metrics_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines in ``data`` and how many bytes they took (a partly written
    last line is left for the next read)."""
    records = []
    used = data.rfind(b"\n") + 1
    for line in data[:used].splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"metrics line is not JSON ({err}): {line[:200]!r}") from None
    return records, used


class MicroVM:
    """One microVM process.

    What to boot: ``kernel``, ``boot_args``, ``initrd``, ``vcpus``/``mem_mib`` (machine-config;
    an unset one takes Firecracker's default, 1 vCPU / 128 MiB), ``drives`` and
    ``network_interfaces`` (dicts in the API's shape), ``config`` (a whole configuration in
    the ``--config-file`` / ``GET /vm/config`` shape; a resource may not be given both ways),
    ``mmds`` (the MMDS data store's contents).  ``start=False`` stops after spawning and
    configuring, leaving ``InstanceStart`` to the caller.

    How to run it: ``binary`` (a path, or an argv prefix; default :func:`default_binary`),
    ``vm_id`` (``--id``), ``level`` (``--level``), ``boot_timer`` (``--boot-timer``),
    ``enable_pci`` (``--enable-pci``: devices on PCI, hot-plug after boot), ``extra_args``
    (appended to the command line), ``env`` (added to the inherited environment).
    ``api_sock``, ``metrics_path`` and ``log_path`` default to files in
    ``workdir``, itself a new temporary directory unless given; the SDK removes the socket,
    and the work directory only when it made it.  ``api_timeout`` bounds each API request,
    ``start_timeout`` the wait for the API to answer, ``console_limit`` the characters of
    console (and of stderr) kept.
    """

    def __init__(
        self,
        kernel: StrPath | None = None,
        boot_args: str | None = None,
        *,
        initrd: StrPath | None = None,
        vcpus: int | None = None,
        mem_mib: int | None = None,
        drives: Sequence[Mapping[str, Any]] = (),
        network_interfaces: Sequence[Mapping[str, Any]] = (),
        config: Mapping[str, Any] | None = None,
        mmds: Mapping[str, Any] | None = None,
        start: bool = True,
        binary: StrPath | Sequence[StrPath] | None = None,
        vm_id: str | None = None,
        api_sock: StrPath | None = None,
        workdir: StrPath | None = None,
        metrics_path: StrPath | None = None,
        log_path: StrPath | None = None,
        level: str | None = None,
        boot_timer: bool = False,
        enable_pci: bool = False,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        api_timeout: float = DEFAULT_TIMEOUT_S,
        start_timeout: float = START_TIMEOUT_S,
        console_limit: int = DEFAULT_LIMIT_CHARS,
    ) -> None:
        self.config = self._merge_config(config, kernel, boot_args, initrd, vcpus, mem_mib, drives,
                                         network_interfaces)
        self.mmds = None if mmds is None else dict(mmds)
        self.start_on_enter = start
        if binary is None:
            self.argv0 = default_binary()
        elif isinstance(binary, (str, os.PathLike)):
            self.argv0 = [os.fspath(binary)]
        else:
            self.argv0 = [os.fspath(part) for part in binary]
        self.vm_id = vm_id
        # The work directory (a new temporary one unless given) holds whichever of the API
        # socket, metrics file and log file were not given; it is made by spawn().
        self._own_workdir = workdir is None
        self.workdir: Path | None = None if workdir is None else Path(workdir)
        self._paths = {"api.sock": api_sock, "metrics.json": metrics_path, "vmm.log": log_path}
        self.api_sock = self.metrics_path = self.log_path = Path()
        self.level = level
        self.boot_timer = boot_timer
        self.enable_pci = enable_pci
        self.extra_args = list(extra_args)
        self.env = None if env is None else dict(env)
        self.start_timeout = start_timeout
        self.api_timeout = api_timeout
        self._client: Client | None = None
        self.console = ConsoleBuffer(console_limit)
        self.stderr = ConsoleBuffer(console_limit)
        self.process: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._metrics_offset = 0
        self._metrics_records: list[dict[str, Any]] = []

    @staticmethod
    def _merge_config(config: Mapping[str, Any] | None, kernel: StrPath | None, boot_args: str | None,
                      initrd: StrPath | None, vcpus: int | None, mem_mib: int | None,
                      drives: Sequence[Mapping[str, Any]],
                      network_interfaces: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        merged = dict(config or {})
        given: dict[str, Any] = {}
        if kernel is not None:
            boot = {"kernel_image_path": os.fspath(kernel)}
            if boot_args is not None:
                boot["boot_args"] = boot_args
            if initrd is not None:
                boot["initrd_path"] = os.fspath(initrd)
            given["boot-source"] = boot
        elif boot_args is not None or initrd is not None:
            raise ValueError("boot_args and initrd need a kernel")
        if vcpus is not None or mem_mib is not None:
            given["machine-config"] = {"vcpu_count": 1 if vcpus is None else vcpus,
                                       "mem_size_mib": 128 if mem_mib is None else mem_mib}
        if drives:
            given["drives"] = [dict(d) for d in drives]
        if network_interfaces:
            given["network-interfaces"] = [dict(n) for n in network_interfaces]
        clash = sorted(k for k in given if merged.get(k) is not None)
        if clash:
            raise ValueError(f"{clash} given both as arguments and in config")
        merged.update(given)
        check_config(merged)
        return merged

    # -- life cycle --------------------------------------------------------------------

    async def __aenter__(self) -> MicroVM:
        try:
            await self.spawn()
            await self.configure()
            if self.start_on_enter:
                await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def argv(self) -> list[str]:
        argv = [*self.argv0, "--api-sock", str(self.api_sock), "--log-path", str(self.log_path),
                "--metrics-path", str(self.metrics_path)]
        if self.vm_id is not None:
            argv += ["--id", self.vm_id]
        if self.level is not None:
            argv += ["--level", self.level]
        if self.boot_timer:
            argv.append("--boot-timer")
        if self.enable_pci:
            argv.append("--enable-pci")
        return argv + self.extra_args

    async def spawn(self) -> dict[str, Any]:
        """Start the VMM process and wait until its API answers; returns ``GET /``'s body."""
        if self.process is not None:
            raise RuntimeError("this MicroVM was already spawned")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="asyncvmm-sdk-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.api_sock, self.metrics_path, self.log_path = (
            self.workdir / name if given is None else Path(given) for name, given in self._paths.items())
        if os.path.lexists(self.api_sock):
            # Another VMM's, or a stale one: its answers could be taken for ours, and it is not
            # ours to remove.
            raise FileExistsError(f"the API socket path {self.api_sock} is already in use")
        self._client = Client(self.api_sock, timeout=self.api_timeout)
        for path in (self.log_path, self.metrics_path):
            path.touch()      # Firecracker opens these without creating them
        self._metrics_offset = self.metrics_path.stat().st_size   # lines of an earlier run are not ours
        self.process = await asyncio.create_subprocess_exec(
            *self.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=None if self.env is None else {**os.environ, **self.env})
        assert self.process.stdout is not None and self.process.stderr is not None
        self._pumps = [asyncio.create_task(self._pump(self.process.stdout, self.console)),
                       asyncio.create_task(self._pump(self.process.stderr, self.stderr))]
        return await self._wait_for_api()

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, buffer: ConsoleBuffer) -> None:
        try:
            while data := await stream.read(65536):
                buffer.feed(data)
        finally:
            buffer.close()

    async def _wait_for_api(self) -> dict[str, Any]:
        async def poll() -> dict[str, Any]:
            while True:
                if self.api_sock.exists():
                    with contextlib.suppress(ApiConnectionError):
                        return await self.client.describe_instance()
                await asyncio.sleep(_POLL_S)

        process = self._running()
        answer = asyncio.ensure_future(poll())
        exited = asyncio.ensure_future(process.wait())
        try:
            done, _ = await asyncio.wait({answer, exited}, timeout=self.start_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if answer in done:
            return answer.result()
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)
        if exited in done:
            await self._drain()
            assert process.returncode is not None
            raise VmmExitedError(process.returncode, "its API socket", self.output())
        raise TimeoutError(f"the API at {self.api_sock} did not answer within {self.start_timeout} s:\n"
                           f"{self.output()[-2000:]}")

    async def configure(self) -> None:
        await apply_config(self.client, self.config)
        if self.mmds is not None:
            await self.client.put_mmds(self.mmds)

    async def start(self) -> None:
        await self.client.start_instance()

    @property
    def client(self) -> Client:
        """The API client for this VM's socket (from :meth:`spawn` on)."""
        if self._client is None:
            raise RuntimeError("the VMM was not spawned yet")
        return self._client

    def _running(self) -> asyncio.subprocess.Process:
        if self.process is None:
            raise RuntimeError("the VMM was not spawned yet")
        return self.process

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait(self, timeout: float | None = None) -> int:
        """The VMM's exit code (negative: the signal that ended it), once all its output is read."""
        process = self._running()
        await asyncio.wait_for(process.wait(), timeout)
        await self._drain()
        assert process.returncode is not None
        return process.returncode

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL if the VMM has not exited after ``timeout`` seconds."""
        process = self._running()
        if process.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                return await self.wait(timeout)
            except TimeoutError:
                self._signal(signal.SIGKILL)
        return await self.wait()

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._running().send_signal(signum)

    async def _drain(self) -> None:
        # A process the VMM started may still hold the pipes: read for a moment, then stop.
        pending = [t for t in self._pumps if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)

    async def close(self) -> None:
        """End the process if it still runs, stop reading its output, close the API client,
        and remove the API socket and (when the SDK made it) the work directory."""
        try:
            if self.process is not None:
                if self.process.returncode is None:
                    await self.stop()
                if self.process.stdin is not None:
                    self.process.stdin.close()
                await self._drain()
        finally:
            for task in self._pumps:
                task.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            if self._client is not None:
                await self._client.close()
                with contextlib.suppress(FileNotFoundError):
                    if self.api_sock.is_socket():
                        self.api_sock.unlink()
            if self._own_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- console -----------------------------------------------------------------------

    def output(self) -> str:
        """Console, stderr and log text, for error messages."""
        return self.console.text + self.stderr.text + self.log_text()

    async def wait_for_console(self, pattern: str | re.Pattern[str], timeout: float | None = 30.0,
                               start: int = 0) -> re.Match[str]:
        """Wait for a literal string or a compiled regex on the console, at or after absolute
        offset ``start`` (``vm.console.end`` for text that has not arrived yet)."""
        try:
            return await self.console.wait_for(pattern, timeout, start)
        except StreamEndedError:
            try:
                returncode = await self.wait(STOP_TIMEOUT_S)
            except TimeoutError:
                raise EOFError(f"the VMM closed its stdout but still runs; no {pattern!r} on the "
                               f"console:\n{self.console.text[-2000:]}") from None
            raise VmmExitedError(returncode, f"{pattern!r} on the console", self.output()) from None
        except TimeoutError:
            raise ConsoleTimeoutError(str(pattern), timeout or 0.0, self.console.text) from None

    async def write_console(self, data: bytes | str) -> None:
        """Send bytes to the guest's serial console (the VMM's stdin)."""
        stdin = self._running().stdin
        assert stdin is not None
        stdin.write(data.encode() if isinstance(data, str) else data)
        await stdin.drain()

    def log_text(self) -> str:
        """The VMM's log (``--log-path``) so far; empty before :meth:`spawn`."""
        if self._client is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- API shortcuts -----------------------------------------------------------------

    async def state(self) -> str:
        return (await self.client.describe_instance())["state"]

    async def pause(self) -> None:
        await self.client.pause()

    async def resume(self) -> None:
        await self.client.resume()

    async def send_ctrl_alt_del(self) -> None:
        await self.client.send_ctrl_alt_del()

    async def metrics(self) -> dict[str, Any]:
        """Ask the VMM to write a metrics line now (``FlushMetrics``, so the VM must be
        started) and return it: counters are deltas since the previous line."""
        await self.client.flush_metrics()
        records = self.read_metrics()
        if not records:
            raise RuntimeError(f"FlushMetrics succeeded but {self.metrics_path} has no line")
        return records[-1]

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every metrics line written so far (at InstanceStart, each minute, each flush)."""
        with open(self.metrics_path, "rb") as f:
            f.seek(self._metrics_offset)
            records, used = parse_metrics_lines(f.read())
        self._metrics_offset += used
        self._metrics_records += records
        return list(self._metrics_records)
