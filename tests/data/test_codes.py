"""data.codes: the one codes layout (an .npz of level_0 (top) ... arrays, (N, *grid), smallest dtype) that
encode, sample, decompress and token shards all write, and every reader reads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.codes import code_dtype, codes_to_bytes, load_codes, save_codes


def test_round_trip_any_levels_and_batch(tmp_path):
    codes = [torch.randint(0, 300, (5, 2, 3)), torch.randint(0, 16, (5, 4, 6))]
    path = save_codes(tmp_path / "c.npz", codes, [300, 16])
    with np.load(path) as raw:
        assert raw.files == ["level_0", "level_1"]
        assert raw["level_0"].dtype == np.uint16 and raw["level_1"].dtype == np.uint8  # smallest for the codebook
    back = load_codes(path)
    assert all(torch.equal(a, b) and b.dtype == torch.long for a, b in zip(codes, back))
    assert all(torch.equal(a, b) for a, b in zip(codes, load_codes(codes_to_bytes(codes, [300, 16]))))
    assert code_dtype(256) == np.uint8 and code_dtype(257) == np.uint16 and code_dtype(70000) == np.int32


def test_a_plain_npy_reads_as_one_level(tmp_path):
    """What tokgen 0.1's `encode` wrote for a single-level tokenizer."""
    np.save(tmp_path / "old.npy", np.arange(16, dtype=np.uint8).reshape(4, 4))
    (codes,) = load_codes(tmp_path / "old.npy")
    assert codes.shape == (4, 4) and int(codes[3, 3]) == 15


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="c.npz, not c.npy"):
        save_codes(tmp_path / "c.npy", [torch.zeros(1, 2, 2, dtype=torch.long)], [4])
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_codes(tmp_path / "missing.npz")
    np.savez(tmp_path / "gap.npz", level_0=np.zeros(2), level_2=np.zeros(2))
    with pytest.raises(ValueError, match="level_1"):
        load_codes(tmp_path / "gap.npz")
    np.savez(tmp_path / "float.npz", level_0=np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="not integer codes"):
        load_codes(tmp_path / "float.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a codes file"):
        load_codes(tmp_path / "text.npz")
    with pytest.raises(ValueError, match="2 code levels but 1"):
        save_codes(tmp_path / "x.npz", [torch.zeros(1, 2), torch.zeros(1, 2)], [4])


def test_bytes_read_the_same_through_the_fast_path_and_zipfile(tmp_path):
    """Shard samples (bytes) skip zipfile when the npz is the plain uncompressed one np.savez writes; a compressed
    npz, or one whose member is damaged, goes through zipfile and reads the same or fails the same way."""
    import io
    import zipfile

    from data import codes as codes_module

    levels = [torch.randint(0, 300, (2, 3, 5)), torch.randint(0, 7, (2, 6, 10))]
    data = codes_to_bytes(levels, [300, 7])
    assert codes_module._read_stored(data, 10**6, "x") is not None  # the fast path takes it
    fast = load_codes(data)
    slow = load_codes(save_codes(tmp_path / "c.npz", levels, [300, 7]))  # a path: zipfile
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(fast, slow, levels))

    packed = io.BytesIO()
    np.savez_compressed(packed, level_0=levels[0].numpy().astype(np.uint16), level_1=levels[1].numpy())
    assert codes_module._read_stored(packed.getvalue(), 10**6, "x") is None
    assert all(torch.equal(a, b) for a, b in zip(load_codes(packed.getvalue()), levels))

    damaged = bytearray(data)
    damaged[30 + 11 + 20 + 5] ^= 0xFF  # inside level_0 (after its 30-byte header, name, zip64 extra): bad CRC
    assert codes_module._read_stored(bytes(damaged), 10**6, "x") is None
    with pytest.raises(ValueError, match="not a codes file"):
        load_codes(bytes(damaged))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert sorted(z.namelist()) == ["level_0.npy", "level_1.npy"]
