"""The whole chain on code stacks, as a user runs it: train a tiny residual-VQ tokenizer a few steps, export its
tokens, train a tiny prior of each architecture a few steps on them, make a pipeline, sample and decode, compress and
decompress exactly, and let evaluate-prior and evaluate-tokenizer count every stage (digits for the transformer and
the PixelCNN, a folder of clips for WaveNet, which evaluate-samples also judges)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import tokgen

pytestmark = pytest.mark.usefixtures("quiet_cli")

STAGES, K = 2, 16
QUANTIZER = {"kind": "rvq", "num_stages": STAGES, "codebook_size": K, "dim": 8}
TRAIN = {"batch_size": 8, "max_steps": 3, "checkpoint_every": 3, "warmup_steps": 1}
PRIORS = {
    "transformer": {"dim": 16, "num_layers": 1, "num_heads": 2, "depth_layers": 1},
    "pixelcnn": {"channels": 8, "head_channels": 8, "num_layers": 2, "kernel_size": 3},
    "wavenet": {"channels": 8, "skip_channels": 8, "head_channels": 8, "layers_per_cycle": 2, "num_cycles": 1},
}


def write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value))
    return path


def train_tokenizer_and_export(tmp_path: Path, model: dict, data, size: int, fresh) -> tuple[Path, Path]:
    config = write_json(tmp_path / "tok.json", {"arch": "vqvae", "model": model, "data": str(data), "size": size,
                                                 "eval_fraction": 0.0, "image_every": 1000, **TRAIN})
    run, tokens = tmp_path / "tok", tmp_path / "tokens"
    assert tokgen("train-tokenizer", "--config", config, "--out", run, "--quiet") == 0
    fresh()
    assert tokgen("export-tokens", run, "--data", data, "--out", tokens, "--split", "train", "--device", "cpu",
                  "--quiet") == 0
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["levels"][0]["depth"] == STAGES
    assert manifest["levels"][0]["stage_codebook_sizes"] == [K] * STAGES
    return run, tokens


def prior_pipeline(tmp_path: Path, run: Path, tokens: Path, arch: str, fresh) -> Path:
    config = write_json(tmp_path / f"{arch}.json", {"arch": arch, "model": PRIORS[arch], **TRAIN, "eval_every": 0})
    prior, pipe = tmp_path / f"prior-{arch}", tmp_path / f"pipe-{arch}"
    assert tokgen("train-prior", "--tokens", tokens, "--config", config, "--out", prior, "--unconditional",
                  "--quiet") == 0
    fresh()
    assert json.loads((prior / "model" / "config.json").read_text())["depth"] == STAGES
    assert tokgen("make-pipeline", "--tokenizer", run, "--priors", prior, "--out", pipe, "--quiet") == 0
    return pipe


def sample_decode_compress(tmp_path: Path, pipe: Path, item: Path, grid: list[int], suffix: str,
                           item_grid: list[int] | None = None) -> None:
    out = tmp_path / f"samples-{pipe.name}"
    assert tokgen("sample", pipe, "--num", 2, "--top-p", 0.9, "--out", out, "--device", "cpu", "--quiet") == 0
    with np.load(out / "codes.npz") as codes:
        assert codes["level_0"].shape == (2, *grid, STAGES) and codes["level_0"].dtype == np.uint8
    assert tokgen("decode", pipe, out / "codes.npz", "--out", tmp_path / f"decoded-{pipe.name}", "--quiet") == 0
    assert len(list((tmp_path / f"decoded-{pipe.name}").glob(f"*{suffix}"))) == 2
    packed, encoded, back = (tmp_path / f"{pipe.name}{ext}" for ext in (".tkg", "-enc.npz", "-dec.npz"))
    assert tokgen("compress", pipe, item, "--out", packed, "--quiet") == 0
    assert tokgen("encode", pipe, item, "--out", encoded, "--quiet") == 0
    assert tokgen("decompress", pipe, packed, "--out", tmp_path / f"restored-{pipe.name}{suffix}", "--codes-out", back,
                  "--quiet") == 0
    with np.load(encoded) as a, np.load(back) as b:
        assert a["level_0"].shape == (1, *(item_grid or grid), STAGES) and np.array_equal(a["level_0"], b["level_0"])


def evaluate_prior(tmp_path: Path, pipe: Path, data, tokens_per_sample: int, capsys, *extra) -> None:
    capsys.readouterr()
    assert tokgen("evaluate-prior", pipe, "--data", data, "--out", tmp_path / f"eval-{pipe.name}", "--limit", 6,
                  "--compress", 2, "--device", "cpu", "--json", *extra) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["tokens_per_sample"] == tokens_per_sample and metrics["levels"][0]["depth"] == STAGES
    assert metrics["bits_per_sample"] == pytest.approx(metrics["bits_per_token"] * tokens_per_sample)
    assert metrics["compression"]["round_trips_exact"]


def test_digits_through_transformer_and_pixelcnn_priors(tmp_path, capsys, fresh_accelerate):
    model = {"modality": "image", "in_channels": 1, "channels": [8, 8], "num_res_blocks": 1, "factors": [4, 4],
             "quantizer": QUANTIZER}
    run, tokens = train_tokenizer_and_export(tmp_path, model, "digits", 16, fresh_accelerate)
    assert tokgen("evaluate-tokenizer", run, "--data", "digits", "--out", tmp_path / "ev", "--limit", 8,
                  "--no-lpips", "--no-fd-vgg16", "--device", "cpu", "--quiet") == 0
    tokenizer_metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert tokenizer_metrics["codes_per_input"] == 16 * STAGES
    assert len(tokenizer_metrics["codebook_usage_per_stage"][0]) == STAGES
    item = tmp_path / "item.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8), mode="L").save(item)
    for arch in ("transformer", "pixelcnn"):
        pipe = prior_pipeline(tmp_path, run, tokens, arch, fresh_accelerate)
        sample_decode_compress(tmp_path, pipe, item, [4, 4], ".png")
        evaluate_prior(tmp_path, pipe, "digits", 16 * STAGES, capsys)


def test_audio_clips_through_a_wavenet_prior(tmp_path, capsys, fresh_accelerate):
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        t = np.arange(1024) / 16000
        wave = 0.5 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(1024)
        sf.write(clips / f"clip{i}.wav", wave.astype(np.float32), 16000)
    model = {"modality": "audio", "in_channels": 1, "channels": [8, 8], "num_res_blocks": 1, "factors": [8],
             "sample_rate": 16000, "quantizer": QUANTIZER}
    run, tokens = train_tokenizer_and_export(tmp_path, model, clips, 256, fresh_accelerate)
    pipe = prior_pipeline(tmp_path, run, tokens, "wavenet", fresh_accelerate)
    # samples of the training length (256 / 8 positions); a whole clip compresses (1024 / 8: WaveNet takes any length)
    sample_decode_compress(tmp_path, pipe, clips / "clip0.wav", [32], ".wav", item_grid=[128])
    evaluate_prior(tmp_path, pipe, clips, 32 * STAGES, capsys, "--eval-fraction", "0")
    assert tokgen("evaluate-samples", pipe, "--data", clips, "--eval-data", clips, "--num", 4, "--num-real", 3,
                  "--num-train", 4, "--pairs", 4, "--closest", 2, "--out", tmp_path / "es", "--device", "cpu",
                  "--quiet") == 0
    metrics = json.loads((tmp_path / "es" / "metrics.json").read_text())
    assert metrics["distance_to_real"]["fd_logmel"] >= 0 and metrics["diversity"]["distinct_codes_all_levels"] > 0
    with np.load(tmp_path / "es" / "codes.npz") as codes:
        assert codes["level_0"].shape == (4, 32, STAGES)
    # a prior over the first stage only (`export-tokens --stages 1`): a pipeline at the lower bitrate
    fresh_accelerate()
    tokens1, prior1, pipe1 = tmp_path / "tokens1", tmp_path / "prior1", tmp_path / "pipe1"
    assert tokgen("export-tokens", run, "--data", clips, "--out", tokens1, "--split", "train", "--stages", 1,
                  "--device", "cpu", "--quiet") == 0
    assert json.loads((tokens1 / "manifest.json").read_text())["levels"][0]["depth"] == 1
    config = write_json(tmp_path / "wavenet1.json", {"arch": "wavenet", "model": PRIORS["wavenet"], **TRAIN,
                                                     "eval_every": 0})
    assert tokgen("train-prior", "--tokens", tokens1, "--config", config, "--out", prior1, "--unconditional",
                  "--quiet") == 0
    fresh_accelerate()
    assert tokgen("make-pipeline", "--tokenizer", run, "--priors", prior1, "--out", pipe1, "--quiet") == 0
    assert tokgen("sample", pipe1, "--num", 2, "--out", tmp_path / "s1", "--device", "cpu", "--quiet") == 0
    with np.load(tmp_path / "s1" / "codes.npz") as codes:
        assert codes["level_0"].shape == (2, 32, 1)
    assert tokgen("compress", pipe1, clips / "clip0.wav", "--out", tmp_path / "c1.tkg", "--quiet") == 0
    assert tokgen("encode", pipe1, clips / "clip0.wav", "--stages", 1, "--out", tmp_path / "e1.npz", "--quiet") == 0
    assert tokgen("decompress", pipe1, tmp_path / "c1.tkg", "--out", tmp_path / "r1.wav", "--codes-out",
                  tmp_path / "d1.npz", "--quiet") == 0
    with np.load(tmp_path / "e1.npz") as a, np.load(tmp_path / "d1.npz") as b:
        assert a["level_0"].shape == (1, 128, 1) and np.array_equal(a["level_0"], b["level_0"])
