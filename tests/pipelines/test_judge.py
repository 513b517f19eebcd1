"""The sample judge: a classifier trained on real items scores samples against the classes asked for."""
from __future__ import annotations

import pytest
import torch

from data import build_dataset
from pipelines.judge import DYNAMIC_RANGE_DB, NUM_JUDGES, features, judge, train_judge


pytestmark = pytest.mark.usefixtures("one_thread")


def test_judge_tells_right_labels_from_wrong_ones():
    train = build_dataset("digits", split="train", size=8, channels=1)
    held_out = build_dataset("digits", split="eval", size=8, channels=1)
    items = [held_out[i] for i in range(100)]
    x = torch.stack([it["x"] for it in items])
    right = torch.tensor([int(it["label"]) for it in items])
    wrong = (right + 1 + torch.arange(100) % 9) % 10  # never the true class
    good = judge(train, held_out, x, right, "image", 10, steps=200)
    bad = judge(train, held_out, x, wrong, "image", 10, steps=200)
    assert good.real_accuracy > 0.85 and good.sample_accuracy > 0.85
    assert bad.sample_accuracy < 0.1 and bad.real_accuracy == good.real_accuracy  # deterministic per seed
    assert len(good.per_class_sample_accuracy) == 10 and good.num_samples == 100 and good.num_judges == NUM_JUDGES
    assert "reconstruction_accuracy" not in good.to_dict()  # no tokenizer given


def test_the_judge_averages_the_log_probabilities_of_classifiers_seeded_in_turn():
    """An ensemble of two, seeded 3: the mean of the judges of one classifier seeded 3 and 4 (which differ)."""
    train = build_dataset("digits", split="train", size=8, channels=1)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    alone = [train_judge(train, "image", 10, steps=20, seed=seed, num_judges=1).log_probs(x) for seed in (3, 4)]
    pair = train_judge(train, "image", 10, steps=20, seed=3, num_judges=2)
    assert len(pair.models) == 2 and not torch.allclose(alone[0], alone[1], atol=1e-3)
    assert torch.allclose(pair.log_probs(x), (alone[0] + alone[1]) / 2, atol=1e-5)
    assert torch.equal(pair.log_probs(x), train_judge(train, "image", 10, steps=20, seed=3, num_judges=2).log_probs(x))


def test_judge_scores_a_tokenizers_reconstructions_of_the_held_out_items():
    train = build_dataset("digits", split="train", size=8, channels=1)
    held_out = build_dataset("digits", split="eval", size=8, channels=1)
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    exact = judge(train, held_out, x, y, "image", 10, steps=200, reconstruct=lambda b: b, reconstruct_batch=7,
                  num_judges=1)
    assert exact.reconstruction_accuracy == exact.real_accuracy  # a perfect tokenizer keeps every verdict
    blank = judge(train, held_out, x, y, "image", 10, steps=200, reconstruct=torch.zeros_like, num_judges=1)
    assert blank.reconstruction_accuracy < 0.2 and blank.to_dict()["reconstruction_accuracy"] < 0.2


def test_features_give_pooled_views_of_every_modality():
    assert features(torch.zeros(2, 1, 8192), "audio").shape == (2, 1, 1, 32, 32)
    assert features(torch.rand(2, 1, 8, 64, 64), "video").shape == (2, 8, 1, 32, 32)  # a view per frame
    assert features(torch.rand(2, 3, 8, 8), "image").shape == (2, 1, 3, 8, 8)


def test_audio_features_ignore_what_lies_40_db_below_the_peak():
    t = torch.arange(8192) / 16000
    tone = torch.where((t > 0.2) & (t < 0.3), torch.sin(2 * torch.pi * 440 * t), torch.zeros(()))[None, None]
    hiss = 1e-3 * torch.randn(tone.shape, generator=torch.Generator().manual_seed(0))  # ~ -57 dB re the tone
    clean, noisy = features(tone, "audio"), features(tone + hiss, "audio")
    assert torch.allclose(clean, noisy, atol=0.5)  # within half a dB everywhere
    assert clean.amax() - clean.amin() <= DYNAMIC_RANGE_DB + 1e-3
    assert features(0.5 * tone, "audio").sub(clean).mean().item() == pytest.approx(-6.02, abs=0.05)


def test_video_judge_labels_clips_by_their_frames():
    train = build_dataset("moving-digits", modality="video", split="train", size=32, channels=1, frames=4,
                          length=600, max_digits=1)
    held_out = build_dataset("moving-digits", modality="video", split="eval", size=32, channels=1, frames=4,
                             length=100, max_digits=1)
    x = torch.stack([held_out[i]["x"] for i in range(100)])
    right = torch.tensor([held_out[i]["label"] for i in range(100)])
    found = judge(train, held_out, x, right, "video", 10, steps=300, num_judges=1)
    assert found.real_accuracy == found.sample_accuracy > 0.6  # chance is 0.1
    shuffled = judge(train, held_out, x[:, :, torch.randperm(4)], right, "video", 10, steps=300, num_judges=1)
    assert shuffled.sample_accuracy == found.sample_accuracy  # frames are views: their order does not matter


def test_judge_needs_labels_and_a_classifier():
    unlabelled = [{"x": torch.rand(1, 8, 8), "label": -1, "key": "a", "skipped": False}]
    with pytest.raises(ValueError, match="labelled"):
        judge(unlabelled, unlabelled, torch.rand(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), "image", 10, steps=1)
    with pytest.raises(ValueError, match="at least one classifier"):
        train_judge(build_dataset("digits", split="train", size=8, channels=1), "image", 10, steps=1, num_judges=0)
