"""asyncvmm's benchmarks: each measures asyncvmm against a peer VMM in the same run.

Run one as ``.venv/bin/python -m benchmarks.<name> [--runs N] [--quick]``; it
prints ratios asyncvmm/peer and writes ``benchmarks/results/<name>.json``,
then regenerates ``benchmarks/results/SUMMARY.md``.  See docs/benchmarks.md.
"""
