"""Codes on disk: one layout for every file and shard entry that holds codes.

A codes file is an uncompressed ``.npz`` (numpy, never pickled) with one array per level, ``level_0`` the top
level, each ``(N, *grid)`` in the smallest integer dtype that holds its codebook. ``tokgen encode`` (N = 1),
``tokgen sample`` (N samples), ``tokgen decompress --codes-out`` and every sample of a token shard write it;
``tokgen decode`` and the token readers read it.
"""
from __future__ import annotations

import io
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
    """codes: one (N, *grid) integer tensor per level, top first."""
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


def _claimed_shape(npz, key: str) -> tuple[int, ...]:
    """The shape an npz member's header claims, read without reading the array."""
    with npz.zip.open(f"{key}.npy") as member:
        major, _ = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(member)
    return tuple(shape)


def load_codes(source: str | Path | bytes, max_codes: int = MAX_INPUT_SIZE) -> list[torch.Tensor]:
    """A codes file (path or its bytes) -> one LongTensor per level, top first; arrays whose header claims more
    than ``max_codes`` codes are refused before they are read.

    A plain ``.npy`` array (what tokgen 0.1's ``encode`` wrote for one level) reads as one level.
    """
    where = "codes data" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise FileNotFoundError(f"codes file {source} not found")
    try:
        loaded = np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{where} is not a codes file (.npz of level_0, level_1, ... arrays): {err}") from err
    if isinstance(loaded, np.ndarray):
        arrays = [loaded]
    else:
        with loaded:
            keys = [level_key(i) for i in range(len(loaded.files))]
            if sorted(loaded.files) != sorted(keys):
                raise ValueError(f"{where} holds {sorted(loaded.files)}, not the arrays {keys} of a codes file")
            for key in keys:  # the headers first: what they claim is allocated on reading
                check_input_size(_claimed_shape(loaded, key), max_codes, f"codes ({where})")
            arrays = [loaded[k] for k in keys]
    for a in arrays:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where} holds {a.dtype} values, not integer codes")
    return [torch.from_numpy(a.astype(np.int64)) for a in arrays]
