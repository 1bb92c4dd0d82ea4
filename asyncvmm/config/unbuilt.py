"""What asyncvmm does not build yet, named, so that a request asking for it is refused.

Contract: nothing is accepted and then ignored.  A request (or ``--config-file``
item) that asks for a feature asyncvmm does not build fails where it is made,
with :class:`NotBuiltError` ("<feature> is not supported yet by asyncvmm."),
after the value's own validation ran.  Whole resources that are not built
(memory hotplug, ...) are refused by action in the controller; this
module names them and refuses the *fields* of built resources that ask for
more than is built.  Default and no-op values ask for nothing and pass.
When a feature is built, its line here goes and the test that pins the
refusal turns around.  No I/O here.
"""

from __future__ import annotations

from typing import Any

from asyncvmm.config.errors import ConfigError


class NotBuiltError(ConfigError):
    """The request asks for ``feature``, which asyncvmm does not build yet."""

    def __init__(self, feature: str) -> None:
        super().__init__(f"{feature} is not supported yet by asyncvmm.")
        self.feature = feature


# Every field of every resource is built today; a check goes here (type -> function naming
# the feature, or None) when a feature lands in pieces.
_CHECKS: dict[type, Any] = {}


def unbuilt_feature(value: Any) -> str | None:
    """The feature ``value`` asks for that asyncvmm does not build, or ``None``."""
    check = _CHECKS.get(type(value))
    return check(value) if check is not None else None


def refuse_unbuilt(value: Any) -> None:
    """Raise :class:`NotBuiltError` if ``value`` asks for a feature that is not built."""
    feature = unbuilt_feature(value)
    if feature is not None:
        raise NotBuiltError(feature)
