"""Adversarial training: the GAN losses on known logits, the discriminators' shapes and precision, and
``train-tokenizer`` with a discriminator (identical to the run without one up to its start, the logs, the model
folder, bf16, audio and video). Kill -9 + resume and 2 processes: tests/pipelines/test_reliability.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stage1_tokenizer import train
from stage1_tokenizer.adversarial import AdversarialConfig, CollapseWatch, build_adversary, frozen, generator_terms
from stage1_tokenizer.audio_discriminator import AudioDiscriminator, AudioDiscriminatorConfig
from stage1_tokenizer.gan_losses import (adaptive_weight, discriminator_loss, feature_matching, generator_loss,
                                         lecam_penalty, ramp)
from stage1_tokenizer.patchgan import GlobalBatchNorm, PatchGAN, PatchGANConfig

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")


# ---- losses on known logits ----------------------------------------------------------------------------
def test_hinge_and_non_saturating_losses_on_known_logits():
    confident_real, confident_fake = [torch.full((2, 1, 3, 3), 2.0)], [torch.full((2, 1, 3, 3), -2.0)]
    assert float(discriminator_loss(confident_real, confident_fake, "hinge")) == 0.0  # both beyond the margin
    assert float(discriminator_loss([torch.zeros(2, 4)], [torch.zeros(2, 4)], "hinge")) == 2.0
    assert float(generator_loss(confident_fake, "hinge")) == 2.0  # -E[D(x^)]
    ns = discriminator_loss(confident_real, confident_fake, "non_saturating")
    assert math.isclose(float(ns), 2 * math.log1p(math.exp(-2.0)), rel_tol=1e-6)
    assert math.isclose(float(generator_loss(confident_fake, "non_saturating")), math.log1p(math.exp(2.0)),
                        rel_tol=1e-6)
    # several maps are averaged, not summed
    two = discriminator_loss([torch.zeros(1, 4), torch.full((1, 4), 2.0)], [torch.zeros(1, 4)] * 2, "hinge")
    assert float(two) == (2.0 + 1.0) / 2
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(confident_fake, "wasserstein")


def test_losses_run_in_fp32_from_half_precision_logits():
    big = [torch.full((1, 8), 300.0, dtype=torch.float16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = lecam_penalty(big, [-b for b in big], torch.zeros(1), torch.zeros(1))
        loss = generator_loss([-b for b in big], "non_saturating")
    assert penalty.dtype == torch.float32 and float(penalty) == 2 * 300.0 ** 2  # 90000 overflows nothing in fp32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_lecam_pulls_each_side_towards_the_other_sides_running_mean():
    """The LeCam paper's code: E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(x^))^2]."""
    anchors = torch.tensor([1.0]), torch.tensor([-1.0])  # ema_real, ema_fake
    # real logits at or below the fake anchor and fake logits at or above the real anchor: nothing to pull
    assert float(lecam_penalty([torch.tensor([-1.5])], [torch.tensor([1.5])], *anchors)) == 0.0
    assert float(lecam_penalty([torch.tensor([0.5])], [torch.tensor([-0.5])], *anchors)) == 1.5 ** 2 + 1.5 ** 2
    assert float(lecam_penalty([torch.tensor([3.0])], [torch.tensor([-3.0])], *anchors)) == 4.0 ** 2 + 4.0 ** 2


def test_feature_matching_is_relative_l1_and_zero_for_identical_features():
    real = [[torch.ones(2, 3, 4), torch.full((2, 3), 2.0)]]
    assert float(feature_matching(real, real)) == 0.0
    fake = [[torch.zeros(2, 3, 4), torch.full((2, 3), 3.0)]]
    assert math.isclose(float(feature_matching(real, fake)), (1.0 + 0.5) / 2, rel_tol=1e-6)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    out = layer(torch.randn(3, 4))
    nll, gan = out.pow(2).mean(), -out.mean() * 0.01
    g_nll = torch.autograd.grad(nll, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    weight = adaptive_weight(nll, gan, layer.weight)
    assert math.isclose(float(weight), float(g_nll.norm() / (g_gan.norm() + 1e-4)), rel_tol=1e-5)
    assert float(adaptive_weight(nll, gan * 0, layer.weight, max_weight=5.0)) == 5.0  # clamped
    (nll + gan).backward()  # both graphs are still there for the backward pass


def test_ramp_starts_at_disc_start_and_reaches_one():
    assert [ramp(s, 10, 4) for s in (0, 9, 10, 11, 12, 13, 100)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert ramp(10, 10, 0) == 1.0 and ramp(9, 10, 0) == 0.0


def test_collapse_watch_warns_once_after_a_long_outright_win():
    watch = CollapseWatch(gap=4.0, steps=100)
    assert watch.check(10, 5.0) is None and watch.check(60, 5.0) is None
    assert watch.check(80, 1.0) is None  # back in the game: the count starts again
    assert watch.check(100, 6.0) is None
    with pytest.warns(RuntimeWarning, match="won outright since step 100"):
        assert "apart" in watch.check(200, 6.0)
    assert watch.check(400, 9.0) is None  # once


# ---- discriminators ----------------------------------------------------------------------------------
def test_patchgan_2d_and_3d_shapes():
    image = PatchGAN(PatchGANConfig(modality="image", in_channels=3, channels=8, num_layers=3))
    out = image(torch.rand(2, 3, 64, 64))
    assert len(out.logits) == 1 and out.logits[0].shape == (2, 1, 6, 6)  # 64 -> 8 by three strides, -1 -1 by k4
    assert [f.shape[1] for f in out.features[0]] == [8, 16, 32, 64]
    video = PatchGAN(PatchGANConfig(modality="video", in_channels=1, channels=4, num_layers=2))
    logits = video(torch.rand(2, 1, 8, 32, 32)).logits[0]
    assert logits.shape == (2, 1, 8, 6, 6)  # time kept, space down by 4
    with pytest.raises(ValueError, match="audio"):
        PatchGANConfig(modality="audio")


def test_a_patchgan_judges_patches_so_bigger_inputs_get_more_logits():
    disc = PatchGAN(PatchGANConfig(modality="image", in_channels=1, channels=4, num_layers=2))
    assert disc(torch.rand(1, 1, 64, 64)).logits[0].shape[-2:] == (14, 14)
    assert disc(torch.rand(1, 1, 128, 96)).logits[0].shape[-2:] == (30, 22)


def test_global_batch_norm_is_batch_norm_over_the_batch_in_fp32_with_no_running_state():
    norm = GlobalBatchNorm(4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 5, 6) * 3 + 1
    expected = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    assert torch.allclose(norm(x), expected, atol=1e-5)
    assert torch.allclose(norm.eval()(x), expected, atol=1e-5)  # always the batch's own statistics
    assert list(dict(norm.named_buffers())) == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="norm"):
        PatchGANConfig(norm="layer")


def test_audio_discriminator_maps_features_and_bf16():
    disc = AudioDiscriminator(AudioDiscriminatorConfig(period_channels=4, period_max_channels=16,
                                                       stft_windows=(256, 128), stft_channels=4))
    wave = torch.randn(2, 1, 4000).clamp(-1, 1)
    out = disc(wave)
    assert len(out.logits) == 5 + 2 and all(len(f) == 5 for f in out.features)
    assert out.logits[0].shape[-1] == 2 and out.logits[4].shape[-1] == 11  # the period folds the wave
    assert out.logits[5].shape[:2] == (2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = disc(wave)
        assert disc.subs[5].spectrogram(wave).dtype == torch.float32  # the STFT stays in fp32
    assert all(torch.isfinite(m).all() for m in half.logits)
    with pytest.raises(ValueError, match="mono"):
        disc(torch.randn(2, 2, 4000))


def test_generator_terms_leave_no_gradient_in_the_discriminator():
    cfg = AdversarialConfig(weight=1.0, discriminator={"channels": 4, "num_layers": 1})
    adversary = build_adversary(cfg, "image", 1, seed=0)
    decoder = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 16, 16)
    recon = decoder(x)
    nll = F.l1_loss(recon, x)
    terms = generator_terms(cfg, adversary, x, recon, nll, decoder.weight, step=0)
    (nll + terms.loss).backward()
    assert decoder.weight.grad is not None
    assert all(p.grad is None and p.requires_grad for p in adversary.parameters())
    assert generator_terms(AdversarialConfig(weight=1.0, disc_start=5), adversary, x, recon, nll, decoder.weight,
                           step=4) is None


def test_the_discriminator_has_its_own_seed():
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    build_adversary(AdversarialConfig(weight=1.0), "image", 3, seed=0)
    assert torch.equal(torch.rand(1), before)  # the tokenizer's random stream did not move


# ---- training with a discriminator ----------------------------------------------------------------------
TINY = {
    "model": {"modality": "image", "in_channels": 1, "channels": [8, 8], "num_res_blocks": 1, "factors": [4, 4],
              "quantizer": {"codebook_size": 32, "dim": 8}},
    "data": "digits", "size": 16, "batch_size": 8, "image_every": 0, "log_every": 2, "checkpoint_every": 0,
    "max_steps": 8, "warmup_steps": 2,
}
GAN = {"weight": 0.5, "disc_start": 4, "ramp_steps": 2, "lecam_weight": 0.01,
       "discriminator": {"channels": 8, "num_layers": 2}}


def run(tmp_path: Path, name: str, *flags: str, **overrides) -> Path:
    cfg = {**TINY, **overrides}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return train.main(["--out", str(tmp_path / name), "--config", str(path), "--quiet", *flags])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "logs").glob("tokenizer/events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_run_with_a_discriminator_equals_the_run_without_until_it_starts(tmp_path, fresh_accelerate):
    plain = weights(run(tmp_path, "plain", "--max-steps", "4"))
    fresh_accelerate()
    waiting = weights(run(tmp_path, "waiting", "--max-steps", "4", adversarial=GAN))
    assert plain.keys() == waiting.keys()  # the model folder holds the tokenizer only
    for key in plain:
        assert torch.equal(plain[key], waiting[key]), key
    fresh_accelerate()
    plain8 = weights(run(tmp_path, "plain8"))
    fresh_accelerate()
    gan8 = weights(run(tmp_path, "gan8", adversarial=GAN))
    assert not all(torch.allclose(plain8[k], gan8[k]) for k in plain8)  # then it acts


def test_a_run_with_a_discriminator_logs_both_sides(tmp_path):
    run_dir = run(tmp_path, "gan", adversarial=GAN).parent
    logs = scalars(run_dir)
    for tag in ("d_loss", "d_gan", "logits_real", "logits_fake", "lecam", "g_gan", "gan_weight", "logit_gap"):
        assert tag in logs, sorted(logs)
        assert all(math.isfinite(v) for _, v in logs[tag])
    assert [s for s, _ in logs["d_loss"]] == [6, 8]  # from disc_start on (logged at steps 2, 4, 6, 8)
    assert [s for s, _ in logs["loss"]] == [2, 4, 6, 8]
    assert all(v > 0 for _, v in logs["gan_weight"])
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["adversarial"]["disc_start"] == 4 and resolved["adversarial"]["loss"] == "hinge"


def test_bf16_autocast_with_a_discriminator_stays_finite(tmp_path):
    run_dir = run(tmp_path, "bf16", "--mixed-precision", "bf16", "--max-steps", "6",
                  adversarial={**GAN, "disc_start": 2}).parent
    logs = scalars(run_dir)
    assert all(math.isfinite(v) for tag in ("loss", "d_loss", "g_gan", "gan_weight") for _, v in logs[tag])
    assert logs["bad_steps"][-1][1] == 0
    assert all(torch.isfinite(t).all() for t in weights(run_dir / "model").values() if t.is_floating_point())


def test_audio_with_mel_loss_feature_matching_and_the_codec_discriminator(tmp_path):
    audio = {"model": {"modality": "audio", "in_channels": 1, "channels": [8, 8], "num_res_blocks": 1,
                       "factors": [16], "patch": [4], "sample_rate": 16000,
                       "quantizer": {"codebook_size": 16, "dim": 8}},
             "data": "spoken-digits", "size": 2048, "batch_size": 4, "stft_weight": 1.0, "mel_weight": 1.0}
    gan = {"weight": 1.0, "adaptive_weight": False, "disc_start": 1, "feature_matching_weight": 2.0,
           "discriminator": {"period_channels": 4, "period_max_channels": 16, "stft_windows": [256, 128],
                             "stft_channels": 4}}
    run_dir = run(tmp_path, "audio", "--max-steps", "4", "--mixed-precision", "bf16", adversarial=gan,
                  **audio).parent
    logs = scalars(run_dir)
    for tag in ("mel_loss", "stft_loss", "feature_matching", "d_loss", "g_gan"):
        assert tag in logs and all(math.isfinite(v) for _, v in logs[tag]), tag
    assert logs["gan_weight"][-1][1] == 1.0  # fixed weight, fully ramped


def test_video_with_a_3d_patchgan(tmp_path):
    video = {"model": {"modality": "video", "in_channels": 1, "channels": [8, 8], "num_res_blocks": 1,
                       "factors": [2, 4, 4], "quantizer": {"codebook_size": 16, "dim": 8}},
             "data": "moving-digits", "size": 16, "frames": 4, "batch_size": 2}
    run_dir = run(tmp_path, "video", "--max-steps", "3", adversarial={**GAN, "disc_start": 1},
                  **video).parent
    assert "d_loss" in scalars(run_dir)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown PatchGANConfig fields"):
        run(tmp_path, "bad", adversarial={"weight": 1.0, "discriminator": {"periods": [2, 3]}})
    with pytest.raises(ValueError, match="mel_weight applies to audio"):
        run(tmp_path, "bad2", mel_weight=1.0)
    with pytest.raises(ValueError, match="adversarial.loss"):
        run(tmp_path, "bad3", adversarial={"weight": 1.0, "loss": "wgan"})


def test_init_from_starts_from_a_saved_tokenizer_and_refuses_one_that_does_not_fit(tmp_path, fresh_accelerate):
    first = run(tmp_path, "first", "--max-steps", "3")
    fresh_accelerate()
    again = run(tmp_path, "again", "--max-steps", "1", "--init-from", str(first.parent), lr=0.0)
    before, after = weights(first), weights(again)
    for key in before:
        if "quantizer" not in key:  # a step at lr 0 moves no weight; the EMA codebook still learns
            assert torch.equal(before[key], after[key]), key
    fresh_accelerate()
    with pytest.raises(ValueError, match="init_from .* do not fit"):
        run(tmp_path, "wider", "--max-steps", "1", "--init-from", str(first), model={**TINY["model"], "channels": [16, 16]})


def test_training_warns_when_the_discriminator_wins_outright_for_long(tmp_path):
    """The watch runs at logging steps on the running logit gap: a threshold below any gap fires it once."""
    gan = {**GAN, "disc_start": 1, "collapse_gap": -100.0, "collapse_steps": 4}
    with pytest.warns(RuntimeWarning, match="won outright"):
        run(tmp_path, "collapse", adversarial=gan)


def test_gradient_accumulation_steps_the_discriminator_once_per_optimizer_step(tmp_path):
    """With 2 micro-batches per step, both optimizers step once per optimizer step: the discriminator's Adam has
    counted exactly the steps since disc_start (not the micro-batches)."""
    run_dir = run(tmp_path, "accum", "--grad-accum", "2", "--max-steps", "6", "--checkpoint-every", "6",
                  adversarial={**GAN, "disc_start": 2}).parent
    state = torch.load(run_dir / "checkpoints" / "step_00000006" / "optimizer_1.bin", weights_only=True)
    steps = {float(s["step"]) for s in state["state"].values()}
    assert steps == {4.0}  # steps 2..5 (0-based) of 6
    tokenizer_steps = {float(s["step"]) for s in torch.load(run_dir / "checkpoints" / "step_00000006" /
                                                             "optimizer.bin", weights_only=True)["state"].values()}
    assert tokenizer_steps == {6.0}
