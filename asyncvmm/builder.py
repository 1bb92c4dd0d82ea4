"""The composition root: a :class:`~asyncvmm.config.VmConfig` becomes a running microVM.

This is the one place that knows every part: it creates the KVM VM and its
memory, loads the kernel, writes the boot tables (zero page or PVH start
info, ACPI, MP table), creates the legacy and virtio devices with their
irqfds and ioeventfds, and the vCPUs.  Everything it acquires is registered
on an ``ExitStack`` so a failure part-way releases it all and leaves the
VMM configurable (Firecracker's rule for a failed InstanceStart).

Order matters to KVM: the TSS address and the in-kernel irqchip come before
any vCPU; the PIT after the irqchip; irqfds after the irqchip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import mmap
import os
from typing import Callable

import msgspec

from .arch.x86_64 import cputemplate, layout, regs
from .arch.x86_64.acpi import AcpiError, PciHostBridge, create_acpi_tables
from .arch.x86_64.bootparams import BootParamsError, build_boot_params, write_cmdline
from .arch.x86_64.loader import KernelLoad, LoaderError, load_initrd, load_kernel
from .arch.x86_64.mptable import MpTableError, create_mptable
from .arch.x86_64.pvh import write_pvh_start_info
from .config import VmConfig
from .config.machine import DEFAULT_KERNEL_CMDLINE
from .devices.bus import Bus
from .devices.irq import EventFd, EventFdIrqLine
from .devices.legacy.acpi_pm import ACPI_PM_PORT_BASE, ACPI_PM_PORT_SIZE, AcpiPm
from .devices.legacy.boot_timer import BootTimer
from .devices.legacy.i8042 import I8042, I8042Metrics, I8042State
from .devices.legacy.serial import Serial, SerialMetrics, SerialState
from .devices.rate_limiter import RateLimiter, RateLimiterState, TokenBucket
from .devices.virtio.block import Block, BlockFileError, BlockMetrics, UnsupportedEngineError
from .devices.virtio.block.vhost_user import VhostUserBlock, VhostUserBlockError, VhostUserBlockMetrics
from .devices.virtio.device import VirtioDevice
from .devices.virtio.mmio import (VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_QUEUE_NOTIFY,
                                  TransportState, VirtioMmioTransport)
from .devices.virtio.mmio import PAGE_SIZE as VIRTIO_MMIO_PAGE
from .devices.virtio.pci import PciTransportState
from .devices.virtio.net import Net, NetMetrics
from .devices.virtio.rng import EntropyMetrics, Rng
from .devices.virtio.pmem import Pmem, PmemMetrics, PmemState
from .devices.virtio.vsock import Vsock, VsockBackendError, VsockMetrics
from .devices.virtio.balloon import Balloon, BalloonMetrics
from .devices.virtio.balloon.device import BalloonState
from .devices.virtio.mem import VirtioMem, VirtioMemMetrics
from .devices.virtio.mem.device import VirtioMemState
from .devices.virtio.mem.backing import HotplugBacking
from .kvm import Kvm, KvmError, VmFd
from .kvm.structs import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from .guestfault import GuestFaultMetrics, GuestFaults
from .irqroute import GsiRouter
from .memory import GuestMemory
from .metrics import MetricsRegistry, SummedGroup
from .mmds import (DEFAULT_MMDS_IPV4, MmdsHttpHandler, MmdsMetrics, MmdsNetworkStack, MmdsStore,
                   MmdsVersion, TokenAuthority)
from .net.tap import Tap, TapError
from .pcislots import PciSlotError, PciSlots
from .pmemslots import PmemBacking, PmemError, PmemRegions, nr_memslots
from .snapshot import kvmstate
from .snapshot.memfile import rate_limiters
from .snapshot.uffd import UffdError, register_and_send
from .snapshot.format import SnapshotFormatError, SnapshotState
from .vcpu import Vcpu, VcpuMetrics, VcpuStopReason

log = logging.getLogger(__name__)

KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000
MiB = 1 << 20


HUGE_PAGES_NEED_UFFD = ("a snapshot of a microVM backed by huge pages loads only with the Uffd "
                        "memory backend (as in Firecracker): the File backend cannot map a "
                        "memory file onto huge pages")


MEMORY_HOTPLUG_UFFD = ("a snapshot of a microVM with memory hotplug (virtio-mem) loads only with "
                       "the File memory backend in asyncvmm")


class BuildError(Exception):
    """The microVM could not be built; the message is for the API client."""


@dataclasses.dataclass
class BuildContext:
    """What the builder needs from the VMM process besides the configuration."""

    loop: asyncio.AbstractEventLoop
    metrics: MetricsRegistry
    on_vcpu_stop: Callable[[int, VcpuStopReason, str], None]
    on_guest_reset: Callable[[], None]        # i8042 reset: ends the VMM with 0
    on_guest_poweroff: Callable[[], None]     # ACPI S5: ends the VMM with 0
    serial_out: Callable[[bytes], None] | None
    serial_on_rx_space: Callable[[], None] | None = None
    boot_timer: bool = False
    start_ns: int = 0
    start_cpu_ns: int = 0
    kvm_path: str = "/dev/kvm"
    mmds_store: MmdsStore | None = None       # the API's data store (a fresh one if None)
    restore: "Restore | None" = None          # build from a snapshot instead of booting
    pci: bool = False                         # --enable-pci: virtio devices on PCI, not virtio-mmio


@dataclasses.dataclass
class Restore:
    """A snapshot to restore: its state, and its memory file mapped privately (copy-on-write)."""

    state: SnapshotState
    mem_fd: int | None                        # the memory file (File backend)
    uffd_path: str | None = None              # the page-fault handler's socket (Uffd backend)
    clock_realtime: bool = False              # advance kvmclock by the wall time since the snapshot


@dataclasses.dataclass
class MicroVm:
    """A built machine; :meth:`close` releases everything it holds."""

    vm: VmFd
    mem: GuestMemory
    vcpus: list[Vcpu]
    pio_bus: Bus
    mmio_bus: Bus
    serial: Serial
    i8042: I8042
    boot_timer: BootTimer | None
    blocks: dict[str, Block]
    rng: Rng | None
    kernel: KernelLoad | None                 # None for a microVM restored from a snapshot
    cmdline: str
    resources: contextlib.ExitStack
    nets: dict[str, Net] = dataclasses.field(default_factory=dict)
    vsock: Vsock | None = None
    balloon: Balloon | None = None
    msr_indices: list[int] = dataclasses.field(default_factory=list)   # what a snapshot saves
    transports: list = dataclasses.field(default_factory=list)   # virtio transports, attach order
    transport_ids: list[str] = dataclasses.field(default_factory=list)   # the device of each
    pci: PciSlots | None = None               # the PCI bus (--enable-pci)
    hotplugged: dict[str, contextlib.ExitStack] = dataclasses.field(default_factory=dict)
    memory_hotplug: VirtioMem | None = None   # the virtio-mem device (PUT /hotplug/memory)
    pmems: dict[str, Pmem] = dataclasses.field(default_factory=dict)
    pmem_regions: PmemRegions | None = None

    def close(self) -> None:
        self.resources.close()


def kernel_cmdline(config: VmConfig, virtio_windows: list[tuple[int, int, int]], *,
                   pci: bool = False) -> str:
    """boot_args (or Firecracker's default), then what Firecracker v1.16 appends after them.

    That is ``pci=off`` when there is no PCI bus (appended even when boot_args has it, as
    Firecracker does; never with ``--enable-pci``), the root device (a drive, or the
    n-th pmem device as ``/dev/pmem<n>``), and one ``virtio_mmio.device=`` per
    virtio-mmio device for kernels built with VIRTIO_MMIO_CMDLINE_DEVICES; others find
    the devices in the DSDT.
    """
    boot = config.boot_source
    parts = [boot.boot_args if boot and boot.boot_args is not None else DEFAULT_KERNEL_CMDLINE]
    if not pci:
        parts.append("pci=off")
    root = next((d for d in config.drives if d.is_root_device), None)
    if root is not None:
        dev = f"PARTUUID={root.partuuid}" if root.partuuid else "/dev/vda"
        parts.append(f"root={dev} {'ro' if root.is_read_only else 'rw'}")
    for index, pmem in enumerate(config.pmem):
        if pmem.root_device:
            parts.append(f"root=/dev/pmem{index} {'ro' if pmem.read_only else 'rw'}")
    for base, size, gsi in virtio_windows:
        parts.append(f"virtio_mmio.device={size // 1024}K@{base:#x}:{gsi}")
    return " ".join(p for p in parts if p)


def _create_memory(vm: VmFd, mem_size_mib: int, stack: contextlib.ExitStack,
                   restore: Restore | None = None, huge_pages: bool = False,
                   shared: bool = False) -> GuestMemory:
    size = mem_size_mib * MiB
    try:
        ram = layout.ram_layout(size)
        if restore is not None:
            mem = _snapshot_memory(ram, restore, stack, huge_pages)
        elif shared:                    # a vhost-user backend maps guest RAM from the memfd
            mem = GuestMemory.memfd(ram, huge_pages=huge_pages)
        elif huge_pages:
            mem = GuestMemory.hugetlb_2m(ram)
        else:
            mem = GuestMemory.anonymous(ram)
    except (ValueError, OSError) as e:
        hint = (" (2 MiB huge pages come from the host's pool: /proc/sys/vm/nr_hugepages)"
                if huge_pages else "")
        raise BuildError(f"Cannot allocate {mem_size_mib} MiB of guest memory: {e}{hint}") from e
    stack.callback(mem.close)
    return mem


def _register_memory(vm: VmFd, mem: GuestMemory, track_dirty_pages: bool) -> None:
    """One KVM slot per region; with dirty page tracking KVM logs the pages the guest writes."""
    flags = KVM_MEM_LOG_DIRTY_PAGES if track_dirty_pages else 0
    if track_dirty_pages:
        mem.track_dirty()         # and the VMM logs its own writes (a Diff takes both)
    for slot, region in enumerate(mem.regions):
        vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr, flags)


def _snapshot_memory(ram: list[tuple[int, int]], restore: Restore,
                     stack: contextlib.ExitStack, huge_pages: bool = False) -> GuestMemory:
    """The memory file mapped MAP_PRIVATE: pages are read on first touch and copied on first
    write, so restore time does not grow with guest size and many microVMs share one file."""
    saved = [(r.guest_addr, r.size) for r in restore.state.memory]
    if saved != list(ram):
        raise BuildError(f"the snapshot's memory regions {saved} do not match the machine's {ram}")
    offsets = [r.file_offset for r in restore.state.memory]
    expected = [sum(size for _, size in ram[:i]) for i in range(len(ram))]
    if offsets != expected:
        raise BuildError("the snapshot's memory regions are not laid out back to back in the file")
    if restore.uffd_path is not None:
        mem = GuestMemory.hugetlb_2m(ram) if huge_pages else GuestMemory.anonymous(ram)
        for region in mem.regions:      # untouched pages are the handler's, not zero
            region.anonymous = False
        try:
            uffd = register_and_send(mem, offsets, restore.uffd_path)
        except UffdError as e:
            mem.close()
            raise BuildError(str(e)) from e
        stack.callback(os.close, uffd)
        return mem
    if huge_pages:
        raise BuildError(HUGE_PAGES_NEED_UFFD)
    have = os.fstat(restore.mem_fd).st_size
    need = restore.state.memory_file_size
    if have < need or need < sum(size for _, size in ram):
        raise BuildError(f"the memory file has {have} bytes; the snapshot state says {need}")
    return GuestMemory.from_file(restore.mem_fd, ram, private=True)


def _irq_line(vm: VmFd, gsi: int, stack: contextlib.ExitStack) -> EventFdIrqLine:
    line = EventFdIrqLine(gsi)
    stack.callback(line.eventfd.close)
    vm.register_irqfd(line.eventfd.fd, gsi)
    return line


def _load_boot_image(config: VmConfig, mem: GuestMemory, cmdline: str, rsdp_addr: int,
                     reserved: list[tuple[int, int]]) -> tuple[KernelLoad, regs.BootEntry]:
    boot = config.boot_source
    try:
        kernel = load_kernel(mem, boot.kernel_image_path)
        initrd = None
        if boot.initrd_path:
            initrd = load_initrd(mem, boot.initrd_path, kernel_end=kernel.kernel_end,
                                 initrd_addr_max=kernel.initrd_addr_max).as_tuple()
        cmdline_len = write_cmdline(mem, cmdline, max_len=kernel.cmdline_max_len)
        ram = [(r.guest_addr, r.size) for r in mem.regions]
        if kernel.pvh_entry is not None:
            write_pvh_start_info(mem, mem_layout=ram, cmdline_addr=layout.CMDLINE_START,
                                 initrd=initrd, rsdp_addr=rsdp_addr, reserved=reserved)
            return kernel, regs.BootEntry(kernel.pvh_entry, pvh=True)
        zero_page = build_boot_params(mem_layout=ram, cmdline_addr=layout.CMDLINE_START,
                                      cmdline_len=cmdline_len, initrd=initrd,
                                      setup_header=kernel.setup_header, acpi_rsdp_addr=rsdp_addr,
                                      reserved=reserved)
        mem.write(layout.ZERO_PAGE_START, zero_page)
        return kernel, regs.BootEntry(kernel.entry)
    except OSError as e:
        raise BuildError(f"Cannot load kernel due to invalid memory configuration or invalid "
                         f"kernel image: {e}") from e
    except (LoaderError, BootParamsError) as e:
        raise BuildError(f"Cannot load kernel due to invalid memory configuration or invalid "
                         f"kernel image: {e}") from e


def build_microvm(config: VmConfig, ctx: BuildContext) -> MicroVm:
    """Create everything for ``config``; vCPU threads exist but stay paused."""
    try:
        return _build(config, ctx)
    except KvmError as e:
        raise BuildError(f"KVM refused the VM set-up: {e}") from e
    except cputemplate.CpuTemplateError as e:
        raise BuildError(str(e)) from e


def _build(config: VmConfig, ctx: BuildContext) -> MicroVm:
    restore = ctx.restore
    if config.boot_source is None:
        raise BuildError("Cannot start microvm without kernel configuration.")
    mc = config.machine_config
    if mc.huge_pages != "None" and config.balloon is not None:
        raise BuildError("A balloon device cannot be used with huge pages (as in Firecracker): "
                         "inflating it would give no memory back.")
    if config.memory_hotplug is not None:
        for device in [*config.drives, *config.network_interfaces]:
            _refuse_vhost_with_memory_hotplug(device)
    with contextlib.ExitStack() as stack:
        try:
            kvm = Kvm(ctx.kvm_path)
        except KvmError as e:
            raise BuildError(f"Cannot open /dev/kvm: {e}") from e
        stack.callback(kvm.close)
        template = _cpu_template(config, kvm, restore)
        vm = kvm.create_vm()
        stack.callback(vm.close)
        vm.set_tss_address(KVM_TSS_ADDRESS)
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        vm.create_irqchip()
        vm.create_pit2()
        mem = _create_memory(vm, mc.mem_size_mib, stack, restore, huge_pages=mc.huge_pages == "2M",
                             shared=any(d.socket is not None for d in config.drives))
        _register_memory(vm, mem, mc.track_dirty_pages)

        # Port I/O is answered on the vCPU threads (per-device locks); the MMIO bus belongs
        # to the loop, where vCPU threads hand their accesses (vcpu.py), so it has no locks.
        faults = GuestFaults(_register(ctx.metrics, "guest_faults", GuestFaultMetrics()))
        pio_bus = Bus("pio", locked=True, faults=faults)
        mmio_bus = Bus("mmio", locked=False, faults=faults)
        serial_limit = config.serial.rate_limiter if config.serial is not None else None
        serial = Serial(_irq_line(vm, layout.IRQ_COM1, stack), ctx.serial_out,
                        metrics=_register(ctx.metrics, "uart", SerialMetrics()),
                        on_rx_space=ctx.serial_on_rx_space,
                        out_limiter=TokenBucket.from_config(serial_limit) if serial_limit else None)
        pio_bus.insert(layout.COM1_PORT, 8, serial)
        i8042 = I8042(_irq_line(vm, layout.IRQ_I8042, stack), ctx.on_guest_reset,
                      metrics=_register(ctx.metrics, "i8042", I8042Metrics()))
        pio_bus.insert(layout.I8042_PORT, 5, i8042)
        pio_bus.insert(ACPI_PM_PORT_BASE, ACPI_PM_PORT_SIZE, AcpiPm(ctx.on_guest_poweroff))
        boot_timer = None
        if ctx.boot_timer:
            boot_timer = BootTimer(ctx.start_ns, ctx.start_cpu_ns)
            mmio_bus.insert(layout.BOOT_TIMER_ADDR, layout.BOOT_TIMER_SIZE, boot_timer)

        # The PCI CONFIG_ADDRESS/DATA ports belong to the loop, like the MMIO bus.
        loop_pio_bus = Bus("pio", locked=False, faults=faults)
        # A snapshot is restored on the transport it was taken on, whatever this process's flag.
        pci = "pci_slots" in restore.state.devices if restore is not None else ctx.pci
        if pci:
            router = GsiRouter(vm)
            slots = PciSlots(vm, mem, mmio_bus, loop_pio_bus, ctx.loop, faults, router)
            stack.callback(slots.close)
            saved_slots = restore.state.devices["pci_slots"] if restore is not None else None
            virtio = _PciAttach(slots, saved_slots)
        else:
            virtio = _VirtioSlots(vm, mem, mmio_bus, ctx.loop, stack, faults)
        balloon_device = None
        if config.balloon is not None:
            b = config.balloon
            balloon_device = Balloon(
                amount_mib=b.amount_mib, deflate_on_oom=b.deflate_on_oom,
                stats_polling_interval_s=b.stats_polling_interval_s,
                free_page_hinting=b.free_page_hinting, free_page_reporting=b.free_page_reporting,
                mem_size_mib=mc.mem_size_mib,
                metrics=_register(ctx.metrics, "balloon", BalloonMetrics()))
        balloon = None
        if balloon_device is not None and pci:
            # Firecracker 1.16 attaches the balloon first, so on PCI it is 00:01.0 ahead of the
            # drives (clients work out BDFs from that order).  virtio-mmio keeps the order its
            # snapshots were taken with.
            balloon = virtio.attach(balloon_device, "balloon")
        blocks = {}
        # The root device goes first so that it is /dev/vda, as the command line says.
        for drive in sorted(config.drives, key=lambda d: not d.is_root_device):
            blocks[drive.drive_id] = virtio.attach(_block_device(drive, ctx, stack),
                                                   f"block:{drive.drive_id}")
        nets = {}
        mmds_stacks = _mmds_stacks(config, ctx)
        for iface in config.network_interfaces:
            nets[iface.iface_id] = virtio.attach(
                _net_device(iface, mmds_stacks.get(iface.iface_id), ctx, stack),
                f"net:{iface.iface_id}")
        pmem_regions = PmemRegions(vm, mem.end)
        saved_pmem = restore.state.devices.get("pmem", {}) if restore is not None else {}
        pmems = {}
        for cfg in config.pmem:
            try:
                device = _pmem_device(cfg, ctx, stack, pmem_regions, saved_pmem.get(cfg.id))
            except PmemError as e:
                raise BuildError(f"Cannot create pmem device: {e}") from e
            pmems[cfg.id] = virtio.attach(device, f"pmem:{cfg.id}")
        vsock = None
        if config.vsock is not None:
            vsock = virtio.attach(_vsock_device(config.vsock, ctx), "vsock")
        rng = None
        if config.entropy is not None:
            rng = virtio.attach(Rng(RateLimiter.from_config(config.entropy.rate_limiter),
                                    _register(ctx.metrics, "entropy", EntropyMetrics())), "entropy")
        if balloon_device is not None and not pci:
            balloon = virtio.attach(balloon_device, "balloon")
        memory_hotplug = None
        if config.memory_hotplug is not None:
            memory_hotplug = virtio.attach(_virtio_mem(config.memory_hotplug, vm, mem, ctx, stack, restore),
                                           "memory_hotplug")
        virtio.map_register_pages()
        virtio_windows = virtio.windows
        cmdline = kernel_cmdline(config, virtio_windows, pci=pci)
        if restore is not None:
            msr_indices = kvm.msr_index_list()
            vcpus = _vcpus(vm, kvm, mc, pio_bus, loop_pio_bus, mmio_bus, ctx, stack, mem, entry=None,
                           template=template)
            machine = MicroVm(vm=vm, mem=mem, vcpus=vcpus, pio_bus=pio_bus, mmio_bus=mmio_bus,
                              serial=serial, i8042=i8042, boot_timer=boot_timer, blocks=blocks,
                              rng=rng, kernel=None, cmdline=cmdline, resources=stack,
                              nets=nets, vsock=vsock, balloon=balloon, msr_indices=msr_indices,
                              transports=virtio.transports, transport_ids=virtio.ids,
                              pci=virtio.slots if pci else None, pmems=pmems,
                              pmem_regions=pmem_regions, memory_hotplug=memory_hotplug)
            _restore_limiters(restore.state, machine)
            _restore_state(restore.state, vm, vcpus, serial, i8042, machine,
                           clock_realtime=restore.clock_realtime, balloon=balloon)
            if vsock is not None:
                # As Firecracker does after a load: the host side's connections are gone, and
                # the guest is told (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) to drop its own.
                vsock.transport_reset()
            machine.resources = stack.pop_all()
            return machine

        try:
            acpi = create_acpi_tables(vcpus=mc.vcpu_count, virtio_devices=virtio_windows,
                                      serial=True, i8042=True,
                                      pci=_host_bridge(virtio.slots) if pci else None)
            acpi.write_into(mem)
            mp_addr, mp_table = create_mptable(vcpus=mc.vcpu_count,
                                               extra_gsis=[gsi for _, _, gsi in virtio_windows])
            mem.write(mp_addr, mp_table)
        except (AcpiError, MpTableError) as e:
            raise BuildError(str(e)) from e

        reserved = [(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE)] if pci else []
        kernel, entry = _load_boot_image(config, mem, cmdline, acpi.rsdp_addr, reserved)
        log.info("Kernel %s loaded at %#x, entry %#x (%s)", config.boot_source.kernel_image_path,
                 kernel.load_addr, entry.entry_addr, "PVH" if entry.pvh else "64-bit boot protocol")

        msr_indices = kvm.msr_index_list()
        vcpus = _vcpus(vm, kvm, mc, pio_bus, loop_pio_bus, mmio_bus, ctx, stack, mem, entry,
                       template=template)
        resources = stack.pop_all()
    # KVM's fd for /dev/kvm is not needed once the VM exists.
    return MicroVm(vm=vm, mem=mem, vcpus=vcpus, pio_bus=pio_bus, mmio_bus=mmio_bus, serial=serial,
                   i8042=i8042, boot_timer=boot_timer, blocks=blocks, rng=rng, kernel=kernel,
                   cmdline=cmdline,
                   resources=resources, nets=nets, vsock=vsock, balloon=balloon,
                   msr_indices=msr_indices, transports=virtio.transports,
                   transport_ids=virtio.ids, pci=virtio.slots if pci else None,
                   memory_hotplug=memory_hotplug,
                   pmems=pmems, pmem_regions=pmem_regions)


def _cpu_template(config: VmConfig, kvm: Kvm, restore: Restore | None) -> cputemplate.CpuTemplate:
    """The CPU template (static or custom, docs/cpu-templates.md), checked against the host CPU
    (not for a restore: the guest already runs with it) and KVM's capabilities."""
    template = cputemplate.select_template(config.machine_config.cpu_template, config.cpu_config,
                                           kvm.supported_cpuid(), check_host=restore is None)
    cputemplate.check_capabilities(template, kvm.check_extension)
    return template


def _vcpus(vm: VmFd, kvm: Kvm, mc, pio_bus: Bus, loop_pio_bus: Bus, mmio_bus: Bus,
           ctx: BuildContext, stack: contextlib.ExitStack, mem: GuestMemory,
           entry: regs.BootEntry | None,
           template: cputemplate.CpuTemplate = cputemplate.CpuTemplate()) -> list[Vcpu]:
    """The vCPUs with their CPUID; the boot vCPU at ``entry`` (None: a snapshot sets them).

    The template's CPUID changes go onto KVM's supported CPUID before normalization; its MSR
    changes onto the values vCPU 0 reads (a snapshot brings its own MSRs)."""
    cpuid_base = cputemplate.apply_cpuid(kvm.supported_cpuid(), template)
    template_msrs: list[tuple[int, int]] = []
    vcpu_metrics = _register(ctx.metrics, "vcpu", SummedGroup(VcpuMetrics))
    vcpus = []
    for index in range(mc.vcpu_count):
        fd = vm.create_vcpu(index)
        stack.callback(fd.close)
        if index == 0 and template.msrs and entry is not None:
            template_msrs = cputemplate.apply_msrs(fd.get_msrs([a for a, _ in template.msrs]),
                                                   template)
        regs.configure_vcpu(fd, cpuid_base, vcpu_count=mc.vcpu_count, smt=mc.smt,
                            template_msrs=template_msrs)
        if index == 0 and entry is not None:
            regs.set_boot_registers(fd, mem, entry)
        vcpus.append(Vcpu(fd, pio_bus=pio_bus, pio_loop_bus=loop_pio_bus, mmio_bus=mmio_bus,
                          loop=ctx.loop,
                          on_stop=ctx.on_vcpu_stop, metrics=vcpu_metrics.new_part()))
    return vcpus


def _restore_limiters(state: SnapshotState, machine: MicroVm) -> None:
    """Each device's rate limiter budgets (its buckets come from the snapshot's configuration)."""
    try:
        saved = msgspec.convert(state.devices.get("rate_limiters", {}), dict[str, RateLimiterState])
        limiters = rate_limiters(machine)
        unknown = sorted(set(saved) - set(limiters))
        if unknown:
            raise ValueError(f"rate limiter state for devices the microVM lacks: {unknown}")
        for name, limiter_state in saved.items():
            limiters[name].restore_state(limiter_state)
    except (msgspec.ValidationError, ValueError) as e:
        raise BuildError(f"the snapshot's device state is invalid: {e}") from e


def _restore_state(state: SnapshotState, vm: VmFd, vcpus: list[Vcpu], serial: Serial,
                   i8042: I8042, machine: MicroVm, *,
                   clock_realtime: bool = False, balloon: Balloon | None = None) -> None:
    """The snapshot's VM, vCPU and device state, each through its validating setter."""
    transports = machine.transports
    if len(state.vcpus) != len(vcpus):
        raise BuildError(f"the snapshot has {len(state.vcpus)} vCPU states for {len(vcpus)} vCPUs")
    try:
        serial.restore_state(msgspec.convert(state.devices.get("serial"), SerialState))
        i8042.restore_state(msgspec.convert(state.devices.get("i8042"), I8042State))
        saved_balloon = state.devices.get("balloon")
        if (saved_balloon is None) != (balloon is None):
            raise ValueError("the snapshot's balloon state does not match the configuration")
        if balloon is not None:          # before its transport activates it
            balloon.restore_state(msgspec.convert(saved_balloon, BalloonState))
        virtio = msgspec.convert(state.devices.get("virtio", []),
                                 list[TransportState | PciTransportState])
        if len(virtio) != len(transports):
            raise ValueError(f"{len(virtio)} virtio device states for {len(transports)} devices")
        ids = state.devices.get("virtio_ids")
        if ids is not None:       # states in the snapshot's attach order, matched by device
            by_id = dict(zip(msgspec.convert(ids, list[str]), virtio))
            if sorted(by_id) != sorted(machine.transport_ids):
                raise ValueError(f"virtio device states for {sorted(by_id)}, devices "
                                 f"{sorted(machine.transport_ids)}")
            virtio = [by_id[i] for i in machine.transport_ids]
        for transport, transport_state in zip(transports, virtio):
            transport.restore_state(transport_state)
            if machine.pci is not None:
                machine.pci.restored(transport)
    except (msgspec.ValidationError, ValueError) as e:
        raise BuildError(f"the snapshot's device state is invalid: {e}") from e
    try:
        kvmstate.restore_vm(vm, state.vm, clock_realtime=clock_realtime)
        for vcpu, vcpu_state in zip(vcpus, state.vcpus):
            kvmstate.restore_vcpu(vcpu.fd, vcpu_state)
    except SnapshotFormatError as e:
        raise BuildError(str(e)) from e
    except KvmError as e:
        raise BuildError(f"KVM refused the snapshot's state: {e}") from e


class _VirtioSlots:
    """Hands out virtio-mmio windows and wires each device's ioeventfds and irqfd, and maps
    the windows' register pages read-only into the guest (:meth:`map_register_pages`)."""

    def __init__(self, vm: VmFd, mem: GuestMemory, bus: Bus, loop: asyncio.AbstractEventLoop,
                 stack: contextlib.ExitStack, faults: GuestFaults) -> None:
        self._vm, self._mem, self._bus, self._loop, self._stack = vm, mem, bus, loop, stack
        self._faults = faults
        self.windows: list[tuple[int, int, int]] = []
        self.transports: list[VirtioMmioTransport] = []
        self.ids: list[str] = []

    def attach(self, device: VirtioDevice, device_id: str):
        try:
            base, size, gsi = layout.virtio_mmio_window(len(self.windows))
        except ValueError as e:
            raise BuildError(f"Too many virtio devices: {e}") from e
        irq = _irq_line(self._vm, gsi, self._stack)
        events = []
        for index in range(device.num_queues):
            evt = EventFd()
            self._stack.callback(evt.close)
            # The guest's QueueNotify write of this queue's index signals the
            # eventfd inside KVM: no exit to userspace on the I/O hot path.
            self._vm.register_ioeventfd(evt.fd, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, datamatch=index)
            events.append(evt)
        transport = VirtioMmioTransport(device, mem=self._mem, irq=irq, queue_events=events,
                                        loop=self._loop, faults=self._faults,
                                        kernel_vring_ack=_KernelVringAck(self._vm, base, self._stack))
        self._stack.callback(getattr(device, "close", device.deactivate))
        self._bus.insert(base, size, transport)
        self.windows.append((base, size, gsi))
        self.transports.append(transport)
        self.ids.append(device_id)
        return device

    def map_register_pages(self) -> None:
        """One read-only KVM slot over all windows, each page kept current by its transport:
        the guest's register and config reads never exit (VirtioMmioTransport.attach_register_page).
        KVM refusing the slot leaves every read exiting to the transport, as before."""
        if not self.transports:
            return
        assert layout.VIRTIO_MMIO_SIZE == VIRTIO_MMIO_PAGE     # the windows are consecutive pages
        size = len(self.windows) * VIRTIO_MMIO_PAGE
        pages = mmap.mmap(-1, size)                # shared anonymous: never copied on write
        view = memoryview(pages)
        each = [view[i * VIRTIO_MMIO_PAGE:(i + 1) * VIRTIO_MMIO_PAGE] for i in range(len(self.windows))]

        def unmap() -> None:
            for transport in self.transports:
                transport.attach_register_page(None)
            for page in each:
                page.release()
            view.release()
            pages.close()

        self._stack.callback(unmap)
        for transport, page in zip(self.transports, each):
            transport.attach_register_page(page)
        base = self.windows[0][0]
        slot = _register_page_slot(self._vm)
        try:
            self._vm.set_user_memory_region(slot, base, size, ctypes.addressof(ctypes.c_char.from_buffer(pages)),
                                            KVM_MEM_READONLY)
        except (KvmError, OSError) as e:
            log.warning("virtio-mmio: KVM refused the read-only register pages (%s); register reads "
                        "exit to the VMM", e)
            for transport in self.transports:
                transport.attach_register_page(None)
            return
        self._stack.callback(self._vm.set_user_memory_region, slot, base, 0, 0, 0)


class _KernelVringAck:
    """KVM completing a window's InterruptACK of the used-buffer bit: an ioeventfd with
    datamatch 1 on the register, over an eventfd that counts the ACKs
    (mmio.KernelVringAck; VirtioMmioTransport._let_kvm_ack_vring).  One per window, however
    often the guest resets the device."""

    def __init__(self, vm: VmFd, base: int, stack: contextlib.ExitStack) -> None:
        self._vm, self._base, self._stack = vm, base, stack
        self._counter: EventFd | None = None

    def switch(self, on: bool) -> bool:
        try:
            if self._counter is None:
                self._counter = EventFd()
                self._stack.callback(self._counter.close)
            self._vm.register_ioeventfd(self._counter.fd, self._base + VIRTIO_MMIO_INTERRUPT_ACK, 4,
                                        datamatch=VIRTIO_MMIO_INT_VRING, deassign=not on)
        except (KvmError, OSError) as e:
            # Nothing is lost: the ACK keeps exiting to the VMM, which answers it.
            log.warning("virtio-mmio at %#x: KVM could not %s the InterruptACK ioeventfd: %s",
                        self._base, "add" if on else "remove", e)
            return False
        return True

    def taken(self) -> int:
        counter = self._counter
        return counter.read() if counter is not None and counter.fd >= 0 else 0


def _register_page_slot(vm: VmFd) -> int:
    """The KVM slot of the virtio-mmio register pages: the one just below pmem's reserve."""
    return nr_memslots(vm) - _SLOTS_KEPT_FOR_PMEM - 1


class _PciAttach:
    """The builder's view of :class:`PciSlots`: attach in order, or at a snapshot's slots."""

    windows: list[tuple[int, int, int]] = []       # no virtio-mmio windows with PCI

    def map_register_pages(self) -> None:
        """Nothing to map: virtio-pci's registers are in BARs the guest programs (pcislots)."""

    def __init__(self, slots: PciSlots, saved_slots: dict | None) -> None:
        self.slots = slots
        self._saved = None
        if saved_slots is not None:
            try:
                self._saved = msgspec.convert(saved_slots, dict[str, int])
            except msgspec.ValidationError as e:
                raise BuildError(f"the snapshot's PCI slots are invalid: {e}") from None
            numbers = list(self._saved.values())
            if any(not 1 <= n <= 31 for n in numbers) or len(set(numbers)) != len(numbers):
                raise BuildError(f"the snapshot's PCI slots are invalid: {sorted(numbers)} "
                                 "(each device its own slot in 1..31)")
        self.transports: list = []
        self.ids: list[str] = []

    def attach(self, device: VirtioDevice, device_id: str):
        slot = None
        if self._saved is not None:
            if device_id not in self._saved:
                raise BuildError(f"the snapshot has no PCI slot for device {device_id}")
            slot = self._saved[device_id]
        try:
            transport = self.slots.attach(device, slot=slot)
        except PciSlotError as e:
            raise BuildError(str(e)) from e
        self.transports.append(transport)
        self.ids.append(device_id)
        return device


def _host_bridge(slots: PciSlots) -> PciHostBridge:
    return PciHostBridge(ecam_base=layout.PCI_ECAM_START, ecam_size=layout.PCI_ECAM_BUS0_SIZE,
                         bus_start=0, bus_end=0, mmio32=slots.mmio32, mmio64=slots.mmio64)


def _vsock_device(cfg, ctx: BuildContext) -> Vsock:
    """The vsock device; its listener at ``uds_path`` is bound now (PUT /vsock only tried it)."""
    try:
        return Vsock(cfg.guest_cid, cfg.uds_path, ctx.loop, _register(ctx.metrics, "vsock", VsockMetrics()))
    except VsockBackendError as e:
        raise BuildError(f"Cannot create backend for vsock device: {e}") from e


def _block_device(drive, ctx: BuildContext, stack: contextlib.ExitStack) -> Block | VhostUserBlock:
    if drive.socket is not None:
        return _vhost_user_block(drive, ctx, stack)
    metrics = BlockMetrics()
    try:
        block = Block(drive.drive_id, drive.path_on_host, read_only=bool(drive.is_read_only),
                      is_root_device=drive.is_root_device, partuuid=drive.partuuid,
                      cache_type=drive.cache_type, io_engine=drive.io_engine,
                      rate_limiter=RateLimiter.from_config(drive.rate_limiter), metrics=metrics)
    except (BlockFileError, UnsupportedEngineError, OSError) as e:
        raise BuildError(f"Unable to create the block device {drive.drive_id}: {e}") from e
    ctx.metrics.register(f"block_{drive.drive_id}", metrics, aggregate="block")
    stack.callback(ctx.metrics.unregister, f"block_{drive.drive_id}")
    return block


def _pmem_device(cfg, ctx: BuildContext, stack: contextlib.ExitStack, regions: PmemRegions,
                 saved=None) -> Pmem:
    """The file of ``cfg`` mapped into the guest (where a snapshot had it, if ``saved``) and
    its virtio-pmem device; raises :class:`PmemError`."""
    backing = PmemBacking(cfg.path_on_host, cfg.read_only)
    stack.callback(backing.close)
    if saved is not None:
        try:
            placed = msgspec.convert(saved, PmemState)
        except msgspec.ValidationError as e:
            raise PmemError(f"the snapshot's pmem state is invalid: {e}") from None
        if placed.size != backing.mmap_len:
            raise PmemError(f"the snapshot's region is {placed.size:#x} bytes, the file "
                            f"{cfg.path_on_host} now needs {backing.mmap_len:#x}")
        regions.check(placed.start, placed.size)
        start = placed.start
    else:
        start = regions.allocate(backing.mmap_len)
    regions.map(backing, start)
    stack.callback(regions.unmap, start)
    metrics = PmemMetrics()
    device = Pmem(cfg.id, start=start, size=backing.mmap_len, file_len=backing.file_len,
                  flush=backing.flush, read_only=cfg.read_only, root_device=cfg.root_device,
                  rate_limiter=RateLimiter.from_config(cfg.rate_limiter), metrics=metrics)
    ctx.metrics.register(f"pmem_{cfg.id}", metrics, aggregate="pmem")
    stack.callback(ctx.metrics.unregister, f"pmem_{cfg.id}")
    return device


# KVM slots left for pmem regions (they count down from KVM's last slot) when hotplug slots are
# counted up from the RAM slots.
_SLOTS_KEPT_FOR_PMEM = 64


def _virtio_mem(cfg, vm: VmFd, mem: GuestMemory, ctx: BuildContext,
                stack: contextlib.ExitStack, restore: Restore | None = None) -> VirtioMem:
    """The virtio-mem device over its region (layout.memory_hotplug_region); its KVM slots
    follow the RAM slots and are registered only while a block in them is plugged.  Restored
    from a snapshot, the region maps the memory file after boot RAM (copy-on-write) and the
    device takes its plugged blocks back, before its transport restores the queues."""
    size, slot_size = cfg.total_size_mib * MiB, cfg.slot_size_mib * MiB
    try:
        addr, _ = layout.memory_hotplug_region(mem.end, size)
    except ValueError as e:
        raise BuildError(f"Cannot place the hotpluggable memory: {e}") from e
    first_slot = len(mem.regions)
    slots = size // slot_size
    nr_slots = nr_memslots(vm)
    if first_slot + slots > nr_slots - _SLOTS_KEPT_FOR_PMEM - 1:     # and one for _register_page_slot
        raise BuildError(f"Hotpluggable memory needs {slots} KVM memory slots of "
                         f"{cfg.slot_size_mib} MiB; KVM has {nr_slots}: use larger slots")

    def set_region(index: int, gpa: int, length: int, host_addr: int) -> None:
        vm.set_user_memory_region(first_slot + index, gpa, length, host_addr)

    saved, file = None, None
    if restore is not None:
        if restore.mem_fd is None:
            raise BuildError(MEMORY_HOTPLUG_UFFD)
        try:
            saved = msgspec.convert(restore.state.devices.get("memory_hotplug"), VirtioMemState)
        except msgspec.ValidationError as e:
            raise BuildError(f"the snapshot's memory hotplug state is invalid: {e}") from e
        if saved.file_offset != mem.total_size or restore.state.memory_file_size < mem.total_size + size:
            raise BuildError("the snapshot's memory file does not hold the hotpluggable region after RAM")
        file = (restore.mem_fd, saved.file_offset)
    try:
        backing = HotplugBacking(addr, size, slot_size, set_region, file=file)
    except OSError as e:
        raise BuildError(f"Cannot allocate {cfg.total_size_mib} MiB of hotpluggable memory: {e}") from e
    stack.callback(backing.close)
    device = VirtioMem(addr=addr, total_size_mib=cfg.total_size_mib, block_size_mib=cfg.block_size_mib,
                       slot_size_mib=cfg.slot_size_mib, backing=backing,
                       metrics=_register(ctx.metrics, "memory_hotplug", VirtioMemMetrics()))
    backing.region.accessible = device.accessible
    mem.add_hotplug_region(backing.region)
    if saved is not None:
        try:
            slots_back = device.restore_state(saved)
        except ValueError as e:
            raise BuildError(f"the snapshot's device state is invalid: {e}") from e
        for change in slots_back:
            backing.set_slot(change.index, change.present)
    log.info("Hotpluggable memory: %d MiB at %#x, blocks of %d MiB, KVM slots of %d MiB from slot %d",
             cfg.total_size_mib, addr, cfg.block_size_mib, cfg.slot_size_mib, first_slot)
    return device


def _vhost_user_block(drive, ctx: BuildContext, stack: contextlib.ExitStack) -> VhostUserBlock:
    """A drive whose back end serves the guest's queue itself (connected and agreed with now)."""
    metrics = VhostUserBlockMetrics()
    try:
        block = VhostUserBlock(drive.drive_id, drive.socket, is_root_device=drive.is_root_device,
                               partuuid=drive.partuuid, cache_type=drive.cache_type, metrics=metrics)
    except VhostUserBlockError as e:
        raise BuildError(f"Unable to create the block device {drive.drive_id}: Vhost user backend "
                         f"error: {e}") from e
    stack.callback(block.close)             # until attached (the transport's close repeats it)
    name = f"vhost_user_block_{drive.drive_id}"     # Firecracker's metrics group
    ctx.metrics.register(name, metrics)
    stack.callback(ctx.metrics.unregister, name)
    log.info("Drive %s: vhost-user back end at %s", drive.drive_id, drive.socket)
    return block


def _mmds_stacks(config: VmConfig, ctx: BuildContext) -> dict[str, MmdsNetworkStack]:
    """One MMDS network stack per interface listed in ``mmds-config``, sharing one handler.

    The ``mmds`` metrics group is registered once per process, whether or
    not MMDS is configured, as Firecracker always reports it.
    """
    metrics = _register(ctx.metrics, "mmds", MmdsMetrics())
    mc = config.mmds_config
    if mc is None:
        return {}
    store = ctx.mmds_store if ctx.mmds_store is not None else MmdsStore()
    handler = MmdsHttpHandler(store, TokenAuthority(), version=MmdsVersion(mc.version),
                              imds_compat=mc.imds_compat, metrics=metrics)
    return {iface_id: MmdsNetworkStack(handler, ipv4_addr=mc.ipv4_address or DEFAULT_MMDS_IPV4,
                                       metrics=metrics)
            for iface_id in mc.network_interfaces}


def _net_device(iface, mmds: MmdsNetworkStack | None, ctx: BuildContext,
                stack: contextlib.ExitStack) -> Net:
    """A virtio-net device on the tap ``host_dev_name`` in the VMM's network namespace."""
    try:
        tap = Tap.open(iface.host_dev_name, vnet_hdr=True)
    except TapError as e:
        raise BuildError(f"Could not create the network device: "
                         f"Open tap device failed: {e}") from e
    stack.callback(tap.close)          # until the device owns it (Net.close closes it too)
    metrics = NetMetrics()
    try:
        if iface.vhost:
            net = _vhost_net_device(iface, tap, metrics, stack)
        else:
            net = Net(iface.iface_id, tap, guest_mac=iface.guest_mac, mtu=iface.mtu,
                      rx_rate_limiter=RateLimiter.from_config(iface.rx_rate_limiter),
                      tx_rate_limiter=RateLimiter.from_config(iface.tx_rate_limiter),
                      mmds=mmds, metrics=metrics)
    except (ValueError, OSError) as e:
        raise BuildError(f"Could not create the network device: {e}") from e
    ctx.metrics.register(f"net_{iface.iface_id}", metrics, aggregate="net")
    stack.callback(ctx.metrics.unregister, f"net_{iface.iface_id}")
    log.info("Network interface %s on tap %s, guest MAC %s%s", iface.iface_id, tap.name,
             net.mac_address, " (MMDS)" if mmds is not None else "")
    return net


def _vhost_net_device(iface, tap: Tap, metrics: NetMetrics, stack: contextlib.ExitStack) -> Net:
    """The asyncvmm extension ``vhost``: the same device, its queues served by /dev/vhost-net."""
    from .devices.vhost.net import VhostNet, open_backend
    vhost, kernel_features = open_backend()
    stack.callback(vhost.close)        # until the device owns it (VhostNet.close closes it too)
    log.info("Network interface %s: vhost-net, kernel features %#x", iface.iface_id, kernel_features)
    return VhostNet(iface.iface_id, tap, vhost, kernel_features, guest_mac=iface.guest_mac,
                    mtu=iface.mtu, metrics=metrics)


def _register(metrics: MetricsRegistry, name: str, group):
    existing = metrics.get(name)
    if existing is not None:
        return existing
    metrics.register(name, group)
    return group


# -- hot-plug (--enable-pci) ------------------------------------------------------------------


VHOST_WITH_MEMORY_HOTPLUG = (
    "{what} cannot be used with memory hotplug yet: its back end is given the boot memory "
    "only, and the guest would place buffers in hot-plugged memory it cannot reach")


def _refuse_vhost_with_memory_hotplug(device) -> None:
    if getattr(device, "socket", None) is not None:
        raise BuildError(VHOST_WITH_MEMORY_HOTPLUG.format(what=f"The vhost-user drive {device.drive_id}"))
    if getattr(device, "vhost", None):
        raise BuildError(VHOST_WITH_MEMORY_HOTPLUG.format(
            what=f"The vhost-net interface {device.iface_id}"))


def hotplug_device(machine: MicroVm, ctx: BuildContext, cfg) -> None:
    """Create the device ``cfg`` asks for (a drive, a network interface or a pmem device)
    and put it on the running microVM's PCI bus; the guest finds it when it rescans the
    bus.  A failure leaves the microVM as it was."""
    if machine.pci is None:
        raise BuildError("PCI is not enabled")
    if machine.memory_hotplug is not None:
        _refuse_vhost_with_memory_hotplug(cfg)
    if getattr(cfg, "socket", None) is not None and machine.mem.regions[0].shared_fd is None:
        raise BuildError("Vhost user backend error: guest memory is not shared (it is, when a "
                         "vhost-user drive is configured before boot)")
    with contextlib.ExitStack() as stack:
        if hasattr(cfg, "drive_id"):
            device_id, device = f"block:{cfg.drive_id}", _block_device(cfg, ctx, stack)
        elif hasattr(cfg, "path_on_host"):
            device_id = f"pmem:{cfg.id}"
            try:
                device = _pmem_device(cfg, ctx, stack, machine.pmem_regions)
            except PmemError as e:
                raise BuildError(f"Unable to create the virtio-pmem device: {e}") from e
        else:
            device_id = f"net:{cfg.iface_id}"
            device = _net_device(cfg, None, ctx, stack)
        transport = machine.pci.attach(device)          # PciSlotError: the bus is full
        stack.callback(machine.pci.detach, transport)
        machine.transports.append(transport)
        machine.transport_ids.append(device_id)
        if hasattr(cfg, "drive_id"):
            machine.blocks[cfg.drive_id] = device
        elif isinstance(device, Pmem):
            machine.pmems[cfg.id] = device
        else:
            machine.nets[cfg.iface_id] = device
        device_stack = stack.pop_all()
    if not machine.hotplugged:      # one callback closes whatever is still plugged at the end
        machine.resources.callback(_close_hotplugged, machine)
    machine.hotplugged[device_id] = device_stack


def _close_hotplugged(machine: MicroVm) -> None:
    while machine.hotplugged:
        _, stack = machine.hotplugged.popitem()
        stack.close()


def unplug_device(machine: MicroVm, device_id: str, metrics: MetricsRegistry) -> None:
    """Take a device off the running microVM's PCI bus (the guest removed it first)."""
    if machine.pci is None:
        raise BuildError("PCI is not enabled")
    try:
        index = machine.transport_ids.index(device_id)
    except ValueError:
        raise BuildError("Device not found") from None
    transport = machine.transports[index]
    kind, _, name = device_id.partition(":")
    devices = {"block": machine.blocks, "pmem": machine.pmems}.get(kind, machine.nets)
    device = devices.get(name)
    stack = machine.hotplugged.get(device_id)
    # Off the bus first: if that fails the microVM still lists the device, as it still has it.
    if stack is None:
        machine.pci.detach(transport)
    else:
        stack.close()
        del machine.hotplugged[device_id]
    del machine.transports[index]
    del machine.transport_ids[index]
    devices.pop(name, None)
    if stack is None:               # a device the microVM booted with
        metrics.unregister(f"{kind}_{name}")
        if isinstance(device, VhostUserBlock):
            metrics.unregister(f"vhost_user_block_{name}")
        if isinstance(device, Pmem):
            # The guest loses the region now; the host mapping goes when the microVM closes.
            machine.pmem_regions.unmap(device.start)
