"""Causal convolutions with an incremental (one position at a time) mode, for the PixelCNN and WaveNet priors.

Each convolution has two ways to run with the same weights:

* ``forward``: the whole sequence / grid at once (training, likelihoods), causality by padding and
  shifting, never by masking weights, so outputs never depend on later inputs, not even by zero gradients.
* an incremental mode that keeps only the past inputs the kernel can still reach:

  - ``CausalConv1d`` (WaveNet): a per-layer queue of the last ``(k - 1) * dilation + 1`` inputs; one new
    sample costs one kernel application (k taps) per layer, whatever the receptive field
    (Fast WaveNet, Paine et al. 2016).
  - ``VerticalConv`` (PixelCNN vertical stack): the last ``kh`` rows of its input; ``row`` computes a whole
    output row from them (O(W) once per row, O(1) amortized per token).
  - ``HorizontalConv`` (PixelCNN horizontal stack): the current row of its input; ``at`` computes the single
    output position (i, j) from the ``kw`` inputs to its left (Ramachandran et al. 2017).

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
    """(B, C, *grid): a conv prior's class embedding + processed upper-level codes, or None when unconditional.

    Needs ``prior.config``, ``prior.class_emb``/``embed_class`` and ``prior.cond_emb``/``cond_conv``."""
    cfg = prior.config
    if not cfg.conditional:
        return None
    grid = tuple(cfg.grid_shape)
    ctx = prior.tok_emb.weight.new_zeros(batch, cfg.channels, *grid)
    if prior.class_emb is not None:
        ctx = ctx + prior.embed_class(class_labels).view(batch, -1, *([1] * len(grid)))
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


def linear_step(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 (or any k taps flattened into ``x``) convolution applied to one position: (B, Cin*k) -> (B, Cout).
    A group-masked layer (code stacks) computes with its masked weight, as its forward does."""
    weight = conv.masked_weight if isinstance(conv, GroupMasked) else conv.weight
    return F.linear(x, weight.reshape(weight.shape[0], -1), conv.bias)


def pointwise(conv: type[nn.Module], in_widths: list[int], out_widths: list[int], depth: int) -> nn.Module:
    """A 1x1 convolution from channels laid out as the segments ``in_widths`` to ``out_widths`` (e.g. the halves
    of a gate): plain without stacks; for stacks masked B by stage groups (each segment split into ``depth``)."""
    if not depth:
        return conv(sum(in_widths), sum(out_widths), 1)
    masked = MaskedConv1d if conv is nn.Conv1d else MaskedConv2d
    return masked(group_ids(in_widths, depth), group_ids(out_widths, depth), "B")


# ---- 1-D --------------------------------------------------------------------------------------
class ConvQueue:
    """The past inputs one ``CausalConv1d`` can still reach, as a ring buffer stored twice over
    (slot p and p + size) so that the k taps are always one strided slice, never a gather."""

    def __init__(self, batch: int, channels: int, size: int, like: torch.Tensor):
        self.size, self.t = size, 0
        self.buf = like.new_zeros(batch, channels, 2 * size)  # zeros = the left padding

    def push(self, x: torch.Tensor) -> None:
        p = self.t % self.size
        self.buf[:, :, p] = x
        self.buf[:, :, p + self.size] = x
        self.t += 1

    def replace(self, x: torch.Tensor) -> None:
        """Overwrite the newest input (the same position again: the next stage of a code stack)."""
        p = (self.t - 1) % self.size
        self.buf[:, :, p] = x
        self.buf[:, :, p + self.size] = x

    def window(self, dilation: int) -> torch.Tensor:
        """(B, C, k): inputs at t - (k-1) d, ..., t - d, t for the input t just pushed."""
        p = (self.t - 1) % self.size
        return self.buf[:, :, p + 1 : p + self.size + 1 : dilation]


class CausalConv1d(nn.Conv1d):
    """Dilated convolution whose output t sees inputs t - (k-1) d ... t (left padding)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)

    @property
    def context(self) -> int:
        return (self.kernel_size[0] - 1) * self.dilation[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.context, 0)))

    def start_queue(self, batch: int) -> ConvQueue:
        return ConvQueue(batch, self.in_channels, self.context + 1, self.weight)

    def step(self, x: torch.Tensor, queue: ConvQueue, replace: bool = False) -> torch.Tensor:
        """x (B, Cin) is the input at the next position (``replace``: again at the newest one); returns the output
        there, (B, Cout)."""
        if replace:
            queue.replace(x)
        else:
            queue.push(x)
        return linear_step(self, queue.window(self.dilation[0]).reshape(x.shape[0], -1))


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

    def start_row(self, batch: int, width: int) -> torch.Tensor:
        """Cache of the current input row, with kw zero columns on the left."""
        return self.weight.new_zeros(batch, self.in_channels, width + self.width)

    def write(self, row: torch.Tensor, j: int, x: torch.Tensor) -> None:
        """Store the input at column j, x (B, Cin)."""
        row[:, :, self.width + j] = x

    def at(self, row: torch.Tensor, j: int) -> torch.Tensor:
        """Output at column j, (B, Cout), from the cached inputs to its left."""
        start = j + (0 if self.mask == "A" else 1)
        return linear_step(self, row[:, :, start : start + self.width].reshape(row.shape[0], -1))


class StackHorizontalConv(GroupMasked, HorizontalConv):
    """``HorizontalConv`` over a code stack's channel groups, into the two halves of a gate: output (i, j) sees inputs (i, j - kw + 1 ... j), the
    ones before j in full and the one at j through the group mask, A (the first layer: group k sees the groups
    < k, the stages drawn before k) or B (later layers: <= k). Cached like mask B (``at`` reads column j)."""

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
