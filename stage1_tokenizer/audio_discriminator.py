"""The neural codecs' audio discriminator: multi-period (HiFi-GAN) plus multi-scale STFT (EnCodec) sub-discriminators.

- Multi-period: for each period p (2, 3, 5, 7, 11), the wave (B, 1, T) is folded into (B, 1, T/p, p) and 2-D
  convolutions with kernels (5, 1) run down each column, so every sub-discriminator sees samples p apart:
  the periodic structure of voiced speech that a waveform L1 or a spectrogram loss does not pin down.
- Multi-scale STFT: for each window n, the complex STFT (real and imaginary parts as 2 channels, frames x
  frequency bins) goes through 2-D convolutions dilated in time and strided in frequency, so phase and
  fine spectral detail at three time-frequency trade-offs are judged.

``forward(x)`` -> ``DiscriminatorOutput`` with one logit map per period and per window, and each one's layer
activations for feature matching. Weight normalisation on every convolution, as both papers (no running
statistics: every DDP rank holds the same discriminator). The STFTs run in fp32 under autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from stage1_tokenizer.gan_losses import DiscriminatorOutput


@dataclass
class AudioDiscriminatorConfig:
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)  # HiFi-GAN's primes: no period is a multiple of another
    period_channels: int = 32  # first layer's width; x4 per layer up to period_max_channels (HiFi-GAN: 32 .. 1024)
    period_max_channels: int = 1024
    stft_windows: tuple[int, ...] = (2048, 1024, 512)  # EnCodec's at 24 kHz; hop = window // 4
    stft_channels: int = 32

    def __post_init__(self):
        self.periods, self.stft_windows = tuple(self.periods), tuple(self.stft_windows)
        if not self.periods and not self.stft_windows:
            raise ValueError("the audio discriminator needs at least one period or one STFT window")
        if any(p < 2 for p in self.periods):
            raise ValueError(f"periods must be >= 2, got {self.periods}")
        if any(w < 16 or w & (w - 1) for w in self.stft_windows):
            raise ValueError(f"stft_windows must be powers of two >= 16, got {self.stft_windows}")


class PeriodDiscriminator(nn.Module):
    """(B, 1, T) -> logits (B, 1, T/p/243, p) and 5 layers of features, on the wave folded by period p."""

    def __init__(self, period: int, channels: int, max_channels: int):
        super().__init__()
        self.period = period
        widths = [1] + [min(channels * 4 ** i, max_channels) for i in range(4)]
        layers = [nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0)) for a, b in zip(widths, widths[1:])]
        layers.append(nn.Conv2d(widths[-1], widths[-1], (5, 1), 1, padding=(2, 0)))
        self.layers = nn.ModuleList(weight_norm(c) for c in layers)
        self.head = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pad = -x.shape[-1] % self.period
        if pad:
            x = F.pad(x, (0, pad), mode="reflect" if pad < x.shape[-1] else "constant")
        h = x.view(x.shape[0], 1, -1, self.period)
        features = []
        for conv in self.layers:
            h = F.leaky_relu(conv(h), 0.1)
            features.append(h)
        return self.head(h), features


class STFTDiscriminator(nn.Module):
    """(B, 1, T) -> logits over (frames, frequency bins / 8) and 5 layers of features, on the complex STFT."""

    def __init__(self, window: int, channels: int):
        super().__init__()
        self.window = window
        self.register_buffer("hann", torch.hann_window(window), persistent=False)
        layers = [nn.Conv2d(2, channels, (3, 9), padding=(1, 4))]
        layers += [nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4))
                   for d in (1, 2, 4)]
        layers.append(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)))
        self.layers = nn.ModuleList(weight_norm(c) for c in layers)
        self.head = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) -> (B, 2, frames, window // 2 + 1): real and imaginary parts, in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            wave = x.float().flatten(1)
            spec = torch.stft(wave, self.window, hop_length=self.window // 4, window=self.hann, center=True,
                              pad_mode="reflect" if wave.shape[-1] > self.window // 2 else "constant",
                              normalized=True, return_complex=True)
            return torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, features = self.spectrogram(x).to(self.head.bias.dtype), []
        for conv in self.layers:
            h = F.leaky_relu(conv(h), 0.2)
            features.append(h)
        return self.head(h), features


class AudioDiscriminator(nn.Module):
    """Waves (B, 1, T) in [-1, 1] -> ``DiscriminatorOutput``: the period maps first, then the STFT maps."""

    def __init__(self, config: AudioDiscriminatorConfig):
        super().__init__()
        self.config = config
        self.subs = nn.ModuleList(
            [PeriodDiscriminator(p, config.period_channels, config.period_max_channels) for p in config.periods]
            + [STFTDiscriminator(w, config.stft_channels) for w in config.stft_windows]
        )

    def forward(self, x: torch.Tensor) -> DiscriminatorOutput:
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"the audio discriminator takes mono waves (B, 1, T), got shape {tuple(x.shape)}")
        logits, features = [], []
        for sub in self.subs:
            out, feats = sub(x)
            logits.append(out)
            features.append(feats)
        return DiscriminatorOutput(logits=logits, features=features)
