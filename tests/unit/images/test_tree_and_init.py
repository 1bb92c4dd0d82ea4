"""FsTree placement, the guest init scripts, debian output parsing, the minikernel config check."""

from __future__ import annotations

import base64
import shutil
import stat
import subprocess

import pytest

from asyncvmm_tools.images.cpio import parse
from asyncvmm_tools.images.debian import parse_candidate, parse_depends
from asyncvmm_tools.images.guestinit import init_script, run_flag
from asyncvmm_tools.images.minikernel import FRAGMENT, missing_options
from asyncvmm_tools.images.tree import FsTree, TreeError, guest_path
from tests.conftest import require


def test_guest_path_resolves_merged_usr():
    assert guest_path("/lib/x86_64-linux-gnu/libc.so.6") == "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert guest_path("/lib64/ld-linux-x86-64.so.2") == "/usr/lib64/ld-linux-x86-64.so.2"
    assert guest_path("/usr/bin/socat") == "/usr/bin/socat"
    assert guest_path("/etc/hosts") == "/etc/hosts"


def test_tree_redirects_through_merged_usr_and_emits_cpio(tmp_path):
    tree = FsTree()
    tree.add_bytes("/bin/tool", b"x", 0o755)
    tree.add_symlink("/bin/sh", "/bin/busybox")
    tree.add_chardev("/dev/console", 5, 1)
    assert "/usr/bin/tool" in tree.nodes and "/bin/tool" not in tree.nodes
    entries = {e.name: e for e in parse(tree.to_cpio())}
    assert entries["bin"].data == b"usr/bin" and stat.S_ISLNK(entries["bin"].mode)
    assert entries["usr/bin/tool"].data == b"x"
    tree.materialize(tmp_path / "root")
    assert (tmp_path / "root/bin/tool").read_bytes() == b"x"      # through the bin -> usr/bin link
    assert not (tmp_path / "root/dev/console").exists()          # device nodes are for cpio only


def test_tree_conflicts_are_errors(tmp_path):
    tree = FsTree()
    tree.add_bytes("/etc/a", b"1")
    with pytest.raises(TreeError):
        tree.add_bytes("/etc/a", b"2")
    (tmp_path / "fifo").mkdir()
    with pytest.raises(TreeError):
        tree.add_host_file("/x", tmp_path / "fifo")


@pytest.mark.parametrize("stage", ["initramfs", "rootfs"])
def test_init_scripts_parse_in_busybox_sh(stage, tmp_path):
    require(shutil.which("busybox") is not None, "busybox not installed")
    script = tmp_path / "init"
    script.write_bytes(init_script(stage))
    r = subprocess.run(["busybox", "sh", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"STAGE={stage}" in script.read_text()


def test_unknown_stage():
    with pytest.raises(ValueError):
        init_script("bootloader")


def test_run_flag_is_one_cmdline_word_that_decodes_back():
    flag = run_flag("echo 'a b' && exit 3")
    assert " " not in flag and flag.startswith("avm.run=")
    assert base64.b64decode(flag.split("=", 1)[1]).decode() == "echo 'a b' && exit 3"


def test_init_param_parsing_in_a_real_shell(tmp_path):
    """The init's param/flag helpers, run against a fake /proc/cmdline."""
    require(shutil.which("busybox") is not None, "busybox not installed")
    text = init_script("rootfs").decode()
    helpers = "\n".join(l for l in text.splitlines() if l.startswith(("param()", "flag()")))
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 root=/dev/vda rw avm.run=ZWNobyBoaQ== avm.then=poweroff\n")
    helpers = helpers.replace("/proc/cmdline", str(cmdline))
    script = helpers + "\nparam root; param avm.run; param avm.then; flag rw && echo RW; flag ro || echo NORO; " \
                       "param nosuch || echo MISSING\n"
    out = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True).stdout.split()
    assert out == ["/dev/vda", "ZWNobyBoaQ==", "poweroff", "RW", "NORO", "MISSING"]


APT_DEPENDS = """linux-image-cloud-amd64
  Depends: linux-image-6.1.0-56-cloud-amd64
  Recommends: something
"""
APT_POLICY = """linux-image-6.1.0-56-cloud-amd64:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
"""


def test_parse_apt_output():
    assert parse_depends(APT_DEPENDS, "linux-image-") == ["linux-image-6.1.0-56-cloud-amd64"]
    assert parse_depends(APT_DEPENDS, "nothing-") == []
    assert parse_candidate(APT_POLICY) == "6.1.192-2"
    assert parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n") is None


def test_minikernel_config_check_reports_dropped_options():
    full = "\n".join(FRAGMENT.split())
    assert missing_options(full) == []
    without_vsock = full.replace("CONFIG_VIRTIO_VSOCKETS=y", "# CONFIG_VIRTIO_VSOCKETS is not set")
    assert missing_options(without_vsock) == ["CONFIG_VIRTIO_VSOCKETS=y"]
    assert "CONFIG_MODULES=n" not in missing_options(full.replace("CONFIG_MODULES=n", ""))


def test_paths_sh_prints_quoted_assignments_a_shell_can_eval(tmp_path):
    import subprocess
    from asyncvmm_tools.images import GuestImages
    from asyncvmm_tools.images.__main__ import shell_assignments
    d = tmp_path / "with space"
    images = GuestImages(bzimage=d / "vmlinuz", vmlinux=d / "vmlinux", initramfs=d / "i.cpio",
                         rootfs=d / "r'oot.ext4", kernel_version="6.1", kernel_dir=d)
    out = subprocess.run(["sh", "-c", f'eval "$1"; printf "%s\\n" "$KERNEL" "$BZIMAGE" "$INITRD" "$ROOTFS"',
                          "sh", shell_assignments(images)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(d / "vmlinux"), str(d / "vmlinuz"), str(d / "i.cpio"), str(d / "r'oot.ext4")]


def test_init_loads_every_listed_module_and_goes_on_past_one_that_fails(tmp_path):
    """The initramfs's module loop, run with an insmod that refuses one module (absent, or
    refused by this kernel): the failure is reported and the later modules still load."""
    require(shutil.which("busybox") is not None, "busybox not installed")
    lines = init_script("initramfs").decode().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith("while read -r m"))
    end = next(i for i in range(start, len(lines)) if "done < /etc/asyncvmm/modules" in lines[i])
    listing = tmp_path / "modules"
    listing.write_text("virtio_mmio.ko\nvirtio_pci.ko\n\nvirtio_blk.ko\n")
    loop = "\n".join(lines[start:end + 1]).replace("/etc/asyncvmm/modules", str(listing))
    script = ('say() { echo "asyncvmm-guest: $*"; }\n'
              'insmod() { echo "loaded $1"; [ "$1" != /lib/modules/virtio_pci.ko ]; }\n' + loop + "\necho end\n")
    out = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True).stdout.splitlines()
    assert out == ["loaded /lib/modules/virtio_mmio.ko", "loaded /lib/modules/virtio_pci.ko",
                   "asyncvmm-guest: insmod virtio_pci.ko failed", "loaded /lib/modules/virtio_blk.ko", "end"]


@pytest.mark.parametrize("cmdline,expected", [
    ("root=/dev/pmem0 rw rootflags=dax", "mount -t ext4 -o rw,dax /dev/pmem0 /newroot"),
    ("root=/dev/pmem0 ro", "mount -t ext4 -o ro /dev/pmem0 /newroot"),
    ("root=/dev/vda rootfstype=ext2", "mount -t ext2 -o ro /dev/vda /newroot"),
])
def test_init_mounts_the_root_the_command_line_names(tmp_path, cmdline, expected):
    """The initramfs's root switch, with mount stubbed and switch_root echoed: a virtio-pmem root
    (Firecracker's ``root=/dev/pmem0 rw``) and ``rootflags=`` (``dax``) reach the mount."""
    require(shutil.which("busybox") is not None, "busybox not installed")
    lines = init_script("initramfs").decode().splitlines()
    helpers = [l for l in lines if l.startswith(("param()", "flag()"))]
    start = next(i for i, l in enumerate(lines) if l.strip() == "root=$(param root)")
    end = next(i for i in range(start, len(lines)) if "staying in the initramfs" in lines[i])
    block = "\n".join(lines[start:end + 2])
    (tmp_path / "cmdline").write_text(f"console=ttyS0 {cmdline}\n")
    script = ("\n".join(helpers).replace("/proc/cmdline", str(tmp_path / "cmdline")) + "\n"
              'say() { echo "asyncvmm-guest: $*"; }\n'
              'mount() { case "$1" in --move) return 0;; esac; echo "mount $*"; }\n'
              'mkdir() { :; }\nsleep() { :; }\n'
              + block.replace('[ ! -b "$root" ]', "false").replace("exec switch_root", "echo switch_root")
              + "\n")
    out = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True).stdout.splitlines()
    assert out[0] == expected
    assert out[1].startswith("asyncvmm-guest: root ") and out[2] == "switch_root /newroot /sbin/init"
