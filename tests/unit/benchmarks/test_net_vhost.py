"""The net benchmark's vhost-net variants: asked for by name, wired as each VMM spells vhost."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import net, report

VHOST = [name for name, _ in net.VHOST_VARIANTS]


def test_vhost_variants_are_known_but_not_run_by_default():
    assert [v.name for v in net.make_variants()] == [name for name, _ in net.VARIANTS]
    every = net.make_variants([name for name, _ in net.VARIANTS] + VHOST)
    assert len({v.link.tap for v in every}) == len({v.link.subnet for v in every}) == len(every)
    settings = net.settings_from(net.parse_args(["--variants", ",".join(VHOST)]))
    assert settings.variants == tuple(VHOST)


def test_asyncvmm_vhost_sets_the_extension_and_qemu_vhost_turns_vhost_on(tmp_path):
    from tests.linux.harness import VmSpec

    spec = VmSpec(kernel=Path("/k"), boot_args="console=ttyS0")
    a, q, apci, qpci = net.make_variants(VHOST)
    net._launchers(a, "ns1", tmp_path).argv(spec, tmp_path)
    assert json.loads((tmp_path / "vm.json").read_text())["network-interfaces"] == [
        {**net.asyncvmm_interface(a.link), "vhost": True}]
    qargv = " ".join(net._launchers(q, "ns1", tmp_path).argv(spec, tmp_path))
    assert "vhost=on" in qargv and "vhost=off" not in qargv and "pcie=on" not in qargv
    assert "--enable-pci" in net._launchers(apci, "ns1", tmp_path).argv(spec, tmp_path)
    qpargv = " ".join(net._launchers(qpci, "ns1", tmp_path).argv(spec, tmp_path))
    assert "pcie=on" in qpargv and "virtio-net-pci,disable-legacy=on" in qpargv and "vhost=on" in qpargv
    assert "-global virtio-net-pci.romfile=" in qpargv      # no option ROM to look for
    # The userspace variants stay as they were.
    assert "vhost" not in net.asyncvmm_interface(a.link)
    assert "vhost=off" in " ".join(net.qemu_net_args(a.link))


def test_vhost_comparisons_pair_the_two_vhosts_and_each_with_its_userspace_path():
    vdocs = {name: {"metrics": {"h2g_mib_s": report.metric([10.0], "MiB/s")}}
             for name in [n for n, _ in net.VARIANTS] + VHOST}
    pairs = [(c["subject"], c["peer"]) for c in net.comparisons(vdocs)[0]]
    assert pairs[3:] == [("asyncvmm-vhost", "qemu-microvm-vhost"),
                         ("asyncvmm-pci-vhost", "qemu-microvm-pci-vhost"),
                         ("asyncvmm-vhost", "asyncvmm"), ("asyncvmm-pci-vhost", "asyncvmm-pci")]
