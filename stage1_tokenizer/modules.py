"""Conv building blocks for 1-D (audio), 2-D (images) and 3-D (video) tokenizers.

The encoder downsamples each axis by its own power-of-two factor (video: time and space apart), so one
encoder/decoder family serves every modality.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def channels_last(module: nn.Module, dims: int) -> nn.Module:
    """3-D convs run 2-3x faster channels-last on CPU (oneDNN), which takes a video tokenizer's whole train
    step from 1.32 s to 1.08 s (BENCHMARKS.md §10a): keep a video net's conv weights in that layout. 2-D convs
    gained nothing measurable and stay as they are."""
    return module.to(memory_format=torch.channels_last_3d) if dims == 3 else module


def as_conv_input(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


NORMS = ("group", "none")


def norm(channels: int, kind: str = "group") -> nn.Module:
    """GroupNorm (groups of at least 4 channels, at most 32 groups), or ``kind="none"``: an identity, which keeps
    the layer indices (and so the weights' names) of a net with norms."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")
    return nn.GroupNorm(min(32, channels // 4) or 1, channels, eps=1e-6) if kind == "group" else nn.Identity()


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
    def __init__(self, dims: int, channels: int, out_channels: int | None = None, norm_kind: str = "group"):
        super().__init__()
        out = out_channels or channels
        conv = CONV[dims]
        self.block = nn.Sequential(
            norm(channels, norm_kind), nn.SiLU(), conv(channels, out, 3, padding=1),
            norm(out, norm_kind), nn.SiLU(), conv(out, out, 3, padding=1),
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


def _patch_or_none(patch: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return tuple(patch) if patch is not None and math.prod(patch) > 1 else None


def conv_factors(factors: tuple[int, ...], patch: tuple[int, ...] | None) -> tuple[int, ...]:
    """What the strided convs downsample once ``patch`` has been folded into channels."""
    if patch is None:
        return tuple(factors)
    if len(patch) != len(factors) or any(p < 1 or f % p for f, p in zip(factors, patch)):
        raise ValueError(f"patch {tuple(patch)} must give a divisor of each downsampling factor {tuple(factors)}")
    return tuple(f // p for f, p in zip(factors, patch))


def _patterns(patch: tuple[int, ...]) -> tuple[str, str, dict]:
    """einops patterns for (B, C, *S) and (B, C * prod(patch), *S / patch), with the patch sizes."""
    names = "thw"[-len(patch):]
    whole = "b c " + " ".join(f"({a} p{a})" for a in names)
    folded = "b (c " + " ".join(f"p{a}" for a in names) + ") " + " ".join(names)
    return whole, folded, {f"p{a}": p for a, p in zip(names, patch)}


def space_to_depth(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S) -> (B, C * prod(patch), *S / patch): each patch's values become channels (lossless)."""
    whole, folded, sizes = _patterns(patch)
    return rearrange(x, f"{whole} -> {folded}", **sizes)


def depth_to_space(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``space_to_depth``."""
    whole, folded, sizes = _patterns(patch)
    return rearrange(x, f"{folded} -> {whole}", **sizes)


class Encoder(nn.Module):
    """x (B, C, *S) -> features (B, out_channels, *S / factors).

    ``patch`` (optional, per axis, dividing ``factors``): the first downsampling folds each patch into
    channels (``space_to_depth``) instead of running convs at full resolution, where most of a small
    video net's time goes; the strided convs do the rest. ``norm_kind``: see ``norm``.
    """

    def __init__(self, dims: int, in_channels: int, channels: tuple[int, ...], num_res_blocks: int,
                 factors: tuple[int, ...], out_channels: int, patch: tuple[int, ...] | None = None,
                 norm_kind: str = "group"):
        super().__init__()
        self.patch = _patch_or_none(patch)
        strides = down_schedule(conv_factors(factors, self.patch))
        widths = _stage_widths(channels, len(strides))
        in_channels *= math.prod(self.patch or (1,))
        layers: list[nn.Module] = [CONV[dims](in_channels, widths[0], 3, padding=1)]
        for i, stride in enumerate(strides):
            layers += [ResBlock(dims, widths[i], widths[i + 1], norm_kind)]
            layers += [ResBlock(dims, widths[i + 1], norm_kind=norm_kind) for _ in range(num_res_blocks - 1)]
            layers.append(_down(dims, widths[i + 1], stride))
        layers += [ResBlock(dims, widths[-1], norm_kind=norm_kind) for _ in range(num_res_blocks)]
        layers += [norm(widths[-1], norm_kind), nn.SiLU(), CONV[dims](widths[-1], out_channels, 1)]
        self.net = channels_last(nn.Sequential(*layers), dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch:
            x = space_to_depth(x, self.patch)
        return self.net(as_conv_input(x)).contiguous()


class Decoder(nn.Module):
    """features (B, in_channels, *S') -> x (B, out_channels, *S' * factors); ``patch`` as in ``Encoder``
    (the last convs give each patch's values as channels, ``depth_to_space`` puts them in place)."""

    def __init__(self, dims: int, in_channels: int, channels: tuple[int, ...], num_res_blocks: int,
                 factors: tuple[int, ...], out_channels: int, patch: tuple[int, ...] | None = None,
                 norm_kind: str = "group"):
        super().__init__()
        self.patch = _patch_or_none(patch)
        strides = down_schedule(conv_factors(factors, self.patch))[::-1]
        out_channels *= math.prod(self.patch or (1,))
        widths = _stage_widths(channels, len(strides))[::-1]
        layers: list[nn.Module] = [CONV[dims](in_channels, widths[0], 3, padding=1)]
        layers += [ResBlock(dims, widths[0], norm_kind=norm_kind) for _ in range(num_res_blocks)]
        for i, stride in enumerate(strides):
            layers.append(_up(dims, widths[i], stride))
            layers += [ResBlock(dims, widths[i], widths[i + 1], norm_kind)]
            layers += [ResBlock(dims, widths[i + 1], norm_kind=norm_kind) for _ in range(num_res_blocks - 1)]
        layers += [norm(widths[-1], norm_kind), nn.SiLU(), CONV[dims](widths[-1], out_channels, 3, padding=1)]
        self.net = channels_last(nn.Sequential(*layers), dims)

    @property
    def last_layer(self) -> torch.Tensor:
        """The last convolution's weight (the adaptive GAN weight's gradients are taken there)."""
        return self.net[-1].weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.net(as_conv_input(z))
        return (depth_to_space(x, self.patch) if self.patch else x).contiguous()


def _stage_widths(channels: tuple[int, ...], stages: int) -> list[int]:
    """Width before the first stage and after each one; the last given width repeats."""
    return [channels[min(i, len(channels) - 1)] for i in range(stages + 1)]
