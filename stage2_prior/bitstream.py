"""A small self-describing container for tokgen compressed files.

Layout (all integers unsigned; varints are LEB128, little-endian base-128)::

    magic      4 bytes  b"TKGN"
    version    1 byte   (1)
    fingerprint 8 bytes  truncated hash of the pipeline that wrote the file
    num_levels 1 byte
    per level: ndim (1 byte) + ndim dims as varints   (code grid shape, top level first)
    extra_len  varint   (0 when `extra` is empty) + extra_len bytes of compact UTF-8 JSON
    crc32      4 bytes  little-endian CRC32 of every byte before it + the payload
    payload    the rest of the file

A 1-level 2-D header with dims < 128 and empty extra is 22 bytes.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = [
    "MAGIC",
    "VERSION",
    "FINGERPRINT_BYTES",
    "BitstreamError",
    "Header",
    "pack",
    "unpack",
    "peek_header",
    "check_fingerprint",
    "header_size",
]

MAGIC = b"TKGN"
VERSION = 1
FINGERPRINT_BYTES = 8
_MAX_VARINT_BYTES = 10


class BitstreamError(ValueError):
    """Raised for malformed, corrupt, foreign or incompatible tokgen files."""


@dataclass
class Header:
    fingerprint: bytes
    shapes: List[Tuple[int, ...]] = field(default_factory=list)
    extra: Dict = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# varints
# --------------------------------------------------------------------------- #
def _write_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"varint must be >= 0, got {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise BitstreamError("truncated header")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            b = self.byte()
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                return value
        raise BitstreamError("corrupt header: varint too long")


# --------------------------------------------------------------------------- #
# pack / unpack
# --------------------------------------------------------------------------- #
def _encode_header(header: Header) -> bytearray:
    fp = bytes(header.fingerprint)
    if len(fp) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be exactly {FINGERPRINT_BYTES} bytes, got {len(fp)}")
    shapes = list(header.shapes)
    if len(shapes) > 255:
        raise ValueError(f"at most 255 levels are supported, got {len(shapes)}")
    extra = header.extra if header.extra is not None else {}
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")

    out = bytearray(MAGIC)
    out.append(VERSION)
    out += fp
    out.append(len(shapes))
    for shape in shapes:
        dims = [int(d) for d in shape]
        if len(dims) > 255:
            raise ValueError(f"at most 255 dims per level are supported, got {len(dims)}")
        out.append(len(dims))
        for d in dims:
            if d < 0:
                raise ValueError(f"shape dims must be >= 0, got {tuple(dims)}")
            _write_varint(out, d)
    if extra:
        blob = json.dumps(extra, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
        _write_varint(out, len(blob))
        out += blob
    else:
        _write_varint(out, 0)
    return out


def pack(header: Header, payload: bytes) -> bytes:
    """Serialise ``header`` + ``payload`` into a tokgen file."""
    head = _encode_header(header)
    payload = bytes(payload)
    crc = zlib.crc32(payload, zlib.crc32(head)) & 0xFFFFFFFF
    return bytes(head) + struct.pack("<I", crc) + payload


def header_size(header: Header) -> int:
    """Bytes the container adds around the payload (header + CRC)."""
    return len(_encode_header(header)) + 4


def _parse_header(data) -> Tuple[Header, int, int]:
    """Parse the header; returns (header with extra not yet decoded, extra start, crc position)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC):
        if MAGIC.startswith(data) and data:
            raise BitstreamError("truncated header")
        raise BitstreamError("not a tokgen file (bad magic)")
    if data[:4] != MAGIC:
        raise BitstreamError("not a tokgen file (bad magic)")
    r = _Reader(data, 4)
    version = r.byte()
    if version != VERSION:
        raise BitstreamError(f"unsupported version {version} (this build reads version {VERSION})")
    fingerprint = r.take(FINGERPRINT_BYTES)
    num_levels = r.byte()
    shapes = []
    for _ in range(num_levels):
        ndim = r.byte()
        shapes.append(tuple(r.varint() for _ in range(ndim)))
    extra_len = r.varint()
    extra_start = r.pos
    r.take(extra_len)
    crc_pos = r.pos
    r.take(4)
    return Header(fingerprint=fingerprint, shapes=shapes, extra={}), extra_start, crc_pos


def _decode_extra(data: bytes, start: int, end: int) -> Dict:
    if end == start:
        return {}
    try:
        extra = json.loads(data[start:end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BitstreamError(f"corrupt header: extra metadata is not valid JSON ({exc})") from None
    if not isinstance(extra, dict):
        raise BitstreamError("corrupt header: extra metadata is not a JSON object")
    return extra


def unpack(data: bytes) -> Tuple[Header, bytes]:
    """Parse and verify a tokgen file; returns ``(header, payload)``.

    Raises :class:`BitstreamError` on bad magic, unsupported version, truncation
    or checksum mismatch.
    """
    header, extra_start, crc_pos = _parse_header(data)
    data = bytes(data)
    (stored,) = struct.unpack_from("<I", data, crc_pos)
    payload = data[crc_pos + 4:]
    crc = zlib.crc32(payload, zlib.crc32(data[:crc_pos])) & 0xFFFFFFFF
    if crc != stored:
        raise BitstreamError("checksum mismatch: file is corrupt or was modified")
    header.extra = _decode_extra(data, extra_start, crc_pos)
    return header, payload


def peek_header(data: bytes) -> Header:
    """Parse the header only (no checksum verification; the payload may be absent)."""
    header, extra_start, crc_pos = _parse_header(data)
    header.extra = _decode_extra(bytes(data), extra_start, crc_pos)
    return header


def check_fingerprint(header: Header, expected: bytes) -> None:
    """Raise :class:`BitstreamError` unless ``header.fingerprint == expected``."""
    expected = bytes(expected)
    if bytes(header.fingerprint) != expected:
        raise BitstreamError(
            "this file was compressed with another pipeline "
            f"(fingerprint {bytes(header.fingerprint).hex()}, this pipeline {expected.hex()})"
        )
