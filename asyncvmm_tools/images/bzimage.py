"""Find and decompress the ELF kernel inside a bzImage.

Primer (Linux Documentation/arch/x86/boot.rst): a bzImage is a real-mode
setup of ``setup_sects + 1`` 512-byte sectors (``setup_sects`` at 0x1F1; 0
means 4) followed by the protected-mode part.  The setup header carries the
signature ``HdrS`` at 0x202, the protocol version at 0x206 and, from version
2.08, ``payload_offset`` (0x248) and ``payload_length`` (0x24C): where, counted
from the start of the protected-mode part, the compressed kernel lies.  The
build appends the decompressed size as a little-endian u32 to the payload,
which the CLI decompressors do not expect, so it is cut off and checked.
The decompressed payload is ``vmlinux`` (stripped), possibly followed by
relocation data, which an ELF loader ignores.

Parsing is pure; :func:`decompress` runs ``lz4``/``zstd`` for those formats
(Python has no codec for them) and uses the stdlib for gzip/xz/lzma/bzip2.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import subprocess
import zlib
from dataclasses import dataclass

SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
HEADER_MAGIC = 0x202
VERSION = 0x206
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C

MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),      # LZ4 legacy frame, as the kernel's build writes it
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
)


class BzImageError(ValueError):
    """Not a bzImage we can unpack, or a payload that does not decompress to ELF64."""


@dataclass(frozen=True)
class Payload:
    offset: int          # from the start of the file
    length: int          # including the appended size word
    compression: str
    version: int         # boot protocol version, e.g. 0x20f


def locate_payload(image: bytes) -> Payload:
    if len(image) < 0x250:
        raise BzImageError("file too short for a setup header")
    if struct.unpack_from("<H", image, BOOT_FLAG)[0] != 0xAA55:
        raise BzImageError("no 0xAA55 boot flag")
    if image[HEADER_MAGIC:HEADER_MAGIC + 4] != b"HdrS":
        raise BzImageError("no HdrS signature")
    version = struct.unpack_from("<H", image, VERSION)[0]
    if version < 0x208:
        raise BzImageError(f"boot protocol {version:#x} predates payload_offset (2.08)")
    setup_sects = image[SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET)
    start = (setup_sects + 1) * 512 + offset
    if length < 8 or start + length > len(image):
        raise BzImageError(f"payload {start:#x}+{length:#x} outside the {len(image):#x}-byte file")
    return Payload(start, length, compression_of(image[start:start + 8]), version)


def compression_of(head: bytes) -> str:
    for magic, name in MAGICS:
        if head.startswith(magic):
            return name
    raise BzImageError(f"unknown compression magic {head[:6].hex()}")


def decompress(image: bytes) -> bytes:
    """The ELF vmlinux inside ``image``; raises :class:`BzImageError`."""
    p = locate_payload(image)
    blob = image[p.offset:p.offset + p.length]
    body, size = blob[:-4], struct.unpack("<I", blob[-4:])[0]
    out = _decompress(body, p.compression)
    if len(out) != size:
        raise BzImageError(f"decompressed {len(out)} bytes, header says {size}")
    check_elf64(out)
    return out


def _decompress(body: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body)
    if kind in ("xz", "lzma"):
        fmt = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(format=fmt).decompress(body)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(body)
    if kind in ("lz4", "zstd"):
        tool = ["lz4", "-dc"] if kind == "lz4" else ["zstd", "-dcq"]
        try:
            r = subprocess.run(tool, input=body, capture_output=True)
        except FileNotFoundError as exc:
            raise BzImageError(f"{tool[0]} is not installed (apt-get install {tool[0]})") from exc
        if r.returncode != 0:
            raise BzImageError(f"{tool[0]} failed: {r.stderr.decode(errors='replace').strip()}")
        return r.stdout
    raise BzImageError(f"no decompressor for {kind}")


def check_elf64(data: bytes) -> None:
    if data[:4] != b"\x7fELF":
        raise BzImageError("payload is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise BzImageError("payload is not ELF64 little-endian")
    if struct.unpack_from("<H", data, 0x12)[0] != 62:
        raise BzImageError("payload is not an x86-64 ELF")
