"""One build of the test guest per session, into a private cache directory."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import require


def toolchain_present() -> bool:
    return all(shutil.which(t) for t in ("gcc", "ld", "objcopy"))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    require(toolchain_present(), "gcc/ld/objcopy are needed to build the test guest")
    from tests.guest.build import build_test_guest
    return build_test_guest(tmp_path_factory.mktemp("testguest-cache"))
