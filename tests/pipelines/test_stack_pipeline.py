"""Pipelines over code stacks (a residual quantizer's codes, (B, *grid, stages) per level): sampling and decoding,
exact likelihoods over every stage, completion, long generation (sliding window and conv priors), guidance, exact
compression round trips (library and CLI), evaluate-prior's bits per token, `tokgen sample` and `tokgen decode`."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data.codes import load_codes
from pipelines import compress as C
from pipelines.evaluate import evaluate_pipeline
from pipelines.pipeline import TokgenPipeline
from pipelines.sample import main as sample_main
from stage1_tokenizer.codec import decode_main, encode_main
from stage2_prior.pixelcnn import GatedPixelCNNPrior, GatedPixelCNNPriorConfig
from stage2_prior.wavenet import WaveNetPrior, WaveNetPriorConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D, K = 3, 16  # stages, codes per stage
RVQ = {"kind": "rvq", "num_stages": D}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"device": "cpu", "dtype": "fp32", "json": False, "quiet": True, **kw})


def image_pipe(tiny, null_class: bool = False) -> TokgenPipeline:
    """16x16 images -> 4x4 positions x 3 stages of 16 codes; a class-conditional transformer over the stacks."""
    prior = tiny.scale_up(tiny.transformer(grid=(4, 4), vocab=K, num_classes=3, null_class=null_class, depth=D,
                                           depth_layers=1))
    return TokgenPipeline(tiny.vqvae(codebook_size=K, quantizer=RVQ), [prior], (1, 16, 16), ["a", "b", "c"])


def hierarchy_pipe(tiny) -> TokgenPipeline:
    """32x32 images -> a 4x4 top (transformer) and an 8x8 bottom (PixelCNN, conditioned on the top's stacks)."""
    torch.manual_seed(0)
    bottom = GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=(8, 8), vocab_size=K, depth=D,
                                                         cond_grid_shape=(4, 4), cond_vocab_size=K, cond_depth=D,
                                                         channels=12, head_channels=12, num_layers=2, kernel_size=3))
    top = tiny.transformer(grid=(4, 4), vocab=K, depth=D)
    tokenizer = tiny.hvqvae(codebook_size=K, quantizer=RVQ)
    return TokgenPipeline(tokenizer, [tiny.scale_up(top), tiny.scale_up(bottom)], (1, 32, 32))


def audio_pipe(tiny) -> TokgenPipeline:
    """Audio of 64 samples -> 8 positions x 3 stages; a WaveNet over the stacks."""
    torch.manual_seed(0)
    prior = WaveNetPrior(WaveNetPriorConfig(grid_shape=(8,), vocab_size=K, depth=D, channels=12, skip_channels=12,
                                            head_channels=12, layers_per_cycle=2, num_cycles=1))
    return TokgenPipeline(tiny.vqvae(modality="audio", factors=(8,), codebook_size=K, quantizer=RVQ),
                          [tiny.scale_up(prior)], (1, 64))


# ---- sampling, likelihoods ---------------------------------------------------------------------------
def test_sample_decode_and_exact_bits(tiny):
    pipe = image_pipe(tiny)
    assert pipe.num_tokens == 16 * D
    out = pipe(batch_size=3, class_labels=[0, 1, 2], generator=gen(0))
    (codes,) = out.codes
    assert codes.shape == (3, 4, 4, D) and out.samples.shape == (3, 1, 16, 16)
    assert torch.allclose(out.samples, pipe.decode(out.codes))
    x = out.samples
    bits = pipe.nll_bits(pipe.encode(x), [0, 1, 2])
    prior_bits = pipe.priors[0].nll(pipe.encode(x)[0], torch.tensor([0, 1, 2])).double() / math.log(2)
    assert torch.allclose(bits[:, 0], prior_bits)
    assert torch.allclose(pipe.bits_per_dim(x, [0, 1, 2]), (prior_bits / 256).float())
    # fewer stages decode too (a lower bitrate), as the tokenizer allows
    assert pipe.decode([codes[..., :1]]).shape == (3, 1, 16, 16)


def test_depth_mismatch_is_refused(tiny):
    with pytest.raises(ValueError, match="depth"):
        TokgenPipeline(tiny.vqvae(codebook_size=K, quantizer=RVQ), [tiny.transformer(grid=(4, 4), vocab=K)],
                       (1, 16, 16))
    with pytest.raises(ValueError, match="depth"):
        TokgenPipeline(tiny.vqvae(codebook_size=K), [tiny.transformer(grid=(4, 4), vocab=K, depth=D)], (1, 16, 16))


def test_complete_keeps_every_stage_of_the_known_rows(tiny):
    pipe = image_pipe(tiny)
    x = pipe(batch_size=2, class_labels=[1, 1], generator=gen(1)).samples
    out = pipe.complete(x, 0.5, class_labels=[1, 1], generator=gen(2))
    known = pipe.encode(x)[0]
    assert torch.equal(out.codes[0][:, :2], known[:, :2])  # rows 0-1, all three stages
    assert not torch.equal(out.codes[0][:, 2:], known[:, 2:])


def test_hierarchy_of_stacks_samples_and_scores(tiny):
    pipe = hierarchy_pipe(tiny)
    out = pipe(batch_size=2, generator=gen(3))
    assert [tuple(c.shape) for c in out.codes] == [(2, 4, 4, D), (2, 8, 8, D)]
    assert out.samples.shape == (2, 1, 32, 32)
    bits = pipe.nll_bits(out.codes)
    assert bits.shape == (2, 2) and (bits > 0).all()


def test_long_generation_and_guidance_on_stacks(tiny):
    pipe = audio_pipe(tiny)
    out = pipe.sample_long(200, batch_size=2, generator=gen(4))  # WaveNet: the whole longer grid
    assert out.codes[0].shape == (2, 25, D) and out.samples.shape == (2, 1, 200)
    video = TokgenPipeline(tiny.vqvae(modality="video", factors=(2, 4, 4), codebook_size=K, quantizer=RVQ),
                           [tiny.scale_up(tiny.transformer(grid=(2, 2, 2), vocab=K, depth=D, num_classes=3,
                                                           null_class=True))], (1, 4, 8, 8))
    long = video.sample_long(10, 2, [0, 2], generator=gen(5))  # transformer: a sliding window over time
    assert long.codes[0].shape == (2, 5, 2, 2, D) and long.samples.shape == (2, 1, 10, 8, 8)
    plain = video(batch_size=2, class_labels=[1, 1], generator=gen(6))
    guided = video(batch_size=2, class_labels=[1, 1], generator=gen(6), guidance=4.0)
    assert guided.codes[0].shape == (2, 2, 2, 2, D) and not torch.equal(guided.codes[0], plain.codes[0])
    cached = video(batch_size=2, class_labels=[1, 1], generator=gen(6), guidance=4.0, top_k=4, top_p=0.9)
    full = video(batch_size=2, class_labels=[1, 1], generator=gen(6), guidance=4.0, top_k=4, top_p=0.9,
                 use_cache=False)
    assert torch.equal(cached.codes[0], full.codes[0])


# ---- compression --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [image_pipe, hierarchy_pipe, audio_pipe])
def test_compression_round_trips_exactly(make, tiny):
    pipe = make(tiny)
    out = pipe(batch_size=3, class_labels=[0, 1, 2] if pipe.num_classes else None, generator=gen(7))
    labels = [0, 1, 2] if pipe.num_classes else None
    blobs = C.compress_batch(pipe, out.codes, labels)
    decoded = C.decompress_batch(pipe, blobs)
    for i, d in enumerate(decoded):
        assert all(torch.equal(a, b[i]) for a, b in zip(d.codes, out.codes))
        assert d.codes[0].shape[-1] == D
    # one stream alone, from its stacked codes without the batch axis
    one = C.compress(pipe, [c[0] for c in out.codes], None if labels is None else 0)
    assert all(torch.equal(a, b[0]) for a, b in zip(C.decompress(pipe, one).codes, out.codes))
    nll = float(pipe.nll_bits([c[:1] for c in out.codes], labels[:1] if labels else None).sum())
    assert len(one) <= nll / 8 * 1.01 + 16


def test_compress_cli_round_trip_matches_encode(tiny, tmp_path):
    pipe = image_pipe(tiny, null_class=True)
    pipe.save_pretrained(tmp_path / "pipe")
    x = pipe(batch_size=1, class_labels=[2], generator=gen(8)).samples[0]
    Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L").save(tmp_path / "in.png")
    report = C.compress_main(args=ns(pipeline=tmp_path / "pipe", input=tmp_path / "in.png", out=tmp_path / "f.tkg",
                                     report=None, class_label=None, size=None))
    assert report["code_shapes"] == [[4, 4, D]] and report["coded_without_class"]
    codes = C.decompress_main(args=ns(pipeline=tmp_path / "pipe", file=tmp_path / "f.tkg", out=tmp_path / "out.png",
                                      codes_out=tmp_path / "dec.npz", max_input_size=C.MAX_INPUT_SIZE))
    enc = encode_main(args=ns(model=tmp_path / "pipe", input=tmp_path / "in.png", out=tmp_path / "enc.npz",
                              size=None, stages=None))
    assert codes[0].shape == (4, 4, D) and torch.equal(codes[0], enc[0][0])
    assert torch.equal(load_codes(tmp_path / "dec.npz")[0], load_codes(tmp_path / "enc.npz")[0])
    assert report["bytes"] <= report["nll_bits"] / 8 * 1.01 + 16


# ---- evaluate-prior, sample, decode ---------------------------------------------------------------------
def test_evaluate_prior_counts_every_stage(tiny):
    pipe = audio_pipe(tiny)
    clips = [{"x": torch.rand(1, 64) * 1.6 - 0.8, "label": -1, "key": f"c{i}", "skipped": []} for i in range(5)]
    metrics = evaluate_pipeline(pipe, clips, batch_size=2, compress=2)
    assert metrics["tokens_per_sample"] == 8 * D and metrics["levels"][0]["depth"] == D
    assert metrics["bits_per_sample"] == pytest.approx(metrics["bits_per_token"] * 8 * D)
    assert metrics["compression"]["round_trips_exact"]


def test_sample_and_decode_commands(tiny, tmp_path):
    image_pipe(tiny).save_pretrained(tmp_path / "pipe")
    report = sample_main(["--num", "3", "--out", str(tmp_path / "s"), "--seed", "1", "--top-k", "5", "--quiet",
                          "--device", "cpu", str(tmp_path / "pipe")])
    assert report["num"] == 3
    with np.load(tmp_path / "s" / "codes.npz") as saved:
        assert saved["level_0"].shape == (3, 4, 4, D) and saved["level_0"].dtype == np.uint8
    paths = decode_main(args=ns(model=tmp_path / "pipe", codes=tmp_path / "s" / "codes.npz", out=tmp_path / "d"))
    assert len(paths) == 3 and Image.open(paths[0]).size == (16, 16)
    again = sample_main(["--num", "3", "--out", str(tmp_path / "t"), "--seed", "1", "--top-k", "5", "--quiet",
                         "--device", "cpu", "--no-cache", str(tmp_path / "pipe")])
    assert again["num"] == 3
    assert np.array_equal(np.load(tmp_path / "t" / "codes.npz")["level_0"], np.load(tmp_path / "s" / "codes.npz")["level_0"])


def test_audio_files_compress_exactly(tiny, tmp_path):
    audio_pipe(tiny).save_pretrained(tmp_path / "pipe")
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "a.wav", (rng.random(128) * 1.6 - 0.8).astype(np.float32), 16000)
    report = C.compress_main(args=ns(pipeline=tmp_path / "pipe", input=tmp_path / "a.wav", out=tmp_path / "a.tkg",
                                     report=None, class_label=None, size=None))
    assert report["code_shapes"] == [[16, D]]  # a clip twice the training length: the WaveNet codes it
    codes = C.decompress_main(args=ns(pipeline=tmp_path / "pipe", file=tmp_path / "a.tkg", out=tmp_path / "o.wav",
                                      codes_out=None, max_input_size=C.MAX_INPUT_SIZE))
    enc = encode_main(args=ns(model=tmp_path / "pipe", input=tmp_path / "a.wav", out=tmp_path / "e.npz", size=None,
                              stages=None))
    assert torch.equal(codes[0], enc[0][0]) and sf.info(str(tmp_path / "o.wav")).frames == 128


# ---- a prior over the first stages only (a lower bitrate) ------------------------------------------------
def test_a_prior_over_the_first_stages_samples_scores_and_compresses_at_that_depth(tiny):
    """The tokenizer codes 3 stages; the prior models the first 2 (tokens exported with ``--stages 2``): the pipeline
    samples and decodes stacks of 2, encodes inputs to their first 2 stages, and its bits and compression count those."""
    torch.manual_seed(0)
    prior = WaveNetPrior(WaveNetPriorConfig(grid_shape=(8,), vocab_size=K, depth=2, channels=12, skip_channels=12,
                                            head_channels=12, layers_per_cycle=2, num_cycles=1))
    tokenizer = tiny.vqvae(modality="audio", factors=(8,), codebook_size=K, quantizer=RVQ)
    pipe = TokgenPipeline(tokenizer, [tiny.scale_up(prior)], (1, 64))
    assert pipe.code_depth == 2 and tokenizer.code_depth == D and pipe.num_tokens == 8 * 2
    out = pipe(batch_size=3, generator=gen(9))
    assert out.codes[0].shape == (3, 8, 2) and out.samples.shape == (3, 1, 64)
    x = out.samples
    codes = pipe.encode(x)[0]
    assert torch.equal(codes, tokenizer.encode_levels(x, num_stages=2)[0])
    bits = pipe.nll_bits([codes])
    assert torch.allclose(bits[:, 0], pipe.priors[0].nll(codes).double() / math.log(2))
    blobs = C.compress_batch(pipe, x)
    assert all(torch.equal(d.codes[0], codes[i]) for i, d in enumerate(C.decompress_batch(pipe, blobs)))
    deeper = WaveNetPrior(WaveNetPriorConfig(grid_shape=(8,), vocab_size=K, depth=D + 1, channels=12,
                                             skip_channels=12, head_channels=12, layers_per_cycle=2, num_cycles=1))
    with pytest.raises(ValueError, match="depth"):  # more stages than the tokenizer codes
        TokgenPipeline(tokenizer, [deeper], (1, 64))


def test_codes_of_every_stage_are_refused_by_a_pipeline_over_fewer_with_the_command_that_makes_them(tiny):
    torch.manual_seed(0)
    prior = WaveNetPrior(WaveNetPriorConfig(grid_shape=(8,), vocab_size=K, depth=2, channels=12, skip_channels=12,
                                            head_channels=12, layers_per_cycle=2, num_cycles=1))
    tokenizer = tiny.vqvae(modality="audio", factors=(8,), codebook_size=K, quantizer=RVQ)
    pipe = TokgenPipeline(tokenizer, [tiny.scale_up(prior)], (1, 64))
    all_stages = tokenizer.encode_levels(torch.rand(1, 1, 64) * 1.6 - 0.8)  # (1, 8, 3): the tokenizer's full depth
    with pytest.raises(ValueError, match="model 2 stages a position: `tokgen encode --stages 2`"):
        C.compress_batch(pipe, all_stages)
