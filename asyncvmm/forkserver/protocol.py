"""The fork server's wire format.  Pure: bytes in, checked values out; no I/O here.

The socket is ``AF_UNIX``/``SOCK_SEQPACKET``: every message keeps its
boundaries and arrives whole, so the server and the forked child can both
write to the one connection without interleaving, and a message that does
not fit the reader's buffer is seen as truncated (``MSG_TRUNC``) rather than
half-read.  Each message is one JSON object (UTF-8).  Strings that came from
the OS (argv, environment, paths) travel as Python decoded them
(``surrogateescape``); JSON carries the lone surrogates as ``\\udcXX`` escapes,
so arbitrary bytes survive the trip.

One connection serves one VMM:

* launcher -> server, once: a request ``{"version": 1, "argv": [...],
  "cwd": "/abs", "env": {...}, "rlimits": {"NOFILE": [soft, hard], ...},
  "umask": 18}`` with exactly three descriptors attached (``SCM_RIGHTS``):
  the launcher's stdin, stdout and stderr;
* server -> launcher: ``{"waiter": "/path"}`` when the server has a native
  waiter for it (``native.py``), ``{"pid": N}`` once the child is forked, then one
  status, ``{"exit": code}`` or ``{"signal": signum}``; or ``{"error": "..."}``
  instead of all of those when the request is refused.

A child whose server has gone sends its own ``{"exit": code}`` just before it
exits, so the status still arrives; the launcher keeps the first status it
reads.  The launcher sends nothing after its request: the child
treats the connection's end (EOF) as its launcher's death.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
MAX_MESSAGE = 128 * 1024          # fits the default socket buffers (212992 bytes here) whole
STDIO_FDS = 3
MAX_ARGS = 4096
# The rlimits a launcher hands over: every one Linux defines, by resource module name.
RLIMITS = ("AS", "CORE", "CPU", "DATA", "FSIZE", "MEMLOCK", "MSGQUEUE", "NICE", "NOFILE",
           "NPROC", "RSS", "RTPRIO", "RTTIME", "SIGPENDING", "STACK")


class ProtocolError(ValueError):
    """A message that is not what the protocol allows; the text says what is wrong."""


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    return data


def _decode_object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message exceeds the {MAX_MESSAGE}-byte limit")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"not a JSON message: {err}") from None
    except RecursionError:
        raise ProtocolError("not a JSON message: nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError("a message must be a JSON object")
    return value


def _plain_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string")
    if "\0" in value:
        raise ProtocolError(f"{what} contains a NUL character")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{what} must be an integer in [{low}, {high}]")
    return value


def make_request(argv: list[str], cwd: str, env: dict[str, str],
                 rlimits: dict[str, tuple[int, int]], umask: int, jail: list[str] | None = None) -> bytes:
    request = {"version": VERSION, "argv": argv, "cwd": cwd, "env": env,
               "rlimits": {k: list(v) for k, v in rlimits.items()}, "umask": umask}
    if jail is not None:  # asyncvmm-jailer's flags: the child jails itself (docs/jailer.md)
        request["jail"] = jail
    return encode(request)


def parse_request(data: bytes) -> dict[str, Any]:
    """The request's fields, checked; :class:`ProtocolError` names the first bad one."""
    msg = _decode_object(data)
    unknown = set(msg) - {"version", "argv", "cwd", "env", "rlimits", "umask", "jail"}
    if unknown:
        raise ProtocolError(f"unknown request fields: {', '.join(sorted(unknown))}")
    if msg.get("version") != VERSION:
        raise ProtocolError(f"unsupported protocol version {msg.get('version')!r} (this server speaks {VERSION})")
    argv = msg.get("argv")
    if not isinstance(argv, list) or len(argv) > MAX_ARGS:
        raise ProtocolError(f"argv must be a list of at most {MAX_ARGS} strings")
    argv = [_plain_str(a, "an argument") for a in argv]
    cwd = _plain_str(msg.get("cwd"), "cwd")
    if not cwd.startswith("/"):
        raise ProtocolError("cwd must be an absolute path")
    env = msg.get("env")
    if not isinstance(env, dict):
        raise ProtocolError("env must be an object of strings")
    for key, value in env.items():
        if not key or "=" in _plain_str(key, "an environment name"):
            raise ProtocolError(f"bad environment variable name {key!r}")
        _plain_str(value, f"environment variable {key}")
    rlimits = msg.get("rlimits")
    if not isinstance(rlimits, dict):
        raise ProtocolError("rlimits must be an object")
    checked: dict[str, tuple[int, int]] = {}
    for name, pair in rlimits.items():
        if name not in RLIMITS:
            raise ProtocolError(f"unknown rlimit {name!r}")
        if not isinstance(pair, list) or len(pair) != 2:
            raise ProtocolError(f"rlimit {name} must be [soft, hard]")
        # -1 is RLIM_INFINITY as Python's resource module spells it.
        soft, hard = (_int(v, f"rlimit {name}", -1, 2**63 - 1) for v in pair)
        checked[name] = (soft, hard)
    umask = _int(msg.get("umask"), "umask", 0, 0o777)
    jail = msg.get("jail")
    if jail is not None:
        if not isinstance(jail, list) or len(jail) > MAX_ARGS:
            raise ProtocolError(f"jail must be a list of at most {MAX_ARGS} strings")
        jail = [_plain_str(a, "a jailer argument") for a in jail]
    return {"argv": argv, "cwd": cwd, "env": env, "rlimits": checked, "umask": umask, "jail": jail}


def parse_reply(data: bytes) -> tuple[str, Any]:
    """One server (or child) message as ``(kind, value)``: pid, exit, signal or error."""
    msg = _decode_object(data)
    if len(msg) != 1:
        raise ProtocolError("a reply has exactly one field")
    (kind, value), = msg.items()
    if kind in ("error", "waiter"):
        return kind, _plain_str(value, kind)
    if kind == "pid":
        return kind, _int(value, "pid", 1, 2**22)
    if kind == "exit":
        return kind, _int(value, "exit", 0, 255)
    if kind == "signal":
        return kind, _int(value, "signal", 1, 64)
    raise ProtocolError(f"unknown reply {kind!r}")
