import errno
import os

import pytest
from pyroute2 import NetNS

from asyncvmm.net.netns import (NetnsError, create_netns, create_tap, delete_link, delete_netns,
                                link_exists, netns_exists, netns_path, temporary_netns,
                                temporary_tap)
from tests.conftest import require


def _require_root() -> None:
    require(os.geteuid() == 0, "network namespaces need root")
    require(os.path.exists("/dev/net/tun"), "/dev/net/tun is missing")


@pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 201])
def test_bad_namespace_names(name):
    with pytest.raises(NetnsError) as exc:
        netns_path(name)
    assert exc.value.errno == errno.EINVAL


def test_temporary_netns_is_removed_even_when_the_body_fails():
    _require_root()
    with pytest.raises(RuntimeError):
        with temporary_netns() as ns:
            assert netns_exists(ns)
            raise RuntimeError("boom")
    assert not netns_exists(ns)


def test_create_twice_and_delete_missing_are_typed_errors():
    _require_root()
    with temporary_netns() as ns:
        with pytest.raises(NetnsError) as exc:
            create_netns(ns)
        assert exc.value.errno == errno.EEXIST
    with pytest.raises(NetnsError) as exc:
        delete_netns(ns)
    assert exc.value.errno == errno.ENOENT


def test_tap_is_created_addressed_and_up_then_deleted():
    _require_root()
    with temporary_netns() as ns:
        create_tap("avtap9", netns=ns, addr="192.168.241.1/30", mtu=1400)
        with NetNS(ns) as ipr:
            [link] = ipr.get_links(ifname="avtap9")
            assert link.get("IFLA_MTU") == 1400
            assert link["flags"] & 1  # IFF_UP
            assert link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "tun"
            addrs = [(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=link["index"])]
            assert ("192.168.241.1", 30) in addrs
        with pytest.raises(NetnsError):
            create_tap("avtap9", netns=ns)  # already there
        delete_link("avtap9", netns=ns)
        assert not link_exists("avtap9", netns=ns)
        with pytest.raises(NetnsError) as exc:
            delete_link("avtap9", netns=ns)
        assert exc.value.errno == errno.ENODEV


def test_temporary_tap_cleans_up_and_missing_namespace_is_reported():
    _require_root()
    with temporary_netns() as ns:
        with temporary_tap("avtap8", netns=ns, up=False):
            assert link_exists("avtap8", netns=ns)
        assert not link_exists("avtap8", netns=ns)
    with pytest.raises(NetnsError) as exc:
        create_tap("avtap7", netns=ns)
    assert exc.value.errno == errno.ENOENT
