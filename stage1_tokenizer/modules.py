"""Conv building blocks for 1-D (audio), 2-D (images) and 3-D (video) tokenizers.

The encoder downsamples each axis by its own power-of-two factor (video: time and space apart), so one
encoder/decoder family serves every modality.
"""
from __future__ import annotations

import math

import torch
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels, eps=1e-6)


def down_schedule(factors: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-stage strides (each 1 or 2 per axis) that multiply to ``factors``.

    (4, 16, 16) -> [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    """
    logs = []
    for f in factors:
        if f < 1 or f & (f - 1):
            raise ValueError(f"downsampling factors must be powers of two, got {factors}")
        logs.append(int(math.log2(f)))
    return [tuple(2 if s < l else 1 for l in logs) for s in range(max(logs, default=0))]


class ResBlock(nn.Module):
    def __init__(self, dims: int, channels: int, out_channels: int | None = None):
        super().__init__()
        out = out_channels or channels
        conv = CONV[dims]
        self.block = nn.Sequential(
            norm(channels), nn.SiLU(), conv(channels, out, 3, padding=1),
            norm(out), nn.SiLU(), conv(out, out, 3, padding=1),
        )
        self.skip = conv(channels, out, 1) if out != channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


def _down(dims: int, channels: int, stride: tuple[int, ...]) -> nn.Module:
    kernel = tuple(4 if s == 2 else 3 for s in stride)
    return CONV[dims](channels, channels, kernel, stride=stride, padding=1)


def _up(dims: int, channels: int, stride: tuple[int, ...]) -> nn.Module:
    kernel = tuple(4 if s == 2 else 3 for s in stride)
    return CONV_T[dims](channels, channels, kernel, stride=stride, padding=1)


class Encoder(nn.Module):
    """x (B, C, *S) -> features (B, out_channels, *S / factors)."""

    def __init__(self, dims: int, in_channels: int, channels: tuple[int, ...], num_res_blocks: int,
                 factors: tuple[int, ...], out_channels: int):
        super().__init__()
        strides = down_schedule(factors)
        widths = _stage_widths(channels, len(strides))
        layers: list[nn.Module] = [CONV[dims](in_channels, widths[0], 3, padding=1)]
        for i, stride in enumerate(strides):
            layers += [ResBlock(dims, widths[i], widths[i + 1])]
            layers += [ResBlock(dims, widths[i + 1]) for _ in range(num_res_blocks - 1)]
            layers.append(_down(dims, widths[i + 1], stride))
        layers += [ResBlock(dims, widths[-1]) for _ in range(num_res_blocks)]
        layers += [norm(widths[-1]), nn.SiLU(), CONV[dims](widths[-1], out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """features (B, in_channels, *S') -> x (B, out_channels, *S' * factors)."""

    def __init__(self, dims: int, in_channels: int, channels: tuple[int, ...], num_res_blocks: int,
                 factors: tuple[int, ...], out_channels: int):
        super().__init__()
        strides = down_schedule(factors)[::-1]
        widths = _stage_widths(channels, len(strides))[::-1]
        layers: list[nn.Module] = [CONV[dims](in_channels, widths[0], 3, padding=1)]
        layers += [ResBlock(dims, widths[0]) for _ in range(num_res_blocks)]
        for i, stride in enumerate(strides):
            layers.append(_up(dims, widths[i], stride))
            layers += [ResBlock(dims, widths[i], widths[i + 1])]
            layers += [ResBlock(dims, widths[i + 1]) for _ in range(num_res_blocks - 1)]
        layers += [norm(widths[-1]), nn.SiLU(), CONV[dims](widths[-1], out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _stage_widths(channels: tuple[int, ...], stages: int) -> list[int]:
    """Width before the first stage and after each one; the last given width repeats."""
    return [channels[min(i, len(channels) - 1)] for i in range(stages + 1)]
