"""Codes on disk: one layout for every file and shard entry that holds codes.

A codes file is an uncompressed ``.npz`` (numpy, never pickled) with one array per level, ``level_0`` the top
level, each ``(N, *grid)`` in the smallest integer dtype that holds its codebook; a residual quantizer's code
stacks are ``(N, *grid, depth)``, the stages last (a file may hold fewer stages than the tokenizer has: the first
k decode at a lower bitrate). ``tokgen encode`` (N = 1),
``tokgen sample`` (N samples), ``tokgen decompress --codes-out`` and every sample of a token shard write it;
``tokgen decode`` and the token readers read it.
"""
from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .limits import MAX_INPUT_SIZE, check_input_size

CODES_SUFFIX = ".npz"


def code_dtype(codebook_size: int) -> np.dtype:
    """Smallest dtype that holds codes in [0, codebook_size): uint8, uint16, else int32."""
    if codebook_size <= 256:
        return np.dtype(np.uint8)
    if codebook_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def level_key(level: int) -> str:
    return f"level_{level}"


def _arrays(codes: list[torch.Tensor], codebook_sizes: list[int]) -> dict[str, np.ndarray]:
    if len(codes) != len(codebook_sizes):
        raise ValueError(f"{len(codes)} code levels but {len(codebook_sizes)} codebook sizes")
    return {level_key(i): np.ascontiguousarray(c.detach().cpu().numpy().astype(code_dtype(k)))
            for i, (c, k) in enumerate(zip(codes, codebook_sizes))}


def write_codes(file: BinaryIO, codes: list[torch.Tensor], codebook_sizes: list[int]) -> None:
    """codes: one (N, *grid) integer tensor per level, top first ((N, *grid, depth) for code stacks)."""
    np.savez(file, **_arrays(codes, codebook_sizes))


def save_codes(path: str | Path, codes: list[torch.Tensor], codebook_sizes: list[int]) -> Path:
    """Write a codes file (``.npz``); returns its path."""
    path = Path(path)
    if path.suffix != CODES_SUFFIX:
        raise ValueError(f"codes files are {CODES_SUFFIX} archives (one array per level): name it "
                         f"{path.with_suffix(CODES_SUFFIX).name}, not {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        write_codes(f, codes, codebook_sizes)
    return path


def codes_to_bytes(codes: list[torch.Tensor], codebook_sizes: list[int]) -> bytes:
    buffer = io.BytesIO()
    write_codes(buffer, codes, codebook_sizes)
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def _parse_header(version: int, header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of an .npy header. Cached: every sample of a token shard has the same header,
    and numpy's parser (a literal_eval) costs as much as reading the sample."""
    read = np.lib.format.read_array_header_1_0 if version == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(io.BytesIO(header))
    return tuple(shape), bool(fortran), dtype


def _read_header(member, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(member)
    if major not in (1, 2, 3):
        raise ValueError(f"{where} has an .npy array of unknown version {major}")
    width = 2 if major == 1 else 4  # the header length: little-endian uint16 (v1) or uint32 (v2, v3)
    length_bytes = member.read(width)
    length = int.from_bytes(length_bytes, "little")
    if len(length_bytes) != width or length > 65536:
        raise ValueError(f"{where} has a malformed .npy header")
    header = member.read(length)
    if len(header) != length:
        raise ValueError(f"{where} has a truncated .npy header")
    return _parse_header(1 if major == 1 else 2, length_bytes + header)


def _read_level(npz, key: str, max_codes: int, where: str) -> np.ndarray:
    """One array of an npz, its header checked (size, integer dtype) before its data is read."""
    with npz.zip.open(f"{key}.npy") as member:
        shape, fortran, dtype = _read_header(member, where)
        check_input_size(tuple(shape), max_codes, f"codes ({where})")
        if not np.issubdtype(dtype, np.integer):
            raise ValueError(f"{where} holds {dtype} values, not integer codes")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = member.read(size)
    if len(data) != size:
        raise ValueError(f"{where} is truncated: {key} holds {len(data)} of {size} bytes")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local header (APPNOTE 4.3.7)
_ZIP64 = 0xFFFFFFFF  # a size that is in the zip64 extra field instead


def _zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    """(uncompressed, compressed) size from a local header's zip64 extra field (id 1), else None."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, pos)
        if kind == 1 and size >= 16 and pos + 20 <= len(extra):
            return struct.unpack_from("<QQ", extra, pos + 4)
        pos += 4 + size
    return None


def _stored_members(data: bytes) -> dict[str, bytes] | None:
    """{name: bytes} of an uncompressed zip (what ``np.savez`` writes) in one pass over its local headers, each
    member's CRC checked; None for anything else (compressed, data descriptors, damage), which zipfile then reads
    and reports. Why: a token sample is a 300-byte npz, and zipfile's central-directory parse plus np.load cost
    more than the rest of reading the sample."""
    members, pos = {}, 0
    while data.startswith(b"PK\x03\x04", pos) and pos + _LOCAL_HEADER.size <= len(data):
        _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = _LOCAL_HEADER.unpack_from(data, pos)
        start = pos + _LOCAL_HEADER.size + name_len + extra_len
        if flags & 0x09 or method != 0:  # encrypted, sizes in a data descriptor, compressed
            return None
        if _ZIP64 in (csize, usize):
            sizes = _zip64_sizes(data[start - extra_len : start])
            if sizes is None:
                return None
            usize, csize = sizes
        body = data[start : start + csize]
        if csize != usize or len(body) != csize or zlib.crc32(body) != crc:
            return None
        members[data[pos + _LOCAL_HEADER.size : start - extra_len].decode("utf-8", "replace")] = body
        pos = start + csize
    return members if members and data.startswith(b"PK\x01\x02", pos) else None


def _array_from_bytes(member: bytes, key: str, max_codes: int, where: str) -> np.ndarray:
    stream = io.BytesIO(member)
    shape, fortran, dtype = _read_header(stream, where)
    check_input_size(tuple(shape), max_codes, f"codes ({where})")
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{where} holds {dtype} values, not integer codes")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(member) - stream.tell() != size:
        raise ValueError(f"{where} is damaged: {key} holds {len(member) - stream.tell()} bytes, its header says {size}")
    return np.frombuffer(member, dtype, offset=stream.tell()).reshape(shape, order="F" if fortran else "C")


def _read_stored(data: bytes, max_codes: int, where: str) -> list[np.ndarray] | None:
    """The fast path of ``load_codes`` for bytes: the levels of an uncompressed npz, else None."""
    members = _stored_members(data)
    if members is None:
        return None
    keys = [level_key(i) for i in range(len(members))]
    if sorted(members) != sorted(f"{k}.npy" for k in keys):
        raise ValueError(f"{where} holds {sorted(members)}, not the arrays {keys} of a codes file")
    return [_array_from_bytes(members[f"{k}.npy"], k, max_codes, where) for k in keys]


def _read_arrays(source, max_codes: int, where: str) -> list[np.ndarray]:
    try:
        loaded = np.load(source, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{where} is not a codes file (.npz of level_0, level_1, ... arrays): {err}") from err
    if isinstance(loaded, np.ndarray):
        return [loaded]
    with loaded:
        keys = [level_key(i) for i in range(len(loaded.files))]
        if sorted(loaded.files) != sorted(keys):
            raise ValueError(f"{where} holds {sorted(loaded.files)}, not the arrays {keys} of a codes file")
        return [_read_level(loaded, key, max_codes, where) for key in keys]


def load_codes(source: str | Path | bytes, max_codes: int = MAX_INPUT_SIZE) -> list[torch.Tensor]:
    """A codes file (path or its bytes) -> one LongTensor per level, top first; arrays whose header claims more
    than ``max_codes`` codes are refused before they are read.

    A plain ``.npy`` array (what tokgen 0.1's ``encode`` wrote for one level) reads as one level.
    """
    where = "codes data" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise FileNotFoundError(f"codes file {source} not found")
    try:
        arrays = _read_stored(source, max_codes, where) if isinstance(source, bytes) else None
        if arrays is None:
            arrays = _read_arrays(io.BytesIO(source) if isinstance(source, bytes) else source, max_codes, where)
    # a damaged archive: a bad CRC, a compression method zipfile lacks, an "encrypted" flag (RuntimeError)
    except (OSError, EOFError, NotImplementedError, RuntimeError, zipfile.BadZipFile) as err:
        raise ValueError(f"{where} is not a codes file (.npz of level_0, level_1, ... arrays): {err}") from err
    for a in arrays:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where} holds {a.dtype} values, not integer codes")
    return [torch.from_numpy(a.astype(np.int64)) for a in arrays]
