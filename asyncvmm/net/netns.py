"""Network namespaces and tap interfaces for tools and tests (pyroute2).

Named namespaces live where ``ip netns`` keeps them (``/run/netns/<name>``),
so everything made here is visible to ``ip -n <name> ...`` and the other way
round.  Interface helpers take ``netns=None`` for the caller's namespace.

* :func:`create_netns` / :func:`delete_netns`
* :func:`create_tap` makes a persistent tap (optionally addressed and up)
  that a VMM later attaches to with :meth:`asyncvmm.net.tap.Tap.open`;
  :func:`delete_link` removes any interface.
* :func:`temporary_netns` and :func:`temporary_tap` are context managers
  that always clean up, even when the body fails.
* :func:`enter_netns` moves the *calling thread* into a namespace (setns).

Errors are :class:`NetnsError` (an ``OSError`` with the errno).  All of this
needs CAP_NET_ADMIN (and CAP_SYS_ADMIN for namespaces).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import secrets
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from pyroute2 import IPRoute

# pyroute2 is imported inside the functions that use it: importing it costs
# about half a second, and the VMM imports this module (through the tap
# module, for enter_netns) on every start.

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    pass


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or len(name) > 200:
        raise NetnsError(errno.EINVAL, f"bad network namespace name {name!r}")


def netns_path(name: str) -> str:
    _check_name(name)
    return os.path.join(NETNS_RUN_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create_netns(name: str) -> None:
    """Create the named namespace; :class:`NetnsError` (EEXIST) if it exists."""
    if netns_exists(name):
        raise NetnsError(errno.EEXIST, f"network namespace {name!r} already exists")
    from pyroute2 import netns as pyroute2_netns

    try:
        pyroute2_netns.create(name)
    except OSError as err:
        raise NetnsError(err.errno or errno.EIO, f"create network namespace {name!r}: {err}") from None


def delete_netns(name: str) -> None:
    """Remove the named namespace; interfaces in it (taps included) go with it."""
    if not netns_exists(name):
        raise NetnsError(errno.ENOENT, f"no network namespace {name!r}")
    from pyroute2 import netns as pyroute2_netns

    try:
        pyroute2_netns.remove(name)
    except OSError as err:
        raise NetnsError(err.errno or errno.EIO, f"remove network namespace {name!r}: {err}") from None


def enter_netns(name: str) -> None:
    """setns(2) the calling thread into the named namespace."""
    try:
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise NetnsError(err.errno or errno.ENOENT, f"open network namespace {name!r}") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(err, f"setns into {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def _rtnl(netns: str | None) -> Iterator["IPRoute"]:
    from pyroute2 import IPRoute, NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    if netns is not None and not netns_exists(netns):
        raise NetnsError(errno.ENOENT, f"no network namespace {netns!r}")
    ipr = NetNS(netns) if netns is not None else IPRoute()
    try:
        yield ipr
    except NetlinkError as err:
        raise NetnsError(err.code, f"netlink: {err}") from None
    finally:
        ipr.close()


def _index(ipr: "IPRoute", ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(errno.ENODEV, f"no interface {ifname!r}")
    return found[0]


def create_tap(name: str, *, netns: str | None = None, addr: str | None = None,
               up: bool = True, mtu: int | None = None) -> None:
    """Create persistent tap ``name``; ``addr`` is a CIDR like ``"172.16.0.1/24"``."""
    iface = ipaddress.IPv4Interface(addr) if addr is not None else None
    with _rtnl(netns) as ipr:
        # Creating a tap goes through TUNSETIFF, which silently attaches to an
        # existing device of that name: refuse instead of adopting it.
        if ipr.link_lookup(ifname=name):
            raise NetnsError(errno.EEXIST, f"interface {name!r} already exists")
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        index = _index(ipr, name)
        if mtu is not None:
            ipr.link("set", index=index, mtu=mtu)
        if iface is not None:
            ipr.addr("add", index=index, address=str(iface.ip),
                     prefixlen=iface.network.prefixlen)
        if up:
            ipr.link("set", index=index, state="up")


def delete_link(name: str, *, netns: str | None = None) -> None:
    with _rtnl(netns) as ipr:
        ipr.link("del", index=_index(ipr, name))


def link_exists(name: str, *, netns: str | None = None) -> bool:
    with _rtnl(netns) as ipr:
        return bool(ipr.link_lookup(ifname=name))


@contextlib.contextmanager
def temporary_netns(prefix: str = "asyncvmm-") -> Iterator[str]:
    """A fresh uniquely named namespace, deleted on exit whatever happens."""
    name = f"{prefix}{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


@contextlib.contextmanager
def temporary_tap(name: str, *, netns: str | None = None, addr: str | None = None,
                  up: bool = True) -> Iterator[str]:
    """A tap created for the body and deleted on exit (if it still exists)."""
    create_tap(name, netns=netns, addr=addr, up=up)
    try:
        yield name
    finally:
        if (netns is None or netns_exists(netns)) and link_exists(name, netns=netns):
            delete_link(name, netns=netns)
