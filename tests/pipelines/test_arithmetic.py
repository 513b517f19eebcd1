"""Tests for stage2_prior.arithmetic (range coder) and stage2_prior.bitstream (container)."""

import numpy as np
import pytest
import torch

from pipelines.arithmetic import (
    MAX_PRECISION,
    PRECISION,
    ArithmeticDecoder,
    ArithmeticEncoder,
    decode_sequence,
    encode_sequence,
    ideal_bits,
    precision_for,
    quantize_cdf,
)
from pipelines.bitstream import (
    MAGIC,
    VERSION,
    BitstreamError,
    Header,
    check_pipeline,
    fingerprint_bytes,
    header_size,
    pack,
    peek_header,
    read,
    unpack,
)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_cdf(cdf, precision=PRECISION):
    cdf = torch.as_tensor(cdf)
    if cdf.dim() == 1:
        cdf = cdf[None]
    assert cdf.dtype == torch.int64
    assert (cdf[:, 0] == 0).all()
    assert (cdf[:, -1] == 2**precision).all()
    freq = cdf[:, 1:] - cdf[:, :-1]
    assert (freq >= 1).all()


def _dirichlet_cdfs(rng, n, vocab, alpha, precision=PRECISION):
    p = rng.dirichlet(np.full(vocab, alpha), size=n)
    logits = torch.from_numpy(np.log(np.maximum(p, 1e-300)))
    return p, quantize_cdf(logits, precision)


def _roundtrip(symbols, cdf, precision=PRECISION):
    data = encode_sequence(symbols, cdf, precision)
    rows = cdf.numpy()
    seen_prefix = []

    def cdf_fn(i, prefix):
        assert len(prefix) == i
        seen_prefix.append(list(prefix))
        return rows[i]

    out = decode_sequence(data, len(symbols), cdf_fn, precision)
    assert out == [int(s) for s in symbols]
    # the decoder only ever exposed the true prefix
    for i, pre in enumerate(seen_prefix):
        assert pre == [int(s) for s in symbols[:i]]
    return data


# --------------------------------------------------------------------------- #
# quantize_cdf
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("vocab", [2, 3, 17, 512])
def test_quantize_random_logits(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=g) * 5
    cdf = quantize_cdf(logits)
    assert cdf.shape == (64, vocab + 1)
    _check_cdf(cdf)
    # close to the float model: each freq within ~1 count of 1 + p * (T - V)
    p = torch.softmax(logits.double(), -1)
    freq = (cdf[:, 1:] - cdf[:, :-1]).double()
    expected = 1 + p * (2**PRECISION - vocab)
    assert (freq - expected).abs().max() <= 1.0 + 1e-6


def test_quantize_extreme_logits():
    # one dominant symbol
    logits = torch.full((3, 10), -1e4)
    logits[0, 0] = 1e4
    logits[1, 9] = 1e4
    logits[2, 4] = 1e4
    cdf = quantize_cdf(logits)
    _check_cdf(cdf)
    freq = cdf[:, 1:] - cdf[:, :-1]
    assert freq[0, 0] == 2**16 - 9 and freq[1, 9] == 2**16 - 9 and freq[2, 4] == 2**16 - 9
    # near uniform
    cdf = quantize_cdf(torch.randn(4, 100) * 1e-9)
    _check_cdf(cdf)
    freq = cdf[:, 1:] - cdf[:, :-1]
    assert freq.max() - freq.min() <= 1
    # V = 2, 1-D input
    cdf = quantize_cdf(torch.tensor([0.0, 50.0]))
    assert cdf.shape == (3,)
    _check_cdf(cdf)
    assert cdf[1] == 1
    # V = 4096 at precision 16
    cdf = quantize_cdf(torch.randn(5, 4096) * 20)
    _check_cdf(cdf)
    # V = 1 is trivially representable
    _check_cdf(quantize_cdf(torch.zeros(2, 1)))
    # float16 / bfloat16 input is accepted
    _check_cdf(quantize_cdf(torch.randn(2, 8).half()))


def test_quantize_errors():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_cdf(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_cdf(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_cdf(torch.tensor([[float("-inf"), 0.0]]))
    with pytest.raises(ValueError, match="precision"):
        quantize_cdf(torch.zeros(1, 2**8), precision=8)
    with pytest.raises(ValueError):
        quantize_cdf(torch.zeros(2, 3, 4))


def test_quantize_is_batch_invariant_and_deterministic():
    g = torch.Generator().manual_seed(0)
    for vocab in (7, 1000):
        logits = torch.randn(37, vocab, generator=g, dtype=torch.float64) * 4
        full = quantize_cdf(logits)
        assert torch.equal(full, quantize_cdf(logits.clone()))
        for i in range(logits.shape[0]):
            assert torch.equal(full[i], quantize_cdf(logits[i]))
            assert torch.equal(full[i], quantize_cdf(logits[i : i + 1])[0])


# --------------------------------------------------------------------------- #
# coder round trips
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n", [0, 1, 2, 7, 300, 2000])
@pytest.mark.parametrize("alpha", [0.01, 1.0])
def test_roundtrip_sampled(n, alpha):
    rng = np.random.default_rng(1000 * n + int(alpha * 100))
    vocab = 37
    p, cdf = _dirichlet_cdfs(rng, n, vocab, alpha)
    symbols = [int(rng.choice(vocab, p=row / row.sum())) for row in p]
    _roundtrip(symbols, cdf)


@pytest.mark.parametrize("n", [1, 5, 500])
def test_roundtrip_adversarial(n):
    """Symbols of (near-)minimal frequency, and symbols at both alphabet ends."""
    rng = np.random.default_rng(n)
    vocab = 64
    _, cdf = _dirichlet_cdfs(rng, n, vocab, 0.005)
    freq = (cdf[:, 1:] - cdf[:, :-1]).numpy()
    least = freq.argmin(axis=1)
    _roundtrip(least.tolist(), cdf)
    _roundtrip([0] * n, cdf)
    _roundtrip([vocab - 1] * n, cdf)
    mixed = [int(least[i]) if i % 3 else int(freq[i].argmax()) for i in range(n)]
    _roundtrip(mixed, cdf)


def test_roundtrip_precisions_and_binary():
    rng = np.random.default_rng(7)
    for precision, vocab in [(8, 2), (12, 100), (16, 2), (24, 4096), (32, 3)]:
        p, cdf = _dirichlet_cdfs(rng, 200, vocab, 0.1, precision)
        symbols = [int(rng.choice(vocab, p=row / row.sum())) for row in p]
        _roundtrip(symbols, cdf, precision)


def test_incremental_api_and_row_types():
    rng = np.random.default_rng(3)
    n, vocab = 400, 20
    p, cdf = _dirichlet_cdfs(rng, n, vocab, 0.3)
    symbols = [int(rng.choice(vocab, p=row / row.sum())) for row in p]
    enc = ArithmeticEncoder()
    for i, s in enumerate(symbols):
        row = cdf[i] if i % 3 == 0 else (cdf[i].tolist() if i % 3 == 1 else cdf[i].numpy())
        enc.encode(s, row)
    data = enc.finish()
    assert data == encode_sequence(symbols, cdf)
    assert data == encode_sequence(torch.tensor(symbols), [r.tolist() for r in cdf])
    dec = ArithmeticDecoder(data)
    out = []
    for i in range(n):
        row = cdf[i] if i % 3 == 0 else (cdf[i].tolist() if i % 3 == 1 else cdf[i].numpy())
        out.append(dec.decode(row))
    assert out == symbols


def test_prior_driven_decode_with_context():
    """cdf depends on the prefix, like an autoregressive prior with a KV cache."""
    vocab, n = 16, 500
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(5)) * 3

    def logits_for(prefix):
        prev = prefix[-1] if prefix else 0
        return table[prev] + 0.1 * len(prefix) % 3

    rng = np.random.default_rng(5)
    symbols, rows = [], []
    for i in range(n):
        row = quantize_cdf(logits_for(symbols))
        rows.append(row)
        f = (row[1:] - row[:-1]).double()
        symbols.append(int(rng.choice(vocab, p=(f / f.sum()).numpy())))
    data = encode_sequence(symbols, torch.stack(rows))
    out = decode_sequence(data, n, lambda i, prefix: quantize_cdf(logits_for(prefix)))
    assert out == symbols


def test_encoder_errors():
    cdf = quantize_cdf(torch.zeros(2, 4))
    with pytest.raises(ValueError):
        encode_sequence([0, 4], cdf)
    with pytest.raises(ValueError):
        encode_sequence([0, -1], cdf)
    with pytest.raises(ValueError):
        encode_sequence([0], cdf)
    with pytest.raises(ValueError):
        encode_sequence([0, 1], cdf, precision=12)  # totals do not match
    bad = [0, 5, 5, 9, 2**16]  # zero-frequency symbol 1
    with pytest.raises(ValueError):
        ArithmeticEncoder().encode(1, bad)
    enc = ArithmeticEncoder()
    enc.finish()
    with pytest.raises(RuntimeError):
        enc.encode(0, cdf[0])


def test_truncated_and_tampered_payload_never_hangs():
    rng = np.random.default_rng(11)
    n, vocab = 1500, 50
    p, cdf = _dirichlet_cdfs(rng, n, vocab, 0.2)
    symbols = [int(rng.choice(vocab, p=row / row.sum())) for row in p]
    data = encode_sequence(symbols, cdf)
    rows = cdf.numpy()
    variants = [b"", data[:1], data[: len(data) // 2], data[:-1], data + b"\x00" * 5, b"\xff" * len(data)]
    for k in range(0, len(data), max(1, len(data) // 10)):
        t = bytearray(data)
        t[k] ^= 0x5A
        variants.append(bytes(t))
    for v in variants:
        out = decode_sequence(v, n, lambda i, prefix: rows[i])
        assert len(out) == n and all(0 <= s < vocab for s in out)
    # appended zeros are equivalent to the padding: still exact
    assert decode_sequence(data + b"\x00" * 5, n, lambda i, prefix: rows[i]) == symbols
    # deterministic past the end
    a = decode_sequence(data[:10], n, lambda i, prefix: rows[i])
    b = decode_sequence(data[:10], n, lambda i, prefix: rows[i])
    assert a == b


def test_empty_sequence():
    assert encode_sequence([], torch.zeros(0, 5, dtype=torch.int64)) == b""
    assert decode_sequence(b"", 0, lambda i, p: None) == []
    assert ideal_bits([], torch.zeros(0, 5, dtype=torch.int64)) == 0.0


# --------------------------------------------------------------------------- #
# compression efficiency
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("alpha,vocab", [(0.05, 256), (1.0, 256), (0.02, 8), (0.5, 2)])
def test_size_close_to_ideal(alpha, vocab):
    rng = np.random.default_rng(int(alpha * 1000) + vocab)
    n = 3000
    p, cdf = _dirichlet_cdfs(rng, n, vocab, alpha)
    symbols = [int(rng.choice(vocab, p=row / row.sum())) for row in p]
    data = _roundtrip(symbols, cdf)
    ideal = ideal_bits(symbols, cdf)
    assert len(data) * 8 <= ideal * 1.01 + 32
    # the coder itself is within a couple of bytes of the quantised model
    assert len(data) * 8 <= ideal + 24


def test_size_near_deterministic_sequence():
    # almost all mass on the coded symbol: output must stay a handful of bytes
    logits = torch.full((5000, 64), -30.0)
    logits[:, 3] = 30.0
    cdf = quantize_cdf(logits)
    data = _roundtrip([3] * 5000, cdf)
    assert len(data) * 8 <= ideal_bits([3] * 5000, cdf) + 24


def test_ideal_bits_value():
    cdf = torch.tensor([[0, 2**15, 2**16], [0, 2**14, 2**16]])
    assert ideal_bits([0, 1], cdf) == pytest.approx(1.0 + np.log2(4 / 3))


# --------------------------------------------------------------------------- #
# bitstream container
# --------------------------------------------------------------------------- #
FP = bytes(range(1, 33))  # a 32-byte (SHA-256) pipeline fingerprint
OTHER = bytes(range(101, 133))  # another pipeline: another tag
SAME_TAG = FP[:2] + bytes(30)  # another pipeline whose fingerprint starts like FP's


@pytest.mark.parametrize(
    "shape,label",
    [((32, 32), None), ((32, 32), 7), ((16000,), None), ((16, 64, 64), 999), ((1, 1), 0), ((2**40, 3), None)],
)
def test_pack_unpack_roundtrip(shape, label):
    payload = bytes(np.random.default_rng(0).integers(0, 256, 77, dtype=np.uint8))
    content = b"codes"
    blob = pack(FP, shape, payload, label, content=content)
    assert blob[:2] == MAGIC
    header, p2 = unpack(blob, FP, content)
    assert p2 == payload
    assert header == Header(FP[:2], tuple(shape), label)
    assert peek_header(blob) == header
    assert len(blob) == header_size(shape, label) + len(payload)
    assert read(blob).header_bytes == header_size(shape, label)
    # empty payload is fine too; the hex form of the fingerprint works the same
    assert unpack(pack(FP.hex(), shape, b"", label), FP)[1] == b""


def test_header_is_small():
    # 2 magic + 1 version/flags + 2 tag + 2 dims + 4 check
    assert len(pack(FP, (32, 32), b"")) == header_size((32, 32)) == 11
    assert header_size((32, 32), class_label=9) == 12  # + 1 byte class label
    assert header_size((256, 256)) == 13  # dims >= 128 take two varint bytes
    assert header_size((16000,)) == 11  # 16000 < 2**14: two varint bytes
    assert header_size((16, 64, 64)) == 12


def test_corruption_detected_everywhere():
    content = bytes(range(64))
    blob = pack(FP, (32, 32), bytes(range(40)), 3, content=content)
    for pos in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[pos] ^= flip
            with pytest.raises(BitstreamError):
                unpack(bytes(bad), FP, content)
    # appended bytes, and other decoded content, are caught too
    with pytest.raises(BitstreamError, match="corrupt or was modified"):
        unpack(blob + b"\x00", FP, content)
    with pytest.raises(BitstreamError, match="corrupt or was modified"):
        unpack(blob, FP, content[:-1] + b"\x00")


def test_truncation_detected():
    blob = pack(FP, (32, 32), b"payload bytes", 1)
    for cut in range(len(blob)):
        with pytest.raises(BitstreamError):
            unpack(blob[:cut], FP)
    with pytest.raises(BitstreamError, match="truncated header"):
        unpack(blob[:7], FP)


def test_error_messages():
    blob = pack(FP, (8, 8), b"xyz")
    with pytest.raises(BitstreamError, match=r"not a tokgen compressed file \(bad magic\)"):
        unpack(b"\x89P" + blob[2:], FP)
    with pytest.raises(BitstreamError, match="bad magic"):
        unpack(b"", FP)
    with pytest.raises(BitstreamError, match="unsupported version 7"):
        unpack(blob[:2] + bytes([(7 << 4) | (blob[2] & 0xF)]) + blob[3:], FP)
    with pytest.raises(BitstreamError, match="corrupt header"):
        unpack(blob[:2] + bytes([blob[2] | 0xC]) + blob[3:], FP)  # a class label and "no class" at once
    with pytest.raises(BitstreamError, match="corrupt header"):
        unpack(blob[:2] + bytes([blob[2] & 0xF4 | (VERSION << 4)]) + blob[3:], FP)  # zero dims
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(BitstreamError, match="checksum mismatch: the file is corrupt or was modified"):
        unpack(bytes(bad), FP)
    assert issubclass(BitstreamError, ValueError)
    with pytest.raises(ValueError):
        pack(b"short", (8, 8), b"")
    with pytest.raises(ValueError):
        pack(FP, (8, 8, 8, 8), b"")
    with pytest.raises(ValueError):
        pack(FP, (0, 8), b"")


def test_another_pipeline_refused():
    blob = pack(FP, (8, 8), b"payload")
    header = read(blob).header
    check_pipeline(header, FP)
    with pytest.raises(BitstreamError, match="compressed with another pipeline") as info:
        unpack(blob, OTHER)
    assert FP[:2].hex() in str(info.value) and OTHER.hex()[:12] in str(info.value)
    # a fingerprint with the same 2-byte tag still fails: the check covers all 32 bytes
    check_pipeline(header, SAME_TAG)
    with pytest.raises(BitstreamError, match="corrupt or was modified"):
        unpack(blob, SAME_TAG)
    assert fingerprint_bytes(FP.hex()) == FP
    with pytest.raises(ValueError):
        fingerprint_bytes("not hex")


def test_precision_for():
    assert precision_for(2) == PRECISION == 16
    assert precision_for(1024) == 16
    assert precision_for(1025) == 21
    assert precision_for(4096) == 22
    assert precision_for(65536) == 26
    assert precision_for(2**22) == MAX_PRECISION
    with pytest.raises(ValueError):
        precision_for(2**22 + 1)
    for k in (2, 1000, 1025, 16384):
        # the 1-count floor keeps at most 1/64 of the mass
        assert k / 2 ** precision_for(k) <= 1 / 64


def test_end_to_end_container_with_coder():
    rng = np.random.default_rng(21)
    n, vocab = 256, 512
    p, cdf = _dirichlet_cdfs(rng, n, vocab, 0.05)
    symbols = [int(rng.choice(vocab, p=row / row.sum())) for row in p]
    blob = pack(FP, (64, 64), encode_sequence(symbols, cdf))
    h, payload = unpack(blob, FP)
    assert h.input_shape == (64, 64)
    rows = cdf.numpy()
    assert decode_sequence(payload, n, lambda i, prefix: rows[i]) == symbols
    nll_bits = float(-np.log2(p[np.arange(n), symbols]).sum())
    assert len(blob) == header_size((64, 64)) + len(payload) == 11 + len(payload)
    # coder + 16-bit quantisation stay within 1% + 2 bytes of the float model's NLL
    assert len(payload) <= nll_bits / 8 * 1.01 + 2


def test_encode_intervals_matches_encode():
    rng = np.random.default_rng(4)
    _, cdf = _dirichlet_cdfs(rng, 300, 40, 0.1)
    symbols = rng.integers(0, 40, 300)
    rows = cdf.numpy()
    enc = ArithmeticEncoder()
    enc.encode_intervals(rows[np.arange(300), symbols], rows[np.arange(300), symbols + 1])
    assert enc.finish() == encode_sequence(symbols, cdf)
    with pytest.raises(ValueError):
        ArithmeticEncoder().encode_intervals([5], [5])
    with pytest.raises(ValueError):
        ArithmeticEncoder().encode_intervals([0, 1], [2])
