"""Log-mel spectrograms of waveforms: what pictures of audio show and what mel distances compare."""
from __future__ import annotations

import functools

import torch
import torchaudio


def waves_2d(x: torch.Tensor) -> torch.Tensor:
    """Mono audio (B, 1, T) or (B, T) -> float32 (B, T)."""
    if x.dim() == 3:
        if x.shape[1] != 1:
            raise ValueError(f"expected mono audio (B, 1, T), got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 2:
        raise ValueError(f"expected audio (B, 1, T) or (B, T), got shape {tuple(x.shape)}")
    return x.float()


def fft_size_for(length: int, largest: int) -> int:
    """The largest power of two <= min(length, largest) (at least 16)."""
    n = 16
    while n * 2 <= min(length, largest):
        n *= 2
    return n


@functools.lru_cache(maxsize=8)
def _mel_transform(sample_rate: int, fft_size: int, n_mels: int):
    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=fft_size, hop_length=fft_size // 4,
                                                n_mels=n_mels, power=2.0, center=True)


def log_mel_spectrogram(x: torch.Tensor, sample_rate: int, n_mels: int = 64, fft_size: int = 1024) -> torch.Tensor:
    """Waves (B, 1, T) or (B, T) -> log-mel power in dB (B, n_mels, frames), fp32 even under autocast.

    The FFT shrinks to the largest power of two <= T for short clips (hop = FFT // 4), and the
    number of mel bands to at most FFT // 8.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        waves = waves_2d(x)
        n = fft_size_for(waves.shape[-1], fft_size)
        mel = _mel_transform(int(sample_rate), n, min(n_mels, n // 8)).to(waves.device)  # no empty mel bands
        return 10.0 * torch.log10(mel(waves).clamp_min(1e-10))
