import json

import pytest

from benchmarks import report


def doc_with(a_samples, b_samples, unit="ms"):
    variants = {"asyncvmm-x": {"metrics": {"boot": report.metric(a_samples, unit)}},
                "qemu-x": {"metrics": {"boot": report.metric(b_samples, unit)}}}
    return report.new_document("demo", "Demo", "python -m benchmarks.demo", variants=variants,
                               comparisons=[report.compare(variants, "asyncvmm-x", "qemu-x", "boot")],
                               git={"commit": "abcdef1234567890", "dirty": True},
                               machine={"cpu_model": "Test CPU", "kvm": "kvm_pvm"},
                               load={"before": [1.0, 1.0, 1.0], "after": [2.0, 1.0, 1.0]},
                               notes=["a note"])


def test_metric_keeps_raw_samples_and_summary():
    m = report.metric([3, 1, 2], "ms")
    assert m["samples"] == [3, 1, 2]
    assert (m["median"], m["min"], m["max"], m["n"]) == (2, 1, 3, 3)


def test_compare_divides_the_medians():
    c = doc_with([30, 40, 50], [10, 20, 30])["comparisons"][0]
    assert c["ratio"] == 2.0
    assert (c["subject_median"], c["peer_median"]) == (40, 20)


def test_compare_refuses_missing_metrics_and_unit_mismatch():
    variants = {"a": {"metrics": {"m": report.metric([1], "ms")}},
                "b": {"metrics": {"m": report.metric([1], "KiB")}}}
    with pytest.raises(report.ResultError):
        report.compare(variants, "a", "b", "m")
    with pytest.raises(report.ResultError):
        report.compare(variants, "a", "c", "m")


def test_unknown_unit_is_refused():
    with pytest.raises(report.ResultError):
        report.metric([1], "furlongs")


def test_memory_is_shown_in_mib():
    assert report.fmt(2048, "KiB") == "2.0 MiB"
    assert report.fmt(1234.56, "ms") == "1,234.6 ms"
    assert report.fmt(None, "ms") == "n/a"


def test_terminal_table_shows_the_ratio():
    text = report.format_comparisons(doc_with([30, 40, 50], [10, 20, 30])["comparisons"])
    assert "2.00x" in text.splitlines()[1]


def test_write_result_writes_json_and_regenerates_the_summary(tmp_path):
    path = report.write_result(doc_with([30, 40, 50], [10, 20, 30]), tmp_path)
    assert json.loads(path.read_text())["variants"]["qemu-x"]["metrics"]["boot"]["samples"] == [10, 20, 30]
    summary = (tmp_path / report.SUMMARY_NAME).read_text()
    assert "| boot | `asyncvmm-x` | 40.0 ms | `qemu-x` | 20.0 ms | 2.00x |" in summary
    assert "abcdef123456 plus uncommitted changes" in summary and "kvm_pvm" in summary
    assert "- a note" in summary


def test_summary_covers_every_result_file_in_name_order(tmp_path):
    for name in ("zeta", "alpha"):
        d = doc_with([1], [1])
        d["benchmark"], d["title"] = name, name.title()
        report.write_result(d, tmp_path)
    (tmp_path / "unrelated.json").write_text("[1, 2]")
    summary = (tmp_path / report.SUMMARY_NAME).read_text()
    assert summary.index("## Alpha") < summary.index("## Zeta")


def test_dumps_round_trips_and_keeps_sample_lists_on_one_line():
    doc = {"a": {"samples": [1, 2.5, 3], "nested": [[1, 2], {"x": None}]}, "empty": {}, "s": "t"}
    text = report.dumps(doc)
    assert json.loads(text) == doc
    assert '"samples": [1, 2.5, 3]' in text


def test_summary_counts_failed_runs():
    doc = doc_with([1], [1])
    doc["variants"]["asyncvmm-x"]["failures"] = ["boom", "bang"]
    text = "\n".join(report.render_document(doc))
    assert "`asyncvmm-x` 2" in text
