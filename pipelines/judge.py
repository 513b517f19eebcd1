"""Do class-conditional samples show the class asked for? A judge that does not depend on the model.

A small conv classifier is trained on real training items only (never on reconstructions or samples),
then labels the held-out real items (its accuracy there is the ceiling the samples can reach) and the
samples. The share of samples it labels as the class they were asked for is a number people can check
instead of listening to 40 clips or squinting at 160 frames. Images and video are classified from pixels,
audio from a log-mel spectrogram; every modality goes through the same N-d conv stack.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stage1_tokenizer.modules import CONV

MAX_SIDE = 32  # inputs are average-pooled to at most this many positions per axis: the class is coarse


@dataclass
class JudgeResult:
    real_accuracy: float  # on held-out real items: the ceiling for samples
    sample_accuracy: float  # share of samples labelled as the class they were asked for
    per_class_sample_accuracy: list[float]
    num_real: int
    num_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def features(x: torch.Tensor, modality: str, sample_rate: int = 16000) -> torch.Tensor:
    """(N, C, *S) as the tokenizer sees it -> (N, C', *S') with every axis <= ``MAX_SIDE``.

    audio (N, 1, T) -> log-mel (N, 1, 64, frames); image (N, C, H, W) and video (N, C, T, H, W) as is.
    """
    x = x.float()
    if modality == "audio":
        import torchaudio

        mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=512, hop_length=128, n_mels=64)
        x = (mel(x) + 1e-5).log()  # (N, 1, 64, frames)
    spatial = x.shape[2:]
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(spatial)]
    return pool(x, [min(s, MAX_SIDE) for s in spatial])


class Classifier(nn.Module):
    """(N, C, *S) -> logits (N, num_classes): three stride-2 convs, global average pool, linear."""

    def __init__(self, dims: int, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        conv, widths = CONV[dims], (in_channels, width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [conv(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).flatten(2).mean(-1))


def _stack(dataset, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(min(len(dataset), limit))]
    items = [it for it in items if not it.get("skipped") and int(it["label"]) >= 0]
    if not items:
        raise ValueError("the judge needs labelled items; this dataset has none")
    return torch.stack([it["x"] for it in items]), torch.tensor([int(it["label"]) for it in items])


@dataclass
class Judge:
    """A classifier trained on real items, with the normalization of its inputs."""

    model: Classifier
    modality: str
    sample_rate: int
    mean: torch.Tensor
    std: torch.Tensor

    def hits(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x (N, C, *S) as the tokenizer sees it, labels (N,) -> (N,) 1.0 where labelled as ``labels``."""
        feats = features(x, self.modality, self.sample_rate)
        with torch.no_grad():
            predicted = torch.cat([self.model((chunk - self.mean) / self.std).argmax(-1) for chunk in feats.split(256)])
        return (predicted == labels).float()


def train_judge(train_set, modality: str, num_classes: int, sample_rate: int = 16000, steps: int = 300,
                batch_size: int = 32, seed: int = 0, max_items: int = 2000) -> Judge:
    """Train on ``train_set``'s real labelled items. Deterministic for a seed."""
    with torch.random.fork_rng():
        # training datasets crop at random from the global RNG: seed it so the judge does not depend on
        # what ran before it (the demo and benchmarks.judge then train the same classifier)
        torch.manual_seed(seed)
        x_raw, y_train = _stack(train_set, max_items)
        x_train = features(x_raw, modality, sample_rate)
        model = Classifier(x_train.dim() - 2, x_train.shape[1], num_classes)
    # one scalar normalization from the real training items: everything is judged on the same scale
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x_train), (batch_size,), generator=generator)
        loss = F.cross_entropy(model((x_train[idx] - mean) / std), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Judge(model.eval(), modality, sample_rate, mean, std)


def judge(train_set, eval_set, samples: torch.Tensor, labels: torch.Tensor, modality: str, num_classes: int,
          sample_rate: int = 16000, steps: int = 300, batch_size: int = 32, seed: int = 0,
          max_items: int = 2000) -> JudgeResult:
    """Train on ``train_set`` (real items), then score ``eval_set`` and ``samples`` (N, C, *S) asked for
    ``labels`` (N,). Deterministic for a seed."""
    judged = train_judge(train_set, modality, num_classes, sample_rate, steps, batch_size, seed, max_items)
    x_eval, y_eval = _stack(eval_set, max_items)
    real = judged.hits(x_eval, y_eval)
    hits = judged.hits(samples, labels)
    per_class = [float(hits[labels == c].mean()) if bool((labels == c).any()) else float("nan")
                 for c in range(num_classes)]
    return JudgeResult(float(real.mean()), float(hits.mean()), per_class, len(x_eval), len(samples))
