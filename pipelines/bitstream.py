"""The compact, self-describing container of ``tokgen compress`` files.

Layout (varints are LEB128: little-endian base-128, 7 bits a byte)::

    magic        2 bytes  b"TK"
    version+flags 1 byte  high nibble: version (2); low nibble: bits 0-1 the number of spatial
                          dims of the input (1 audio, 2 image, 3 video), bit 2 a class label
                          follows, bit 3 coded with the "no class" label (a class-conditional
                          pipeline whose priors learned one; no label follows)
    tag          2 bytes  the first 2 bytes of the pipeline fingerprint (SHA-256)
    input shape  varints  one per spatial dim (the channels and the code grids follow from the
                          tokenizer)
    class label  varint   only when flagged (class-conditional pipelines)
    check        4 bytes  little-endian CRC32 of: the full 32-byte pipeline fingerprint, every header
                          byte before the check, and the payload (plus optional ``content`` the writer
                          and the reader both know but the file does not store)
    payload      the rest (the arithmetic-coded codes)

A 32x32 image: 2 + 1 + 2 + 2 + 4 = 11 bytes of header (12 with a class label < 128).

The check is verified before any decoding: a file made by another pipeline never verifies (the check
covers the full fingerprint), and any flipped, cut or appended byte is caught. The 2-byte tag only lets
the reader say clearly "compressed with another pipeline" rather than "corrupt".
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = [
    "MAGIC",
    "VERSION",
    "TAG_BYTES",
    "FINGERPRINT_BYTES",
    "BitstreamError",
    "Header",
    "Container",
    "fingerprint_bytes",
    "pack",
    "read",
    "unpack",
    "peek_header",
    "check_pipeline",
    "header_size",
]

MAGIC = b"TK"
VERSION = 2
TAG_BYTES = 2
FINGERPRINT_BYTES = 32
MAX_DIMS = 3
_FLAG_CLASS = 0x4
_FLAG_NULL_CLASS = 0x8
NULL_LABEL = -1  # Header.class_label of a file coded with the "no class" label (stage2_prior.NULL_CLASS)
_MAX_VARINT_BYTES = 10
_CHECK = struct.Struct("<I")


class BitstreamError(ValueError):
    """Raised for malformed, corrupt, foreign or incompatible tokgen files."""


@dataclass
class Header:
    """tag: 2 bytes of the writer's fingerprint; input_shape: spatial input size (no channels);
    class_label: None for unconditional pipelines, NULL_LABEL when coded with the "no class" label."""

    tag: bytes
    input_shape: Tuple[int, ...]
    class_label: Optional[int] = None


def fingerprint_bytes(fingerprint) -> bytes:
    """A pipeline fingerprint (hex string as ``TokgenPipeline.fingerprint()`` gives, or bytes) as 32 bytes."""
    if isinstance(fingerprint, str):
        try:
            fingerprint = bytes.fromhex(fingerprint)
        except ValueError:
            raise ValueError(f"fingerprint must be a hex string, got {fingerprint!r}") from None
    fingerprint = bytes(fingerprint)
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes (SHA-256), got {len(fingerprint)}")
    return fingerprint


# --------------------------------------------------------------------------- #
# varints
# --------------------------------------------------------------------------- #
def _write_varint(out: bytearray, value: int) -> None:
    value = int(value)
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
                if i and b == 0:
                    raise BitstreamError("corrupt header: non-canonical varint")
                return value
        raise BitstreamError("corrupt header: varint too long")


# --------------------------------------------------------------------------- #
# writing
# --------------------------------------------------------------------------- #
def _encode_header(fingerprint: bytes, input_shape, class_label) -> bytearray:
    dims = [int(d) for d in input_shape]
    if not 1 <= len(dims) <= MAX_DIMS:
        raise ValueError(f"input_shape must have 1 to {MAX_DIMS} spatial dims, got {tuple(dims)}")
    if any(d < 1 for d in dims):
        raise ValueError(f"input_shape dims must be >= 1, got {tuple(dims)}")
    flags = len(dims)
    if class_label == NULL_LABEL:
        flags |= _FLAG_NULL_CLASS
    elif class_label is not None:
        if int(class_label) < 0:
            raise ValueError(f"class_label must be >= 0 (or NULL_LABEL), got {class_label}")
        flags |= _FLAG_CLASS
    out = bytearray(MAGIC)
    out.append((VERSION << 4) | flags)
    out += fingerprint[:TAG_BYTES]
    for d in dims:
        _write_varint(out, d)
    if flags & _FLAG_CLASS:
        _write_varint(out, int(class_label))
    return out


def _check_value(fingerprint: bytes, head: bytes, payload: bytes, content: bytes) -> int:
    crc = zlib.crc32(fingerprint)
    crc = zlib.crc32(head, crc)
    crc = zlib.crc32(payload, crc)
    return zlib.crc32(content, crc) & 0xFFFFFFFF


def pack(fingerprint, input_shape, payload: bytes, class_label: Optional[int] = None,
         content: bytes = b"") -> bytes:
    """Header + check + payload. ``content`` is covered by the check but not stored."""
    fp = fingerprint_bytes(fingerprint)
    head = bytes(_encode_header(fp, input_shape, class_label))
    payload = bytes(payload)
    return head + _CHECK.pack(_check_value(fp, head, payload, bytes(content))) + payload


def header_size(input_shape, class_label: Optional[int] = None) -> int:
    """Bytes the container adds to the payload (header + check)."""
    return len(_encode_header(b"\0" * FINGERPRINT_BYTES, input_shape, class_label)) + _CHECK.size


# --------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------- #
@dataclass
class Container:
    """A parsed (not yet verified) file."""

    header: Header
    payload: bytes
    head: bytes  # the header bytes before the check
    check: int

    @property
    def header_bytes(self) -> int:
        return len(self.head) + _CHECK.size

    def verify(self, fingerprint, content: bytes = b"") -> None:
        """Raise :class:`BitstreamError` unless the check matches (same pipeline, intact file, same content)."""
        fp = fingerprint_bytes(fingerprint)
        if _check_value(fp, self.head, self.payload, bytes(content)) != self.check:
            raise BitstreamError("checksum mismatch: the file is corrupt or was modified")


def read(data) -> Container:
    """Parse a file: magic, version, header fields. Raises :class:`BitstreamError`; verifies nothing."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC):
        if data and MAGIC.startswith(data):
            raise BitstreamError("truncated header")
        raise BitstreamError("not a tokgen compressed file (bad magic)")
    if data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a tokgen compressed file (bad magic)")
    r = _Reader(data, len(MAGIC))
    vf = r.byte()
    version, flags = vf >> 4, vf & 0xF
    if version != VERSION:
        raise BitstreamError(f"unsupported version {version} (this build reads version {VERSION})")
    ndim = flags & 0x3
    if ndim == 0 or (flags & _FLAG_CLASS and flags & _FLAG_NULL_CLASS):
        raise BitstreamError("corrupt header: bad flags")
    tag = r.take(TAG_BYTES)
    dims = tuple(r.varint() for _ in range(ndim))
    if any(d == 0 for d in dims):
        raise BitstreamError("corrupt header: zero-size input")
    class_label = r.varint() if flags & _FLAG_CLASS else (NULL_LABEL if flags & _FLAG_NULL_CLASS else None)
    head = data[: r.pos]
    (check,) = _CHECK.unpack(r.take(_CHECK.size))
    return Container(Header(tag, dims, class_label), data[r.pos:], head, check)


def peek_header(data) -> Header:
    """The header fields, unverified."""
    return read(data).header


def check_pipeline(header: Header, fingerprint) -> None:
    """Raise :class:`BitstreamError` if the file's tag says another pipeline wrote it."""
    fp = fingerprint_bytes(fingerprint)
    if bytes(header.tag) != fp[:TAG_BYTES]:
        raise BitstreamError(
            "this file was compressed with another pipeline "
            f"(its tag {bytes(header.tag).hex()}, this pipeline's fingerprint {fp.hex()[:12]}...)"
        )


def unpack(data, fingerprint, content: bytes = b"") -> Tuple[Header, bytes]:
    """Parse and verify in one go when ``content`` is known beforehand; returns ``(header, payload)``."""
    container = read(data)
    check_pipeline(container.header, fingerprint)
    container.verify(fingerprint, content)
    return container.header, container.payload
