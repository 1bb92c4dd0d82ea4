"""The emulated KVM host's initramfs: busybox, KVM/virtio/overlay modules and its ``/init``.

Contract of ``/init`` (all on the serial console, prefixed ``asyncvmm-hostvm:``):
``kvm ready ... nested=<Y|N|1|0>`` or ``kvm missing``; ``job start`` and
``job exit=<status>``.  It finds its two disks by serial -- ``avmroot`` (the
runtime: Python, venv, project, tools, guest images; mounted read-only under a
tmpfs overlay, so everything is writable and nothing persists) and ``avmjob``
(``job.sh`` in, ``results/`` and ``exitcode`` out) -- runs
``/hostvm-job/job.sh`` chrooted into the overlay with the console as its
controlling tty, records the exit status, syncs and powers off.
``avm.epoch=<seconds>`` sets the clock (a microvm has no RTC);
``avm.project=<path>`` copies the job disk's ``project/`` there (into the overlay).
``/tmp`` and ``/run`` get a fresh tmpfs unless the runtime disk has files
under them (a project and its venv under ``/tmp``), which stay visible.
"""

from __future__ import annotations

from pathlib import Path

from ..images import kmod
from ..images.initramfs import add_base, add_busybox
from ..images.kernel import KernelArtifact
from ..images.tree import FsTree

# (module, insmod arguments).  kvm_amd: the TCG CPU (-cpu max) is an AMD with SVM.  vgif=0: KVM
# does not use TCG's virtual GIF; tried against the emulated host's freezes (docs/testing.md),
# which it did not end: the fio benchmark froze with it too.
HOST_MODULES = [("virtio_mmio", ""), ("virtio_blk", ""), ("overlay", ""), ("kvm_amd", "nested=1 vgif=0"),
                ("tun", ""), ("veth", ""), ("bridge", ""), ("vhost_vsock", ""), ("virtio_rng", ""),
                ("vhost_net", "")]
JOB_MOUNT = "/hostvm-job"
ROOT_SERIAL = "avmroot"
JOB_SERIAL = "avmjob"

HOST_INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "asyncvmm-hostvm: $*"; }
stamp() { read -r up _ < /proc/uptime; echo "asyncvmm-hostvm: at $up s: $*"; }
param() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}"; return 0;; esac; done; return 1; }
die() { say "FATAL: $*"; sync; poweroff -f; while true; do sleep 3600; done; }
find_disk() {
    for d in /sys/block/vd*; do
        [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
    done
    return 1
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
epoch=$(param avm.epoch) && date -s "@$epoch" >/dev/null
while read -r m args; do
    [ -n "$m" ] && { insmod "/lib/modules/$m" $args || say "insmod $m failed"; }
done < /etc/asyncvmm/modules
if [ -e /dev/kvm ]; then
    say "kvm ready: /dev/kvm present, nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null)"
else
    say "kvm missing: no /dev/kvm (is SVM exposed by -cpu max?)"
fi
stamp "modules loaded"
tries=0
until rootdev=$(find_disk @ROOT@) && jobdev=$(find_disk @JOB@); do
    tries=$((tries + 1)); [ $tries -gt 300 ] && die "disks @ROOT@/@JOB@ not found"; sleep 0.1
done
mkdir -p /lower /rw /newroot
mount -t ext4 -o ro,noload "$rootdev" /lower || die "cannot mount $rootdev"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || die "overlay failed"
for d in proc sys dev tmp run @JOBDIR@; do mkdir -p "/newroot/$d"; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
# A fresh tmpfs on /tmp and /run, unless the runtime has files there (a project cloned under
# /tmp brings its venv): a tmpfs would hide them, and the overlay is writable and on tmpfs anyway.
for d in tmp:1777 run:0755; do
    if [ -z "$(ls -A "/lower/${d%:*}" 2>/dev/null)" ]; then
        mount -t tmpfs -o "mode=${d#*:}" tmpfs "/newroot/${d%:*}"
    else
        chmod "${d#*:}" "/newroot/${d%:*}"
    fi
done
# Debian's /var/run is a link to /run (pyroute2 keeps named netns under /var/run/netns,
# iproute2 under /run/netns); the runtime disk is a copy of files, not of that link.
[ -e /newroot/var/run ] || [ -L /newroot/var/run ] || { mkdir -p /newroot/var && ln -s /run /newroot/var/run; }
mount -t ext4 "$jobdev" "/newroot@JOBDIR@" || die "cannot mount the job disk $jobdev"
stamp "disks mounted"
if project=$(param avm.project); then
    # Copied, not bind-mounted: a venv inside the project lives on the root disk.
    mkdir -p "/newroot$project" && cp -a "/newroot@JOBDIR@/project/." "/newroot$project/" \
        || die "cannot copy the project to $project"
fi
stamp "project copied"
ip link set lo up
hostname asyncvmm-hostvm
say "job start"
setsid cttyhack chroot /newroot /bin/sh @JOBDIR@/job.sh
rc=$?
say "job exit=$rc"
stamp "job done"
echo "$rc" > "/newroot@JOBDIR@/exitcode"
sync
umount "/newroot@JOBDIR@" || say "job disk busy; relying on sync"
poweroff -f
while true; do sleep 3600; done
"""


def host_init_script() -> bytes:
    return (HOST_INIT.replace("@ROOT@", ROOT_SERIAL).replace("@JOB@", JOB_SERIAL)
            .replace("@JOBDIR@", JOB_MOUNT).encode())


def host_initramfs_tree(kernel: KernelArtifact, busybox: Path) -> FsTree:
    table, builtin = kmod.scan_modules(kernel.modules_dir)
    args = dict(HOST_MODULES)
    order = kmod.load_order([m for m, _ in HOST_MODULES], table, builtin)
    tree = FsTree()
    add_base(tree)
    add_busybox(tree, busybox)
    tree.add_bytes("/init", host_init_script(), 0o755)
    lines = []
    for rel in order:
        plain = rel.rsplit(".ko", 1)[0] + ".ko"
        tree.add_bytes(f"/lib/modules/{plain}", kmod.read_module(kernel.modules_dir / rel))
        lines.append(f"{plain} {args.get(kmod.module_name(rel), '')}".rstrip() + "\n")
    tree.add_bytes("/etc/asyncvmm/modules", "".join(lines).encode())
    return tree
