"""Tools around asyncvmm, not part of the VMM: the guest image builder and the emulated KVM host.

* :mod:`asyncvmm_tools.images` -- builds the guest images tests, benchmarks and the
  quickstart boot (``asyncvmm-images``, ``python -m asyncvmm_tools.images``).
* :mod:`asyncvmm_tools.hostvm` -- QEMU TCG with nested SVM, the KVM host the linux
  tier runs in where ``/dev/kvm`` is not hardware (``asyncvmm-hostvm``,
  ``python -m asyncvmm_tools.hostvm``).

The runtime package ``asyncvmm`` never imports this one (tests/unit/test_layering.py
checks it); these tools use only the standard library and the host's programs.
"""
