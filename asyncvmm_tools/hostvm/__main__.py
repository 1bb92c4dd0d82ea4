"""``python -m asyncvmm_tools.hostvm run [--timeout S] [--mem MiB] -- CMD...`` | ``shell`` | ``kind`` | ``microvm``.

``run`` boots the emulated KVM host, runs CMD there (in the project
directory, same paths as here) with the console streamed to stdout, and
exits with CMD's status (124: timed out, 125: the host never reported one);
with ``--interactive`` this terminal is CMD's terminal.
``shell`` gives an interactive bash inside it; leave with ``exit``.
``kind`` prints what /dev/kvm is here: hardware, software or absent.
``microvm`` boots the built guest images under QEMU microvm on this
machine's /dev/kvm (useful inside the emulated host, or on hardware KVM).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import HostVmError, kvm_kind, run_in_hostvm
from .detect import nested_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncvmm_tools.hostvm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a command inside the emulated KVM host")
    run.add_argument("--timeout", type=float, default=1800)
    run.add_argument("--mem", type=int, default=4096, help="MiB of RAM for the emulated host")
    run.add_argument("--console-log", type=Path)
    run.add_argument("--results", type=Path, help="copy the job's results directory here")
    run.add_argument("--interactive", action="store_true",
                     help="forward this terminal to the console: CMD gets it as its controlling tty")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    shell = sub.add_parser("shell", help="an interactive shell inside the emulated KVM host")
    shell.add_argument("--mem", type=int, default=4096)
    sub.add_parser("kind", help="print hardware|software|absent for this machine's /dev/kvm")
    mv = sub.add_parser("microvm", help="boot the built guest images under QEMU microvm on /dev/kvm here")
    mv.add_argument("--run", help="a shell command the guest runs before it reboots (default: a shell)")
    mv.add_argument("--mem", type=int, default=256)
    mv.add_argument("--vcpus", type=int, default=1)
    args = parser.parse_args(argv)

    if args.command == "microvm":
        return exec_microvm(args)

    if args.command == "kind":
        nested = nested_status()
        print(kvm_kind() + (f" (nested={nested})" if nested else ""))
        return 0

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    interactive = args.command == "shell" or args.interactive
    if args.command == "shell":
        cmd = ["/bin/bash", "-l"]
    else:
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("run needs a command after --")
    progress("[hostvm] booting the emulated KVM host (QEMU TCG, nested SVM); this takes ~20 s")
    try:
        result = run_in_hostvm(cmd, timeout=getattr(args, "timeout", 24 * 3600), mem_mib=args.mem,
                               console_log=getattr(args, "console_log", None),
                               results_dir=getattr(args, "results", None),
                               echo=sys.stdout, interactive=interactive, progress=progress)
    except HostVmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if interactive and os.isatty(0):
            subprocess.run(["stty", "sane"], check=False)   # QEMU leaves the tty raw if killed
    progress(f"[hostvm] {result.kvm_line or 'no kvm status'}; timings: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    if result.timed_out:
        return 124
    return 125 if result.returncode is None else result.returncode


def exec_microvm(args) -> int:
    """Replace this process with QEMU microvm booting the cached images (console on this terminal)."""
    from ..images import load_manifest
    from ..images.guestinit import run_flag
    from .qemu import Disk, MachineSpec, machine_argv

    images = load_manifest()
    cmdline = "console=ttyS0 panic=-1 pci=off quiet loglevel=4 initcall_blacklist=cmos_init reboot=t root=/dev/vda ro"
    if args.run:
        cmdline += " " + run_flag(args.run)
    argv = machine_argv(MachineSpec(kernel=images.bzimage, initrd=images.initramfs, cmdline=cmdline,
                                    disks=(Disk(images.rootfs, "rootfs", readonly=True),),
                                    mem_mib=args.mem, vcpus=args.vcpus, serial="stdio,signal=off"))
    os.execvp(argv[0], argv)
    return 127   # not reached


if __name__ == "__main__":
    sys.exit(main())
