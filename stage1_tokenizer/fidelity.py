"""Distribution distances between sets of images: an offline Frechet distance on ImageNet VGG16 features.

``FD-VGG16`` (reported as ``fd_vgg16``) is the Frechet distance of FID computed on a different network: the
ImageNet VGG16 backbone of the shared offline weights (``vgg16_features.safetensors``, found as LPIPS finds
its backbones), so every CPU run, test and CI job reports a distribution distance without a download. It is
not FID and its values are not comparable with FID's; FID itself needs the Inception weights file the user
names (see the protocol in BENCHMARKS.md).

Protocol of the features: images in [0, 1], grayscale repeated to 3 channels, resized to 128x128 (bilinear,
antialiased; a third of 224x224's cost, since these features run on CPUs), ImageNet mean/std normalisation,
VGG16's 13 conv layers, global average pool -> 512 values. Video: the same per frame, averaged over the frames
(``video_features``). Audio: ``FD-logmel`` on each clip's log-mel statistics (``audio_features``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.models import vgg16

from data.spectrogram import log_mel_spectrogram
from stage1_tokenizer.perceptual import BACKBONE_FILES, find_backbone, weight_dirs

FEATURE_SIZE = 128
AUDIO_MELS = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """Frozen ImageNet VGG16 conv features, average-pooled: (B, C, H, W) in [0, 1] -> (B, 512) float32."""

    def __init__(self):
        super().__init__()
        self.features = vgg16().features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @classmethod
    def from_shared_weights(cls) -> "VGGFeatures":
        """Load the offline backbone; a clear error naming the folders searched when it is missing."""
        path = find_backbone("vgg")
        if path is None:
            searched = ", ".join(str(d) for d in weight_dirs())
            raise FileNotFoundError(f"the offline Frechet distance needs {BACKBONE_FILES['vgg']} (ImageNet VGG16); "
                                    f"not found in [{searched}]: set TOKGEN_WEIGHTS to its folder")
        model = cls()
        state = {k.removeprefix("features."): v for k, v in load_file(str(path)).items()}
        model.features.load_state_dict(state, strict=True)
        return model

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.float().clamp(0, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.features((x - self.mean) / self.std).mean(dim=(2, 3))


def image_features(model: VGGFeatures, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, 512) float64 features, computed in batches on the model's device."""
    device = model.mean.device
    parts = [model(images[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 512, dtype=torch.float64)


def video_features(model: VGGFeatures, clips: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N, C, T, H, W) in [0, 1] -> (N, 512) float64: per-frame VGG16 features averaged over the T frames."""
    n, _, t = clips.shape[:3]
    frames = clips.transpose(1, 2).flatten(0, 1)
    return image_features(model, frames, batch_size).view(n, t, -1).mean(1)


def audio_features(waves: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(N, 1, T) or (N, T) waves -> (N, 2 * AUDIO_MELS) float64: mean and std over time of each log-mel band (dB)."""
    mel = log_mel_spectrogram(waves, sample_rate, n_mels=AUDIO_MELS)
    return torch.cat([mel.mean(-1), mel.std(-1)], dim=1).double()


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D), N, M >= 2.

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), in float64; the symmetric form
    keeps every matrix positive semi-definite, so eigh is stable also when N < D (singular covariances).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 items per set, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp(min=0))
