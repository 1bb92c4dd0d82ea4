from benchmarks import machine


def test_cpu_model_and_meminfo_parsing():
    assert machine.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t: fpu\n") == "AMD EPYC"
    assert machine.cpu_model("") is None
    assert machine.meminfo_kib("MemTotal:       24576000 kB\nMemFree: 1 kB\n", "MemTotal") == 24576000
    assert machine.meminfo_kib("", "MemTotal") is None


def test_kvm_kind_prefers_the_vendor_module(tmp_path):
    assert machine.kvm_kind(tmp_path) is None
    (tmp_path / "kvm").mkdir()
    assert machine.kvm_kind(tmp_path) == "kvm"
    (tmp_path / "kvm_pvm").mkdir()
    assert machine.kvm_kind(tmp_path) == "kvm_pvm"
