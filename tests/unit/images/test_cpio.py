"""The cpio newc writer, checked byte-exact against readers we did not write (GNU cpio, busybox cpio)."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvmm_tools.images.cpio import CpioArchive, CpioError, encode_entry, parse
from tests.conftest import require


def sample() -> CpioArchive:
    a = CpioArchive()
    a.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    a.add_file("etc/asyncvmm/modules", b"a.ko\n")
    a.add_symlink("bin/sh", "/bin/busybox")
    a.add_chardev("dev/console", 5, 1)
    a.add_dir("tmp", 0o1777)
    return a


def test_header_layout_is_newc():
    entry = encode_entry(1, stat.S_IFREG | 0o644, 1, 0, (0, 0), "ab", b"xyz")
    assert entry[:6] == b"070701"
    assert entry[6:14] == b"00000001"            # ino
    assert entry[14:22] == b"000081A4"           # S_IFREG|0644
    assert entry[54:62] == b"00000003"           # filesize
    assert entry[94:102] == b"00000003"          # namesize incl. NUL
    # 110-byte header + "ab\0" = 113 -> padded to 116; data 3 -> padded to 4
    assert len(entry) == 116 + 4
    assert entry[113:116] == b"\0\0\0" and entry[116:119] == b"xyz"


def test_parents_sorted_and_deterministic():
    a, b = sample(), sample()
    assert a.to_bytes() == b.to_bytes()
    names = [e.name for e in parse(a.to_bytes())]
    assert names == sorted(names)
    assert {"etc", "etc/asyncvmm", "bin", "dev"} <= set(names)


def test_round_trip_through_our_parser():
    entries = {e.name: e for e in parse(sample().to_bytes())}
    assert entries["init"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert entries["bin/sh"].data == b"/bin/busybox" and stat.S_ISLNK(entries["bin/sh"].mode)
    assert stat.S_ISCHR(entries["dev/console"].mode) and entries["dev/console"].rdev == (5, 1)
    assert stat.S_IMODE(entries["tmp"].mode) == 0o1777


@pytest.mark.parametrize("bad", ["", "/", "a/../b", "a//b", "./x"])
def test_rejects_unsafe_names(bad):
    with pytest.raises(CpioError):
        CpioArchive().add_file(bad, b"")


def test_rejects_file_under_file_and_duplicates():
    a = CpioArchive()
    a.add_file("x", b"")
    with pytest.raises(CpioError):
        a.add_file("x/y", b"")
    with pytest.raises(CpioError):
        a.add_file("x", b"other")


def test_truncated_archive_is_an_error():
    data = sample().to_bytes()
    with pytest.raises(CpioError):
        parse(data[:200])


def test_gnu_cpio_lists_and_extracts_it(tmp_path):
    require(shutil.which("cpio") is not None, "GNU cpio not installed")
    data = sample().to_bytes()
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True).stdout
    assert sorted(listing.decode().split()) == sorted(e.name for e in parse(data))
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=data,
                   cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/sh").readlink().as_posix() == "/bin/busybox"


def test_busybox_cpio_reads_it():
    require(shutil.which("busybox") is not None, "busybox not installed")
    data = sample().to_bytes()
    r = subprocess.run(["busybox", "cpio", "-t"], input=data, capture_output=True, check=True)
    assert sorted(r.stdout.decode().split()) == sorted(e.name for e in parse(data))


def test_gnu_cpio_archive_of_the_same_tree_has_our_modes_and_data(tmp_path):
    """Inode numbers and mtimes differ by design; type, permissions and contents must not."""
    require(shutil.which("cpio") is not None, "GNU cpio not installed")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"hello")
    (tmp_path / "d").chmod(0o755)
    (tmp_path / "d" / "f").chmod(0o644)
    theirs = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--reproducible"], cwd=tmp_path,
                            input=b"d\nd/f\n", capture_output=True, check=True).stdout
    ours_entries = {e.name: e for e in parse(theirs)}
    assert ours_entries["d/f"].data == b"hello"
    a = CpioArchive()
    a.add_dir("d", 0o755)
    a.add_file("d/f", b"hello", 0o644)
    mine = {e.name: (e.mode, e.data, e.rdev) for e in parse(a.to_bytes())}
    assert mine == {k: (e.mode, e.data, e.rdev) for k, e in ours_entries.items()}


names = st.lists(st.text("abcdefgh", min_size=1, max_size=6), min_size=1, max_size=3).map("/".join)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, st.binary(max_size=64), min_size=1, max_size=8))
def test_any_files_round_trip(files):
    a = CpioArchive()
    added = {}
    for name, data in files.items():
        try:
            a.add_file(name, data)
            added[name] = data
        except CpioError:
            pass  # a name that is a parent of another: refused, as it must be
    back = {e.name: e.data for e in parse(a.to_bytes()) if stat.S_ISREG(e.mode)}
    assert back == added
