"""The sample judge: a classifier trained on real items scores samples against the classes asked for."""
from __future__ import annotations

import pytest
import torch

from data import build_dataset
from pipelines.judge import features, judge


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
    assert len(good.per_class_sample_accuracy) == 10 and good.num_samples == 100


def test_features_pool_every_modality_to_a_small_grid():
    assert features(torch.zeros(2, 1, 8192), "audio").shape == (2, 1, 32, 32)
    assert features(torch.rand(2, 1, 8, 64, 64), "video").shape == (2, 1, 8, 32, 32)
    assert features(torch.rand(2, 3, 8, 8), "image").shape == (2, 3, 8, 8)


def test_judge_needs_labels():
    unlabelled = [{"x": torch.rand(1, 8, 8), "label": -1, "key": "a", "skipped": False}]
    with pytest.raises(ValueError, match="labelled"):
        judge(unlabelled, unlabelled, torch.rand(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), "image", 10, steps=1)
