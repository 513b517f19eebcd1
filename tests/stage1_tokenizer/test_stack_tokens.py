"""Tests for code stacks (a residual quantizer's codes, (*grid, stages)) below the priors: export-tokens (manifest
depth and per-stage codebook sizes, format version), the token readers (in memory and streaming, their checks),
evaluate-tokenizer (usage per stage; codes, bits and kbps over every stage) and encode/decode (--stages)."""
from __future__ import annotations

import argparse
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.codes import load_codes
from data.tokens import FLAT_VERSION, VERSION, TokenDataset, collate_tokens, load_all, read_manifest
from stage1_tokenizer.codec import decode_codes, decode_main, encode_main
from stage1_tokenizer.evaluate import _code_metrics, evaluate
from stage1_tokenizer.export import export_tokens
from stage1_tokenizer.quantizer import CodebookStats

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES, K = 3, 32
RVQ = {"kind": "rvq", "num_stages": STAGES}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny):
    """A tiny 3-stage residual VQ-VAE (16x16 -> 4x4 x 3 codes of 32) and 12 images exported with it."""
    tok, ds = tiny.vqvae(quantizer=RVQ), tiny.images(12)
    folder = tmp_path_factory.mktemp("stacks") / "tokens"
    manifest = export_tokens(tok, ds, folder, batch_size=5, shard_size=4, progress=False)
    with torch.no_grad():
        expected = tok.encode(torch.stack([ds[i]["x"] for i in range(12)]))
    return tok, folder, manifest, expected


def test_export_records_depth_and_stage_codebooks(exported):
    tok, folder, manifest, expected = exported
    assert manifest == read_manifest(folder)
    assert manifest["version"] == VERSION == 3  # readers older than stacks refuse it ("upgrade tokgen")
    assert manifest["levels"] == [{"grid_shape": [4, 4], "codebook_size": K, "dtype": "uint8", "depth": STAGES,
                                   "stage_codebook_sizes": [K] * STAGES}]
    assert expected.shape == (12, 4, 4, STAGES)
    codes, labels, keys = load_all(folder, "train")
    assert len(codes) == 1 and torch.equal(codes[0], expected)
    assert labels.tolist() == [i % 5 for i in range(12)] and len(keys) == 12
    # one shard sample: the codes layout with the stages last, in the smallest dtype
    with tarfile.open(folder / "train-00-000000.tar") as tar:
        name = next(n for n in tar.getnames() if n.endswith(".codes.npz"))
        array = np.load(io.BytesIO(tar.extractfile(name).read()), allow_pickle=False)["level_0"]
    assert array.dtype == np.uint8 and array.shape == (1, 4, 4, STAGES)


def test_streaming_reader_yields_stacks(exported):
    _, folder, _, expected = exported
    ds = TokenDataset(folder, "train", shuffle=0)
    assert ds.code_shapes == [(4, 4, STAGES)] and ds.grid_shapes == [(4, 4)] and ds.depths == [STAGES]
    assert ds.stage_codebook_sizes == [[K] * STAGES]
    batches = list(DataLoader(ds, batch_size=5, collate_fn=collate_tokens))
    streamed = torch.cat([b["codes"][0] for b in batches])
    assert streamed.shape == (12, 4, 4, STAGES) and torch.equal(streamed, expected)


def test_flat_tokens_keep_format_version_2(tmp_path, tiny):
    manifest = export_tokens(tiny.vqvae(), tiny.images(4), tmp_path / "t", batch_size=4, progress=False)
    assert manifest["version"] == FLAT_VERSION == 2
    assert "depth" not in manifest["levels"][0] and "stage_codebook_sizes" not in manifest["levels"][0]


def _edit_manifest(folder, tmp_path, **level):
    """A copy of the token folder whose level-0 manifest entry has ``level`` changed."""
    copy = tmp_path / "edited"
    copy.mkdir(parents=True)
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["levels"][0].update(level)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_readers_check_depth_and_each_stage_range(exported, tmp_path):
    _, folder, _, expected = exported
    assert int(expected[..., 2].max()) >= 2  # the check below has codes to refuse
    small = _edit_manifest(folder, tmp_path, stage_codebook_sizes=[K, K, 2])
    with pytest.raises(ValueError, match=r"outside \[0, codebook size\) of its stage \[32, 32, 2\]"):
        load_all(small, "train")
    with pytest.raises(ValueError, match="outside"):
        next(iter(TokenDataset(small, "train", shuffle=0)))
    shallow = _edit_manifest(folder, tmp_path / "b", depth=2)
    with pytest.raises(ValueError, match=r"grid of shape \(4, 4, 3\), but the manifest says \(4, 4, 2\)"):
        load_all(shallow, "train")


# ---- evaluate-tokenizer ----------------------------------------------------------------------
def test_evaluate_counts_every_stage(exported, tiny):
    tok, _, _, expected = exported
    metrics = evaluate(tok, tiny.images(12), batch_size=5, lpips=False, quiet=True)
    assert metrics["code_depth"] == STAGES
    assert metrics["codes_per_input"] == 16 * STAGES
    assert metrics["compression_ratio"] == pytest.approx(16 * 16 * 8 / (16 * STAGES * math.log2(K)))
    usage = metrics["codebook_usage_per_stage"]
    assert len(usage) == 1 and len(usage[0]) == STAGES
    for stage in range(STAGES):  # each stage's usage is that of its own codes over the whole set
        assert usage[0][stage] == pytest.approx(len(torch.unique(expected[..., stage])) / K)
    assert metrics["codebook_usage"] == pytest.approx(min(usage[0]))
    assert len(metrics["perplexity_per_stage"][0]) == STAGES and metrics["code_grid_shapes"] == [[4, 4]]


def test_audio_bitrate_counts_every_stage(tiny):
    tok = tiny.vqvae(quantizer=RVQ, modality="audio", factors=(4,), sample_rate=16000)
    stats = [[CodebookStats(K) for _ in range(STAGES)]]
    metrics = _code_metrics(tok, stats, (1, 1024))
    # 256 positions x 3 stages x 5 bits over 1024 / 16000 s
    assert metrics["bitrate_kbps"] == pytest.approx(256 * STAGES * 5 / (1024 / 16000) / 1000)
    assert metrics["codes_per_input"] == 256 * STAGES


# ---- encode / decode ---------------------------------------------------------------------------
def test_encode_stages_and_decode(exported, tmp_path, tiny):
    tok, _, _, _ = exported
    tok.save_pretrained(tmp_path / "tok")
    png = tmp_path / "x.png"
    x = tiny.images(1).images[0]
    Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L").save(png)
    args = {"model": tmp_path / "tok", "input": png, "size": None, "device": "cpu", "dtype": "fp32", "json": False,
            "quiet": True}
    full = encode_main(args=argparse.Namespace(**args, out=tmp_path / "all.npz", stages=None))
    one = encode_main(args=argparse.Namespace(**args, out=tmp_path / "one.npz", stages=1))
    assert full[0].shape == (1, 4, 4, STAGES) and one[0].shape == (1, 4, 4, 1)
    assert torch.equal(one[0][..., 0], full[0][..., 0])  # the first stage does not depend on the others
    assert np.load(tmp_path / "all.npz")["level_0"].shape == (1, 4, 4, STAGES)
    assert torch.equal(load_codes(tmp_path / "all.npz")[0], full[0])
    for name in ("all", "one"):  # any number of stages decodes
        paths = decode_main(args=argparse.Namespace(model=tmp_path / "tok", codes=tmp_path / f"{name}.npz",
                                                    out=tmp_path / f"{name}.png", device="cpu", dtype="fp32",
                                                    json=False, quiet=True))
        assert Image.open(paths[0]).size == (16, 16)
    # one item's stack without the batch axis decodes as a batch of one
    assert torch.equal(decode_codes(tok, [full[0][0]]), decode_codes(tok, full))
    with pytest.raises(ValueError, match="residual"):
        encode_main(args=argparse.Namespace(**{**args, "model": _flat(tiny, tmp_path)}, out=tmp_path / "f.npz",
                                            stages=1))


def _flat(tiny, tmp_path):
    tiny.vqvae().save_pretrained(tmp_path / "flat")
    return tmp_path / "flat"
