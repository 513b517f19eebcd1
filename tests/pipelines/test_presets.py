"""The shipped presets build: every demo's tokenizer config, untrained, tokenizes an input of the size the
demo exports, and each level's prior config models the resulting code grids (the same derivation of shapes
from the tokens as ``tokgen train-prior``). A preset with a field that no longer exists, or a patch that does
not divide the factors, fails here instead of minutes into a demo."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.peer_vqvae import PEER_TRAIN_FLOPS_PER_64PX_IMAGE
from data.token_writer import level_entry
from harness.config import PRESET_DIR, preset
from pipelines.demo import DEMOS
from harness.config import config_from_dict
from stage1_tokenizer.adversarial import build_adversary
from stage1_tokenizer.registry import TOKENIZERS
from stage1_tokenizer.train import TokenizerTrainConfig
from stage2_prior.registry import prior_classes
from stage2_prior.train import PriorTrainConfig, model_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _input(cfg: TokenizerTrainConfig, size: int) -> torch.Tensor:
    m = cfg.model_config
    if m.modality == "audio":
        return torch.rand(1, 1, size) * 2 - 1
    if m.modality == "video":
        return torch.rand(1, m.in_channels, cfg.frames, size, size)
    return torch.rand(1, m.in_channels, size, size)


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_presets_fit_together(name):
    spec = DEMOS[name]
    cfg = config_from_dict(TokenizerTrainConfig, preset(spec.tokenizer))
    torch.manual_seed(0)
    tokenizer = TOKENIZERS[cfg.arch][0](cfg.model_config).eval()
    stages = {"num_stages": spec.export_stages} if spec.export_stages else {}  # the stages the demo exports
    with torch.no_grad():
        codes = tokenizer.encode_levels(_input(cfg, spec.export_size or cfg.size), **stages)
    # code grids and codebook sizes come top first, as priors number their levels (stacks: the stages last)
    depth = spec.export_stages or tokenizer.code_depth
    manifest = {"levels": [level_entry(c.shape[1: c.dim() - (1 if depth else 0)], v, depth)
                           for c, v in zip(codes, tokenizer.codebook_sizes)], "num_classes": 10}
    assert len(spec.priors) == len(manifest["levels"])
    for level, prior_name in enumerate(spec.priors):
        pcfg = config_from_dict(PriorTrainConfig, {**preset(prior_name), "tokens": "unused", "level": level})
        prior = prior_classes(pcfg.arch)[0](model_config(pcfg, manifest)).eval()
        if spec.guidance != 1.0 and prior.config.num_classes:  # guided sampling needs the null class
            assert prior.config.null_class, f"{prior_name}: guidance {spec.guidance} needs class_dropout > 0"
        labels = torch.zeros(1, dtype=torch.long) if prior.config.num_classes else None
        cond = codes[level - 1] if level else None
        with torch.no_grad():
            nll = prior.nll(codes[level], labels, cond)
        assert nll.shape == (1,) and torch.isfinite(nll).all()


def test_demo_presets_use_the_cheap_first_stage():
    """The moving-digits, spoken-digits and photos presets fit 15 minutes on 2 cores because of these fields
    (BENCHMARKS.md §10a, §10b): keep them unless the demo is re-timed."""
    video = config_from_dict(TokenizerTrainConfig, preset("tokenizer-moving-digits")).model_config
    audio = config_from_dict(TokenizerTrainConfig, preset("tokenizer-spoken-digits")).model_config
    photos = config_from_dict(TokenizerTrainConfig, preset("tokenizer-photos")).model_config
    assert video.patch == (1, 4, 4) and audio.patch is not None and photos.patch == (2, 2)
    assert preset("prior-moving-digits")["model"]["relative_bias"] is True


def test_three_level_audio_config_trains_with_jukebox_hops(tmp_path):
    """`tokenizer-audio-3level`: a 3-level audio VQ-VAE-2 with hops 8 / 32 / 128 (top level coarsest),
    trained for 2 steps on a WAV folder (the STFT term and level dropout included), then tokenizing."""
    import numpy as np
    import soundfile as sf

    from stage1_tokenizer.registry import load_tokenizer
    from stage1_tokenizer.train import train

    (tmp_path / "wavs").mkdir()
    t = np.arange(12000) / 16000
    for i, f in enumerate((220, 330, 440)):
        sf.write(tmp_path / "wavs" / f"tone{i}.wav", (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32), 16000)
    cfg = config_from_dict(TokenizerTrainConfig, {**preset("tokenizer-audio-3level"), "data": str(tmp_path / "wavs"),
                                                  "batch_size": 2, "max_steps": 2, "checkpoint_every": 2,
                                                  "image_every": 0, "warmup_steps": 1, "level_dropout_steps": 2})
    model = load_tokenizer(train(cfg, tmp_path / "run", quiet=True)).eval()
    assert model.config.factors == ((8,), (4,), (4,)) and model.config.sample_rate == 16000
    with torch.no_grad():
        codes = model.encode_levels(torch.rand(1, 1, 8192) * 2 - 1)
    assert [tuple(c.shape[1:]) for c in codes] == [(64,), (256,), (1024,)]  # hops 128, 32, 8: top first


@pytest.mark.parametrize("name", sorted(f.stem for f in PRESET_DIR.glob("prior-*.json")))
def test_every_prior_config_works_through_the_command_line(name, tmp_path):
    """`tokgen train-prior --config NAME` (a preset's name) and `--config harness/presets/NAME.json`, as the README
    has users run them: the command resolves the preset over the default one, and the result must build that
    arch's model."""
    import argparse

    from stage2_prior.train import add_arguments, parse_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--tokens", "t", "--out", str(tmp_path), "--config", name])
    cfg = parse_config(args)
    by_path = parser.parse_args(["--tokens", "t", "--out", str(tmp_path), "--config", str(PRESET_DIR / f"{name}.json")])
    assert parse_config(by_path) == cfg
    assert cfg.arch == preset(name)["arch"]
    grid = [8] if cfg.arch == "wavenet" else [4, 4]
    manifest = {"levels": [{"grid_shape": grid, "codebook_size": 16}] * 2, "num_classes": 10}
    prior_classes(cfg.arch)[0](model_config(replace(cfg, level=1), manifest))  # a conditioned lower level too


# The train step of rosinality/vq-vae-2-pytorch's default VQVAE on a 64x64 image, forward and backward, counted
# with torch.utils.flop_counter by benchmarks/peer_vqvae.py.
PEER_TRAIN_GFLOP_PER_64PX_IMAGE = PEER_TRAIN_FLOPS_PER_64PX_IMAGE / 1e9


def test_the_default_image_preset_spends_no_more_compute_than_the_peer():
    cfg = config_from_dict(TokenizerTrainConfig, preset("tokenizer-image"))
    torch.manual_seed(0)
    tokenizer = TOKENIZERS[cfg.arch][0](cfg.model_config)
    x = torch.rand(2, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        tokenizer(x).loss.backward()
    per_image = counter.get_total_flops() / 2 / 1e9
    assert per_image <= PEER_TRAIN_GFLOP_PER_64PX_IMAGE, per_image
    codes = tokenizer.encode_levels(x)
    assert [tuple(c.shape[1:]) for c in codes] == [(8, 8), (16, 16)]  # the peer's grids: 8x top, 4x bottom


@pytest.mark.parametrize("name", sorted(f.stem for f in PRESET_DIR.glob("tokenizer-*.json")))
def test_every_tokenizer_preset_builds_and_its_discriminator_judges_its_input(name):
    """Each shipped tokenizer preset resolves (types checked), builds its tokenizer, reconstructs an input of a
    size it takes, and where it trains adversarially its discriminator gives finite logits on that input."""
    cfg = config_from_dict(TokenizerTrainConfig, preset(name))
    m = cfg.model_config
    torch.manual_seed(0)
    tokenizer = TOKENIZERS[cfg.arch][0](m).eval()
    small = {"audio": 4 * math.prod(tokenizer.downsampling), "video": 32, "image": 64}[m.modality]
    x = _input(cfg, small)
    if m.modality == "video":
        x = x[:, :, : max(4, tokenizer.downsampling[0])]
    with torch.no_grad():
        recon = tokenizer.reconstruct(x)
        assert recon.shape == x.shape
        if cfg.adversarial.enabled:
            adversary = build_adversary(cfg.adversarial, m.modality, m.in_channels, cfg.seed)
            logits = adversary(torch.cat([x, recon])).logits
            assert logits and all(torch.isfinite(l).all() for l in logits)
