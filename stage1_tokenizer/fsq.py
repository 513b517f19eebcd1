"""Finite scalar quantization (FSQ, Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Features (B, D, *S) are projected to d = len(levels) channels (when D != d), each channel i is bounded by a tanh
to L_i values and rounded with a straight-through gradient. The implicit codebook is the grid of all combinations,
prod(levels) codes: nothing is learned in it, so there is no codebook loss, no commitment loss and no collapse. A
position's code is the mixed-radix index of its digits (channel 0 least significant), one integer per position, so
FSQ codes keep the (B, *grid) contract of a VQ everywhere. ``lookup`` maps codes back to grid values in [-1, 1] and
projects them out to D channels.

Bounding, rounding and the index run in fp32 even under autocast: bf16 holds only 8 significant bits, so
tanh(.) * (L - 1) / 2 lands on the wrong side of a rounding boundary and an index above 256 is rounded to a
neighbour (codes 1001..1003 read as 1000 or 1004), which loses codes (vector-quantize-pytorch issue #114).

Written here rather than taken from vector-quantize-pytorch: FSQ is a few lines, and the library's version has
changed its bound and dtype handling several times (issues #114, #145, #200); ours shares the interface, the
usage statistics and the rank check of the other quantizers (quantizer.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stage1_tokenizer.quantizer import (CodeUsage, Quantizer, QuantizerConfig, QuantizerOutput, check_codes,
                                        code_counts, parameters_checksum, perplexity)

# The bound stays this fraction inside the outermost levels, so tanh never has to reach +-1 to hit them.
BOUND_EPS = 1e-3


class FiniteScalarQuantizer(Quantizer):
    """FSQ with ``config.levels`` (see the module docstring): ``encode`` (B, D, *S) -> (B, *S) long in
    [0, prod(levels)), ``lookup`` back to (B, D, *S), ``forward`` -> ``QuantizerOutput`` (zero losses)."""

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        if config.kind != "fsq":
            raise ValueError(f"FiniteScalarQuantizer needs a config of kind 'fsq', got {config.kind!r}")
        self.config = config
        d = len(config.levels)
        self.in_proj = nn.Linear(config.dim, d) if d != config.dim else None
        self.out_proj = nn.Linear(d, config.dim) if d != config.dim else None
        levels = torch.tensor(config.levels, dtype=torch.float32)
        # Derived from the config, so not saved: (d,) levels, half widths and mixed-radix place values.
        self.register_buffer("level_counts", levels, persistent=False)
        self.register_buffer("half_width", torch.floor(levels / 2), persistent=False)
        basis = [math.prod(config.levels[:i]) for i in range(d)]
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        self.usage = CodeUsage(config.codebook_size, config.decay)

    # ---- the grid ---------------------------------------------------------------------------------
    def _features(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) -> (N, d) fp32 features in the level space."""
        return self._projected(z)

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d) fp32 -> (N, d) in (-L/2, L/2) (odd L) or (-L/2, L/2 - 1) (even L): rounding gives L values.

        Even L is shifted by half a step so that its L values are symmetric about zero after rounding; the
        shift atanh(offset / half_l) keeps h = 0 at the centre of the bounded range."""
        half_l = (self.level_counts - 1) * (1 - BOUND_EPS) / 2
        offset = torch.where(self.level_counts % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(h + shift) * half_l - offset

    def _digits(self, rounded: torch.Tensor) -> torch.Tensor:
        """(N, d) rounded bound values -> (N, d) long digits in [0, L_i). Non-finite features give valid digits
        (the step that saw them is skipped by the trainer; an out-of-range index would crash the code count first)."""
        digits = torch.nan_to_num(rounded + self.half_width)
        return torch.minimum(digits.clamp(min=0), self.level_counts - 1).long()

    def _codes(self, digits: torch.Tensor) -> torch.Tensor:
        """(N, d) long digits -> (N,) long mixed-radix index, in integer arithmetic (exact for any size)."""
        return (digits * self.basis).sum(-1)

    def _project_out(self, q: torch.Tensor) -> torch.Tensor:
        """(N, d) grid values -> (N, D) fp32 features."""
        if self.out_proj is None:
            return q
        return F.linear(q, self.out_proj.weight.float(), self.out_proj.bias.float())

    @staticmethod
    def _to_grid(flat: torch.Tensor, z_shape: torch.Size) -> torch.Tensor:
        """(N, C) rows in the order of ``_features`` -> (B, C, *S)."""
        return flat.view(z_shape[0], *z_shape[2:], -1).movedim(-1, 1)

    # ---- the interface -----------------------------------------------------------------------------
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) features -> (B, *S) long codes."""
        with torch.autocast(z.device.type, enabled=False):
            codes = self._codes(self._digits(torch.round(self.bound(self._features(z)))))
        return codes.view(z.shape[0], *z.shape[2:])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *S) -> fp32 features (B, D, *S) as the decoder sees them."""
        check_codes(codes, self.codebook_size)
        digits = torch.div(codes.long()[..., None], self.basis, rounding_mode="floor") % self.level_counts.long()
        with torch.autocast(codes.device.type, enabled=False):
            q = self._project_out((digits - self.half_width) / self.half_width)
        return q.movedim(-1, 1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """(B, D, *S) -> ``QuantizerOutput``: z_q like z (straight-through rounding), codes (B, *S); training
        updates the code-usage histogram (summed over ranks)."""
        if z.dim() < 3:
            raise ValueError(f"expected features (B, D, *spatial), got shape {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            h = self._features(z)
            bounded = self.bound(h)
            rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through rounding
            codes = self._codes(self._digits(rounded.detach()))
            counts = code_counts(codes, self.codebook_size)
            if self.training:
                self.usage.update(counts, h.detach())
            q = self._project_out(rounded / self.half_width)
        zero = h.new_zeros(())
        return QuantizerOutput(z_q=self._to_grid(q, z.shape).to(z.dtype), codes=codes.view(z.shape[0], *z.shape[2:]),
                               codebook_loss=zero, commitment_loss=zero, perplexity=perplexity(counts.float()),
                               aux_loss=zero)

    def active_fraction(self) -> float:
        return self.usage.active_fraction()

    def checksum(self) -> torch.Tensor:
        return self.usage.checksum() + parameters_checksum(self, self.usage.counts.device)
