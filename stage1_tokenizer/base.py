"""What every tokenizer carries, whatever its levels: config fields, value range, shapes, the code contract.

A tokenizer maps inputs x (B, C, *S) in the modality's value range (images and video [0, 1], audio [-1, 1])
to one code grid per level, top level first: ``encode_levels(x) -> [LongTensor (B, *grid)]`` and
``decode_levels(codes) -> x``. Level k's grid is S divided by the product of the factors of the levels at and
below it (``level_factors``, bottom first), so shapes, checks and downsampling are the same code for every
tokenizer. A residual quantizer's codes (kind rvq) add a last axis of stages: (B, *grid, stages), ``code_depth``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from data.modalities import DEFAULT_SAMPLE_RATE, MODALITY_DIMS, check_modality, clamp_to_range
from harness.folders import PretrainedMixin
from stage1_tokenizer.modules import NORMS, conv_factors
from stage1_tokenizer.quantizer import QuantizerConfig


@dataclass
class TokenizerConfig:
    """The fields every tokenizer config has. ``level_factors`` (bottom level first) comes from the subclass."""

    modality: str = "image"  # image | audio | video: fixes the input rank and value range
    in_channels: int = 3
    channels: tuple[int, ...] = (64, 128)  # width before/after each downsampling stage (of the bottom encoder)
    num_res_blocks: int = 2
    patch: tuple[int, ...] | None = None  # first downsampling by folding patches into channels (divides factors)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    recon_loss: str = "mse"  # mse | l1
    # group: GroupNorm before every activation of the residual blocks and output convs; none: no normalisation (as
    # the VQ-VAE-2 paper's nets). The small image preset trains faster and better without (BENCHMARKS.md §13).
    norm: str = "group"
    sample_rate: int = 0  # audio only; 0 = DEFAULT_SAMPLE_RATE

    @property
    def level_factors(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def __post_init__(self):
        check_modality(self.modality)
        dims = MODALITY_DIMS[self.modality]
        if any(len(f) != dims for f in self.level_factors):
            raise ValueError(f"{self.modality} needs {dims} factors per level, got {self.level_factors}")
        if self.patch is not None:
            self.patch = tuple(self.patch)
            conv_factors(self.level_factors[0], self.patch)  # clear error for a patch that does not divide
        if self.recon_loss not in ("mse", "l1"):
            raise ValueError(f"recon_loss must be 'mse' or 'l1', got {self.recon_loss!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")


class Tokenizer(PretrainedMixin, nn.Module):
    """Base of every tokenizer: subclasses build the nets and implement ``encode_levels``/``decode_levels``
    and ``codebook_sizes``."""

    config: TokenizerConfig

    # ---- what the data is -------------------------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.config.modality

    @property
    def dims(self) -> int:
        return MODALITY_DIMS[self.config.modality]

    @property
    def sample_rate(self) -> int:
        """Audio samples per second (0 in the config means DEFAULT_SAMPLE_RATE)."""
        return int(self.config.sample_rate) or DEFAULT_SAMPLE_RATE

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Data range -> the nets' [-1, 1]."""
        return x if self.modality == "audio" else x * 2 - 1

    def from_model(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.modality == "audio" else (y + 1) / 2

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return clamp_to_range(x, self.modality)

    def recon_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss_fn = F.mse_loss if self.config.recon_loss == "mse" else F.l1_loss
        return loss_fn(recon.float(), x.float())

    # ---- shapes ------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.config.level_factors)

    @property
    def codebook_sizes(self) -> list[int]:
        """Per level, top first."""
        raise NotImplementedError

    @property
    def downsampling(self) -> tuple[int, ...]:
        """Per axis, input size / top-level grid size."""
        return tuple(math.prod(f) for f in zip(*self.config.level_factors))

    def code_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Input (C, *S) without batch -> code grid shapes, top level first."""
        self.check_input_shape(tuple(input_shape))
        shapes, size = [], tuple(input_shape[1:])
        for f in self.config.level_factors:
            size = tuple(s // k for s, k in zip(size, f))
            shapes.append(size)
        return shapes[::-1]

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        c, spatial = shape[0], shape[1:]
        if len(spatial) != self.dims or c != self.config.in_channels:
            raise ValueError(f"this {self.modality} tokenizer takes (B, {self.config.in_channels}, "
                             f"{', '.join('*' * self.dims)}) inputs with {self.dims} spatial dims, got (B, {shape})")
        if any(s % f for s, f in zip(spatial, self.downsampling)):
            raise ValueError(f"input size {spatial} must be divisible by the downsampling {self.downsampling}")

    def check_batch(self, x: torch.Tensor) -> None:
        if x.dim() != self.dims + 2:
            raise ValueError(f"expected a batch (B, C, {', '.join('*' * self.dims)}), got shape {tuple(x.shape)}")
        self.check_input_shape(tuple(x.shape[1:]))

    @property
    def code_depth(self) -> int:
        """Stages of a residual quantizer (kind rvq), whose codes carry them as a last axis: (B, *grid, stages);
        0 for one code per position (B, *grid). ``code_shapes`` gives the grids either way."""
        q = self.config.quantizer
        return q.num_stages if q.kind == "rvq" else 0

    def code_tensor_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Input (C, *S) without batch -> the shape of one item's codes per level, top first: the grid, with the
        stages last for a residual quantizer, (*grid, code_depth). What export, priors and the coder hold."""
        depth = self.code_depth
        return [(*grid, depth) if depth else grid for grid in self.code_shapes(input_shape)]

    def check_codes(self, codes: list[torch.Tensor]) -> None:
        if len(codes) != self.num_levels:
            grids = f"{self.num_levels} code grids" if self.num_levels > 1 else "1 code grid"
            raise ValueError(f"expected {grids} (one per level, top first), got {len(codes)}")
        grid, depth = ", ".join("*" * self.dims), self.code_depth
        for c in codes:
            if depth == 0 and c.dim() != self.dims + 1:
                raise ValueError(f"expected codes (B, {grid}), got shape {tuple(c.shape)}")
            if depth and (c.dim() != self.dims + 2 or not 1 <= c.shape[-1] <= depth):
                raise ValueError(f"expected residual codes (B, {grid}, stages) with 1..{depth} stages, "
                                 f"got shape {tuple(c.shape)}")

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the decoder's last convolution: where the adversarial weight balances the gradients."""
        return self.decoder.last_layer

    # ---- the code contract -----------------------------------------------------------------------
    def encode_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, *S) -> one code grid (B, *grid) long per level, top first."""
        raise NotImplementedError

    def decode_levels(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """One code grid per level, top first -> x (B, C, *S), not clamped."""
        raise NotImplementedError

    @torch.no_grad()
    def decode_clamped(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """``decode_levels(codes)`` clamped to the data range: what is shown, written and measured."""
        return self.clamp(self.decode_levels(codes))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)), clamped to the data range."""
        return self.decode_clamped(self.encode_levels(x))
