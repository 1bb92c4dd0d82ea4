"""vCPU threads without KVM: a scripted fake vCPU fd, a real asyncio loop, real threads.

What is checked: an MMIO register access taken on a vCPU thread runs on the
loop thread and its answer reaches the guest; registers a device answers
inline stay on the vCPU thread; port I/O stays on the vCPU thread unless a
loop-owned port bus claims the port (then it runs on the loop); an exit
request or a closed loop ends a vCPU that waits for a hand-off; per-vCPU
counters bumped by two threads at once sum exactly.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading

import pytest

from asyncvmm.devices.bus import Bus
from asyncvmm.kvm import exits as x
from asyncvmm.kvm.structs import kvm_run
from asyncvmm.metrics import MetricsRegistry, SummedGroup
from asyncvmm.vcpu import Request, Vcpu, VcpuMetrics, VcpuStopReason, install_kick_handler


@pytest.fixture(autouse=True)
def kick_handler():
    # Pause/exit requests signal the thread; without the no-op handler the signal kills the process.
    install_kick_handler()


class ScriptedVcpuFd:
    """Returns the scripted exits one per ``run()``, then halts."""

    def __init__(self, vcpu_id: int, exits) -> None:
        self.vcpu_id = vcpu_id
        self._exits = list(exits)
        self.runs = 0
        self.reads: list[tuple[x.MmioRead, kvm_run]] = []

    def set_immediate_exit(self, value: bool) -> None:
        pass

    def run(self):
        self.runs += 1
        if not self._exits:
            return x.Hlt()
        make = self._exits.pop(0)
        return make(self) if callable(make) else make

    def mmio_read(self, addr: int, size: int):
        def make(fd):
            run = kvm_run()
            exit_ = x.MmioRead(addr, size, run)
            fd.reads.append((exit_, run))
            return exit_
        return make


class ThreadRecorder:
    """A bus device that records which thread ran each access."""

    def __init__(self) -> None:
        self.threads: list[tuple[str, int]] = []
        self.writes: list[bytes] = []

    def read(self, offset: int, size: int) -> bytes:
        self.threads.append(("read", threading.get_ident()))
        return bytes([0x40 + offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.threads.append(("write", threading.get_ident()))
        self.writes.append(data)


class InlineRecorder(ThreadRecorder):
    """Answers offset 0x60 inline (like virtio-mmio's InterruptStatus)."""

    def read_inline(self, offset: int, size: int):
        if offset != 0x60:
            return None
        self.threads.append(("inline", threading.get_ident()))
        return b"\x01" * size

    def write_inline(self, offset: int, data: bytes) -> bool:
        return False


def make_vcpu(loop, fd, *, mmio: Bus, pio: Bus | None = None, stops=None, metrics=None,
              pio_loop: Bus | None = None) -> Vcpu:
    stops = stops if stops is not None else []
    return Vcpu(fd, pio_bus=pio or Bus("pio"), mmio_bus=mmio, loop=loop,
                on_stop=lambda i, reason, detail: stops.append((i, reason)),
                metrics=metrics or VcpuMetrics(), pio_loop_bus=pio_loop)


async def run_until_stopped(vcpu: Vcpu, stops: list, timeout: float = 10.0) -> None:
    vcpu.start()
    await asyncio.wrap_future(vcpu.request(Request.RESUME))
    deadline = asyncio.get_running_loop().time() + timeout
    while vcpu.is_alive():
        assert asyncio.get_running_loop().time() < deadline, "vCPU thread did not end"
        await asyncio.sleep(0.005)


async def test_mmio_access_runs_on_the_loop_thread_and_the_answer_reaches_the_guest():
    loop = asyncio.get_running_loop()
    dev = ThreadRecorder()
    mmio = Bus("mmio", locked=False)
    mmio.insert(0x1000, 0x100, dev)
    fd = ScriptedVcpuFd(0, [])
    fd._exits = [fd.mmio_read(0x1004, 4), x.MmioWrite(0x1008, b"\x07\0\0\0")]
    stops: list = []
    vcpu = make_vcpu(loop, fd, mmio=mmio, stops=stops)
    await run_until_stopped(vcpu, stops)
    await asyncio.sleep(0)                                  # deliver the on_stop callback
    loop_thread = threading.get_ident()
    assert dev.threads == [("read", loop_thread), ("write", loop_thread)]
    assert dev.writes == [b"\x07\0\0\0"]
    (_, run), = fd.reads
    assert bytes(run.exit.mmio.data[:4]) == b"\x44" * 4
    assert stops == [(0, VcpuStopReason.GUEST_SHUTDOWN)]
    assert (vcpu.metrics.exit_mmio_read, vcpu.metrics.exit_mmio_write) == (1, 1)


async def test_inline_registers_are_answered_on_the_vcpu_thread():
    loop = asyncio.get_running_loop()
    dev = InlineRecorder()
    mmio = Bus("mmio", locked=False)
    mmio.insert(0x1000, 0x100, dev)
    fd = ScriptedVcpuFd(0, [])
    fd._exits = [fd.mmio_read(0x1060, 4), fd.mmio_read(0x1004, 4)]
    vcpu = make_vcpu(loop, fd, mmio=mmio)
    await run_until_stopped(vcpu, [])
    (kind0, t0), (kind1, t1) = dev.threads
    assert (kind0, kind1) == ("inline", "read")
    assert t0 != threading.get_ident() and t1 == threading.get_ident()
    assert bytes(fd.reads[0][1].exit.mmio.data[:4]) == b"\x01" * 4


async def test_port_io_stays_on_the_vcpu_thread():
    loop = asyncio.get_running_loop()
    dev = ThreadRecorder()
    pio = Bus("pio")
    pio.insert(0x3F8, 8, dev)
    fd = ScriptedVcpuFd(0, [x.IoOut(0x3F8, b"ab", 1)])
    vcpu = make_vcpu(loop, fd, mmio=Bus("mmio", locked=False), pio=pio)
    await run_until_stopped(vcpu, [])
    assert dev.writes == [b"a", b"b"]
    assert all(t != threading.get_ident() for _, t in dev.threads)


async def test_ports_the_loop_bus_claims_are_answered_on_the_loop_and_others_stay():
    loop = asyncio.get_running_loop()
    legacy, pci = ThreadRecorder(), ThreadRecorder()
    pio, pio_loop = Bus("pio"), Bus("pio", locked=False)
    pio.insert(0x3F8, 8, legacy)
    pio_loop.insert(0xCF8, 8, pci)
    page = (ctypes.c_uint8 * 16)()
    fd = ScriptedVcpuFd(0, [
        x.IoOut(0xCF8, b"\x00\x00\x00\x80", 4),        # CONFIG_ADDRESS
        x.IoIn(0xCFC, 2, 2, page, 0),                    # rep insw on CONFIG_DATA: one hand-off
        x.IoOut(0x3F8, b"a", 1),
        x.IoIn(0x3F8, 1, 1, page, 8),
        x.IoOut(0xCFC, b"\x01\x02\x03\x04", 2),        # rep outsw
    ])
    vcpu = make_vcpu(loop, fd, mmio=Bus("mmio", locked=False), pio=pio, pio_loop=pio_loop)
    await run_until_stopped(vcpu, [])
    loop_thread = threading.get_ident()
    assert pci.threads == [("write", loop_thread), ("read", loop_thread), ("read", loop_thread),
                           ("write", loop_thread), ("write", loop_thread)]
    assert pci.writes == [b"\x00\x00\x00\x80", b"\x01\x02", b"\x03\x04"]
    assert bytes(page[:4]) == b"\x44" * 4                # offset 4 into the loop device, twice
    assert [k for k, _ in legacy.threads] == ["write", "read"]
    assert all(t != loop_thread for _, t in legacy.threads)
    assert legacy.writes == [b"a"] and page[8] == 0x40
    assert (vcpu.metrics.exit_io_out, vcpu.metrics.exit_io_in) == (3, 2)


def vcpu_at_a_hand_off(loop, later_exits=()):
    """A started, resumed vCPU whose first exit, an MMIO read of a :class:`ThreadRecorder`, is handed
    to ``loop``; waits (up to ~2 s, without yielding to the loop) for the hand-off.  (vcpu, device)."""
    dev = ThreadRecorder()
    mmio = Bus("mmio", locked=False)
    mmio.insert(0x1000, 0x100, dev)
    fd = ScriptedVcpuFd(0, [])
    fd._exits = [fd.mmio_read(0x1004, 4), *later_exits]
    vcpu = make_vcpu(loop, fd, mmio=mmio)
    vcpu.start()
    vcpu.request(Request.RESUME)
    for _ in range(1000):
        if vcpu._handoff is not None:
            break
        threading.Event().wait(0.002)
    return vcpu, dev


async def test_an_exit_request_cancels_a_pending_hand_off():
    """The loop is busy (here: blocked in join, as Vmm.close does); EXIT must still end the vCPU."""
    vcpu, dev = vcpu_at_a_hand_off(asyncio.get_running_loop())
    assert vcpu._handoff is not None
    vcpu.request(Request.EXIT)
    vcpu.join(5.0)                            # blocks the loop, like Vmm.close
    assert not vcpu.is_alive()
    await asyncio.sleep(0.01)
    assert dev.threads == []                  # the cancelled access never ran


def test_a_vcpu_waiting_on_a_closed_loop_ends():
    loop = asyncio.new_event_loop()
    vcpu, dev = vcpu_at_a_hand_off(loop)
    loop.close()                              # the callback is never run
    vcpu.join(5.0)
    assert not vcpu.is_alive()
    assert dev.threads == []


async def test_a_pause_completes_while_a_hand_off_is_pending():
    vcpu, dev = vcpu_at_a_hand_off(asyncio.get_running_loop(), [x.Interrupted()] * 5)
    await asyncio.wait_for(asyncio.wrap_future(vcpu.request(Request.PAUSE)), 5.0)
    assert dev.threads == [("read", threading.get_ident())]   # answered, then parked
    vcpu.request(Request.EXIT)
    vcpu.join(5.0)
    assert not vcpu.is_alive()


async def test_per_vcpu_counters_from_two_threads_sum_exactly():
    loop = asyncio.get_running_loop()
    pio = Bus("pio")
    pio.insert(0x80, 1, ThreadRecorder())
    group = SummedGroup(VcpuMetrics)
    registry = MetricsRegistry()
    registry.register("vcpu", group)
    n = 20_000
    vcpus = [make_vcpu(loop, ScriptedVcpuFd(i, [x.IoOut(0x80, b"\0", 1)] * n), mmio=Bus("mmio"),
                       pio=pio, metrics=group.new_part()) for i in range(2)]
    for v in vcpus:
        v.start()
    for v in vcpus:
        v.request(Request.RESUME)
    for v in vcpus:
        await asyncio.to_thread(v.join, 30.0)
    assert registry.flush()["vcpu"]["exit_io_out"] == 2 * n
    assert group.exit_io_out == 2 * n
