"""PCI for asyncvmm: configuration spaces, bus 0 with its config mechanisms, BAR placement.

Sans-I/O: nothing here touches KVM, file descriptors or the loop, and nothing
here imports ``kvm/`` or ``devices/``.  ``config`` is one function's
configuration space, ``bus`` is bus 0 and the two ways a guest reaches it
(ECAM and ports 0xCF8/0xCFC), ``hostbridge`` the function at slot 0 and
``bars`` the windows BARs may be placed in.
"""
