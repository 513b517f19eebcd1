"""Untrusted compressed files: random, truncated, bit-flipped and crafted ones (headers with a valid check, which
anyone holding the pipeline can compute) each end in a clear error, or in codes of the right range, within
bounded time; a header claiming a 40000x40000 image is refused before anything is allocated."""
from __future__ import annotations

import random
import time

import pytest
import torch

from pipelines import bitstream
from pipelines import compress as C
from pipelines.cli import main as cli_main
from pipelines.pipeline import TokgenPipeline
from stage2_prior import GatedPixelCNNPrior, GatedPixelCNNPriorConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SECONDS = 5.0  # the most one file may take to be refused (or decoded) here


@pytest.fixture(scope="module")
def pipes(tiny):
    transformer = tiny.pipeline(0, num_classes=0)  # (1, 16, 16) -> (4, 4) codes, fixed grid
    conv_prior = GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=(4, 4), vocab_size=32, channels=8,
                                                             num_layers=2, kernel_size=3, head_channels=8))
    conv = TokgenPipeline(tiny.vqvae(), [conv_prior], (1, 16, 16))  # any grid: the size attacks apply
    return {"transformer": transformer, "conv": conv}


def crafted(pipe, dims, payload: bytes, class_label=None) -> bytes:
    """A file whose header says ``dims``, with a check that verifies: what an attacker with the pipeline writes."""
    return bitstream.pack(pipe.fingerprint(), dims, payload, class_label)


def outcome(pipe, blob: bytes) -> str:
    started = time.perf_counter()
    try:
        result = C.decompress(pipe, blob)
    except ValueError as err:  # BitstreamError, InputTooLarge and shape errors are all ValueErrors
        assert str(err) and "\n" not in str(err).strip(), repr(err)  # one clear line
        kind = "refused"
    else:
        for codes, k in zip(result.codes, pipe.tokenizer.codebook_sizes):
            assert codes.dtype == torch.long and (codes.numel() == 0 or 0 <= int(codes.min()) <= int(codes.max()) < k)
        kind = "decoded"
    assert time.perf_counter() - started < SECONDS
    return kind


def test_a_claimed_huge_image_is_refused_at_once(pipes, tmp_path, capsys):
    for pipe in pipes.values():
        blob = crafted(pipe, (40000, 40000), b"\x00" * 60)
        started = time.perf_counter()
        with pytest.raises(ValueError, match="40000 x 40000 = 1,600,000,000 values, above the limit"):
            C.decompress(pipe, blob)
        assert time.perf_counter() - started < 1.0
    pipes["conv"].save_pretrained(tmp_path / "pipe")
    (tmp_path / "bomb.tkg").write_bytes(crafted(pipes["conv"], (40000, 40000), b"\x00" * 60))
    assert cli_main(["decompress", str(tmp_path / "pipe"), str(tmp_path / "bomb.tkg"), "--out",
                     str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "above the limit" in err and "--max-input-size" in err


def test_random_truncated_flipped_and_crafted_files_end_cleanly(pipes):
    rng = random.Random(0)
    pipe = pipes["conv"]
    good = C.compress(pipe, torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert outcome(pipe, good) == "decoded"
    cases = [bytes(rng.randrange(256) for _ in range(rng.randrange(64))) for _ in range(60)]  # random
    cases += [b"TK" + bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(60)]  # magic
    cases += [good[:n] for n in range(len(good))]  # every truncation
    cases += [good + bytes([rng.randrange(256)])]  # appended
    for _ in range(60):  # single bit flips
        flipped = bytearray(good)
        flipped[rng.randrange(len(good))] ^= 1 << rng.randrange(8)
        cases.append(bytes(flipped))
    for _ in range(60):  # crafted headers with a valid check: random shapes, labels and payloads
        dims = tuple(rng.choice([1, 3, 4, 8, 12, 16, 20, 64, 10**5]) for _ in range(rng.choice([1, 2, 2, 3])))
        label = rng.choice([None, None, 0, 5, bitstream.NULL_LABEL])
        cases.append(crafted(pipe, dims, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))), label))
    kinds = [outcome(pipe, blob) for blob in cases]
    assert kinds.count("refused") > 0.9 * len(kinds)
    # the other pipeline (a transformer, fixed grid): crafted files of other sizes are refused, not resized
    for dims in ((32, 32), (16,), (8, 16, 16), (12, 16)):
        assert outcome(pipes["transformer"], crafted(pipes["transformer"], dims, b"\x01\x02\x03\x04")) == "refused"
    outcome(pipes["transformer"], crafted(pipes["transformer"], (16, 16), b"\x01\x02\x03\x04"))  # its own size


def test_a_crafted_payload_with_a_valid_container_check_is_caught_by_the_codes_check(pipes):
    """The container's CRC is public knowledge; the 8 check bits after the codes catch most garbage payloads."""
    pipe, rng = pipes["conv"], random.Random(1)
    kinds = [outcome(pipe, crafted(pipe, (16, 16), bytes(rng.randrange(256) for _ in range(12)))) for _ in range(40)]
    assert kinds.count("refused") >= 30  # 1 in 256 passes by chance; the rest are refused
