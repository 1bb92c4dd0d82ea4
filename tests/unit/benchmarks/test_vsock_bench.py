"""The vsock benchmark's pure parts: per-round metrics, units, comparisons, argument checks."""

from __future__ import annotations

import pytest

from benchmarks import report, vsock


def test_round_metrics_are_rates_and_medians():
    m = vsock.round_metrics(8 << 20, 2.0, 4 << 20, 0.5, [300, 100, 200], [50, 70, 60])
    assert m == {"h2g_mib_s": 4.0, "g2h_mib_s": 8.0, "connect_us": 200, "echo_rtt_us": 60}
    assert {k: vsock.unit_of(k) for k in m} == {"h2g_mib_s": "MiB/s", "g2h_mib_s": "MiB/s",
                                                "connect_us": "us", "echo_rtt_us": "us"}


def test_comparisons_mark_throughput_higher_is_better():
    vdocs = {name: {"metrics": {k: report.metric([v], vsock.unit_of(k)) for k, v in
                                {"h2g_mib_s": a, "g2h_mib_s": a, "connect_us": b, "echo_rtt_us": b}.items()}}
             for name, a, b in (("asyncvmm", 2.0, 300.0), ("qemu-microvm", 4.0, 100.0))}
    comps, notes = vsock.comparisons(vdocs)
    assert not notes
    by = {c["metric"]: c for c in comps}
    assert by["h2g_mib_s"]["ratio"] == 0.5 and by["h2g_mib_s"]["higher_is_better"]
    assert by["connect_us"]["ratio"] == 3.0 and not by["connect_us"]["higher_is_better"]


def test_unknown_variant_and_bad_numbers_are_refused():
    with pytest.raises(ValueError, match="unknown variants"):
        vsock.make_variants(["firecracker"])
    with pytest.raises(SystemExit):
        vsock.parse_args(["--mib", "0"])
    assert [v.name for v in vsock.make_variants()] == ["asyncvmm", "qemu-microvm"]
    assert vsock.Settings(2, 4, ("asyncvmm",)).argv() == ["--runs", "2", "--mib", "4", "--variants", "asyncvmm"]
