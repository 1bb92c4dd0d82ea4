"""The emulated host's runtime disk is cached by content and cleaned up; runs leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from asyncvmm_tools.hostvm import hostdisk, runner
from asyncvmm_tools.hostvm.hostinit import HOST_INIT
from asyncvmm_tools.images import write_if_changed


def test_a_manifest_rewritten_with_the_same_bytes_keeps_the_key(tmp_path):
    manifest = tmp_path / "images.json"
    manifest.write_text('{"rootfs": "/x"}\n')
    files = [str(manifest)]
    before = hostdisk.fingerprint(files, frozenset(files))
    manifest.write_text('{"rootfs": "/x"}\n')
    os.utime(manifest, ns=(1, 1))                      # a new mtime, the same bytes
    assert hostdisk.fingerprint(files, frozenset(files)) == before
    assert hostdisk.fingerprint(files) != hostdisk.fingerprint(files, frozenset(files))
    manifest.write_text('{"rootfs": "/y"}\n')          # same size, other bytes
    assert hostdisk.fingerprint(files, frozenset(files)) != before


def test_other_files_go_by_size_and_mtime(tmp_path):
    f = tmp_path / "lib.so"
    f.write_bytes(b"a")
    before = hostdisk.fingerprint([str(f)])
    os.utime(f, ns=(5, 5))
    assert hostdisk.fingerprint([str(f)]) != before


def test_the_manifest_is_not_rewritten_when_unchanged(tmp_path):
    path = tmp_path / "images.json"
    assert write_if_changed(path, "one\n")
    os.utime(path, ns=(7, 7))
    assert not write_if_changed(path, "one\n")
    assert path.stat().st_mtime_ns == 7
    assert write_if_changed(path, "two\n") and path.read_text() == "two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["images.json"]


def make_disk(disk_dir: Path, name: str, owner: str | None) -> Path:
    disk = disk_dir / f"root-{name}.ext4"
    disk.write_bytes(b"ext4")
    disk.with_suffix(".libs").write_text("/lib/x\n")
    if owner is not None:
        disk.with_suffix(".owner").write_text(owner + "\n")
    return disk


def test_prune_keeps_the_current_held_and_other_live_venvs_disks(tmp_path):
    disk_dir = tmp_path / "hostvm"
    disk_dir.mkdir()
    me, other_venv = str(tmp_path / "venv"), tmp_path / "other-venv"
    other_venv.mkdir()
    current = make_disk(disk_dir, "current", me)
    superseded = make_disk(disk_dir, "old", me)
    held = make_disk(disk_dir, "held", me)
    gone_owner = make_disk(disk_dir, "gone", str(tmp_path / "deleted-clone" / ".venv"))
    other = make_disk(disk_dir, "other", str(other_venv))
    legacy = make_disk(disk_dir, "legacy", None)
    lock = hostdisk.hold(held)
    try:
        deleted = hostdisk.prune(disk_dir, current, me)
    finally:
        lock.close()
    assert sorted(deleted) == sorted([superseded, gone_owner, legacy])
    left = sorted(p.name for p in disk_dir.iterdir())
    assert left == sorted(f"root-{n}.{ext}" for n in ("current", "held", "other") for ext in ("ext4", "libs", "owner"))
    assert hostdisk.prune(disk_dir, current, me) == [held]   # released: now it goes too


def test_hold_gives_none_for_a_disk_already_gone(tmp_path):
    disk = tmp_path / "root-x.ext4"
    assert hostdisk.hold(disk) is None
    disk.write_bytes(b"x")
    lock = hostdisk.hold(disk)
    assert lock is not None
    lock.close()


@pytest.mark.parametrize("fails", [False, True])
def test_a_run_leaves_no_work_directory_behind(monkeypatch, tmp_path, fails):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def fake_run(vm, workdir, argv, **kw):
        assert workdir.parent == tmp_path and workdir.name.startswith("asyncvmm-hostvm-")
        (workdir / "job.ext4").write_bytes(b"\0" * 4096)
        if fails:
            raise OSError("mke2fs failed")
        return "result"

    monkeypatch.setattr(runner, "_run", fake_run)
    if fails:
        with pytest.raises(OSError):
            runner.run_in_hostvm(["true"], timeout=1, prepared=object())
    else:
        assert runner.run_in_hostvm(["true"], timeout=1, prepared=object()) == "result"
    assert list(tmp_path.iterdir()) == []


def tmp_run_mounts(tmp_path: Path, lower_tmp_files: list[str]) -> tuple[list[str], Path]:
    """Run the host init's /tmp and /run lines against directories here; return the mounts."""
    lines = HOST_INIT.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("for d in tmp:1777"))
    end = next(i for i in range(start, len(lines)) if lines[i] == "done")
    snippet = "\n".join(lines[start:end + 1])
    lower, newroot = tmp_path / "lower", tmp_path / "newroot"
    for top in (lower, newroot):
        for d in ("tmp", "run"):
            (top / d).mkdir(parents=True)
            (top / d).chmod(0o755)
    for name in lower_tmp_files:
        (lower / "tmp" / name).mkdir(parents=True)
    log = tmp_path / "mounts"
    script = ('mount() { echo "$*" >> "$LOG"; }\n'
              + snippet.replace("/lower/", f"{lower}/").replace("/newroot/", f"{newroot}/"))
    subprocess.run(["sh", "-ec", script], check=True, env={**os.environ, "LOG": str(log)})
    mounts = log.read_text().splitlines() if log.exists() else []
    return mounts, newroot


def test_the_host_mounts_a_fresh_tmp_when_the_runtime_has_nothing_there(tmp_path):
    mounts, _ = tmp_run_mounts(tmp_path, [])
    assert [m.split()[-1].rsplit("/", 1)[-1] for m in mounts] == ["tmp", "run"]
    assert "mode=1777" in mounts[0]


def test_a_project_cloned_under_tmp_stays_visible_in_the_host(tmp_path):
    mounts, newroot = tmp_run_mounts(tmp_path, ["qs-clone/.venv"])
    assert [m.split()[-1].rsplit("/", 1)[-1] for m in mounts] == ["run"]   # /tmp is not hidden
    assert (newroot / "tmp").stat().st_mode & 0o7777 == 0o1777


def test_the_job_finds_the_same_image_cache_inside(monkeypatch, tmp_path):
    # The runtime disk holds the images at the cache's path; the job must look there, too.
    monkeypatch.setenv("ASYNCVMM_CACHE", str(tmp_path / "my cache"))
    lines = runner.job_script(["true"], {}, "/").splitlines()
    assert f"export ASYNCVMM_CACHE='{tmp_path / 'my cache'}'" in lines


def test_host_initramfs_builds_drop_after_a_day_unused(monkeypatch, tmp_path):
    import time
    hostvm_dir = tmp_path / "hostvm"
    hostvm_dir.mkdir()
    stale, recent = hostvm_dir / "initramfs-old.cpio", hostvm_dir / "initramfs-other-clone.cpio"
    for p in (stale, recent):
        p.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    monkeypatch.setattr(runner, "host_initramfs_tree", lambda kernel, busybox: type("T", (), {"to_cpio": lambda self: b"cpio"})())
    monkeypatch.setattr(runner, "sha256_file", lambda p: "0" * 64)
    kernel = type("K", (), {"root": tmp_path / "kernel-x"})()
    out = runner.host_initramfs(tmp_path, kernel, tmp_path / "busybox")
    assert out.read_bytes() == b"cpio"
    assert sorted(p.name for p in hostvm_dir.iterdir()) == sorted([out.name, recent.name])
