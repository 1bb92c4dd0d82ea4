"""build_test_guest: caching, rebuilding, failures, and the bzImage packer."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.guest import build
from tests.unit.testguest.conftest import toolchain_present
from tests.unit.testguest.elfview import parse_setup_header
from tests.conftest import require


def test_second_call_reuses_the_cache_without_compiling(images, monkeypatch):
    def no_compile(out):
        raise AssertionError("rebuilt although the cache was complete")
    monkeypatch.setattr(build, "_compile_and_link", no_compile)
    again = build.build_test_guest(images.directory.parent)
    assert again == images


def test_cache_directory_is_named_by_the_source_hash(images):
    assert images.directory.name == build.cache_key()
    assert len(images.directory.name) == 64


def test_a_missing_image_is_rebuilt(images, tmp_path):
    shutil.copytree(images.directory, tmp_path / images.directory.name)
    (tmp_path / images.directory.name / images.bzimage.name).unlink()
    rebuilt = build.build_test_guest(tmp_path)
    assert rebuilt.bzimage.read_bytes() == images.bzimage.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [images.directory.name]   # no temp dirs left


def test_key_changes_when_a_source_changes(tmp_path, monkeypatch):
    require(toolchain_present(), "gcc/ld/objcopy are needed to hash tool versions")
    copy = tmp_path / "guest"
    shutil.copytree(build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    before = build.cache_key()
    (copy / "main.c").write_text((copy / "main.c").read_text() + "\n/* changed */\n")
    assert build.cache_key() != before


def test_key_ignores_files_that_do_not_affect_the_images(tmp_path, monkeypatch):
    require(toolchain_present(), "gcc/ld/objcopy are needed to hash tool versions")
    copy = tmp_path / "guest"
    shutil.copytree(build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    before = build.cache_key()
    (copy / "output.py").write_text("# a parser change\n")
    assert build.cache_key() == before


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))            # nothing on PATH
    with pytest.raises(build.TestGuestBuildError, match="gcc not found"):
        build.build_test_guest(tmp_path / "cache")


def test_a_failing_compile_leaves_no_cache_entry(tmp_path, monkeypatch):
    require(toolchain_present(), "gcc/ld/objcopy are needed to build the test guest")
    copy = tmp_path / "guest"
    shutil.copytree(build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "lib.c").write_text("this is not C\n")
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    cache = tmp_path / "cache"
    with pytest.raises(build.TestGuestBuildError, match="lib.c"):
        build.build_test_guest(cache)
    assert list(cache.iterdir()) == []


@given(payload_len=st.integers(0x201, 0x40000), stub_len=st.integers(1, 0x300),
       init_size=st.integers(1, 1 << 24))
def test_packer_header_describes_its_own_layout(payload_len, stub_len, init_size):
    payload = bytes([0xFA]) + bytes(payload_len - 1)
    stub = bytes([0xFA]) * stub_len
    image = build.pack_bzimage(payload, stub, init_size)
    hdr = parse_setup_header(image)
    setup_len = (hdr["setup_sects"] + 1) * 512
    assert image[setup_len:setup_len + payload_len] == payload
    assert len(image) - setup_len == hdr["syssize"] * 16 == -(-payload_len // 16) * 16
    assert hdr["init_size"] >= init_size and hdr["init_size"] % 4096 == 0
    target = 0x202 + (hdr["jump"] >> 8)
    assert image[target:target + stub_len] == stub
    version_at = 0x200 + hdr["kernel_version"]
    assert version_at + len(build.KERNEL_VERSION) <= setup_len


def test_packer_refuses_a_payload_without_a_64_bit_entry():
    with pytest.raises(ValueError, match="0x200"):
        build.pack_bzimage(bytes(0x200), b"\xfa", 4096)
