"""benchmarks.blockfio without a VMM: fio command lines and output, VMM arguments, metrics, settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import blockfio, report
from benchmarks.blockfio import JOBS, TERSE_FIELDS, FioResult, Job
from benchmarks.net import CpuTicks, RunFailed

RANDREAD = Job("randread_4k_qd1", "randread", 4096, 1)
SEQWRITE = Job("seqwrite_1m_qd4", "write", 1 << 20, 4)


def terse(job: str = "randread_4k_qd1", *, error: int = 0, read: tuple = (8000, 1000.5, 2000),
          write: tuple = (0, 0.0, 0), version: str = "3") -> str:
    """A line as the guest prints it: the TERSE_FIELDS of a terse v3 line, in order."""
    values = {"terse_version": version, "jobname": job, "error": error,
              "read_kib": read[0], "read_iops": read[1], "read_runtime_ms": read[2],
              "write_kib": write[0], "write_iops": write[1], "write_runtime_ms": write[2]}
    return ";".join(str(values[name]) for name, _ in TERSE_FIELDS)


# -- fio output --------------------------------------------------------------------------

def test_a_read_job_gives_its_bytes_iops_and_runtime():
    out = f"AVMFIO:3:begin\nAVMFIO:3:end:0\n{terse()}\n"
    result = blockfio.parse_fio_terse(out, "randread_4k_qd1")
    assert result == FioResult("randread_4k_qd1", 8000 * 1024, 0, 1000.5, 2000)
    assert result.mib_s == pytest.approx(8000 / 1024 / 2)


def test_a_write_job_counts_the_write_side():
    line = terse("seqwrite_1m_qd4", read=(0, 0.0, 0), write=(204800, 50.0, 4000))
    result = blockfio.parse_fio_terse(line + "\r\n", "seqwrite_1m_qd4")
    assert result.bytes == 200 << 20 and result.iops == 50.0 and result.runtime_ms == 4000
    assert result.mib_s == 50.0


def test_the_terse_line_is_found_among_other_output():
    out = f"fio: some warning\r\n{terse()}\r\nstderr tail\r\n"
    assert blockfio.parse_fio_terse(out, "randread_4k_qd1").iops == 1000.5


@pytest.mark.parametrize("text, why", [
    ("nothing here", "no terse line"),
    (terse() + ";extra", "terse fields"),
    (terse("other"), "'other'"),
    (terse(error=5), "error 5"),
    (terse(read=(0, 0.0, 0)), "moved nothing"),
    (terse(read=(10, "x", 10)), "not a fio terse line"),
    (terse(read=(10, 1.0, 0)), "moved nothing"),
])
def test_a_bad_result_is_refused(text, why):
    with pytest.raises(RunFailed, match=re.escape(why)):
        blockfio.parse_fio_terse(text, "randread_4k_qd1")


def test_the_terse_fields_are_fio_v3_positions():
    fields = dict(TERSE_FIELDS)
    assert (fields["read_kib"], fields["read_iops"], fields["read_runtime_ms"]) == (6, 8, 9)
    assert (fields["write_kib"], fields["write_iops"], fields["write_runtime_ms"]) == (47, 49, 50)


# -- fio command lines and the guest script ---------------------------------------------------

def test_fio_runs_direct_libaio_time_based_on_the_data_disk():
    argv = blockfio.fio_argv(RANDREAD, 3)
    assert argv[0] == "fio"
    for flag in ("--filename=/dev/vdb", "--rw=randread", "--bs=4096", "--iodepth=1", "--ioengine=libaio",
                 "--direct=1", "--time_based", "--runtime=3", "--output-format=terse", "--terse-version=3"):
        assert flag in argv


def test_fio_needs_a_runtime():
    with pytest.raises(ValueError):
        blockfio.fio_argv(RANDREAD, 0)


def test_the_job_script_frames_fio_with_markers_and_prints_only_the_fields():
    script = blockfio.job_script(7, SEQWRITE, 2)
    lines = script.splitlines()
    assert lines[0] == "printf '%s:%s:begin\\n' AVMFIO 7"
    assert lines[1].startswith("fio --name=seqwrite_1m_qd4 ") and "--output=/tmp/fio.out" in lines[1]
    assert lines[3] == "printf '%s:%s:end:%s\\n' AVMFIO 7 $s"
    assert "cut -d';' -f1,3,5,6,8,9,47,49,50" in script
    assert lines[-1] == "exit $s"
    # the script itself never contains a marker (an echo of it cannot be taken for one)
    assert not re.search(blockfio.begin_marker(7), script) and not re.search(blockfio.end_marker(7), script)


def test_markers_match_what_the_guest_prints():
    console = "xx AVMFIO:7:begin\r\nAVMFIO:7:end:0\r\n"
    assert re.search(blockfio.begin_marker(7), console)
    assert re.search(blockfio.end_marker(7), console)[1] == "0"
    assert not re.search(blockfio.begin_marker(1), console)


def test_jobs_name_their_rate_by_kind():
    assert [j.rate_metric for j in JOBS] == [
        "randread_4k_qd1_iops", "randread_4k_qd32_iops", "randwrite_4k_qd1_iops", "randwrite_4k_qd32_iops",
        "seqread_1m_qd4_mib_s", "seqwrite_1m_qd4_mib_s"]


# -- VMM arguments ------------------------------------------------------------------------

def test_asyncvmm_data_drive_is_writable_writeback():
    drive = blockfio.asyncvmm_data_drive(Path("/d.img"), "Async")
    assert drive == {"drive_id": "data", "path_on_host": "/d.img", "is_root_device": False,
                     "is_read_only": False, "cache_type": "Writeback", "io_engine": "Async"}
    assert blockfio.asyncvmm_vhost_user_drive(Path("/s")) == {"drive_id": "data", "socket": "/s",
                                                              "is_root_device": False}


def test_qemu_data_drive_is_page_cached_threads_and_unlocked():
    args = blockfio.qemu_data_drive(Path("/d.img"))
    drive = args[args.index("-drive") + 1]
    assert "cache=writeback" in drive and "aio=threads" in drive and "file.locking=off" in drive
    assert "readonly" not in drive
    assert args[:2] == ["-global", "virtio-mmio.force-legacy=false"]


def test_qemu_data_drive_moves_to_pci_with_the_net_benchmarks_rewrite():
    from benchmarks.net import qemu_pci_argv

    argv = qemu_pci_argv(["qemu", "-M", "microvm,acpi=on", *blockfio.qemu_data_drive(Path("/d.img"))])
    assert "virtio-blk-pci,disable-legacy=on,drive=data" in argv
    assert "microvm,acpi=on,pcie=on" in argv


def test_qemu_vhost_user_shares_guest_ram():
    args = blockfio.qemu_vhost_user_drive(Path("/s.sock"), mem_mib=256)
    assert "memory-backend-memfd,id=ram,size=256M,share=on" in args
    assert "socket,id=vu,path=/s.sock" in args and "vhost-user-blk,chardev=vu,num-queues=1" in args


def test_one_daemon_exports_the_file_once_per_front_end():
    args = blockfio.storage_daemon_args(Path("/d.img"), [Path("/a.sock"), Path("/b.sock")])
    exports = [args[i + 1] for i, a in enumerate(args) if a == "--export"]
    assert len(exports) == 2
    assert all("writable=on" in e and "node-name=data" in e for e in exports)
    assert "addr.path=/a.sock" in exports[0] and "id=vu1" in exports[1]


# -- metrics and comparisons ------------------------------------------------------------------

def test_job_metrics_are_rate_and_cpu_per_gib():
    result = FioResult("randread_4k_qd1", 512 << 20, 0, 2000.0, 1000)
    cpu = CpuTicks(user=30, system=20, guest=10)            # own: 20 user + 20 sys
    m = blockfio.job_metrics(RANDREAD, result, cpu, None, tick_ms=10.0)
    assert m["randread_4k_qd1_iops"] == 2000.0
    assert m["randread_4k_qd1_vmm_cpu_ms_per_gib"] == 800.0      # 400 ms per half GiB
    assert m["randread_4k_qd1_vmm_user_ms_per_gib"] == 400.0
    assert m["randread_4k_qd1_vmm_sys_ms_per_gib"] == 400.0
    assert m["randread_4k_qd1_guest_cpu_ms_per_gib"] == 200.0
    assert "randread_4k_qd1_backend_cpu_ms_per_gib" not in m


def test_sequential_jobs_report_mib_s_and_the_back_end():
    result = FioResult("seqwrite_1m_qd4", 0, 1 << 30, 25.0, 4000)
    m = blockfio.job_metrics(SEQWRITE, result, CpuTicks(5, 5, 0), 7, tick_ms=10.0)
    assert m["seqwrite_1m_qd4_mib_s"] == 256.0
    assert m["seqwrite_1m_qd4_backend_cpu_ms_per_gib"] == 70.0


def test_units():
    assert blockfio.unit_of("seqread_1m_qd4_mib_s") == "MiB/s"
    assert blockfio.unit_of("randread_4k_qd1_iops") == "count"
    assert blockfio.unit_of("randread_4k_qd1_vmm_cpu_ms_per_gib") == "ms"


def vdoc(rate: float, cpu: float, backend: float | None = None) -> dict:
    metrics = {}
    for job in JOBS:
        metrics[job.rate_metric] = report.metric([rate], blockfio.unit_of(job.rate_metric))
        metrics[f"{job.name}_vmm_cpu_ms_per_gib"] = report.metric([cpu], "ms")
        if backend is not None:
            metrics[f"{job.name}_backend_cpu_ms_per_gib"] = report.metric([backend], "ms")
    return {"metrics": metrics}


def test_each_asyncvmm_variant_is_compared_with_its_peer():
    vdocs = {"asyncvmm": vdoc(100, 50), "qemu-microvm": vdoc(200, 25),
             "asyncvmm-vhost-user": vdoc(90, 1, 40), "qemu-microvm-vhost-user": vdoc(100, 2, 40)}
    comps, notes = blockfio.comparisons(vdocs, JOBS)
    assert notes == []
    by = {(c["subject"], c["peer"], c["metric"]): c for c in comps}
    rate = by[("asyncvmm", "qemu-microvm", "randread_4k_qd1_iops")]
    assert rate["ratio"] == 0.5 and rate["higher_is_better"] is True
    cpu = by[("asyncvmm", "qemu-microvm", "seqwrite_1m_qd4_vmm_cpu_ms_per_gib")]
    assert cpu["ratio"] == 2.0 and cpu["higher_is_better"] is False
    assert by[("asyncvmm-vhost-user", "qemu-microvm-vhost-user", "seqread_1m_qd4_backend_cpu_ms_per_gib")]
    # pairs whose variants did not run are left out
    assert {(s, p) for s, p, _ in by} == {("asyncvmm", "qemu-microvm"),
                                          ("asyncvmm-vhost-user", "qemu-microvm-vhost-user")}


def test_pairs_keep_transports_and_data_paths_apart():
    pairs = {(s, p) for s, p, _ in blockfio.pairs(JOBS)}
    assert ("asyncvmm-pci", "qemu-microvm-pci") in pairs and ("asyncvmm", "qemu-microvm") in pairs
    assert ("asyncvmm-vhost-user", "qemu-microvm-vhost-user") in pairs
    peers = [(s, p) for s, p in pairs if p.startswith("qemu")]
    assert all(("pci" in s) == ("pci" in p) and ("vhost-user" in s) == ("vhost-user" in p) for s, p in peers)


# -- variants and settings ---------------------------------------------------------------------

def test_every_variant_is_known_and_unknown_ones_are_refused():
    names = [v.name for v in blockfio.make_variants()]
    assert names == ["asyncvmm", "asyncvmm-async", "qemu-microvm", "asyncvmm-pci", "qemu-microvm-pci",
                     "asyncvmm-vhost-user", "qemu-microvm-vhost-user"]
    assert blockfio.make_variants(["qemu-microvm"])[0].kind == blockfio.Kind("qemu")
    with pytest.raises(ValueError, match="nope"):
        blockfio.make_variants(["nope"])


def test_quick_settings_and_their_flags_round_trip():
    settings = blockfio.settings_from(blockfio.parse_args(["--quick", "--variants", "asyncvmm,qemu-microvm"]))
    assert settings == blockfio.Settings(blockfio.QUICK_RUNS, blockfio.QUICK_SECONDS, ("asyncvmm", "qemu-microvm"))
    again = blockfio.settings_from(blockfio.parse_args(settings.argv()))
    assert again == settings


def test_defaults_and_a_bound_for_the_nested_run():
    settings = blockfio.settings_from(blockfio.parse_args([]))
    assert settings.runs == blockfio.DEFAULT_RUNS and settings.seconds == blockfio.DEFAULT_SECONDS
    assert settings.variants == tuple(blockfio.VARIANTS)
    assert blockfio.hostvm_timeout(settings) > settings.runs * len(settings.variants) * len(JOBS) * settings.seconds


def test_runs_and_seconds_must_be_positive():
    with pytest.raises(SystemExit):
        blockfio.parse_args(["--runs", "0"])
    with pytest.raises(SystemExit):
        blockfio.parse_args(["--seconds", "0"])
