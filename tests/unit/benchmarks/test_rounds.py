"""Interleaved rounds: rotation, discarded warm-ups, one load reading and one log line per round."""

from __future__ import annotations

from benchmarks import rounds


def test_rounds_rotate_the_first_variant_and_warm_ups_are_discarded(monkeypatch):
    monkeypatch.setattr(rounds.machine, "load_average", lambda: [0.5, 0.5, 0.5])
    ran: list[str] = []
    discarded: list[str] = []
    lines: list[str] = []
    loads = rounds.interleaved_rounds(["a", "b", "c"], 4, ran.append, warmup=1, discard=discarded.append,
                                      describe=lambda vs: "+".join(vs), log=lines.append)
    assert ran == ["a", "b", "c",                        # warm-up
                   "a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert discarded == ["a", "b", "c"]
    assert loads == [[0.5, 0.5, 0.5]] * 4
    assert lines == [f"round {i}/4: load [0.5, 0.5, 0.5]; a+b+c" for i in range(1, 5)]


def test_no_warm_up_by_default(monkeypatch):
    monkeypatch.setattr(rounds.machine, "load_average", lambda: [0.0, 0.0, 0.0])
    ran: list[str] = []
    rounds.interleaved_rounds(["x"], 2, ran.append, log=lambda line: None)
    assert ran == ["x", "x"]
