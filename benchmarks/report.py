"""Benchmark results: the JSON document, the ratio table, and SUMMARY.md.

A result document (``benchmarks/results/<name>.json``) holds everything a
reader needs to trust or redo a number: the raw samples of every metric of
every variant, their summaries (``benchmarks.stats``), the comparisons
(subject median / peer median, measured in the same run), the machine, the
load, the exact commands and the git commit.  ``SUMMARY.md`` is regenerated
from all the JSON files after each run, so it never disagrees with them.

Two things keep a ratio honest:

* a comparison may carry ``unequal_work``: why the two sides did not do the
  same work for that metric (e.g. ``InstanceStart`` loads the kernel, while
  QEMU's ``cont`` runs one loaded before the socket was up).  A document whose
  comparisons carry the key (``None`` when the work is equal) gets an "equal
  work" column and the reasons as numbered notes under its table.
* a *reference* (``references``) is a figure shown beside asyncvmm's that is
  not a peer VMM, e.g. a canned-reply server's latency (what the harness can
  measure at all): it has its own table and no ratio.

Formatting is pure (documents in, text out); only ``write_result`` and
``regenerate_summary`` touch files.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from benchmarks import stats

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUMMARY_NAME = "SUMMARY.md"
SCHEMA = 1

# unit -> (scale for display, display unit, decimals)
DISPLAY = {
    "ms": (1.0, "ms", 1),
    "us": (1.0, "us", 0),
    "KiB": (1 / 1024, "MiB", 1),
    "MiB/s": (1.0, "MiB/s", 1),
    "pkt/s": (1.0, "pkt/s", 0),
    "%": (1.0, "%", 1),
    "count": (1.0, "", 0),
}


class ResultError(ValueError):
    """A result document lacks what a comparison or the summary needs."""


def metric(samples: Sequence[float], unit: str) -> dict[str, Any]:
    """A metric entry: unit, raw samples, and their summary."""
    if unit not in DISPLAY:
        raise ResultError(f"unknown unit {unit!r}")
    return {"unit": unit, "samples": list(samples), **stats.summarize(samples).as_dict()}


def compare(variants: Mapping[str, Any], subject: str, peer: str, name: str) -> dict[str, Any]:
    """Compare one metric of two variants by their medians."""
    try:
        a = variants[subject]["metrics"][name]
        b = variants[peer]["metrics"][name]
    except KeyError as err:
        raise ResultError(f"cannot compare {name}: {subject} or {peer} lacks it ({err})") from None
    if a["unit"] != b["unit"]:
        raise ResultError(f"{name}: units differ ({a['unit']} vs {b['unit']})")
    return {"metric": name, "unit": a["unit"], "subject": subject, "peer": peer,
            "subject_median": a["median"], "peer_median": b["median"],
            "ratio": stats.ratio(a["median"], b["median"])}


def label_unequal(comparisons: Iterable[Mapping[str, Any]],
                  reasons: Mapping[tuple[str, str], Mapping[str, str]]) -> list[dict[str, Any]]:
    """Copies of ``comparisons`` with ``unequal_work`` set: the reason given for their
    (subject, peer) pair and metric, else None (the two sides did the same work)."""
    return [dict(c) | {"unequal_work": reasons.get((c["subject"], c["peer"]), {}).get(c["metric"])}
            for c in comparisons]


def reference(variants: Mapping[str, Any], subject: str, ref: str, name: str) -> dict[str, Any]:
    """One metric of ``subject`` beside the same metric of a reference (not a peer): no ratio."""
    try:
        a = variants[subject]["metrics"][name]
        b = variants[ref]["metrics"][name]
    except KeyError as err:
        raise ResultError(f"cannot show {name} beside {ref}: {subject} or {ref} lacks it ({err})") from None
    if a["unit"] != b["unit"]:
        raise ResultError(f"{name}: units differ ({a['unit']} vs {b['unit']})")
    return {"metric": name, "unit": a["unit"], "subject": subject, "reference": ref,
            "subject_median": a["median"], "reference_median": b["median"]}


def compare_pairs(variants: Mapping[str, Any], pairs: Iterable[tuple[str, str, Sequence[str]]],
                  higher_is_better: Callable[[str], bool]) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`compare` each named metric of every (subject, peer, names) pair whose two variants
    both ran; each comparison is flagged ``higher_is_better`` by metric name.  A metric that one
    of them lacks becomes a note instead.  Returns (comparisons, notes)."""
    out, notes = [], []
    for subject, peer, names in pairs:
        if subject not in variants or peer not in variants:
            continue
        for name in names:
            try:
                c = compare(variants, subject, peer, name)
            except ResultError as err:
                notes.append(f"comparison skipped: {err}")
                continue
            out.append(c | {"higher_is_better": higher_is_better(name)})
    return out, notes


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    scale, shown, decimals = DISPLAY[unit]
    text = f"{value * scale:,.{decimals}f}"
    return f"{text} {shown}".rstrip()


def unequal_notes(comparisons: Iterable[Mapping[str, Any]]) -> tuple[list[str], dict[str, int]]:
    """The distinct ``unequal_work`` reasons in order of first use, and each one's number (1-based)."""
    reasons: list[str] = []
    for c in comparisons:
        why = c.get("unequal_work")
        if why and why not in reasons:
            reasons.append(why)
    return reasons, {why: i + 1 for i, why in enumerate(reasons)}


def work_cell(c: Mapping[str, Any], numbers: Mapping[str, int]) -> str:
    why = c.get("unequal_work")
    return f"no ({numbers[why]})" if why else "yes"


def _labelled(comparisons: Sequence[Mapping[str, Any]]) -> bool:
    return any("unequal_work" in c for c in comparisons)


def format_comparisons(comparisons: Iterable[Mapping[str, Any]]) -> str:
    """A plain-text table of ratios, for the terminal (with the unequal-work reasons, if labelled)."""
    comparisons = list(comparisons)
    labelled = _labelled(comparisons)
    reasons, numbers = unequal_notes(comparisons)
    rows = [("metric", "asyncvmm", "median", "peer", "median", "ratio") + (("equal work",) if labelled else ())]
    for c in comparisons:
        rows.append((c["metric"], c["subject"], fmt(c["subject_median"], c["unit"]),
                     c["peer"], fmt(c["peer_median"], c["unit"]), stats.format_ratio(c["ratio"]))
                    + ((work_cell(c, numbers),) if labelled else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + [f"({i}) unequal work: {why}" for i, why in enumerate(reasons, 1)])


def format_references(references: Iterable[Mapping[str, Any]]) -> str:
    """A plain-text table of reference figures (no ratio), for the terminal."""
    rows = [("metric", "asyncvmm", "median", "reference", "median")]
    rows += [(r["metric"], r["subject"], fmt(r["subject_median"], r["unit"]), r["reference"],
              fmt(r["reference_median"], r["unit"])) for r in references]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_document(doc: Mapping[str, Any]) -> list[str]:
    """The markdown section of one result document."""
    git = doc.get("git", {})
    machine = doc.get("machine", {})
    load = doc.get("load", {})
    dirty = git.get("dirty_paths") or []
    commit = (git.get("commit") or "unknown")[:12] + (
        f" plus uncommitted changes to {len(dirty)} file(s) (listed in the JSON)" if git.get("dirty") else "")
    lines = [f"## {doc.get('title', doc['benchmark'])}", "",
             f"`{doc.get('command', 'python -m benchmarks.' + doc['benchmark'])}` on {doc.get('date', '?')}, "
             f"commit {commit}.", "",
             f"Machine: {machine.get('cpu_model')}, {machine.get('cpus')} CPUs, kernel {machine.get('kernel')}, "
             f"KVM module `{machine.get('kvm')}`, {machine.get('qemu')}. "
             f"Load average (1/5/15 min) before {load.get('before')}, after {load.get('after')}.", ""]
    comparisons = doc.get("comparisons", [])
    if comparisons:
        labelled = _labelled(comparisons)
        reasons, numbers = unequal_notes(comparisons)
        lines += _md_table(
            ("metric", "asyncvmm", "median", "peer", "median", "ratio", "better")
            + (("equal work",) if labelled else ()),
            ((c["metric"], f"`{c['subject']}`", fmt(c["subject_median"], c["unit"]), f"`{c['peer']}`",
              fmt(c["peer_median"], c["unit"]), stats.format_ratio(c["ratio"]),
              "higher" if c.get("higher_is_better") else "lower")
             + ((work_cell(c, numbers),) if labelled else ()) for c in comparisons))
        lines.append("")
        if reasons:
            lines += [f"- Unequal work ({i}): {why}" for i, why in enumerate(reasons, 1)]
            lines.append("")
    references = doc.get("references", [])
    if references:
        lines += ["Reference figures (not a peer VMM, so no ratio):", ""]
        lines += _md_table(
            ("metric", "asyncvmm", "median", "reference", "median"),
            ((r["metric"], f"`{r['subject']}`", fmt(r["subject_median"], r["unit"]), f"`{r['reference']}`",
              fmt(r["reference_median"], r["unit"])) for r in references))
        lines.append("")
    detail = []
    for vname, variant in doc.get("variants", {}).items():
        for mname, m in variant.get("metrics", {}).items():
            u = m["unit"]
            detail.append((f"`{vname}`", mname, str(m["n"]), fmt(m["median"], u), fmt(m["p99"], u),
                           fmt(m["min"], u), fmt(m["max"], u), fmt(m["stdev"], u)))
    if detail:
        lines += ["<details><summary>All metrics (p99 is nearest-rank: the maximum below 100 samples)"
                  "</summary>", ""]
        lines += _md_table(("variant", "metric", "n", "median", "p99", "min", "max", "stdev"), detail)
        lines += ["", "</details>", ""]
    failed = {name: len(v.get("failures", [])) for name, v in doc.get("variants", {}).items()}
    if any(failed.values()):
        lines += ["Failed runs (left out of the statistics; messages in the JSON): " + ", ".join(
            f"`{name}` {n}" for name, n in failed.items() if n) + ".", ""]
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    if doc.get("notes"):
        lines.append("")
    return lines


def render_summary(docs: Iterable[Mapping[str, Any]]) -> str:
    lines = ["# Benchmark results", "",
             "Generated from `benchmarks/results/*.json` by `python -m benchmarks.report`; "
             "do not edit by hand. Ratios are asyncvmm median / peer median measured in the same "
             "run; the \"better\" column says whether a higher ratio (rates: IOPS, MiB/s, requests/s) or a "
             "lower one (times, sizes) favours asyncvmm. How to run and read them: "
             "[docs/benchmarks.md](../../docs/benchmarks.md).", ""]
    for doc in sorted(docs, key=lambda d: d["benchmark"]):
        lines += render_document(doc)
    return "\n".join(lines).rstrip() + "\n"


def new_document(benchmark: str, title: str, command: str, **fields: Any) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"schema": SCHEMA, "benchmark": benchmark, "title": title, "command": command,
            "date": now.isoformat(), **fields}


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if isinstance(doc, dict) and "benchmark" in doc:
            docs.append(doc)
    return docs


def regenerate_summary(results_dir: Path = RESULTS_DIR) -> Path:
    path = results_dir / SUMMARY_NAME
    _atomic_write(path, render_summary(load_results(results_dir)))
    return path


def write_result(doc: Mapping[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<benchmark>.json`` and regenerate SUMMARY.md; returns the JSON path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{doc['benchmark']}.json"
    _atomic_write(path, dumps(doc) + "\n")
    regenerate_summary(results_dir)
    return path


def select_variants(variants: Sequence[Any], spec: str | None,
                    default: Sequence[str] | None = None) -> list[Any]:
    """The variants named in ``spec`` (comma-separated; else ``default``, else all), in run order.

    Raises ValueError naming any unknown variant.
    """
    wanted = spec.split(",") if spec else list(default or (v.name for v in variants))
    unknown = set(wanted) - {v.name for v in variants}
    if unknown:
        raise ValueError(f"unknown variants: {', '.join(sorted(unknown))}")
    return [v for v in variants if v.name in wanted]


def conclude(doc: Mapping[str, Any], variants: Sequence[Any], *, write: bool,
             results_dir: Path = RESULTS_DIR, note: str = "") -> int:
    """Print a benchmark's comparisons and failures, write its results; the process exit code.

    Every variant needs at least one sample for the run to count as a success.
    """
    print()
    print(format_comparisons(doc["comparisons"]))
    if doc.get("references"):
        print()
        print(format_references(doc["references"]))
    if note:
        print(note)
    for v in variants:
        if v.failures:
            print(f"{v.name}: {len(v.failures)} failed run(s)")
    if write:
        path = write_result(doc, results_dir)
        print(f"\nwrote {path} and {results_dir / SUMMARY_NAME}")
    return 0 if all(v.samples for v in variants) else 1


def conclude_document(doc: Mapping[str, Any], ok: bool, *, results_dir: Path | None, note: str = "") -> int:
    """:func:`conclude` for a finished document (a run that may have been nested in the emulated host).

    Prints the comparisons, ``note``, each variant's failure count and first failure, writes the
    results when ``results_dir`` is not None; the process exit code.
    """
    print()
    print(format_comparisons(doc["comparisons"]))
    if note:
        print(note)
    for name, v in doc["variants"].items():
        if v["failures"]:
            print(f"{name}: {len(v['failures'])} failure(s): {v['failures'][0][:300]}")
    if results_dir is not None:
        path = write_result(doc, results_dir)
        print(f"\nwrote {path} and {results_dir / SUMMARY_NAME}")
    return 0 if ok else 1


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with one key per line but lists of numbers or strings on one line (samples stay readable)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, Mapping) and value:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main() -> int:
    print(regenerate_summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
