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


def two_variants():
    return {"asyncvmm-x": {"metrics": {"boot": report.metric([40], "ms"), "start": report.metric([90], "ms"),
                                       "get": report.metric([300], "us")}},
            "qemu-x": {"metrics": {"boot": report.metric([20], "ms"), "start": report.metric([3], "ms")}},
            "floor": {"metrics": {"get": report.metric([150], "us")}}}


def test_label_unequal_sets_a_reason_only_for_the_named_pair_and_metric():
    variants = two_variants()
    comps = [report.compare(variants, "asyncvmm-x", "qemu-x", m) for m in ("boot", "start")]
    labelled = report.label_unequal(comps, {("asyncvmm-x", "qemu-x"): {"start": "loads the kernel"},
                                            ("asyncvmm-x", "other"): {"boot": "not this pair"}})
    assert [c["unequal_work"] for c in labelled] == [None, "loads the kernel"]
    assert "unequal_work" not in comps[0]                        # copies: the input is left alone


def test_labelled_comparisons_get_an_equal_work_column_and_numbered_reasons():
    variants = two_variants()
    comps = report.label_unequal([report.compare(variants, "asyncvmm-x", "qemu-x", m) for m in ("boot", "start")],
                                 {("asyncvmm-x", "qemu-x"): {"start": "InstanceStart loads the kernel"}})
    doc = report.new_document("demo", "Demo", "cmd", variants=variants, comparisons=comps)
    text = "\n".join(report.render_document(doc))
    assert "| metric | asyncvmm | median | peer | median | ratio | better | equal work |" in text
    assert "| boot | `asyncvmm-x` | 40.0 ms | `qemu-x` | 20.0 ms | 2.00x | lower | yes |" in text
    assert "| start | `asyncvmm-x` | 90.0 ms | `qemu-x` | 3.0 ms | 30.00x | lower | no (1) |" in text
    assert "- Unequal work (1): InstanceStart loads the kernel" in text
    terminal = report.format_comparisons(comps)
    assert "no (1)" in terminal and "(1) unequal work: InstanceStart loads the kernel" in terminal


def test_unlabelled_documents_keep_the_old_table():
    text = "\n".join(report.render_document(doc_with([2], [1])))
    assert "equal work" not in text and "Unequal work" not in text
    assert "equal work" not in report.format_comparisons(doc_with([2], [1])["comparisons"])


def test_a_reference_has_no_ratio_and_its_own_table():
    variants = two_variants()
    ref = report.reference(variants, "asyncvmm-x", "floor", "get")
    assert ref == {"metric": "get", "unit": "us", "subject": "asyncvmm-x", "reference": "floor",
                   "subject_median": 300, "reference_median": 150}
    doc = report.new_document("demo", "Demo", "cmd", variants=variants, comparisons=[], references=[ref])
    text = "\n".join(report.render_document(doc))
    assert "Reference figures (not a peer VMM, so no ratio):" in text
    assert "| get | `asyncvmm-x` | 300 us | `floor` | 150 us |" in text
    assert "| metric | asyncvmm | median | reference | median |" in text     # no ratio column
    assert "floor" in report.format_references([ref])
    with pytest.raises(report.ResultError):
        report.reference(variants, "asyncvmm-x", "qemu-x", "get")


def test_conclude_document_prints_the_note_and_failures_and_writes_only_when_asked(tmp_path, capsys):
    doc = doc_with([30, 40, 50], [10, 20, 30])
    doc["variants"]["asyncvmm-x"]["failures"] = ["run 2: the guest hung", "run 3: again"]
    doc["variants"]["qemu-x"]["failures"] = []
    assert report.conclude_document(doc, False, results_dir=None, note="(a note on ratios)") == 1
    out = capsys.readouterr().out
    assert out.index("boot") < out.index("(a note on ratios)") < out.index("asyncvmm-x: 2 failure(s): run 2")
    assert "qemu-x:" not in out and "wrote" not in out and list(tmp_path.iterdir()) == []
    assert report.conclude_document(doc, True, results_dir=tmp_path) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / report.SUMMARY_NAME).exists()
