"""Spectral losses for audio tokenizers: multi-resolution STFT loss, DAC's multi-scale mel loss, a log-mel distance.

All take waveforms (B, 1, T) or (B, T) in [-1, 1] and always compute in fp32, also under autocast
(half-precision FFTs lose the quiet bins and overflow on the loud ones).
"""
from __future__ import annotations

import functools

import torch
import torchaudio
from torch import nn

from data.spectrogram import fft_size_for, log_mel_spectrogram, waves_2d

_EPS = 1e-7
# (window = FFT size, mel bands): DAC's MelSpectrogramLoss (Kumar et al. 2023), hop = window // 4
MEL_SCALES = ((32, 5), (64, 10), (128, 20), (256, 40), (512, 80), (1024, 160), (2048, 320))
MEL_CLAMP = 1e-5  # DAC's floor on the mel magnitude before log10: -100 dB, below a 16-bit file's noise


def stft_magnitude(x: torch.Tensor, fft_size: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """(B, T) -> |STFT| (B, fft_size // 2 + 1, frames); sqrt(re^2 + im^2 + eps) keeps gradients finite at 0."""
    spec = torch.stft(x, fft_size, hop_length=hop, win_length=window.shape[0], window=window, center=True,
                      pad_mode="reflect" if x.shape[-1] > fft_size // 2 else "constant", return_complex=True)
    return torch.sqrt(spec.real.square() + spec.imag.square() + _EPS)


class MultiResolutionSTFTLoss(nn.Module):
    """Sum over resolutions of spectral convergence + log-magnitude L1 (Yamamoto et al., Parallel WaveGAN),
    averaged over the resolutions.

    Resolutions: FFT sizes ``fft_sizes`` (hop = size // 4, Hann window of the FFT size). Sizes longer
    than the clip are dropped; when none fits, one FFT of the largest power of two <= T is used.
    ``forward(input, target)`` -> scalar (batch mean); ``per_item`` gives (B,).
    Zero for identical inputs.
    """

    def __init__(self, fft_sizes: tuple[int, ...] = (512, 1024, 2048), hop_divisor: int = 4,
                 sc_weight: float = 1.0, mag_weight: float = 1.0):
        super().__init__()
        if not fft_sizes:
            raise ValueError("fft_sizes must not be empty")
        self.fft_sizes, self.hop_divisor = tuple(sorted(fft_sizes)), hop_divisor
        self.sc_weight, self.mag_weight = sc_weight, mag_weight

    def resolutions(self, length: int) -> list[int]:
        """FFT sizes used for clips of ``length`` samples."""
        fits = [n for n in self.fft_sizes if n <= length]
        return fits or [fft_size_for(length, self.fft_sizes[0])]

    def per_item(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) loss per item."""
        with torch.autocast(device_type=input.device.type, enabled=False):
            x, y = waves_2d(input), waves_2d(target)
            if x.shape != y.shape:
                raise ValueError(f"input {tuple(x.shape)} and target {tuple(y.shape)} differ")
            total = x.new_zeros(x.shape[0])
            sizes = self.resolutions(x.shape[-1])
            for n in sizes:
                window = torch.hann_window(n, device=x.device)
                mx = stft_magnitude(x, n, max(1, n // self.hop_divisor), window)
                my = stft_magnitude(y, n, max(1, n // self.hop_divisor), window)
                # spectral convergence: ||(|Y| - |X|)||_F / ||Y||_F, per item
                sc = (my - mx).flatten(1).norm(dim=1) / my.flatten(1).norm(dim=1).clamp_min(_EPS)
                mag = (my.log() - mx.log()).abs().flatten(1).mean(1)
                total = total + self.sc_weight * sc + self.mag_weight * mag
            return total / len(sizes)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_item(input, target).mean()


def mel_distance(x: torch.Tensor, y: torch.Tensor, sample_rate: int, n_mels: int = 64) -> torch.Tensor:
    """Mean absolute log-mel difference per item, in dB: (B,). Zero for identical inputs."""
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    mx = log_mel_spectrogram(x, sample_rate, n_mels)
    my = log_mel_spectrogram(y, sample_rate, n_mels)
    return (mx - my).abs().flatten(1).mean(1)


@functools.lru_cache(maxsize=32)
def _mel_magnitude(sample_rate: int, window: int, n_mels: int) -> torchaudio.transforms.MelSpectrogram:
    # librosa's (and so DAC's) Slaney mel scale and area normalisation, on the magnitude (power 1)
    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=window, win_length=window,
                                                hop_length=window // 4, f_min=0.0, f_max=sample_rate / 2,
                                                n_mels=n_mels, power=1.0, center=True, pad_mode="reflect",
                                                norm="slaney", mel_scale="slaney")


def multiscale_mel_per_item(input: torch.Tensor, target: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Mean absolute difference of log10 mel magnitudes, averaged over the scales of ``MEL_SCALES`` whose window
    fits the clip: (B,) fp32, differentiable. DAC's mel loss sums its 7 scales; this averages them (x7 to compare).
    Zero for identical clips."""
    with torch.autocast(device_type=input.device.type, enabled=False):
        x, y = waves_2d(input).float(), waves_2d(target).float()
        if x.shape != y.shape:
            raise ValueError(f"input {tuple(x.shape)} and target {tuple(y.shape)} differ")
        scales = [(w, m) for w, m in MEL_SCALES if w <= x.shape[-1]]
        if not scales:
            raise ValueError(f"clips of {x.shape[-1]} samples are shorter than the smallest mel window "
                             f"({MEL_SCALES[0][0]})")
        total = x.new_zeros(x.shape[0])
        for window, n_mels in scales:
            mel = _mel_magnitude(int(sample_rate), window, n_mels).to(x.device)
            mx, my = mel(x).clamp_min(MEL_CLAMP).log10(), mel(y).clamp_min(MEL_CLAMP).log10()
            total = total + (mx - my).abs().flatten(1).mean(1)
        return total / len(scales)


class MultiScaleMelLoss(nn.Module):
    """DAC's multi-scale mel loss (``multiscale_mel_per_item``), the batch mean: a scalar."""

    def __init__(self, sample_rate: int):
        super().__init__()
        self.sample_rate = int(sample_rate)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multiscale_mel_per_item(input, target, self.sample_rate).mean()
