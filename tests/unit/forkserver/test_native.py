"""The native waiter's build: cached by the source's hash, None (the Python waiter) when it cannot build."""

from __future__ import annotations

import os
import shutil

from asyncvmm.forkserver import native
from tests.conftest import require


def test_the_waiter_is_built_once_and_cached(tmp_path, monkeypatch):
    require(shutil.which("gcc"), "no C compiler (gcc; scripts/quickstart installs it)")
    first = native.build_waiter(tmp_path)
    assert first is not None and os.access(first, os.X_OK)
    assert os.path.basename(first).startswith("forkserver-waiter-")
    monkeypatch.setenv("CC", "/bin/false")              # a second build would fail: it is not attempted
    assert native.build_waiter(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first)]   # no temporary left


def test_without_a_working_compiler_there_is_no_native_waiter(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/bin/false")
    assert native.build_waiter(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.build_waiter(tmp_path) is None


def test_the_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "asyncvmm"
