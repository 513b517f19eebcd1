"""Code stacks: what the priors share to model codes with a depth axis of stages, (B, *grid, depth), as a residual
quantizer (kind rvq) makes them.

Order. A prior over stacks models the stages of a position one after the other, after every code of every earlier
position: raster order over (position, stage), the stage fastest, which is ``codes.flatten(1)``. Sampling,
likelihoods and arithmetic coding then step through ``prod(grid) * depth`` codes exactly as through any grid
(``PriorMixin.num_tokens`` counts them), and ``step`` gives the logits of one stage of one position at a time.

The convolutional priors keep that order the way PixelCNN keeps R, G and B inside a pixel (van den Oord et al.
2016, "Pixel Recurrent Neural Networks", mask B): their channels are split into ``depth`` equal groups, group k
computes stage k's logits, and where a layer mixes channels at one position, output group k sees the input groups
< k (mask A: the first layer, whose input there holds the codes themselves) or <= k (mask B: later layers, whose
features there already depend on earlier stages only). Codes at earlier positions are seen in full. The masks are
fixed 0/1 buffers multiplied into the weights (not saved: the state dict is the unmasked layers'), so a masked
weight gets a zero gradient and never moves the output.

The transformer models the stages with a small depth transformer on top of the spatial one (RQ-Transformer); see
``stage2_prior/transformer.py`` for the choice and its measurement.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MASKS = ("A", "B")


def code_shape(grid_shape: Sequence[int], depth: int) -> tuple[int, ...]:
    """One sample's codes: the grid, plus the stages last for a stack (depth > 0)."""
    return (*grid_shape, depth) if depth else tuple(grid_shape)


def check_divisible(what: dict[str, int], depth: int, who: str) -> None:
    """Clear error unless every width in ``what`` splits into ``depth`` channel groups."""
    for name, value in what.items():
        if value % depth:
            raise ValueError(f"{who} over code stacks of depth {depth} splits its {name} ({value}) into one group "
                             f"per stage: make it a multiple of {depth}")


def group_ids(widths: Sequence[int], depth: int) -> torch.Tensor:
    """(sum(widths),) long: the stage group of every channel of a layer whose channels are the concatenated
    segments ``widths`` (e.g. the two halves a gate splits), each split into ``depth`` equal groups."""
    return torch.cat([torch.arange(depth).repeat_interleave(w // depth) for w in widths])


def group_mask(out_ids: torch.Tensor, in_ids: torch.Tensor, mask: str) -> torch.Tensor:
    """(out, in) float 0/1: output channel o may see input channel i when its group is later (mask A) or not
    earlier (mask B)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be 'A' or 'B', got {mask!r}")
    allowed = out_ids[:, None] > in_ids[None] if mask == "A" else out_ids[:, None] >= in_ids[None]
    return allowed.float()


class GroupMasked:
    """A layer whose weight is used times a fixed group mask (``stage_mask``, the shape of ``weight``): every path
    that computes with it, the full forward and a cached step, takes ``masked_weight``."""

    weight: nn.Parameter
    stage_mask: torch.Tensor

    def set_mask(self, mask: torch.Tensor) -> None:
        """mask (out, in), or already the weight's shape."""
        shape = self.weight.shape
        if mask.dim() < len(shape):  # (out, in) for a 1x1 conv's (out, in, 1[, 1])
            mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.dim()))
        mask = mask.expand(shape)
        self.register_buffer("stage_mask", mask.contiguous(), persistent=False)

    @property
    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.stage_mask.to(self.weight.dtype)


class MaskedConv1d(GroupMasked, nn.Conv1d):
    """A 1x1 ``nn.Conv1d`` masked by channel groups: (B, Cin, T) -> (B, Cout, T)."""

    def __init__(self, in_ids: torch.Tensor, out_ids: torch.Tensor, mask: str):
        super().__init__(len(in_ids), len(out_ids), 1)
        self.set_mask(group_mask(out_ids, in_ids, mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight, self.bias)


class MaskedConv2d(GroupMasked, nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` masked by channel groups: (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_ids: torch.Tensor, out_ids: torch.Tensor, mask: str):
        super().__init__(len(in_ids), len(out_ids), 1)
        self.set_mask(group_mask(out_ids, in_ids, mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight, self.bias)


class MaskedLinear(GroupMasked, nn.Linear):
    """``nn.Linear`` masked by channel groups: (..., in) -> (..., out)."""

    def __init__(self, in_ids: torch.Tensor, out_ids: torch.Tensor, mask: str):
        super().__init__(len(in_ids), len(out_ids))
        self.set_mask(group_mask(out_ids, in_ids, mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight, self.bias)


class GroupLayerNorm(nn.Module):
    """LayerNorm over each channel group on its own: (..., C) -> (..., C). One LayerNorm over all channels would
    mix the statistics of later stages' groups into earlier ones'."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        self.depth = depth
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.unflatten(-1, (self.depth, -1))
        return F.layer_norm(groups, groups.shape[-1:]).flatten(-2) * self.weight + self.bias


class StageEmbedding(nn.Module):
    """One embedding table per stage, kept as one (depth * vocab, dim) table: codes (..., depth) ->
    (..., depth, dim). Stage k of a residual quantizer has its own codebook, so code 3 means something else in
    every stage."""

    def __init__(self, vocab_size: int, dim: int, depth: int):
        super().__init__()
        self.vocab_size, self.depth = vocab_size, depth
        self.table = nn.Embedding(depth * vocab_size, dim)
        self.register_buffer("offsets", torch.arange(depth) * vocab_size, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table(codes + self.offsets)

    def stage(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """Stage k's codes (B,) -> (B, dim)."""
        return self.table(codes + k * self.vocab_size)


class SummedStageEmbedding(StageEmbedding):
    """Codes (..., depth) -> (..., dim): the sum of the stages' embeddings (an upper level's stacks, which a prior
    is conditioned on whole; like the residual quantizer, whose decoder sees the sum of its stages)."""

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return super().forward(codes).sum(-2)


def code_embedding(vocab_size: int, dim: int, depth: int, summed: bool = True) -> nn.Module:
    """Embedding of codes (..., ) for depth 0 (``nn.Embedding``, as every prior has without stacks) or of stacks
    (..., depth): summed over the stages to (..., dim), or (``summed=False``) concatenated into ``depth`` groups of
    dim / depth channels, group k = stage k, (..., dim)."""
    if not depth:
        return nn.Embedding(vocab_size, dim)
    if summed:
        return SummedStageEmbedding(vocab_size, dim, depth)
    return GroupedStageEmbedding(vocab_size, dim // depth, depth)


class GroupedStageEmbedding(StageEmbedding):
    """Codes (..., depth) -> (..., depth * dim): the stages' embeddings side by side, group k = stage k (the
    channel groups of the convolutional priors)."""

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return super().forward(codes).flatten(-2)
