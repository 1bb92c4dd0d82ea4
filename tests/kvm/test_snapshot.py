"""Snapshots on the local /dev/kvm: a counting test guest is paused, snapshotted, its process
ends, and a new process loads the snapshot and resumes it: the count goes on from where it
was, it does not restart.  Two processes restored from one snapshot both run.  Bad input
(create while running, load after configuration, a damaged state file, a short memory file,
a Uffd backend nobody serves) gets a 400 naming the problem and the process stays usable.  Diff
snapshots with virtio devices hold what the VMM wrote into guest memory, and the MMDS store
comes back with the snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from asyncvmm.client import ApiError, MicroVM
from asyncvmm.snapshot.format import FORMAT_VERSION
from tests.kvm.conftest import asyncvmm_argv
from tests.kvm.test_net import netns_tap  # noqa: F401  (a fixture)

pytestmark = pytest.mark.kvm

COUNT = re.compile(r"testguest: count i=(\d+)")


def counts(text: str) -> list[int]:
    return [int(m.group(1)) for m in COUNT.finditer(text)]


def assert_continues(before: str, after: str) -> None:
    """The restored guest's console continues the snapshotted one: no reboot, and the two
    together count 1, 2, 3 ... with no number missing or repeated.  (A snapshot may fall in
    the middle of a line; the restored guest prints the rest of it.)"""
    assert "testguest: hello" not in after
    together = counts(before + after)
    assert together == list(range(1, len(together) + 1)), (counts(before)[-3:], counts(after)[:3])
    assert len(together) > len(counts(before))


@contextlib.asynccontextmanager
async def _restored_through_uffd(tmp_path, snap: str, mem: str):
    """A microVM restored from ``snap`` (resumed) through the test page-fault handler serving
    ``mem``; yields ``(vm, handler)``.  The handler must end without an error."""
    from tests.kvm.uffd_handler import PageFaultHandler
    sock = str(tmp_path / "uffd.sock")
    handler = PageFaultHandler(sock, mem)
    handler.start()
    try:
        async with MicroVM(start=False, binary=asyncvmm_argv()) as vm:
            await vm.client.load_snapshot(snapshot_path=snap, resume_vm=True,
                                          mem_backend={"backend_type": "Uffd", "backend_path": sock})
            yield vm, handler
    finally:
        handler.stop()
    assert handler.error is None, handler.error


async def _snapshot_counting_guest(test_guest, tmp_path, *, at: int = 3) -> tuple[int, str, str]:
    """Boot a counting guest, pause it at count ``at`` or later, snapshot it, end the process.
    Returns the last count printed before the pause and the two file paths."""
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    async with MicroVM(test_guest.elf_pvh, "count=100000 exit=halt", vcpus=1, mem_mib=64,
                       binary=asyncvmm_argv(), level="Info") as vm:
        await vm.wait_for_console(f"testguest: count i={at}\n")
        await vm.client.pause()
        with pytest.raises(ApiError) as err:        # not while running: only paused
            await vm.client.resume()
            await vm.client.create_snapshot(mem_file_path=mem, snapshot_path=snap)
        assert err.value.status == 400 and "pause it first" in err.value.fault_message
        await vm.client.pause()
        await vm.client.create_snapshot(mem_file_path=mem, snapshot_path=snap)
    last = counts(vm.console.text)[-1]          # all of the console, read to its end on exit
    return last, snap, mem, vm.console.text


async def test_a_restored_guest_continues_its_count(test_guest, tmp_path):
    last, snap, mem, before = await _snapshot_counting_guest(test_guest, tmp_path)
    described = subprocess.run([*asyncvmm_argv(), "--describe-snapshot", snap], capture_output=True,
                               text=True, timeout=60)
    assert described.returncode == 0 and described.stdout.strip() == f"v{FORMAT_VERSION}.0.0"
    async with MicroVM(start=False, binary=asyncvmm_argv(), level="Info") as vm:
        await vm.client.load_snapshot(snapshot_path=snap, mem_backend={"backend_type": "File",
                                                                       "backend_path": mem})
        assert (await vm.client.describe_instance())["state"] == "Paused"
        await vm.client.resume()
        await vm.wait_for_console(f"testguest: count i={last + 3}\n")
    assert_continues(before, vm.console.text)                 # the next number, not 1


async def test_two_processes_restore_from_one_snapshot(test_guest, tmp_path):
    last, snap, mem, before = await _snapshot_counting_guest(test_guest, tmp_path)
    backend = {"backend_type": "File", "backend_path": mem}
    async with MicroVM(start=False, binary=asyncvmm_argv()) as a, \
            MicroVM(start=False, binary=asyncvmm_argv()) as b:
        await a.client.load_snapshot(snapshot_path=snap, mem_backend=backend, resume_vm=True)
        await b.client.load_snapshot(snapshot_path=snap, mem_backend=backend, resume_vm=True)
        await a.wait_for_console(f"testguest: count i={last + 3}\n")
        await b.wait_for_console(f"testguest: count i={last + 3}\n")
        assert (await a.client.describe_instance())["state"] == "Running"


async def _refused(vm: MicroVM, **load) -> str:
    with pytest.raises(ApiError) as err:
        await vm.client.load_snapshot(**load)
    assert err.value.status == 400
    assert (await vm.client.describe_instance())["state"] == "Not started"
    return err.value.fault_message


async def test_a_guest_restored_through_a_uffd_page_fault_handler_continues(test_guest, tmp_path):
    """The Uffd backend: the VMM hands its userfaultfd and the region mappings to a handler
    (Firecracker's protocol) that serves every page from the memory file."""
    last, snap, mem, before = await _snapshot_counting_guest(test_guest, tmp_path)
    async with _restored_through_uffd(tmp_path, snap, mem) as (vm, handler):
        await vm.wait_for_console(f"testguest: count i={last + 2}\n")
        assert_continues(before, vm.console.text)
    assert handler.faults > 0
    assert [m["offset"] for m in handler.mappings] == [0]
    assert handler.mappings[0]["size"] == 64 << 20 and handler.mappings[0]["page_size"] == 4096


async def test_a_balloon_inflated_after_a_uffd_restore_reads_zeros_through_the_handler(test_guest, tmp_path):
    """The userfaultfd has UFFD_FEATURE_EVENT_REMOVE: the balloon's MADV_DONTNEED reaches the
    handler as remove events, so the guest's pages given back read zeros afterwards (the guest
    counts any that do not), not the touched contents the memory file still holds."""
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    async with MicroVM(test_guest.elf_pvh, "balloon=16:32", vcpus=1, mem_mib=64,
                       config={"balloon": {"amount_mib": 0, "deflate_on_oom": False}},
                       binary=asyncvmm_argv()) as vm:
        await vm.wait_for_console("balloon touched")
        await vm.client.pause()
        await vm.client.create_snapshot(mem_file_path=mem, snapshot_path=snap)
    async with _restored_through_uffd(tmp_path, snap, mem) as (vm, handler):
        for _ in range(600):                  # until the guest's driver has started the device
            try:
                await vm.client.patch_balloon(amount_mib=24)
                break
            except ApiError as e:
                assert "Device not activated yet" in e.fault_message, e.fault_message
                await asyncio.sleep(0.05)
        inflated = await vm.wait_for_console(re.compile(r"balloon inflated pages=(\d+) nonzero=(\d+)\n"),
                                             timeout=60)
    assert int(inflated.group(1)) == 24 * 256 and int(inflated.group(2)) == 0, inflated.group(0)
    assert handler.removes and handler.zero_faults > 0, (handler.removes[:3], handler.zero_faults)


async def test_bad_snapshots_are_refused_and_the_process_stays_usable(test_guest, tmp_path):
    last, snap, mem, before = await _snapshot_counting_guest(test_guest, tmp_path)
    data = open(snap, "rb").read()
    truncated, corrupted, short_mem = (str(tmp_path / n) for n in ("trunc.snap", "bad.snap", "short.mem"))
    open(truncated, "wb").write(data[:len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    open(corrupted, "wb").write(bytes(flipped))
    open(short_mem, "wb").write(open(mem, "rb").read(1 << 20))
    backend = {"backend_type": "File", "backend_path": mem}
    async with MicroVM(start=False, binary=asyncvmm_argv()) as vm:
        assert "truncated" in await _refused(vm, snapshot_path=truncated, mem_backend=backend)
        assert "CRC64" in await _refused(vm, snapshot_path=corrupted, mem_backend=backend)
        assert "not an asyncvmm snapshot" in await _refused(vm, snapshot_path=str(test_guest.elf_pvh),
                                                            mem_backend=backend)
        message = await _refused(vm, snapshot_path=snap,
                                 mem_backend={"backend_type": "File", "backend_path": short_mem})
        assert "memory file has 1048576 bytes" in message
        message = await _refused(vm, snapshot_path=snap, mem_backend=backend,
                                 network_overrides=[{"iface_id": "eth0", "host_dev_name": "tap9"}])
        assert "no network interface `eth0`" in message
        message = await _refused(vm, snapshot_path=snap,
                                 mem_backend={"backend_type": "Uffd", "backend_path": str(tmp_path / "no.sock")})
        assert "cannot connect to the page-fault handler" in message
        # After all that, the same process still loads the good snapshot.
        await vm.client.load_snapshot(snapshot_path=snap, mem_backend=backend, resume_vm=True)
        await vm.wait_for_console(f"testguest: count i={last + 2}\n")


async def test_block_and_entropy_devices_work_on_after_a_restore(test_guest, tmp_path):
    """The guest wrote its disk and read the entropy device before the snapshot; after the
    restore (a new process) the same drivers, on the same queues, read the disk back and get
    entropy: the virtio-mmio registers and queue positions came back."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    cmdline = "blk=write:8:0xab:4 rng=16 count=6 blk=read:8:4 rng=16 exit=halt"
    drives = [{"drive_id": "d0", "path_on_host": str(disk), "is_root_device": False, "is_read_only": False,
               "rate_limiter": {"ops": {"size": 1000, "refill_time": 1000, "one_time_burst": 50}}}]
    async with MicroVM(test_guest.elf_pvh, cmdline, vcpus=1, mem_mib=64, drives=drives,
                       config={"entropy": {}}, binary=asyncvmm_argv()) as vm:
        await vm.wait_for_console("testguest: count i=2\n")
        await vm.client.pause()
        await vm.client.create_snapshot(snapshot_path=snap, mem_file_path=mem)
        with pytest.raises(ApiError) as err:
            await vm.client.create_snapshot(snapshot_type="Diff", snapshot_path=snap + ".d",
                                            mem_file_path=mem + ".d")
        assert err.value.status == 400 and "dirty page tracking disabled" in err.value.fault_message
    before = vm.console.text
    assert "blk write sector=8 count=4" in before and "status=0" in before
    from asyncvmm.snapshot.format import read_state_file
    saved = read_state_file(snap).devices["rate_limiters"]["block:d0"]
    assert saved["bandwidth"] is None and saved["ops"]["one_time_burst"] < 50   # the burst was used
    async with MicroVM(start=False, binary=asyncvmm_argv()) as vm:
        await vm.client.load_snapshot(snapshot_path=snap, resume_vm=True,
                                      mem_backend={"backend_type": "File", "backend_path": mem})
        await vm.wait_for_console("testguest: done", timeout=60)
        after = vm.console.text
    assert "testguest: hello" not in after
    read = next(line for line in after.splitlines() if line.startswith("testguest: blk read"))
    assert "status=0" in read and "first=0xab" in read and "uniform=1" in read, read
    rng = [line for line in after.splitlines() if line.startswith("testguest: rng")]
    assert rng and "bytes=16" in rng[0], after


async def test_load_after_configuration_is_refused(
        test_guest, tmp_path):
    async with MicroVM(start=False, binary=asyncvmm_argv()) as vm:
        await vm.client.put_machine_configuration(vcpu_count=1, mem_size_mib=64)
        message = await _refused(vm, snapshot_path=str(tmp_path / "x"),
                                 mem_backend={"backend_type": "File", "backend_path": str(tmp_path / "y")})
        assert "not allowed after configuring boot-specific resources" in message



async def test_a_microvm_with_a_balloon_is_restored_with_it(test_guest, tmp_path):
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    async with MicroVM(test_guest.elf_pvh, "count=100000 exit=halt", vcpus=1, mem_mib=64,
                       config={"balloon": {"amount_mib": 4, "deflate_on_oom": True,
                                           "stats_polling_interval_s": 1}},
                       binary=asyncvmm_argv()) as vm:
        await vm.wait_for_console("testguest: count i=2\n")
        await vm.client.pause()
        await vm.client.create_snapshot(mem_file_path=mem, snapshot_path=snap)
    before = vm.console.text
    from asyncvmm.snapshot.format import read_state_file
    saved = read_state_file(snap).devices["balloon"]
    assert saved["num_pages"] == 4 * 256 and saved["type"] == "balloon-v1"
    async with MicroVM(start=False, binary=asyncvmm_argv()) as vm:
        await vm.client.load_snapshot(snapshot_path=snap, resume_vm=True,
                                      mem_backend={"backend_type": "File", "backend_path": mem})
        await vm.wait_for_console(f"testguest: count i={counts(before)[-1] + 2}\n")
        assert_continues(before, vm.console.text)
        stats = await vm.client.describe_balloon_stats()
        assert stats["target_mib"] == 4 and stats["target_pages"] == 1024


async def test_a_diff_snapshot_is_small_and_merged_onto_its_base_restores(test_guest, tmp_path):
    """Full A, the guest counts on, Diff B, then (still paused) Full C: A merged with B is C,
    byte for byte, and restoring B's state with the merged memory continues the count."""
    path = {n: str(tmp_path / n) for n in ("a.snap", "a.mem", "b.snap", "b.mem", "c.snap", "c.mem")}
    async with MicroVM(test_guest.elf_pvh, "count=100000 exit=halt",
                       config={"machine-config": {"vcpu_count": 1, "mem_size_mib": 64,
                                                  "track_dirty_pages": True}},
                       binary=asyncvmm_argv()) as vm:
        await vm.wait_for_console("testguest: count i=2\n")
        await vm.client.pause()
        await vm.client.create_snapshot(snapshot_type="Full", snapshot_path=path["a.snap"],
                                        mem_file_path=path["a.mem"])
        at = counts(vm.console.text)[-1]
        await vm.client.resume()
        await vm.wait_for_console(f"testguest: count i={at + 2}\n")
        await vm.client.pause()
        await vm.client.create_snapshot(snapshot_type="Diff", snapshot_path=path["b.snap"],
                                        mem_file_path=path["b.mem"])
        await vm.client.create_snapshot(snapshot_type="Full", snapshot_path=path["c.snap"],
                                        mem_file_path=path["c.mem"])
    last = counts(vm.console.text)[-1]
    before = vm.console.text
    disk = {n: os.stat(path[n]).st_blocks * 512 for n in ("a.mem", "b.mem")}
    assert os.path.getsize(path["b.mem"]) == os.path.getsize(path["a.mem"]) == 64 << 20
    assert disk["b.mem"] * 8 < disk["a.mem"], disk
    full = open(path["c.mem"], "rb").read()
    for how in (["--diff-state", path["b.snap"]], []):      # the state's ranges, or SEEK_DATA
        merged = str(tmp_path / "merged.mem")
        shutil.copyfile(path["a.mem"], merged)
        done = subprocess.run([sys.executable, "-m", "asyncvmm.snapshot.rebase", "--base-file", merged,
                               "--diff-file", path["b.mem"], *how], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert open(merged, "rb").read() == full, how
    async with MicroVM(start=False, binary=asyncvmm_argv()) as vm:
        await vm.client.load_snapshot(snapshot_path=path["b.snap"], resume_vm=True,
                                      mem_backend={"backend_type": "File", "backend_path": merged})
        await vm.wait_for_console(f"testguest: count i={last + 2}\n")
        assert_continues(before, vm.console.text)


async def test_diff_needs_dirty_page_tracking(test_guest, tmp_path):
    async with MicroVM(test_guest.elf_pvh, "count=100000 exit=halt", vcpus=1, mem_mib=64,
                       binary=asyncvmm_argv()) as vm:
        await vm.wait_for_console("testguest: count i=1\n")
        await vm.client.pause()
        with pytest.raises(ApiError) as err:
            await vm.client.create_snapshot(snapshot_type="Diff", snapshot_path=str(tmp_path / "s"),
                                            mem_file_path=str(tmp_path / "m"))
        assert err.value.fault_message == ("Diff snapshots are not allowed on uVMs with dirty page "
                                           "tracking disabled.")


async def test_a_snapshot_restores_into_a_fork_server_child(test_guest, tmp_path):
    """With ASYNCVMM_FORKSERVER set, asyncvmm is a launcher and the VMM a forked child of the
    fork server; a snapshot loads there exactly as in a cold process."""
    from tests.kvm.test_forkserver import Zygote
    last, snap, mem, before = await _snapshot_counting_guest(test_guest, tmp_path)
    zygote = Zygote(tmp_path)
    try:
        async with MicroVM(start=False, binary=asyncvmm_argv(), env=zygote.env()) as vm:
            await vm.client.load_snapshot(snapshot_path=snap, resume_vm=True, mem_backend={
                "backend_type": "File", "backend_path": mem})
            assert len(zygote.children()) == 1
            await vm.wait_for_console(f"testguest: count i={last + 2}\n")
            assert_continues(before, vm.console.text)
    finally:
        zygote.close()


async def test_clock_realtime_load_is_accepted_by_kvm_and_the_guest_continues(test_guest, tmp_path):
    last, snap, mem, before = await _snapshot_counting_guest(test_guest, tmp_path)
    async with MicroVM(start=False, binary=asyncvmm_argv()) as vm:
        await vm.client.load_snapshot(snapshot_path=snap, resume_vm=True, clock_realtime=True,
                                      mem_backend={"backend_type": "File", "backend_path": mem})
        await vm.wait_for_console(f"testguest: count i={last + 2}\n")
        assert_continues(before, vm.console.text)


async def test_a_vsock_device_is_restored_on_its_override_socket(test_guest, tmp_path):
    """A microVM with vsock: the restored one listens on the ``vsock_override`` path (the host
    side of its connections is new, as after Firecracker's transport reset) and counts on."""
    import socket as socketlib
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    old_uds, new_uds = str(tmp_path / "v-old.sock"), str(tmp_path / "v-new.sock")
    async with MicroVM(test_guest.elf_pvh, "count=100000 exit=halt", vcpus=1, mem_mib=64,
                       config={"vsock": {"guest_cid": 3, "uds_path": old_uds}},
                       binary=asyncvmm_argv()) as vm:
        await vm.wait_for_console("testguest: count i=2\n")
        await vm.client.pause()
        await vm.client.create_snapshot(snapshot_path=snap, mem_file_path=mem)
        before = vm.console.text
        last = counts(before)[-1]
        async with MicroVM(start=False, binary=asyncvmm_argv()) as restored:
            # The snapshotted process still holds old_uds: the restore needs the override.
            await restored.client.load_snapshot(
                snapshot_path=snap, resume_vm=True, vsock_override={"uds_path": new_uds},
                mem_backend={"backend_type": "File", "backend_path": mem})
            await restored.wait_for_console(f"testguest: count i={last + 2}\n")
            assert_continues(before, restored.console.text)
            with socketlib.socket(socketlib.AF_UNIX) as s:
                s.connect(new_uds)
            config = await restored.client.get_export_vm_config()
            assert config["vsock"]["uds_path"] == new_uds


@pytest.fixture
def huge_page_pool():
    """At least 40 free 2 MiB huge pages (a 64 MiB guest takes 32), made for the test as root
    and given back after it."""
    path = "/proc/sys/vm/nr_hugepages"

    def free() -> int:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("HugePages_Free:")).split()[1])

    with open(path) as f:
        before = int(f.read())
    need = 40 - free()
    if need > 0:
        try:
            with open(path, "w") as f:
                f.write(str(before + need))
        except OSError as e:
            from tests.conftest import require
            require(False, f"cannot reserve huge pages ({path}): {e}")
    from tests.conftest import require
    require(free() >= 40, "the host could not reserve 40 huge pages")
    yield
    with open(path, "w") as f:
        f.write(str(before))


async def test_huge_pages_snapshot_restores_through_uffd_only(test_guest, tmp_path, huge_page_pool):
    """A guest on 2 MiB huge pages: Full snapshot; the File backend is refused (Firecracker's
    limit), a Diff too; the Uffd backend restores it, the handler told 2 MiB pages."""
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    async with MicroVM(test_guest.elf_pvh, "count=100000 exit=halt",
                       config={"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M",
                                                  "track_dirty_pages": True}},
                       binary=asyncvmm_argv()) as vm:
        await vm.wait_for_console("testguest: count i=2\n")
        await vm.client.pause()
        await vm.client.create_snapshot(snapshot_path=snap, mem_file_path=mem)
        with pytest.raises(ApiError) as err:
            await vm.client.create_snapshot(snapshot_type="Diff", snapshot_path=snap + ".d",
                                            mem_file_path=mem + ".d")
        assert "huge pages" in err.value.fault_message
    before = vm.console.text
    last = counts(before)[-1]
    async with MicroVM(start=False, binary=asyncvmm_argv()) as restored:
        message = await _refused(restored, snapshot_path=snap,
                                 mem_backend={"backend_type": "File", "backend_path": mem})
        assert "only with the Uffd memory backend" in message
    async with _restored_through_uffd(tmp_path, snap, mem) as (restored, handler):
        await restored.wait_for_console(f"testguest: count i={last + 2}\n")
        assert_continues(before, restored.console.text)
    assert handler.mappings[0]["page_size"] == 2 << 20 and handler.mappings[0]["page_size_kib"] == 2048


def _merged_equals_full(tmp_path, path) -> str:
    """Merge Diff B onto Full A (the state's ranges); assert it is Full C byte for byte."""
    merged = str(tmp_path / "merged.mem")
    shutil.copyfile(path["a.mem"], merged)
    done = subprocess.run([sys.executable, "-m", "asyncvmm.snapshot.rebase", "--base-file", merged,
                           "--diff-file", path["b.mem"], "--diff-state", path["b.snap"]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    full = open(path["c.mem"], "rb").read()
    got = open(merged, "rb").read()
    differ = [i for i in range(0, len(full), 4096) if got[i:i + 4096] != full[i:i + 4096]]
    assert not differ, [hex(p) for p in differ[:8]]
    return merged


async def test_a_diff_snapshot_holds_what_a_block_device_wrote(test_guest, tmp_path):
    """Full A, then the guest writes a pattern to its disk and reads it back into its RAM
    (the VMM's preadv/io_uring writes guest memory), Diff B, Full C: A merged with B is C."""
    path = {n: str(tmp_path / n) for n in ("a.snap", "a.mem", "b.snap", "b.mem", "c.snap", "c.mem")}
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    drives = [{"drive_id": "d0", "path_on_host": str(disk), "is_root_device": False,
               "is_read_only": False}]
    async with MicroVM(test_guest.elf_pvh,
                       "serialecho=1 blk=write:8:0x5a:64 blk=read:8:64 count=100000 exit=halt",
                       drives=drives, binary=asyncvmm_argv(),
                       config={"machine-config": {"vcpu_count": 1, "mem_size_mib": 64,
                                                  "track_dirty_pages": True}}) as vm:
        await vm.wait_for_console("testguest: serialecho ready")
        await vm.client.pause()
        await vm.client.create_snapshot(snapshot_type="Full", snapshot_path=path["a.snap"],
                                        mem_file_path=path["a.mem"])
        await vm.client.resume()
        await vm.write_console("go\n")
        await vm.wait_for_console("testguest: count i=2\n")
        await vm.client.pause()
        await vm.client.create_snapshot(snapshot_type="Diff", snapshot_path=path["b.snap"],
                                        mem_file_path=path["b.mem"])
        await vm.client.create_snapshot(snapshot_type="Full", snapshot_path=path["c.snap"],
                                        mem_file_path=path["c.mem"])
    before = vm.console.text
    read = next(line for line in before.splitlines() if line.startswith("testguest: blk read"))
    assert "status=0" in read and "first=0x5a" in read and "uniform=1" in read, read
    merged = _merged_equals_full(tmp_path, path)
    async with MicroVM(start=False, binary=asyncvmm_argv()) as vm:
        await vm.client.load_snapshot(snapshot_path=path["b.snap"], resume_vm=True,
                                      mem_backend={"backend_type": "File", "backend_path": merged})
        await vm.wait_for_console(f"testguest: count i={counts(before)[-1] + 2}\n")
        assert_continues(before, vm.console.text)


MMDS_DOC = {"latest": {"meta-data": {"instance-id": "i-0123", "tags": ["a", "b"], "n": 2 ** 70}}}
MMDS_CONFIG = {"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.170.2",
               "imds_compat": True}


async def test_mmds_and_a_received_frame_survive_a_diff_snapshot(test_guest, tmp_path, netns_tap):
    """A microVM with a network interface, MMDS config and data.  The guest receives a first
    frame, then waits on its serial console: Full A.  The host sends a second frame, which
    the VMM writes into the posted receive buffer while the guest does not touch it (so KVM's
    dirty log cannot see it): Diff B, Full C.  A merged with B is C byte for byte, so B holds
    the VMM's write.  The process restored from B answers GET /mmds with the document and
    GET /vm/config with the MMDS config (no PUT /mmds), and the guest, let go on, finds the
    second frame in its restored memory."""
    from tests.kvm.test_net import GUEST_MAC, HOST_MAC, packet_socket

    ns, tap = netns_tap
    netns = ["ip", "netns", "exec", ns]
    path = {n: str(tmp_path / n) for n in ("a.snap", "a.mem", "b.snap", "b.mem", "c.snap", "c.mem")}
    frames = [GUEST_MAC + HOST_MAC + b"\x88\xb5" + bytes((i * k + 3) & 0xFF for i in range(1200))
              for k in (5, 7)]
    iface = {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": GUEST_MAC.hex(":")}
    sock = packet_socket(ns, tap)
    try:
        async with MicroVM(test_guest.elf_pvh, "net=recv serialecho=1 net=recv count=100000 exit=halt",
                           network_interfaces=[iface], mmds=MMDS_DOC, binary=[*netns, *asyncvmm_argv()],
                           config={"machine-config": {"vcpu_count": 1, "mem_size_mib": 64,
                                                      "track_dirty_pages": True},
                                   "mmds-config": MMDS_CONFIG}) as vm:
            await vm.wait_for_console("testguest: net device mac=")
            sock.send(frames[0])
            await vm.wait_for_console("testguest: serialecho ready")
            await vm.client.pause()
            await vm.client.create_snapshot(snapshot_type="Full", snapshot_path=path["a.snap"],
                                            mem_file_path=path["a.mem"])
            await vm.client.resume()
            sock.send(frames[1])
            await asyncio.sleep(1.0)          # the loop writes it into the guest's buffer
            await vm.client.pause()
            await vm.client.create_snapshot(snapshot_type="Diff", snapshot_path=path["b.snap"],
                                            mem_file_path=path["b.mem"])
            await vm.client.create_snapshot(snapshot_type="Full", snapshot_path=path["c.snap"],
                                            mem_file_path=path["c.mem"])
    finally:
        sock.close()
    before = vm.console.text
    assert f"frame={frames[0].hex()}" in before and f"frame={frames[1].hex()}" not in before
    assert frames[1] in open(path["c.mem"], "rb").read(), "the second frame did not reach the guest"
    merged = _merged_equals_full(tmp_path, path)
    load = dict(snapshot_path=path["b.snap"], mem_backend={"backend_type": "File", "backend_path": merged})
    async with MicroVM(start=False, binary=[*netns, *asyncvmm_argv()],
                       extra_args=["--mmds-size-limit", "32"]) as vm:
        message = await _refused(vm, **load)
        assert "MMDS data store has" in message and "MMDS size limit of 32 bytes" in message, message
    async with MicroVM(start=False, binary=[*netns, *asyncvmm_argv()]) as vm:
        await vm.client.load_snapshot(snapshot_path=path["b.snap"], resume_vm=True,
                                      mem_backend={"backend_type": "File", "backend_path": merged})
        assert await vm.client.get_mmds() == MMDS_DOC
        config = await vm.client.get_export_vm_config()
        assert config["mmds-config"] == MMDS_CONFIG, config["mmds-config"]
        await vm.write_console("go\n")
        await vm.wait_for_console("testguest: count i=2\n")
        assert f"frame={frames[1].hex()}" in vm.console.text
        assert_continues(before, vm.console.text)
