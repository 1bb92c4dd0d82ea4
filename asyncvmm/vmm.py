"""The VMM: one microVM's lifetime in this process, as the controller drives it.

:class:`Vmm` implements :class:`asyncvmm.controller.VmmBackend`.  It builds
the machine (through :mod:`asyncvmm.builder`), runs and pauses its vCPUs,
forwards device operations, and turns the ways a guest can end (reset,
power-off, triple fault, KVM failure) into one call of ``on_exit(code)``
after stopping every vCPU thread.  Everything here runs on the loop; vCPU
threads reach it only through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

import msgspec

from . import __version__
from .builder import (BuildContext, BuildError, MicroVm, Restore, build_microvm, hotplug_device,
                      unplug_device)
from .config import ConfigError, SnapshotCreateConfig, SnapshotLoadConfig, VmConfig
from .config.decode import decode
from .console import SerialConsole
from .devices.virtio.block import BlockFileError
from .devices.virtio.block.vhost_user import VhostUserBlock, VhostUserBlockError
from .devices.virtio.balloon import Balloon, BalloonError
from .devices.virtio.mem import VirtioMem, VirtioMemError
from .controller import BackendError, PciError, StartError, StartRequest
from .exitcodes import ExitCode
from .kvm import KvmError
from .kvm.kind import software_kvm_reason, software_kvm_warning
from .metrics import MetricsRegistry
from .pcislots import PciSlotError
from .mmds.store import MmdsStore
from .snapshot import kvmstate
from .snapshot.format import (MemoryRegionState, SnapshotFormatError, SnapshotState, read_state_file,
                              write_state_file)
from .snapshot.mmds import MmdsStateError, load_mmds, save_mmds
from .snapshot.memfile import dirty_ranges, rate_limiters, write_diff_file, write_memory_file
from .vcpu import Request, VcpuStopReason, install_kick_handler

log = logging.getLogger(__name__)

EXIT_CODES = {
    VcpuStopReason.GUEST_SHUTDOWN: ExitCode.OK,
    VcpuStopReason.GUEST_RESET: ExitCode.OK,
    VcpuStopReason.TRIPLE_FAULT: ExitCode.GENERIC_ERROR,
    VcpuStopReason.GUEST_CRASH: ExitCode.GENERIC_ERROR,
    VcpuStopReason.KVM_FAILURE: ExitCode.UNEXPECTED_ERROR,
}

VCPU_JOIN_TIMEOUT_S = 2.0


def _with_network_overrides(config: VmConfig, overrides) -> VmConfig:
    """The snapshot's interfaces, each override pointing one at another tap."""
    ifaces = list(config.network_interfaces)
    for override in overrides:
        index = next((i for i, n in enumerate(ifaces) if n.iface_id == override.iface_id), None)
        if index is None:
            raise BackendError(f"Invalid network override: the snapshot has no network interface "
                               f"`{override.iface_id}`")
        ifaces[index] = msgspec.structs.replace(ifaces[index], host_dev_name=override.host_dev_name)
    return msgspec.structs.replace(config, network_interfaces=ifaces)


QUIESCE_TIMEOUT_S = 5.0


class Vmm:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, instance_id: str, boot_timer: bool,
                 metrics: MetricsRegistry, on_exit: Callable[[int], None],
                 stdin_fd: int | None = 0, stdout_fd: int = 1,
                 mmds_store: MmdsStore | None = None, seccomp: Any = None,
                 enable_pci: bool = False) -> None:
        self._loop = loop
        self._enable_pci = enable_pci    # --enable-pci: virtio devices on a PCI bus
        # asyncvmm.seccomp.ThreadFilters, or None for no filters (--no-seccomp, tests).
        self._seccomp = seccomp
        self.instance_id = instance_id
        self._boot_timer = boot_timer
        self._metrics = metrics
        self._on_exit = on_exit
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._serial_file: int | None = None
        self.machine: MicroVm | None = None
        self._config: VmConfig | None = None      # what the machine was built from
        # A snapshot was taken or loaded since dirty logging began: a Diff holds only the
        # pages dirtied since then.  Until then a Diff holds every page (the VMM itself
        # wrote the kernel and boot tables, which KVM's dirty log does not see).
        self._has_diff_base = False
        self._console: SerialConsole | None = None
        self._exiting = False
        # The data store the API's PUT/PATCH /mmds write; the guest reads the same one.
        self.mmds_store = mmds_store if mmds_store is not None else MmdsStore()

    # -- lifecycle -------------------------------------------------------------

    async def start(self, config: VmConfig, requested_at: StartRequest | None = None, *,
                    restore: Restore | None = None, resume: bool = True) -> None:
        requested_at = requested_at or StartRequest.now()
        install_kick_handler()
        reason = software_kvm_reason()
        if reason is not None:
            log.warning("%s", software_kvm_warning(reason))
        console = SerialConsole(self._loop, self._stdin_fd)
        ctx = BuildContext(
            loop=self._loop, metrics=self._metrics, on_vcpu_stop=self._on_vcpu_stop,
            on_guest_reset=lambda: self._from_vcpu(ExitCode.OK, "the guest reset the i8042"),
            on_guest_poweroff=lambda: self._from_vcpu(ExitCode.OK, "the guest powered off (ACPI S5)"),
            serial_out=self._serial_sink(config), serial_on_rx_space=console.on_rx_space,
            boot_timer=self._boot_timer, start_ns=requested_at.monotonic_ns,
            start_cpu_ns=requested_at.cpu_ns, mmds_store=self.mmds_store, restore=restore,
            pci=self._enable_pci)
        try:
            machine = build_microvm(config, ctx)
        except BuildError as e:
            self._close_serial_file()
            raise StartError(str(e)) from e
        self.machine, self._console, self._config = machine, console, config
        self._build_ctx = ctx
        console.attach(machine.serial)
        for vcpu in machine.vcpus:
            if self._seccomp is not None:  # each vCPU thread filters itself before guest code
                vcpu.before_run = lambda: self._seccomp.install("vcpu")
            vcpu.start()
        if self._seccomp is not None:
            # The loop thread's own filter, once the vCPU threads exist (they must not inherit it)
            # and before the guest runs; threads the loop starts from now on inherit it.
            try:
                self._seccomp.install("vmm")
            except OSError as e:
                self.close()        # the vCPU threads, KVM fds and memory of this attempt
                raise StartError(f"Cannot install the seccomp filter: {e}") from e
        if resume:
            await self._request_all(Request.RESUME)
        log.info("%s microVM with %d vCPU(s), %d MiB; command line: %s",
                 "Restored" if restore is not None else "Started",
                 len(machine.vcpus), config.machine_config.mem_size_mib, machine.cmdline)

    def _serial_sink(self, config: VmConfig) -> Callable[[bytes], None]:
        path = config.serial.serial_out_path if config.serial else None
        if path:
            try:
                self._serial_file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                            0o600)
            except OSError as e:
                raise StartError(f"Cannot open the serial output file {path}: {e}") from e
            fd = self._serial_file
        else:
            fd = self._stdout_fd
        return lambda data: os.write(fd, data)

    def _close_serial_file(self) -> None:
        if self._serial_file is not None:
            os.close(self._serial_file)
            self._serial_file = None

    async def _request_all(self, req: Request) -> None:
        assert self.machine is not None
        futures = [vcpu.request(req) for vcpu in self.machine.vcpus]
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    async def pause(self) -> None:
        await self._request_all(Request.PAUSE)

    async def resume(self) -> None:
        await self._request_all(Request.RESUME)

    async def send_ctrl_alt_del(self) -> None:
        assert self.machine is not None
        self.machine.i8042.send_ctrl_alt_del()

    # -- the end ------------------------------------------------------------------

    def _from_vcpu(self, code: int, why: str) -> None:
        """A device on a vCPU thread asks to end the VMM."""
        self._loop.call_soon_threadsafe(self.exit, code, why)

    def _on_vcpu_stop(self, index: int, reason: VcpuStopReason, detail: str) -> None:
        code = EXIT_CODES[reason]
        level = logging.INFO if code == ExitCode.OK else logging.ERROR
        log.log(level, "vCPU %d stopped the microVM: %s (%s)", index, reason.value, detail)
        self.exit(code, reason.value)

    def exit(self, code: int, why: str) -> None:
        """Stop every vCPU, release the machine and report ``code`` once."""
        if self._exiting:
            return
        self._exiting = True
        log.info("Vmm is stopping: %s; exit code %d", why, code)
        self.close()
        self._on_exit(int(code))

    def close(self) -> None:
        machine, self.machine = self.machine, None
        if machine is not None:
            for vcpu in machine.vcpus:
                vcpu.request(Request.EXIT)
            deadline = time.monotonic() + VCPU_JOIN_TIMEOUT_S
            for vcpu in machine.vcpus:
                vcpu.join(max(0.0, deadline - time.monotonic()))
            stuck = [v.index for v in machine.vcpus if v.is_alive()]
            if stuck:
                log.error("vCPU thread(s) %s did not stop; leaving their resources to process exit",
                          stuck)
            else:
                machine.close()
        if self._console is not None:
            self._console.close()
            self._console = None
        self._close_serial_file()

    # -- operations of later features ---------------------------------------------

    async def update_drive(self, drive_id: str, path_on_host: str | None, rate_limiter) -> None:
        assert self.machine is not None
        block = self.machine.blocks.get(drive_id)
        if block is None:
            raise BackendError(f"Invalid block device ID: {drive_id}")
        if isinstance(block, VhostUserBlock):
            # Firecracker: no file and no rate limiter to change; without fields, the back
            # end's config is read again and the guest told (a resized disk).
            if path_on_host is not None or rate_limiter is not None:
                raise BackendError("Running method expected different backend.")
            try:
                block.config_update()
            except VhostUserBlockError as e:
                raise BackendError(str(e)) from e
            return
        try:
            if path_on_host is not None:
                block.update_path(path_on_host)
            if rate_limiter is not None:
                block.update_rate_limiter(rate_limiter)
        except (BlockFileError, OSError, ValueError) as e:
            raise BackendError(f"Unable to patch the block device: {e}") from e

    async def update_network_interface(self, iface_id: str, rx, tx) -> None:
        """PATCH /network-interfaces: new rx/tx rate limiters (absent ones stay)."""
        assert self.machine is not None
        net = self.machine.nets.get(iface_id)
        if net is None:
            raise BackendError(f"Invalid network interface ID: {iface_id}")
        try:
            net.update_rate_limiters(rx, tx)
        except ValueError as e:
            raise BackendError(f"Unable to patch the network interface: {e}") from e


    async def update_pmem(self, pmem_id: str, rate_limiter) -> None:
        """PATCH /pmem: new flush rate limiter buckets (absent ones stay)."""
        assert self.machine is not None
        pmem = self.machine.pmems.get(pmem_id)
        if pmem is None:
            raise BackendError("Failed perform action on device: Device not found")
        try:
            pmem.update_rate_limiter(rate_limiter)
        except ValueError as e:
            raise BackendError(str(e)) from e

    # -- PCI hot-plug ----------------------------------------------------------------

    async def hotplug_drive(self, drive) -> None:
        """PUT /drives after boot with --enable-pci: a new virtio-blk function on the bus."""
        self._hotplug(drive)

    async def hotplug_network_interface(self, iface) -> None:
        """PUT /network-interfaces after boot with --enable-pci."""
        self._hotplug(iface)

    async def hotplug_pmem(self, pmem) -> None:
        """PUT /pmem after boot with --enable-pci: a new virtio-pmem function and its region."""
        self._hotplug(pmem)

    def _hotplug(self, cfg) -> None:
        assert self.machine is not None
        try:
            hotplug_device(self.machine, self._build_ctx, cfg)
        except PciSlotError as e:
            raise PciError(f"PCI root error: {e}") from None
        except BuildError as e:
            raise BackendError(str(e)) from None

    @property
    def pci_enabled(self) -> bool:
        """The microVM has a PCI bus (--enable-pci, or a snapshot of such a microVM)."""
        if self.machine is not None:
            return self.machine.pci is not None
        return self._enable_pci

    async def unplug_device(self, kind: str, device_id: str) -> None:
        """DELETE /drives|network-interfaces|pmem/{id} after boot: the guest removed the device first."""
        assert self.machine is not None
        prefix = {"drive": "block", "net": "net", "pmem": "pmem"}.get(kind)
        if prefix is None:
            raise BackendError("Device not found")
        try:
            unplug_device(self.machine, f"{prefix}:{device_id}", self._metrics)
        except BuildError as e:
            raise BackendError(str(e)) from None
        except OSError as e:        # the host refused a deassign (KVM, vhost): the device stays
            raise PciError(f"cannot take {device_id} off the bus: {e}") from None

    async def create_snapshot(self, params: SnapshotCreateConfig, config: VmConfig) -> None:
        """Write the paused microVM's state file and memory file (docs/snapshots.md).

        ``config`` is the controller's current configuration (``GET /vm/config``): what the
        microVM was built from with every post-boot PATCH (a drive's new file, new rate
        limits) applied, so the restore opens what the microVM uses now."""
        assert self.machine is not None and self._config is not None
        machine = self.machine
        hotplug = machine.memory_hotplug
        if hotplug is not None and params.snapshot_type == "Diff":
            raise BackendError("Diff snapshots of a microVM with memory hotplug (virtio-mem) are not "
                               "supported yet by asyncvmm.")
        await self._quiesce_virtio(machine)
        tracking = self._config.machine_config.track_dirty_pages
        if params.snapshot_type == "Diff" and self._config.machine_config.huge_pages != "None":
            raise BackendError("Diff snapshots of a microVM backed by huge pages are not supported "
                               "yet by asyncvmm.")
        try:
            vm_state = kvmstate.save_vm(machine.vm)
            vcpus = [kvmstate.save_vcpu(v.fd, machine.msr_indices) for v in machine.vcpus]
            # Reading the dirty log also clears it: the next Diff holds what changes from now on.
            dirty = self._dirty_ranges(machine) if tracking else None
        except KvmError as e:
            raise BackendError(f"Cannot read the microVM's KVM state: {e}") from e
        diff = params.snapshot_type == "Diff" and self._has_diff_base
        regions, offset = [], 0
        for r in machine.mem.regions:
            regions.append(MemoryRegionState(guest_addr=r.guest_addr, size=r.size, file_offset=offset))
            offset += r.size
        # The hotpluggable region follows boot RAM in the memory file (unplugged blocks: holes).
        ram_size = offset
        if hotplug is not None:
            offset += hotplug.region_size
        state = SnapshotState(
            asyncvmm_version=__version__, snapshot_type=params.snapshot_type,
            config=msgspec.json.encode(config), memory=regions, memory_file_size=offset,
            vm=vm_state, vcpus=vcpus,
            devices={"serial": machine.serial.save_state(), "i8042": machine.i8042.save_state(),
                     "virtio": [t.save_state() for t in machine.transports],
                     "virtio_ids": list(machine.transport_ids),
                     **({"pci_slots": {i: machine.pci.slot_of(t) for i, t in
                                       zip(machine.transport_ids, machine.transports)}}
                        if machine.pci is not None else {}),
                     "rate_limiters": {name: limiter.save_state()
                                       for name, limiter in rate_limiters(machine).items()},
                     **({"balloon": machine.balloon.save_state()} if machine.balloon else {}),
                     **({"memory_hotplug": hotplug.save_state(ram_size)} if hotplug else {}),
                     **({"pmem": {i: p.save_state() for i, p in machine.pmems.items()}}
                        if machine.pmems else {})},
            mmds=save_mmds(self.mmds_store),
            dirty_ranges=(dirty if diff else [(0, offset)]) if params.snapshot_type == "Diff" else None)
        try:
            if diff:
                write_diff_file(params.mem_file_path, machine.mem, dirty)
            else:       # a Full one, or the first Diff of this process: every page
                write_memory_file(params.mem_file_path, machine.mem)
                if hotplug is not None:
                    hotplug.backing.write_file(params.mem_file_path, ram_size, hotplug.plugged_runs(),
                                               hotplug.block_size)
            write_state_file(params.snapshot_path, state)
        except (OSError, ValueError) as e:
            # The dirty logs were read (and so cleared) above: without a written base, the next
            # Diff must hold every page again.
            self._has_diff_base = False
            raise BackendError(f"Cannot write the snapshot: {e}") from e
        self._has_diff_base = tracking

    @staticmethod
    async def _quiesce_virtio(machine: MicroVm) -> None:
        """Wait until no virtio device has a request in flight (block I/O finishing on the
        loop while the vCPUs are paused): a snapshot cannot hold a half-done request."""
        deadline = time.monotonic() + QUIESCE_TIMEOUT_S
        while (busy := sum(t.in_flight() for t in machine.transports)):
            if time.monotonic() > deadline:
                raise BackendError(f"virtio devices still have {busy} requests in flight after "
                                   f"{QUIESCE_TIMEOUT_S:g} s; try again")
            await asyncio.sleep(0.005)

    @staticmethod
    def _dirty_ranges(machine: MicroVm) -> list[tuple[int, int]]:
        """The pages written since the last snapshot: KVM's log (the guest's writes) or'd
        with the VMM's own (its devices' writes, GuestMemory.track_dirty); reading clears both."""
        ranges, offset = [], 0
        for slot, region in enumerate(machine.mem.regions):
            kvm_log = machine.vm.get_dirty_log(slot, region.size)
            vmm_log = region.take_dirty()
            union = (int.from_bytes(kvm_log, "little") | int.from_bytes(vmm_log, "little"))
            bitmap = union.to_bytes(max(len(kvm_log), len(vmm_log)), "little")
            ranges.extend(dirty_ranges(bitmap, offset))
            offset += region.size
        return ranges

    async def load_snapshot(self, params: SnapshotLoadConfig) -> VmConfig:
        """Build the microVM from a snapshot (paused); returns the configuration it had."""
        try:
            state = read_state_file(params.snapshot_path)
        except SnapshotFormatError as e:
            raise BackendError(str(e)) from None
        try:
            config = decode(state.config, VmConfig)
        except ConfigError as e:
            raise BackendError(f"the snapshot's configuration is invalid: {e.message}") from None
        try:
            has_mmds, mmds_doc = load_mmds(state.mmds, self.mmds_store.limit_bytes)
        except MmdsStateError as e:
            raise BackendError(str(e)) from None
        config = _with_network_overrides(config, params.network_overrides)
        if params.vsock_override is not None:
            if config.vsock is None:
                raise BackendError("Invalid vsock override: the snapshot has no vsock device")
            config = msgspec.structs.replace(config, vsock=msgspec.structs.replace(
                config.vsock, uds_path=params.vsock_override.uds_path))
        config = msgspec.structs.replace(config, machine_config=msgspec.structs.replace(
            config.machine_config, track_dirty_pages=params.dirty_page_tracking()))
        backend = params.memory_backend()
        if backend.backend_type == "Uffd":
            restore = Restore(state=state, mem_fd=None, uffd_path=backend.backend_path,
                              clock_realtime=params.clock_realtime)
            await self.start(config, restore=restore, resume=False)
        else:
            try:
                mem_fd = os.open(backend.backend_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise BackendError(f"Cannot open the memory file {backend.backend_path}: "
                                   f"{os.strerror(e.errno)} (os error {e.errno})") from None
            try:
                await self.start(config, restore=Restore(state=state, mem_fd=mem_fd,
                                                         clock_realtime=params.clock_realtime),
                                 resume=False)
            finally:
                os.close(mem_fd)      # the private mapping keeps the file
        if has_mmds:      # checked above; before the guest runs, so it never sees the old store
            self.mmds_store.put(mmds_doc)
        if params.resume_vm:
            await self.resume()
        # Dirty logging starts with the restored memory: a Diff is relative to this snapshot.
        self._has_diff_base = config.machine_config.track_dirty_pages
        return config

    def _virtio_mem(self) -> VirtioMem:
        device = self.machine.memory_hotplug if self.machine is not None else None
        if device is None:
            raise BackendError("Failed perform action on device: Device not found")
        return device

    async def memory_hotplug_status(self) -> dict[str, Any]:
        """GET /hotplug/memory after boot."""
        return self._virtio_mem().status()

    async def update_memory_hotplug_size(self, requested_size_mib: int) -> None:
        """PATCH /hotplug/memory: a new requested size, told to the guest's driver."""
        try:
            self._virtio_mem().update_requested_size(requested_size_mib)
        except VirtioMemError as e:
            # Firecracker's VmmError::VirtioMem prints every device error with this prefix.
            raise BackendError(f"Failed to create memory hotplug device: {e}") from None

    def _balloon(self) -> Balloon:
        balloon = self.machine.balloon if self.machine is not None else None
        if balloon is None:
            raise BackendError("Failed perform action on device: Device not found")
        return balloon

    async def update_balloon(self, amount_mib: int) -> None:
        """PATCH /balloon: a new target; the guest's driver inflates or deflates to it."""
        try:
            self._balloon().update_size(amount_mib)
        except BalloonError as e:
            raise BackendError(f"Balloon: {e}") from None

    async def balloon_stats(self) -> dict[str, Any]:
        try:
            return self._balloon().stats()
        except BalloonError as e:
            raise BackendError(f"Balloon: {e}") from None

    async def update_balloon_stats(self, interval_s: int) -> None:
        try:
            self._balloon().update_stats_polling_interval(interval_s)
        except BalloonError as e:
            raise BackendError(f"Balloon: {e}") from None

    async def start_balloon_hinting(self, acknowledge_on_stop: bool) -> None:
        try:
            self._balloon().start_hinting(acknowledge_on_stop)
        except BalloonError as e:
            raise BackendError(f"Balloon: {e}") from None

    async def balloon_hinting_status(self) -> dict[str, Any]:
        try:
            return self._balloon().hinting_status()
        except BalloonError as e:
            raise BackendError(f"Balloon: {e}") from None

    async def stop_balloon_hinting(self) -> None:
        try:
            self._balloon().stop_hinting()
        except BalloonError as e:
            raise BackendError(f"Balloon: {e}") from None


