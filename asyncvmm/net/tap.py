"""A tap device opened through ``/dev/net/tun``: the host end of a guest NIC.

Primer (Documentation/networking/tuntap.rst, include/uapi/linux/if_tun.h).
Opening ``/dev/net/tun`` and calling ``TUNSETIFF`` with ``IFF_TAP`` attaches
the fd to the tap interface of that name in the calling thread's network
namespace (creating a non-persistent one if none exists).  Each ``read`` then
returns one Ethernet frame and each ``write`` sends one.  ``IFF_NO_PI`` drops
the 4-byte packet-information prefix; ``IFF_VNET_HDR`` puts a
``virtio_net_hdr`` in front of every frame instead, whose size is set with
``TUNSETVNETHDRSZ`` (12: ``virtio_net_hdr_v1``, the layout a modern
virtio-net guest uses, so guest buffers can be passed through unchanged).
``TUNSETOFFLOAD`` tells the kernel which offloads the *reader* (we, on behalf
of the guest) accepts: with ``TUN_F_CSUM`` the kernel may hand us frames with
partial checksums, with ``TUN_F_TSO4/6`` and ``TUN_F_UFO`` frames larger than
the MTU; it must mirror the ``VIRTIO_NET_F_GUEST_*`` features the guest
acknowledged (:func:`offload_for_guest_features`).

The fd is non-blocking and close-on-exec; reads and writes return None
instead of raising when the device has nothing or is full, and raise the
plain ``OSError`` otherwise (e.g. ``EIO`` while the interface is down), which
the net device counts as a tap failure.  Opening and ioctls fail with
:class:`TapError` subclasses carrying the errno and the interface name.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
from typing import Sequence

from asyncvmm.net.netns import NetnsError, enter_netns

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16
VNET_HDR_SIZE = 12  # sizeof(struct virtio_net_hdr_v1)
MAX_FRAME = 65536 + VNET_HDR_SIZE  # the largest GSO frame plus the header

# include/uapi/linux/if_tun.h
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

# include/uapi/linux/virtio_net.h: feature bit numbers.
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10


class ifreq(ctypes.Structure):
    """``struct ifreq`` with the ``ifr_flags`` member of its union.

    struct ifreq { char ifr_name[IFNAMSIZ]; union { ...; short ifr_flags; ...;
    struct ifmap ifr_map; } };  -- 40 bytes on 64-bit, the union being 24.
    """

    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ),
                ("ifr_flags", ctypes.c_short),
                ("_union_rest", ctypes.c_ubyte * 22)]


assert ctypes.sizeof(ifreq) == 40

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, ctype: type) -> int:
    # asm-generic/ioctl.h: dir:2 | size:14 | type:8 | nr:8; the type is 'T'.
    return (direction << 30) | (ctypes.sizeof(ctype) << 16) | (ord("T") << 8) | nr


TUNSETIFF = _ioc(_IOC_WRITE, 202, ctypes.c_int)
TUNSETOFFLOAD = _ioc(_IOC_WRITE, 208, ctypes.c_uint)
TUNGETIFF = _ioc(_IOC_READ, 210, ctypes.c_uint)
TUNGETVNETHDRSZ = _ioc(_IOC_READ, 215, ctypes.c_int)
TUNSETVNETHDRSZ = _ioc(_IOC_WRITE, 216, ctypes.c_int)


class TapError(OSError):
    """A tap operation failed; ``errno`` and ``ifname`` say which and where."""

    def __init__(self, err: int, ifname: str, what: str) -> None:
        super().__init__(err, f"{what} for tap {ifname!r}: {os.strerror(err)}")
        self.ifname = ifname


class TapOpenError(TapError):
    pass


class TapIoctlError(TapError):
    pass


def offload_for_guest_features(features: int) -> int:
    """``TUNSETOFFLOAD`` flags matching the guest's acknowledged features."""
    if not features & (1 << VIRTIO_NET_F_GUEST_CSUM):
        return 0  # no segmentation offload without checksum offload
    flags = TUN_F_CSUM
    for bit, flag in ((VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4), (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                      (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN), (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO)):
        if features & (1 << bit):
            flags |= flag
    return flags


def _tun_fd(name: str, flags: int) -> int:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise TapOpenError(err.errno or errno.EIO, name, f"open {TUN_PATH}") from None
    req = ifreq(ifr_name=name.encode(), ifr_flags=flags)
    try:
        fcntl.ioctl(fd, TUNSETIFF, bytearray(req))
    except OSError as err:
        os.close(fd)
        raise TapOpenError(err.errno or errno.EIO, name, "TUNSETIFF") from None
    return fd


def _tun_fd_in_netns(name: str, flags: int, netns: str) -> int:
    # TUNSETIFF acts in the calling thread's network namespace, and setns()
    # moves only the calling thread: do it on a throwaway thread so the
    # rest of the process stays where it is.  The fd keeps working anywhere.
    result: list[int | BaseException] = []

    def work() -> None:
        try:
            enter_netns(netns)
            result.append(_tun_fd(name, flags))
        except BaseException as err:  # handed back to the caller below
            result.append(err)

    thread = threading.Thread(target=work, name=f"tap-open-{netns}")
    thread.start()
    thread.join()
    if isinstance(result[0], NetnsError):
        raise TapOpenError(result[0].errno or errno.ENOENT, name, f"enter netns {netns!r}")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class Tap:
    """An open tap fd; see the module docstring."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    @classmethod
    def open(cls, name: str, *, vnet_hdr: bool = True, multi_queue: bool = False,
             netns: str | None = None) -> "Tap":
        """Attach to (or create) tap ``name``, in network namespace ``netns`` if given."""
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise TapOpenError(errno.EINVAL, name, "bad interface name")
        flags = IFF_TAP | IFF_NO_PI
        flags |= IFF_VNET_HDR if vnet_hdr else 0
        flags |= IFF_MULTI_QUEUE if multi_queue else 0
        fd = _tun_fd_in_netns(name, flags, netns) if netns else _tun_fd(name, flags)
        tap = cls(fd, name)
        try:
            tap.name = tap._actual_name()
            if vnet_hdr:
                tap.set_vnet_hdr_size(VNET_HDR_SIZE)
        except TapError:
            tap.close()
            raise
        return tap

    def _ioctl(self, request: int, arg: int | bytearray, what: str) -> int | bytes:
        try:
            return fcntl.ioctl(self.fd, request, arg)
        except OSError as err:
            raise TapIoctlError(err.errno or errno.EIO, self.name, what) from None

    def _actual_name(self) -> str:
        buf = bytearray(ctypes.sizeof(ifreq))
        self._ioctl(TUNGETIFF, buf, "TUNGETIFF")
        return ifreq.from_buffer(buf).ifr_name.decode()

    def set_vnet_hdr_size(self, size: int = VNET_HDR_SIZE) -> None:
        self._ioctl(TUNSETVNETHDRSZ, bytearray(ctypes.c_int(size)), "TUNSETVNETHDRSZ")

    def vnet_hdr_size(self) -> int:
        buf = bytearray(ctypes.sizeof(ctypes.c_int))
        self._ioctl(TUNGETVNETHDRSZ, buf, "TUNGETVNETHDRSZ")
        return ctypes.c_int.from_buffer(buf).value

    def set_offload(self, flags: int) -> None:
        """``TUNSETOFFLOAD``: the ``TUN_F_*`` offloads the guest can take."""
        # The argument is passed by value, not through a pointer.
        self._ioctl(TUNSETOFFLOAD, flags, "TUNSETOFFLOAD")

    # -- I/O ------------------------------------------------------------------

    def read_into(self, buf: bytearray | memoryview) -> int | None:
        """Read one frame into ``buf``; its length, or None if none is waiting."""
        try:
            return os.readv(self.fd, [buf])
        except BlockingIOError:
            return None

    def read(self, size: int = MAX_FRAME) -> bytes | None:
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None

    def writev(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int | None:
        """Send one frame gathered from ``bufs``; bytes written, or None if full."""
        try:
            return os.writev(self.fd, bufs)
        except BlockingIOError:
            return None

    def write(self, frame: bytes | bytearray | memoryview) -> int | None:
        return self.writev([frame])

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
