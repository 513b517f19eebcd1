"""Reconstruction metrics per item: what each modality's users compare tokenizers by.

image: PSNR, SSIM (Wang et al. 2004), LPIPS; video: per-frame PSNR, SSIM and LPIPS, averaged over each clip's
frames; audio: SNR, log-mel distance, SI-SDR, STOI, multi-scale mel distance and (opt-in) ViSQOL
(``stage1_tokenizer.audio_metrics``). SSIM matches scikit-image's ``structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1`` (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stage1_tokenizer.audio_loss import mel_distance
from stage1_tokenizer.audio_metrics import reconstruction_metrics

LPIPS_MIN_SIZE = 32  # AlexNet's five pooling stages leave nothing of smaller images (lpips raises)


def psnr(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Per-sample PSNR in dB of (B, ...) tensors."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(peak**2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window) of (B, C, H, W) images in [0, 1] -> (B,).

    An 11-tap Gaussian window (sigma 1.5, scikit-image's 3.5-sigma truncation), population (co)variances,
    averaged over the valid positions and the channels: scikit-image's figure with those settings.
    """
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[None, :]
    kernel = (g.t() @ g)[None, None].expand(c, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=c)  # noqa: E731  (valid conv, as in the reference)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def snr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-clip signal-to-noise ratio in dB of a reconstruction y of x, (B,)."""
    signal = x.pow(2).flatten(1).sum(1)
    noise = (x - y).pow(2).flatten(1).sum(1).clamp(min=1e-10)
    return 10 * torch.log10(signal.clamp(min=1e-10) / noise)


def per_frame(metric, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-image metric over the frames of (B, C, T, H, W) clips, averaged over each clip's T frames -> (B,)."""
    frames = lambda t: t.transpose(1, 2).flatten(0, 1)  # noqa: E731  (B, C, T, H, W) -> (B*T, C, H, W)
    return metric(frames(x), frames(y)).view(x.shape[0], -1).mean(1)


def batch_metrics(x: torch.Tensor, recon: torch.Tensor, modality: str, sample_rate: int, perceptual,
                  visqol: bool = False) -> dict[str, torch.Tensor]:
    """Per-item metrics of one batch, each (B,) float64 on the CPU: what a modality's users compare tokenizers by.

    x, recon: (B, C, H, W) images, (B, C, T, H, W) clips or (B, 1, T) audio; ``perceptual`` (LPIPS on
    images in [0, 1]) or None; no LPIPS on items smaller than ``LPIPS_MIN_SIZE``. Audio clips too short for
    STOI or ViSQOL (``visqol``: opt-in, ~0.35 s a clip) get NaN there: average with the NaNs left out.
    """
    out = {"mse": (recon - x).pow(2).flatten(1).mean(1)}
    if modality == "audio":
        out["snr_db"] = snr(x, recon)
        out["mel_distance"] = mel_distance(recon, x, sample_rate)
        out.update(reconstruction_metrics(x, recon, sample_rate, visqol))
    elif modality == "video":
        out["psnr_db"] = per_frame(psnr, recon, x)
        out["ssim"] = per_frame(ssim, recon, x)
        if perceptual is not None and min(x.shape[-2:]) >= LPIPS_MIN_SIZE:
            out["lpips"] = per_frame(perceptual, recon, x)
    else:
        out["psnr_db"] = psnr(recon, x)
        out["ssim"] = ssim(recon, x)
        if perceptual is not None and min(x.shape[-2:]) >= LPIPS_MIN_SIZE:
            out["lpips"] = perceptual(recon, x)
    return {k: v.detach().double().cpu() for k, v in out.items()}


class MetricMeans:
    """Running means of per-item metrics over batches; NaN (an item a metric cannot score) is left out."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, values: dict[str, torch.Tensor]) -> None:
        """values: name -> (B,) per-item metric of one batch."""
        for key, value in values.items():
            scored = ~value.isnan()
            self.sums[key] = self.sums.get(key, 0.0) + float(value[scored].sum())
            self.counts[key] = self.counts.get(key, 0) + int(scored.sum())

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}

    def unscored(self, total: int) -> dict[str, int]:
        """Items each metric could not score (e.g. clips shorter than STOI's 0.4 s), where there are any."""
        return {k: total - n for k, n in self.counts.items() if n < total}
