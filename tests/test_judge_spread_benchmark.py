"""The judge-spread benchmark: an ensemble of k is scored by the mean of its members' log-probabilities, over random
k-subsets; each classifier alone is the judge with only that classifier."""
from __future__ import annotations

import torch

from benchmarks.judge_spread import classifier_log_probs, ensemble_spread
from data import build_dataset
from pipelines.judge import train_judge


def test_ensembles_of_k_average_log_probabilities():
    labels = torch.tensor([0, 1])
    # three classifiers on two samples: a confident one right on both, one right on the first, one wrong on both
    log_probs = torch.tensor([[[0.0, -9.0], [-9.0, 0.0]], [[0.0, -9.0], [0.0, -1.0]], [[-1.0, 0.0], [0.0, -1.0]]])
    one = ensemble_spread(log_probs, labels, log_probs, labels, 1, 200)
    assert one["samples_min"] == 0.0 and one["samples_max"] == 1.0 and 0 < one["samples_sd"]
    everyone = ensemble_spread(log_probs, labels, log_probs, labels, 3, 5)
    # the mean of all three gets both right (sample 1: [-3, -2/3]) where a majority vote would miss sample 1
    assert everyone["samples_mean"] == everyone["samples_min"] == everyone["samples_max"] == 1.0
    assert everyone["samples_sd"] == 0.0 and everyone["real_mean"] == 1.0


def test_each_classifier_alone_is_one_members_judge():
    train = build_dataset("digits", split="train", size=8, channels=1)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    judge = train_judge(train, "image", 10, steps=10, seed=2, num_judges=2)
    alone = classifier_log_probs(judge, x)
    assert alone.shape == (2, 5, 10)
    assert torch.allclose(alone[1], train_judge(train, "image", 10, steps=10, seed=3, num_judges=1).log_probs(x))
    assert torch.allclose(alone.mean(0), judge.log_probs(x), atol=1e-6)
