"""Causal convolutions for the PixelCNN and WaveNet priors, and what their cached steps share.

Each convolution runs the whole sequence / grid at once (training, likelihoods), causality by padding and shifting,
never by masking weights, so outputs never depend on later inputs, not even by zero gradients. The cached steps
(one position at a time) use the same weights, laid out by the priors themselves (``wavenet.LayerSteps``,
``pixelcnn.ColumnSteps``); the vertical conv keeps its own row cache:

* ``CausalConv1d`` (WaveNet): output t sees inputs t - (k-1) d ... t;
* ``VerticalConv`` (PixelCNN vertical stack): the last ``kh`` rows of its input; ``row`` computes a whole
  output row from them (O(W) once per row, O(1) amortized per token);
* ``HorizontalConv`` (PixelCNN horizontal stack): output (i, j) sees the ``kw`` inputs to its left (mask A) or up
  to itself (mask B) on its row (Ramachandran et al. 2017).

Code stacks (:mod:`stage2_prior.stacks`) add the stage order inside a position: ``StackCausalConv1d`` and
``StackHorizontalConv`` also take the input at the output's own position, through a channel-group mask (A or B)
on that tap alone; their earlier taps, like every tap above, see all channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stage2_prior.stacks import GroupMasked, MaskedConv1d, MaskedConv2d, code_embedding, group_ids, group_mask


def upper_level_conditioning(config, channels: int, conv: type[nn.Module]):
    """(embedding, conv) of a conv prior's upper-level codes, or (None, None) when it has no level above. The conv
    (width 3) is not causal: the upper level is fully known before this level is sampled."""
    if not config.cond_vocab_size:
        return None, None
    embedding = code_embedding(config.cond_vocab_size, channels, config.cond_depth)  # stacks: summed over stages
    return embedding, conv(channels, channels, 3, padding=1)


def conditioning_map(prior, batch: int, class_labels=None, cond=None) -> torch.Tensor | None:
    """A conv prior's class embedding + processed upper-level codes: (B, C, *grid), or (B, C, 1, ...) when only a
    class conditions it (the same at every position: the layers' 1x1 conditioning convs then run once per sample,
    not once per position, and broadcast), or None when unconditional.

    Needs ``prior.config``, ``prior.class_emb``/``embed_class`` and ``prior.cond_emb``/``cond_conv``."""
    cfg = prior.config
    if not cfg.conditional:
        return None
    grid = tuple(cfg.grid_shape)
    ones = (1,) * len(grid)
    ctx = prior.tok_emb.weight.new_zeros(batch, cfg.channels, *ones)
    if prior.class_emb is not None:
        ctx = ctx + prior.embed_class(class_labels).view(batch, -1, *ones)
    if prior.cond_emb is not None:
        up = F.interpolate(prior.cond_emb(cond).movedim(-1, 1), size=grid, mode="nearest")
        ctx = ctx + prior.cond_conv(up)
    return ctx


def gate(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gated activation unit: tanh(a) * sigmoid(b), with a and b the two halves of ``x`` along ``dim``."""
    a, b = x.chunk(2, dim)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> the same moved down by one row (row 0 zeros): row i then holds row i - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def step_matrix(conv: nn.Module, tap: int | None = None) -> torch.Tensor:
    """A conv's weight (its mask applied) laid out for ``x @ W`` on the few rows of a cached step: one tap,
    (in, out), or (``tap`` None) all its taps side by side, oldest first, (k * in, out). Any 1-D conv, or a 2-D one
    of one row (1 x k, 1x1)."""
    weight = (conv.masked_weight if isinstance(conv, GroupMasked) else conv.weight).flatten(2)  # (out, in, k)
    if tap is not None:
        return weight[:, :, tap].t().contiguous()
    return weight.permute(2, 1, 0).flatten(0, 1).contiguous()


def head_step_weights(head: nn.Sequential) -> tuple[torch.Tensor, ...]:
    """(W1, b1, W2, b2) of a conv prior's head ReLU -> 1x1 -> ReLU -> 1x1, as ``step_matrix`` lays them out."""
    _, conv1, _, conv2 = head
    return step_matrix(conv1), conv1.bias, step_matrix(conv2), conv2.bias


def head_step(weights: tuple[torch.Tensor, ...], skip: torch.Tensor) -> torch.Tensor:
    """The head at one position: summed skips (B, S), overwritten by their ReLU, -> logits (B, V)."""
    w1, b1, w2, b2 = weights
    return torch.addmm(b2, torch.addmm(b1, skip.relu_(), w1).relu_(), w2)


def pointwise(conv: type[nn.Module], in_widths: list[int], out_widths: list[int], depth: int) -> nn.Module:
    """A 1x1 convolution from channels laid out as the segments ``in_widths`` to ``out_widths`` (e.g. the halves
    of a gate): plain without stacks; for stacks masked B by stage groups (each segment split into ``depth``)."""
    if not depth:
        return conv(sum(in_widths), sum(out_widths), 1)
    masked = MaskedConv1d if conv is nn.Conv1d else MaskedConv2d
    return masked(group_ids(in_widths, depth), group_ids(out_widths, depth), "B")


# ---- 1-D --------------------------------------------------------------------------------------
class CausalConv1d(nn.Conv1d):
    """Dilated convolution whose output t sees inputs t - (k-1) d ... t (left padding)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)

    @property
    def context(self) -> int:
        return (self.kernel_size[0] - 1) * self.dilation[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.context, 0)))


def gate_mask(in_channels: int, out_channels: int, depth: int, mask: str) -> torch.Tensor:
    """(out, in) group mask of a conv whose outputs are the two halves of a gate (each split into stage groups)."""
    out_ids = group_ids([out_channels // 2, out_channels // 2], depth)
    return group_mask(out_ids, group_ids([in_channels], depth), mask)


class StackCausalConv1d(GroupMasked, CausalConv1d):
    """``CausalConv1d`` over a code stack's channel groups, into the two halves of a gate: the taps before t see
    every channel, the tap at t only the groups mask B allows (output group k sees input groups <= k)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, depth: int):
        super().__init__(in_channels, out_channels, kernel_size, dilation)
        mask = torch.ones_like(self.weight)
        mask[:, :, -1] = gate_mask(in_channels, out_channels, depth, "B")
        self.set_mask(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, (self.context, 0)), self.masked_weight, self.bias)


# ---- 2-D --------------------------------------------------------------------------------------
class VerticalConv(nn.Conv2d):
    """(kh, k) kernel, kh = k // 2 + 1: output row i sees input rows i - kh + 1 ... i, columns j ± k // 2.

    The PixelCNN feeds it inputs already shifted down a row, so row i of every vertical layer depends only on
    rows < i of the image.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, (kernel_size // 2 + 1, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, k = self.kernel_size
        return super().forward(F.pad(x, (k // 2, k // 2, kh - 1, 0)))

    def start_rows(self, batch: int, width: int) -> torch.Tensor:
        """Cache of the last kh input rows (zeros = rows above the grid), padded left and right."""
        kh, k = self.kernel_size
        return self.weight.new_zeros(batch, self.in_channels, kh, width + 2 * (k // 2))

    def push_row(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Append input row x (B, Cin, W), dropping the oldest."""
        p = self.kernel_size[1] // 2
        return torch.cat([rows[:, :, 1:], F.pad(x, (p, p))[:, :, None]], dim=2)

    def row(self, rows: torch.Tensor) -> torch.Tensor:
        """Output row (B, Cout, 1, W) for the newest input row in ``rows``."""
        return super().forward(rows)


class HorizontalConv(nn.Conv2d):
    """(1, kw) kernel, kw = k // 2 + 1, along the row: output (i, j) sees input (i, j - kw ... j - 1) with mask
    'A' (the first layer, whose input at (i, j) is the code being predicted) or (i, j - kw + 1 ... j) with
    mask 'B' (later layers, whose input at (i, j) already depends on earlier codes only)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask: str):
        if mask not in ("A", "B"):
            raise ValueError(f"mask must be 'A' or 'B', got {mask!r}")
        super().__init__(in_channels, out_channels, (1, kernel_size // 2 + 1))
        self.mask = mask

    @property
    def width(self) -> int:
        return self.kernel_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = self.width
        if self.mask == "A":
            return super().forward(F.pad(x, (kw, 0)))[..., :-1]
        return super().forward(F.pad(x, (kw - 1, 0)))


class StackHorizontalConv(GroupMasked, HorizontalConv):
    """``HorizontalConv`` over a code stack's channel groups, into the two halves of a gate: output (i, j) sees
    inputs (i, j - kw + 1 ... j), the ones before j in full and the one at j through the group mask, A (the first
    layer: group k sees the groups < k, the stages drawn before k) or B (later layers: <= k). Its ``mask`` is "B"
    (the taps it reads); ``stage_mask_kind`` is the group mask's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask: str, depth: int):
        super().__init__(in_channels, out_channels, kernel_size, "B")  # the taps of mask B, then the group mask
        self.stage_mask_kind = mask
        taps = torch.ones_like(self.weight)
        taps[:, :, 0, -1] = gate_mask(in_channels, out_channels, depth, mask)
        self.set_mask(taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, (self.width - 1, 0)), self.masked_weight, self.bias)


def horizontal_conv(in_channels: int, out_channels: int, kernel_size: int, mask: str, depth: int) -> HorizontalConv:
    """The horizontal conv of a PixelCNN layer: ``HorizontalConv`` without stacks, ``StackHorizontalConv`` with."""
    if not depth:
        return HorizontalConv(in_channels, out_channels, kernel_size, mask)
    return StackHorizontalConv(in_channels, out_channels, kernel_size, mask, depth)
