"""Seccomp policies in Firecracker's seccompiler JSON format; parsing only, no I/O.

The document maps a thread category to a filter::

    {"vmm":  {"default_action": "trap", "filter_action": "allow",
              "filter": [{"syscall": "read"},
                         {"syscall": "ioctl", "args": [{"index": 1, "type": "dword",
                                                        "op": "eq", "val": 44672,
                                                        "comment": "KVM_RUN"}]}]},
     "vcpu": {...}}

asyncvmm's categories are ``vmm`` (the asyncio loop thread, which also
serves the API, and every thread it starts afterwards) and ``vcpu``. Both
must be present; Firecracker's separate ``api`` category has no thread of
its own here, so a document naming it is refused rather than half-applied.
Actions: ``allow``, ``trap``, ``kill_process``, ``kill_thread``, ``log``,
``{"errno": N}``, ``{"trace": N}``.  Comparisons: ``eq ne lt le gt ge``
and ``{"masked_eq": MASK}``; ``type`` is ``dword`` (low 32 bits) or
``qword``.  Any other key or value is an error naming it.
"""

from __future__ import annotations

import json
from typing import Any

from .bpf import (SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_KILL_THREAD,
                  SECCOMP_RET_LOG, SECCOMP_RET_TRACE, SECCOMP_RET_TRAP, Cond, Filter, FilterError, Rule)
from .syscalls import SYSCALLS

CATEGORIES = ("vmm", "vcpu")

_ACTIONS = {"allow": SECCOMP_RET_ALLOW, "trap": SECCOMP_RET_TRAP, "kill_process": SECCOMP_RET_KILL_PROCESS,
            "kill_thread": SECCOMP_RET_KILL_THREAD, "kill": SECCOMP_RET_KILL_THREAD, "log": SECCOMP_RET_LOG}


class PolicyError(ValueError):
    """A filter document asyncvmm cannot use, with where and why."""


def _action(v: Any, where: str) -> int:
    if isinstance(v, str) and v in _ACTIONS:
        return _ACTIONS[v]
    if isinstance(v, dict) and len(v) == 1:
        (name, n), = v.items()
        if name in ("errno", "trace") and isinstance(n, int) and 0 <= n <= 0xFFFF:
            return (SECCOMP_RET_ERRNO if name == "errno" else SECCOMP_RET_TRACE) | n
    raise PolicyError(f"{where}: unknown action {v!r} (allow, trap, kill_process, kill_thread, log, "
                      "{\"errno\": N} or {\"trace\": N})")


def _keys(obj: Any, where: str, required: set[str], optional: set[str]) -> dict:
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = required - obj.keys()
    if missing:
        raise PolicyError(f"{where}: missing {', '.join(sorted(missing))}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise PolicyError(f"{where}: unknown field {', '.join(sorted(unknown))}")
    return obj


def _cond(obj: Any, where: str) -> Cond:
    _keys(obj, where, {"index", "type", "op", "val"}, {"comment"})
    if obj["type"] not in ("dword", "qword"):
        raise PolicyError(f"{where}: type must be dword or qword, not {obj['type']!r}")
    op, mask = obj["op"], 0
    if isinstance(op, dict) and set(op) == {"masked_eq"} and isinstance(op["masked_eq"], int):
        op, mask = "masked_eq", op["masked_eq"]
    for name in ("index", "val"):
        if not isinstance(obj[name], int) or isinstance(obj[name], bool):
            raise PolicyError(f"{where}: {name} must be an integer")
    try:
        return Cond(obj["index"], op, obj["val"], qword=obj["type"] == "qword", mask=mask)
    except FilterError as e:
        raise PolicyError(f"{where}: {e}") from None


def parse_filter(obj: Any, where: str) -> Filter:
    _keys(obj, where, {"default_action", "filter_action", "filter"}, {"comment"})
    if not isinstance(obj["filter"], list):
        raise PolicyError(f"{where}.filter: expected a list")
    rules: dict[int, list[Rule]] = {}
    unconditional: set[int] = set()
    for i, entry in enumerate(obj["filter"]):
        w = f"{where}.filter[{i}]"
        _keys(entry, w, {"syscall"}, {"args", "comment"})
        name = entry["syscall"]
        if name not in SYSCALLS:
            raise PolicyError(f"{w}: unknown x86_64 system call {name!r}")
        nr = SYSCALLS[name]
        args = entry.get("args")
        if args is None:
            unconditional.add(nr)
            rules[nr] = []
            continue
        if not isinstance(args, list) or not args:
            raise PolicyError(f"{w}.args: expected a non-empty list of conditions")
        conds = tuple(_cond(c, f"{w}.args[{j}]") for j, c in enumerate(args))
        if nr not in unconditional:
            rules.setdefault(nr, []).append(Rule(conds))
    return Filter(_action(obj["default_action"], f"{where}.default_action"),
                  _action(obj["filter_action"], f"{where}.filter_action"), rules)


def parse_policy(text: str | bytes) -> dict[str, Filter]:
    """The per-category filters of a JSON document; :class:`PolicyError` says what is wrong."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise PolicyError(f"not a JSON document: {e}") from None
    if not isinstance(doc, dict):
        raise PolicyError("expected an object mapping thread categories (vmm, vcpu) to filters")
    if "api" in doc:
        raise PolicyError("category 'api': asyncvmm serves the API on the vmm thread (one filter, "
                          "'vmm'); merge its rules there")
    unknown = doc.keys() - set(CATEGORIES)
    if unknown:
        raise PolicyError(f"unknown thread category {', '.join(sorted(unknown))} (asyncvmm has vmm and vcpu)")
    missing = set(CATEGORIES) - doc.keys()
    if missing:
        raise PolicyError(f"missing thread category {', '.join(sorted(missing))}")
    return {c: parse_filter(doc[c], c) for c in CATEGORIES}
