"""Data paths in the host kernel: vhost (``/dev/vhost-*``) backends for virtio devices.

:mod:`.structs` mirrors ``<linux/vhost_types.h>``, :mod:`.ioctls` computes the
request numbers of ``<linux/vhost.h>``, :mod:`.fd` wraps one vhost fd, and
:mod:`.net` is the vhost-net device the virtio transports activate like any
other.
"""
