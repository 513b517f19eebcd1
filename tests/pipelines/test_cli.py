"""The commands through ``pipelines.cli.main`` in-process: sample, encode/decode, train-prior (with exact
resume) and a tiny demo. The pipeline is a tiny random one (no training needed)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.demo import DEMOS
from pipelines.pipeline import TokgenPipeline
from stage1_tokenizer.perceptual import find_backbone
from stage2_prior.transformer import TransformerPrior

from conftest import tokgen

pytestmark = pytest.mark.usefixtures("quiet_cli")

INPUT = (1, 16, 16)
TINY_PRIOR = {"arch": "transformer", "model": {"dim": 16, "num_layers": 1, "num_heads": 2}, "batch_size": 8,
              "max_steps": 6, "checkpoint_every": 3, "eval_every": 3, "warmup_steps": 1}


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory, tiny) -> Path:
    prior = tiny.transformer(1, num_classes=3)
    path = tmp_path_factory.mktemp("pipe") / "pipe"
    TokgenPipeline(tiny.vqvae(), [prior], INPUT, class_names=["a", "b", "c"]).save_pretrained(path)
    return path


def level0(path) -> np.ndarray:
    """The top level of a codes file, as stored (its dtype is the smallest for the codebook)."""
    with np.load(path) as codes:
        return codes["level_0"]


# ---- tokgen itself ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_start_without_torch(flag):
    import subprocess
    import sys

    code = ("import sys\nfrom pipelines.cli import main\n"
            f"try:\n    main([{flag!r}])\nexcept SystemExit as done:\n    assert done.code == 0, done.code\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
            "assert not loaded, loaded[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    if flag == "--version":
        from pipelines import __version__

        assert done.stdout.strip() == f"tokgen {__version__}" and __version__[0].isdigit()
    else:
        assert "train-tokenizer" in done.stdout and "decompress" in done.stdout


def test_every_command_explains_itself():
    """A description for every subcommand and help on every option (the training flags quote the presets)."""
    import argparse

    from pipelines.cli import COMMANDS, build_parser

    for name in COMMANDS:
        parser = build_parser([name])
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        assert command.description and len(command.description) > 30, name
        for action in command._actions:
            assert action.help, (name, action.option_strings or action.dest)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in action.help, (name, action.option_strings, "says not what it uses")
        options = {o for a in command._actions for o in a.option_strings}
        if name not in ("make-pipeline",):  # every command that prints a result can be quiet and speak JSON
            assert {"--quiet", "--json"} <= options, name
    # one name per idea across commands
    assert "--max-items" not in build_parser(["evaluate-tokenizer"]).format_help()
    for name in ("train-tokenizer", "train-prior"):
        text = build_parser([name])._subparsers._group_actions[0].choices[name].format_help()
        assert "(default: the config's;" in text and "--log-with" in text, name


def test_user_errors_are_one_line_with_a_nonzero_exit(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"quantizer": {"ema": "false"}}}))
    assert tokgen("train-tokenizer", "--config", bad, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "QuantizerConfig.ema: expected true or false, got 'false'" in err
    (tmp_path / "lr.json").write_text(json.dumps({"lr": "1e-3"}))
    assert tokgen("train-tokenizer", "--config", tmp_path / "lr.json", "--out", tmp_path / "run") == 2
    assert "TokenizerTrainConfig.lr: expected a number, got '1e-3'" in capsys.readouterr().err


def test_resume_refuses_the_flags_it_would_ignore(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": {"in_channels": 1, "channels": [8, 8], "num_res_blocks": 1,
                                            "factors": [4, 4], "quantizer": {"codebook_size": 16, "dim": 8}},
                                  "size": 16, "batch_size": 8, "image_every": 0, "max_steps": 2,
                                  "checkpoint_every": 2}))
    assert tokgen("train-tokenizer", "--config", config, "--out", tmp_path / "run") == 0
    capsys.readouterr()
    assert tokgen("train-tokenizer", "--out", tmp_path / "run", "--resume", "--lr", "0.1", "--batch-size", "4") == 2
    err = capsys.readouterr().err
    assert "--batch-size, --lr would be ignored; only --max-steps may change" in err
    assert tokgen("train-tokenizer", "--out", tmp_path / "run", "--resume", "--max-steps", "3", "--json") == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(tmp_path / "run" / "model")


# ---- tokgen sample ---------------------------------------------------------------------------------
def test_sample(pipe_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert tokgen("sample", pipe_dir, "--num", 6, "--seed", 1, "--out", out) == 0
    assert {"samples.png", "samples.npy", "codes.npz", "labels.npy", "sampling.json"} <= {p.name for p in out.iterdir()}
    samples = np.load(out / "samples.npy")
    assert samples.shape == (6, *INPUT) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1
    codes = level0(out / "codes.npz")
    assert codes.shape == (6, 4, 4) and codes.dtype == np.uint8 and codes.max() < 32
    assert np.load(out / "labels.npy").tolist() == [0, 1, 2, 0, 1, 2]
    with Image.open(out / "samples.png") as img:
        img.load()
    report = json.loads((out / "sampling.json").read_text())
    assert report["num"] == 6 and report["cache"] is True and report["tokens_per_s"] > 0
    # the samples are the decoded codes
    pipe = TokgenPipeline.from_pretrained(pipe_dir)
    decoded = pipe.decode([torch.from_numpy(codes.astype(np.int64))])
    assert np.allclose(decoded.numpy(), samples, atol=1e-6)

    again, no_cache = tmp_path / "again", tmp_path / "nocache"
    assert tokgen("sample", pipe_dir, "--num", 6, "--seed", 1, "--out", again) == 0
    assert np.array_equal(level0(again / "codes.npz"), codes)  # same seed, same codes
    assert tokgen("sample", pipe_dir, "--num", 6, "--seed", 1, "--out", no_cache, "--no-cache") == 0
    assert np.array_equal(level0(no_cache / "codes.npz"), codes)
    assert json.loads((no_cache / "sampling.json").read_text())["cache"] is False
    static = tmp_path / "static"
    assert tokgen("sample", pipe_dir, "--num", 6, "--seed", 1, "--out", static, "--static-cache") == 0
    assert np.array_equal(level0(static / "codes.npz"), codes)
    assert json.loads((static / "sampling.json").read_text())["static_cache"] is True
    assert json.loads((again / "sampling.json").read_text())["static_cache"] == "auto"
    other = tmp_path / "other"
    assert tokgen("sample", pipe_dir, "--num", 6, "--seed", 2, "--out", other, "--codes-only") == 0
    assert not np.array_equal(level0(other / "codes.npz"), codes)
    assert not (other / "samples.npy").exists()


def test_sample_class(pipe_dir, tmp_path, capsys):
    out = tmp_path / "c2"
    assert tokgen("sample", pipe_dir, "--num", 4, "--class", 2, "--out", out) == 0
    assert np.load(out / "labels.npy").tolist() == [2, 2, 2, 2]
    capsys.readouterr()
    assert tokgen("sample", pipe_dir, "--num", 4, "--class", 7, "--out", tmp_path / "c7") == 2
    err = capsys.readouterr().err
    assert "tokgen sample: error:" in err and "[0, 3)" in err
    assert tokgen("sample", tmp_path / "nowhere", "--num", 2, "--out", tmp_path / "x") == 2
    assert "pipeline.json" in capsys.readouterr().err
    assert tokgen("sample", pipe_dir, "--num", 0, "--out", tmp_path / "zero") == 2
    assert "--num" in capsys.readouterr().err
    assert tokgen("sample", pipe_dir, "--num", 2, "--guidance", 2, "--out", tmp_path / "g") == 2
    assert "class dropout" in capsys.readouterr().err  # this prior has no null class to guide with


def test_sample_video_longer_than_training(tmp_path, tiny):
    """`--length`: a transformer video pipeline trained on 4 frames writes 10-frame clips (sliding window)."""
    tokenizer = tiny.vqvae(modality="video", factors=(2, 4, 4), codebook_size=16)
    prior = tiny.transformer(None, grid=(2, 2, 2), vocab=16)
    TokgenPipeline(tokenizer, [prior], (1, 4, 8, 8)).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "long"
    assert tokgen("sample", tmp_path / "pipe", "--num", 2, "--length", 10, "--out", out) == 0
    assert np.load(out / "samples.npy").shape == (2, 10, 1, 8, 8)  # (N, T, C, H, W)
    assert level0(out / "codes.npz").shape == (2, 5, 2, 2)
    assert any((out / f"sample_001.{ext}").is_file() for ext in ("mp4", "gif"))


# ---- tokgen encode / decode ---------------------------------------------------------------------------
def test_encode_decode(pipe_dir, tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "img.png")
    assert tokgen("encode", pipe_dir, tmp_path / "img.png", "--out", tmp_path / "c.npz") == 0
    codes = level0(tmp_path / "c.npz")
    tokenizer = TokgenPipeline.from_pretrained(pipe_dir).tokenizer
    x = torch.from_numpy(pixels).float().div(255)[None, None]
    with torch.no_grad():
        expected = tokenizer.encode(x)[0]
    assert codes.shape == (1, 4, 4) and codes.dtype == np.uint8
    assert np.array_equal(codes[0], expected.numpy())

    assert tokgen("decode", pipe_dir, tmp_path / "c.npz", "--out", tmp_path / "r.png") == 0
    with Image.open(tmp_path / "r.png") as img:
        assert img.size == (16, 16)
        decoded = np.asarray(img.convert("L"), dtype=np.float32) / 255
    with torch.no_grad():
        reference = tokenizer.decode(expected[None]).clamp(0, 1)[0, 0].numpy()
    assert np.abs(decoded - reference).max() <= 1 / 255 + 1e-6

    capsys.readouterr()
    np.savez(tmp_path / "bad.npz", level_0=np.full((1, 4, 4), 40, dtype=np.uint8))
    assert tokgen("decode", pipe_dir, tmp_path / "bad.npz", "--out", tmp_path / "bad.png") == 2
    assert "[0, 32)" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
    np.savez(tmp_path / "float.npz", level_0=np.full((1, 4, 4), 3.7))
    assert tokgen("decode", pipe_dir, tmp_path / "float.npz", "--out", tmp_path / "float.png") == 2
    assert "not integer codes" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", codes=np.zeros((1, 4, 4), dtype=np.uint8))
    assert tokgen("decode", pipe_dir, tmp_path / "other.npz", "--out", tmp_path / "other.png") == 2
    assert "level_0" in capsys.readouterr().err
    assert tokgen("encode", pipe_dir, tmp_path / "img.png", "--out", tmp_path / "c.npy") == 2
    assert "c.npz" in capsys.readouterr().err  # codes files have one suffix
    assert tokgen("encode", pipe_dir, tmp_path / "missing.png", "--out", tmp_path / "m.npz") == 2
    assert "missing.png" in capsys.readouterr().err
    assert tokgen("decode", pipe_dir, tmp_path / "missing.npz", "--out", tmp_path / "m.png") == 2
    assert "missing.npz" in capsys.readouterr().err


def test_encode_crops_and_matches_channels(pipe_dir, tmp_path):
    """An RGB 18x19 image is made gray and center-cropped to a multiple of the downsampling (16x16)."""
    rgb = np.random.default_rng(1).integers(0, 256, (18, 19, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert tokgen("encode", pipe_dir, tmp_path / "rgb.png", "--out", tmp_path / "c.npz") == 0
    assert level0(tmp_path / "c.npz").shape == (1, 4, 4)


def test_decode_sampled_codes(pipe_dir, tmp_path, capsys):
    """`tokgen sample` codes decode with `tokgen decode`: one item to --out, a batch of 3 to three numbered files
    that are the samples `tokgen sample` decoded itself."""
    assert tokgen("sample", pipe_dir, "--num", 1, "--out", tmp_path / "s", "--codes-only") == 0
    assert tokgen("decode", pipe_dir, tmp_path / "s" / "codes.npz", "--out", tmp_path / "one.png") == 0
    with Image.open(tmp_path / "one.png") as img:
        assert img.size == (16, 16)
    assert tokgen("sample", pipe_dir, "--num", 3, "--out", tmp_path / "s3") == 0
    assert tokgen("decode", pipe_dir, tmp_path / "s3" / "codes.npz", "--out", tmp_path / "three.png") == 0
    samples = np.load(tmp_path / "s3" / "samples.npy")
    for i in range(3):
        with Image.open(tmp_path / f"three_{i:03d}.png") as img:
            decoded = np.asarray(img.convert("L"), dtype=np.float32) / 255
        assert np.abs(decoded - samples[i, 0]).max() <= 1 / 255 + 1e-6
    assert tokgen("decode", pipe_dir, tmp_path / "s3" / "codes.npz", "--out", tmp_path / "folder") == 0
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["000.png", "001.png", "002.png"]


def test_decode_hierarchical_sample_and_encode_outputs(tmp_path, tiny):
    """A 2-level pipeline (as the photos demo's): `tokgen sample --num 4` then `tokgen decode` of its codes file
    writes the 4 samples; `tokgen encode` then `tokgen decode` gives the tokenizer's reconstruction."""
    from stage2_prior import GatedPixelCNNPrior, GatedPixelCNNPriorConfig

    tokenizer = tiny.hvqvae()
    (top, bottom) = tokenizer.code_shapes((1, 32, 32))
    priors = [GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=top, vocab_size=16, channels=8, num_layers=2,
                                                          kernel_size=3, head_channels=8)),
              GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=bottom, vocab_size=16, cond_grid_shape=top,
                                                          cond_vocab_size=16, channels=8, num_layers=2,
                                                          kernel_size=3, head_channels=8))]
    TokgenPipeline(tokenizer, priors, (1, 32, 32)).save_pretrained(tmp_path / "pipe")
    assert tokgen("sample", tmp_path / "pipe", "--num", 4, "--out", tmp_path / "s") == 0
    with np.load(tmp_path / "s" / "codes.npz") as codes:
        assert codes.files == ["level_0", "level_1"]
        assert codes["level_0"].shape == (4, 4, 4) and codes["level_1"].shape == (4, 8, 8)
    assert tokgen("decode", tmp_path / "pipe", tmp_path / "s" / "codes.npz", "--out", tmp_path / "x") == 0
    samples = np.load(tmp_path / "s" / "samples.npy")
    for i in range(4):
        with Image.open(tmp_path / "x" / f"{i:03d}.png") as img:
            decoded = np.asarray(img.convert("L"), dtype=np.float32) / 255
        assert np.abs(decoded - samples[i, 0]).max() <= 1 / 255 + 1e-6
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "img.png")
    assert tokgen("encode", tmp_path / "pipe", tmp_path / "img.png", "--out", tmp_path / "e.npz") == 0
    assert tokgen("decode", tmp_path / "pipe", tmp_path / "e.npz", "--out", tmp_path / "e.png") == 0
    with Image.open(tmp_path / "e.png") as img:
        decoded = np.asarray(img.convert("L"), dtype=np.float32) / 255
    expected = tokenizer.reconstruct(torch.from_numpy(pixels).float().div(255)[None, None])[0, 0].numpy()
    assert np.abs(decoded - expected).max() <= 1 / 255 + 1e-6


# ---- tokgen train-prior -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory, tiny) -> Path:
    from stage1_tokenizer.export import export_tokens

    path = tmp_path_factory.mktemp("tokens") / "tokens"
    export_tokens(tiny.vqvae(), {"train": tiny.images(64, seed=0, classes=3), "eval": tiny.images(16, seed=1, classes=3)},
                  path, batch_size=32, shard_size=64, progress=False)
    return path


@pytest.fixture
def train_prior(fresh_accelerate):
    """`tokgen train-prior --tokens T --out O [--config C] --quiet ...`, with a fresh Accelerate state after it."""
    def run(tokens: Path, out: Path, config: Path | None, *extra) -> int:
        given = ("--config", config) if config is not None else ()
        try:
            return tokgen("train-prior", "--tokens", tokens, "--out", out, *given, *extra)  # bars off: TQDM_DISABLE
        finally:
            fresh_accelerate()

    return run


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def test_train_prior_and_resume(tokens_dir, tmp_path, crash_after_checkpoint, capsys, tiny, train_prior):
    config = tmp_path / "prior.json"
    # label dropout draws from torch's RNG every step: resume must restore it to match the straight run
    config.write_text(json.dumps({**TINY_PRIOR, "class_dropout": 0.5}))
    whole = tmp_path / "whole"
    assert train_prior(tokens_dir, whole, config) == 0
    saved = json.loads((whole / "config.json").read_text())
    assert saved["max_steps"] == 6 and saved["model"]["dim"] == 16 and saved["tokens"] == str(tokens_dir)
    info = json.loads((whole / "prior.json").read_text())
    assert info["tokenizer_fingerprint"] == tiny.vqvae().fingerprint()
    assert info["input_shape"] == list(INPUT) and info["level"] == 0
    ev = info["eval"]
    assert ev["num_samples"] == 16 and 0 < ev["bits_per_token"] < 10
    assert ev["bits_per_dim"] == pytest.approx(ev["bits_per_token"] * 16 / 256)
    prior = TransformerPrior.from_pretrained(whole / "model")
    assert prior.config.grid_shape == (4, 4) and prior.config.vocab_size == 32 and prior.config.num_classes == 3
    assert prior.config.null_class
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    # the run assembles into a pipeline with the tokenizer it was trained for
    tok_dir = tmp_path / "tok"
    tiny.vqvae().save_pretrained(tok_dir)
    pipe = TokgenPipeline.from_runs(tok_dir, [whole])
    assert pipe.input_shape == INPUT and pipe.num_classes == 3
    pipe.save_pretrained(tmp_path / "pipe")
    for g in ("1", "3"):
        assert tokgen("sample", tmp_path / "pipe", "--num", 3, "--guidance", g, "--codes-only",
                      "--out", tmp_path / f"guided{g}") == 0
    assert not np.array_equal(level0(tmp_path / "guided1" / "codes.npz"), level0(tmp_path / "guided3" / "codes.npz"))

    # killed right after the step-3 checkpoint, then resumed: same weights as the straight run
    disarm = crash_after_checkpoint(3)
    resumed = tmp_path / "resumed"
    with pytest.raises(crash_after_checkpoint.error):
        train_prior(tokens_dir, resumed, config)
    disarm()
    assert not (resumed / "model").exists()
    capsys.readouterr()
    assert train_prior(tokens_dir, resumed, config, "--resume", "--max-steps", 6) == 0
    assert "step_00000003 at step 3" in capsys.readouterr().err  # really resumed (a run event, on stderr)
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    assert json.loads((resumed / "prior.json").read_text())["eval"] == pytest.approx(ev)
    # and the comparison has teeth: the step-3 weights differ from the final ones
    at3 = load_file(str(whole / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert any(not torch.allclose(at3[k], a[k]) for k in a)


def test_train_prior_other_arch_from_flag_or_config(tokens_dir, tmp_path, train_prior):
    """The default preset sizes a transformer: `--arch pixelcnn`, or a config file naming another arch, starts
    from that arch's own defaults instead of failing on the transformer's fields."""
    from stage2_prior.pixelcnn import GatedPixelCNNPrior

    assert train_prior(tokens_dir, tmp_path / "flag", None, "--arch", "pixelcnn", "--max-steps", 1,
                       "--batch-size", 4) == 0
    assert GatedPixelCNNPrior.from_pretrained(tmp_path / "flag" / "model").config.channels == 128  # its default
    config = tmp_path / "pixelcnn.json"
    config.write_text(json.dumps({**TINY_PRIOR, "arch": "pixelcnn",
                                  "model": {"channels": 8, "num_layers": 2, "head_channels": 8}}))
    assert train_prior(tokens_dir, tmp_path / "file", config) == 0
    prior = GatedPixelCNNPrior.from_pretrained(tmp_path / "file" / "model")
    assert prior.config.channels == 8 and prior.config.num_layers == 2


def test_train_prior_errors(tokens_dir, tmp_path, capsys, train_prior):
    config = tmp_path / "prior.json"
    config.write_text(json.dumps(TINY_PRIOR))
    assert train_prior(tmp_path / "no_tokens", tmp_path / "r1", config) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train_prior(tokens_dir, tmp_path / "r2", config, "--level", 1) == 2
    assert "--level 1" in capsys.readouterr().err


# ---- tokgen demo ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--temperature", "0"], "temperature must be > 0"),  # not silently the dataset's own temperature
    (["--samples-per-class", "0"], "--samples-per-class must be >= 1"),
    (["--prior-steps", "0"], "--prior-steps must be >= 1"),
])
def test_demo_bad_input_is_one_clear_line_before_any_training(tmp_path, capsys, extra, message):
    out = tmp_path / "demo"
    assert tokgen("demo", "--out", out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing ran


def test_demo_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("stage1_tokenizer.fidelity.FEATURE_SIZE", 32)  # VGG16 features 16x cheaper, same code path
    out = tmp_path / "demo"
    assert tokgen("demo", "--out", out, "--tokenizer-steps", 5, "--prior-steps", 5, "--samples-per-class", 1) == 0
    # the preset samples with classifier-free guidance, and the suggested command says so
    assert "--guidance 2.0 --out more_samples" in capsys.readouterr().out
    measured = find_backbone("vgg") is not None and find_backbone("alex") is not None  # else skipped, with a warning
    for name in ("samples.png", "reconstructions.png", "samples_vs_real.png") + (("closest_pairs.png",) * measured):
        assert (out / name).stat().st_size > 0, name
    samples = np.load(out / "samples.npy")
    assert samples.shape == (10, 1, 32, 32) and samples.min() >= 0 and samples.max() <= 1
    assert np.load(out / "labels.npy").tolist() == list(range(10))
    metrics = json.loads((out / "metrics.json").read_text())
    for section, key in [("tokenizer", "psnr_db"), ("tokenizer", "codebook_usage"), ("prior", "bits_per_token"),
                         ("prior", "bits_per_dim"), ("sampling", "tokens_per_s"), ("timing", "total_s")]:
        assert isinstance(metrics[section][key], (int, float)), (section, key)
    assert metrics["sampling"]["guidance"] == 2.0 and metrics["sampling"]["temperature"] == 1.0
    assert metrics["sampling"]["num_written"] == 10 and "written_draws" not in metrics["sampling"]  # all of them
    s = metrics["sampling"]  # with the backbones: what `tokgen evaluate-samples` reports, on the demo's samples
    if measured:
        assert metrics["tokenizer"]["fd_vgg16"] > 0 and metrics["tokenizer"]["lpips"] > 0
        assert s["distance_to_real"]["fd_vgg16"] > 0 and s["distance_to_real"]["num_held_out"] == 10
        assert s["memorization"]["num_train_compared"] == 500 and 0 <= s["diversity"]["lpips_samples"]
    else:
        assert "distance_to_real" not in s and "fd_vgg16" not in metrics["tokenizer"]
    judged = metrics["sampling"]["judge"]  # a classifier trained on real digits labels the samples
    assert 0 <= judged["sample_accuracy"] <= 1 and judged["real_accuracy"] > 0.5 and judged["num_samples"] == 10
    assert 0 <= judged["reconstruction_accuracy"] <= 1  # and the tokenizer's reconstructions of the held-out digits
    pipe = TokgenPipeline.from_pretrained(out / "pipeline")
    assert pipe.num_classes == 10 and pipe.input_shape == (1, 32, 32)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="spoken-digits needs espeak-ng (make install)")
def test_spoken_digits_demo_samples_the_first_stages_of_words_cut_as_held_out(tmp_path, capsys, monkeypatch):
    """The spoken-digits demo: a residual tokenizer of 4 stages, tokens of the first 2 exported from the window
    around each word, a prior and a pipeline at that depth, kbps and STOI reported, the judge on reconstructions;
    every sample judged and measured, the first of each class written as files."""
    monkeypatch.setitem(DEMOS, "spoken-digits", replace(DEMOS["spoken-digits"], written_per_class=1))
    out = tmp_path / "demo"
    assert tokgen("demo", "--dataset", "spoken-digits", "--out", out, "--tokenizer-steps", 2, "--prior-steps", 2,
                  "--samples-per-class", 2) == 0
    printed = capsys.readouterr().out
    assert "over the first 2 of 4 stages (8.0 kbps)" in printed
    # the suggested command draws more samples as the demo drew its own
    assert "--temperature 0.9 --guidance 1.5 --out more_samples" in printed
    manifest = json.loads((out / "tokens" / "manifest.json").read_text())
    assert manifest["levels"][0]["depth"] == 2 and manifest["input_shape"] == [1, 8192]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokenizer"]["bitrate_kbps"] == 16.0 and 0 <= metrics["tokenizer"]["stoi"] <= 1
    assert metrics["prior"]["stages"] == 2 and metrics["prior"]["bitrate_kbps"] == 8.0
    s = metrics["sampling"]
    assert 0 <= s["judge"]["reconstruction_accuracy"] <= 1 and (s["temperature"], s["guidance"]) == (0.9, 1.5)
    assert s["num_samples"] == s["judge"]["num_samples"] == s["distance_to_real"]["num_samples"] == 20
    assert s["num_written"] == 10 and len(list(out.glob("sample_*.wav"))) == 10
    assert s["written_draws"] == list(range(0, 20, 2))  # the first of each digit's two draws
    assert np.load(out / "samples.npy").shape == (10, 1, 8192)
    assert np.load(out / "labels.npy").tolist() == list(range(10))
    with np.load(out / "codes.npz") as codes:
        assert codes["level_0"].shape == (10, 256, 2)
    assert TokgenPipeline.from_pretrained(out / "pipeline").code_depth == 2
