"""JSON bodies in, typed configs out; typed configs out as JSON-ready objects.

:func:`decode` turns bytes into a schema Struct and reports failures in the
words of serde (``unknown field `x`, expected one of ...``, ``missing field
`x```, ``unknown variant ...``, ``duplicate field `x```, syntax errors ``at
line L column C``), because Firecracker clients match on them.  Like serde,
it refuses a schema object that names a field twice (a plain JSON parser
would keep the last one silently); a free-form document (MMDS, ``--metadata``)
keeps the last of two equal keys, as serde_json's ``Value`` does.
It also runs every ``check()`` in the decoded tree: syntax rules Firecracker
applies while deserializing (MAC addresses, CPU template bitmaps ...).
:func:`to_builtins` drops unset optional fields, as Firecracker's serializer does.
No I/O here.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any, TypeVar

import msgspec

from asyncvmm.config.errors import ConfigError

T = TypeVar("T")

_PATH_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_DECODERS: dict[Any, msgspec.json.Decoder] = {}


def decode(body: bytes, type_: type[T]) -> T:
    """Decode ``body`` as ``type_``; raise :class:`ConfigError` with a serde-like message."""
    decoder = _DECODERS.get(type_)
    if decoder is None:
        decoder = _DECODERS[type_] = msgspec.json.Decoder(type_)
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as err:
        raise ConfigError(_serde_message(str(err), type_)) from None
    except msgspec.DecodeError as err:
        raise ConfigError(_syntax_message(str(err), body)) from None
    except RecursionError:
        raise ConfigError("recursion limit exceeded") from None
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        _refuse_duplicate_keys(body)
    check_tree(value)
    return value


def _refuse_duplicate_keys(body: bytes) -> None:
    """msgspec keeps the last of two equal keys; re-read the (valid) JSON to refuse them."""

    def pairs(items: list[tuple[str, Any]]) -> None:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                raise ConfigError(f"duplicate field `{key}`")
            seen.add(key)

    try:  # numbers are not needed here: skip converting them (and Python's digit limit)
        json.loads(body, object_pairs_hook=pairs, parse_int=_ignore, parse_float=_ignore)
    except RecursionError:
        raise ConfigError("recursion limit exceeded") from None


def _ignore(_: str) -> None:
    return None


def check_tree(value: Any) -> None:
    """Call ``check()`` on every Struct in ``value``, depth first."""
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            check_tree(getattr(value, name))
        check = getattr(value, "check", None)
        if check is not None:
            check()
    elif isinstance(value, list):
        for item in value:
            check_tree(item)


def to_builtins(value: Any, keep_top_level_nulls: bool = False) -> Any:
    """Plain JSON values; unset (``None``) optional fields are left out below the top level."""
    plain = msgspec.to_builtins(value)
    if keep_top_level_nulls and isinstance(plain, dict):
        return {k: (None if v is None else _drop_nulls(v)) for k, v in plain.items()}
    return _drop_nulls(plain)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _syntax_message(text: str, body: bytes) -> str:
    """msgspec's ``JSON is malformed: <why> (byte N)`` as serde's ``<why> at line L column C``."""
    if "truncated" in text:
        return "EOF while parsing a value" + _line_column(body, len(body))
    if match := re.fullmatch(r"JSON is malformed: (.*) \(byte (\d+)\)", text):
        return match.group(1) + _line_column(body, int(match.group(2)))
    return text


def _line_column(body: bytes, offset: int) -> str:
    """1-based, counting bytes within the line as serde does; at the end, the last byte read."""
    offset = min(offset, len(body))
    line = body.count(b"\n", 0, offset) + 1
    column = offset - (body.rfind(b"\n", 0, offset) + 1) + (1 if offset < len(body) else 0)
    return f" at line {line} column {column}"


def _serde_message(text: str, root: Any) -> str:
    body, _, where = text.partition(" - at `")
    where = where.rstrip("`")
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", body):
        fields = _field_names(_type_at(root, where))
        expected = ", ".join(f"`{f}`" for f in fields)
        msg = f"unknown field `{m.group(1)}`" + (f", expected one of {expected}" if fields else "")
    elif m := re.fullmatch(r"Object missing required field `(.*)`", body):
        msg = f"missing field `{m.group(1)}`"
    elif m := re.fullmatch(r"Invalid enum value (.*)", body):
        choices = _literal_choices(_type_at(root, where))
        expected = ", ".join(f"`{c}`" for c in choices)
        msg = f"unknown variant `{m.group(1).strip(chr(39))}`" + (
            f", expected one of {expected}" if choices else ""
        )
    elif m := re.fullmatch(r"Expected `(.*)`, got `(.*)`", body):
        msg = f"invalid type: {m.group(2)}, expected {m.group(1)}"
    elif m := re.fullmatch(r"Expected `int` ([<>]=?) (-?\d+)", body):
        msg = f"invalid value: integer out of range, expected an integer {m.group(1)} {m.group(2)}"
    else:
        msg = body
    return f"{msg} at `{where}`" if where and where != "$" else msg


def _unwrap(tp: Any) -> Any:
    """Strip Optional/Annotated wrappers down to the interesting type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
            if len(args) != 1:
                return tp
        else:
            return tp


def _type_at(root: Any, path: str) -> Any:
    tp = _unwrap(root)
    for name, index in _PATH_SEGMENT.findall(path[1:] if path.startswith("$") else ""):
        if index:
            args = typing.get_args(tp)
            tp = _unwrap(args[0]) if args else None
        else:
            fields = {f.encode_name: f for f in _struct_fields(tp)}
            tp = _unwrap(fields[name].type) if name in fields else None
    return tp


def _struct_fields(tp: Any) -> tuple[Any, ...]:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return msgspec.structs.fields(tp)
    return ()


def _field_names(tp: Any) -> list[str]:
    return [f.encode_name for f in _struct_fields(tp)]


def _literal_choices(tp: Any) -> list[str]:
    return [str(a) for a in typing.get_args(tp)] if typing.get_origin(tp) is typing.Literal else []
