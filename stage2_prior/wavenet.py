"""WaveNet-style prior over 1-D code sequences (audio tokens): dilated causal convolutions, gated units,
residual and skip connections, with Fast WaveNet cached generation (Paine et al. 2016).

Position t's input is the code at t - 1 (a learned start vector at t = 0), embedded; then ``num_cycles``
cycles of ``layers_per_cycle`` layers with dilations 1, 2, 4, ..., each a causal conv (output t sees inputs
t - (k-1) d ... t) -> gate tanh * sigmoid (+ conditioning) -> 1x1 to residual | skip. The summed skips go
through ReLU -> 1x1 -> ReLU -> 1x1 to V logits. Conditioning in every gated layer: a class embedding and
upper-level codes (embedded, upsampled nearest to this length, through a non-causal conv of width 3).
Receptive field: 1 + (k - 1) * sum(dilations) positions.

Cached generation keeps one queue per layer with the last (k - 1) d + 1 inputs of its conv, so a token costs
L * (k * C * 2C + C * (C + S)) multiply-adds (+ head, + L * C * 2C with conditioning) whatever the receptive
field; a full forward costs that for every position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.folders import PretrainedMixin
from stage2_prior.base import PriorConfig, PriorMixin, class_embedding
from stage2_prior.causal_conv import (CausalConv1d, ConvQueue, conditioning_map, gate, linear_step,
                                      upper_level_conditioning)


@dataclass
class WaveNetPriorConfig(PriorConfig):
    grid_shape: tuple[int, ...] = (1024,)  # (T,): 1-D sequences only; cond_grid_shape too
    channels: int = 64  # residual channels
    skip_channels: int = 128
    head_channels: int = 256
    kernel_size: int = 2
    layers_per_cycle: int = 10  # dilations 1, 2, ..., 2 ** (layers_per_cycle - 1)
    num_cycles: int = 3

    def __post_init__(self):
        super().__post_init__()
        if len(self.grid_shape) != 1:
            raise ValueError(f"the WaveNet prior models 1-D code sequences (T,), got grid_shape {self.grid_shape}: "
                             "use the pixelcnn prior for 2-D grids or the transformer for any rank")
        if self.cond_vocab_size and (self.cond_grid_shape is None or len(self.cond_grid_shape) != 1):
            raise ValueError(f"cond_grid_shape must be 1-D for a WaveNet prior, got {self.cond_grid_shape}")
        if self.kernel_size < 2:
            raise ValueError(f"kernel_size must be >= 2, got {self.kernel_size}")

    @property
    def dilations(self) -> list[int]:
        return [2**i for i in range(self.layers_per_cycle)] * self.num_cycles

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * sum(self.dilations)


class ResidualLayer(nn.Module):
    def __init__(self, cfg: WaveNetPriorConfig, dilation: int):
        super().__init__()
        c = cfg.channels
        self.conv = CausalConv1d(c, 2 * c, cfg.kernel_size, dilation)
        self.out = nn.Conv1d(c, c + cfg.skip_channels, 1)  # gated -> residual | skip
        self.ctx = nn.Conv1d(c, 2 * c, 1) if cfg.conditional else None

    def finish(self, x, pre, ctx, step: bool):
        """Shared by both paths: pre-activation (+ conditioning) -> (x + residual, skip)."""
        if ctx is not None:
            pre = pre + (linear_step(self.ctx, ctx) if step else self.ctx(ctx))
        out = linear_step(self.out, gate(pre)) if step else self.out(gate(pre))
        res, skip = out.split([x.shape[1], out.shape[1] - x.shape[1]], dim=1)
        return x + res, skip

    def forward(self, x, ctx):
        return self.finish(x, self.conv(x), ctx, step=False)

    def step(self, x, queue: ConvQueue, ctx):
        return self.finish(x, self.conv.step(x, queue), ctx, step=True)


@dataclass
class WaveNetState:
    queues: list[ConvQueue]  # per layer: its conv's past inputs
    ctx: torch.Tensor | None  # (B, C, T) conditioning (class + upper-level codes)
    batch: int
    pos: int = 0


class WaveNetPrior(PriorMixin, PretrainedMixin, nn.Module):
    """WaveNet-style prior over 1-D code sequences (see the module docstring)."""

    config_class = WaveNetPriorConfig
    model_type = "wavenet"
    legacy_model_types = ("wavenet_prior",)
    shape_agnostic = True  # no parameter depends on the grid size: train on crops, sample bigger

    def __init__(self, config: WaveNetPriorConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.tok_emb = nn.Embedding(config.vocab_size, c)
        self.start = nn.Parameter(torch.zeros(c))
        self.class_emb = class_embedding(config, c)
        self.cond_emb, self.cond_conv = upper_level_conditioning(config, c, nn.Conv1d)
        self.layers = nn.ModuleList(ResidualLayer(config, d) for d in config.dilations)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(config.skip_channels, config.head_channels, 1), nn.ReLU(),
                                  nn.Conv1d(config.head_channels, config.vocab_size, 1))

    def context(self, batch: int, class_labels=None, cond=None) -> torch.Tensor | None:
        """(B, C, T): class embedding + processed upper-level codes, or None when unconditional."""
        return conditioning_map(self, batch, class_labels, cond)

    def forward(self, codes: torch.Tensor, class_labels=None, cond=None) -> torch.Tensor:
        """codes (B, T) -> logits (B, T, V); position t sees codes < t only."""
        self.check_inputs(codes, class_labels, cond)
        b = codes.shape[0]
        ctx = self.context(b, class_labels, cond)
        x = torch.cat([self.start.expand(b, 1, -1), self.tok_emb(codes[:, :-1])], dim=1).transpose(1, 2)
        skip = 0
        for layer in self.layers:
            x, s = layer(x, ctx)
            skip = skip + s
        return self.head(skip).transpose(1, 2)

    # ---- incremental (cached) computation -----------------------------------------------------
    def start_state(self, batch: int, class_labels=None, cond=None) -> WaveNetState:
        self.check_inputs(None, class_labels, cond, batch=batch)
        return WaveNetState([layer.conv.start_queue(batch) for layer in self.layers],
                            self.context(batch, class_labels, cond), batch)

    def step(self, state: WaveNetState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for position ``state.pos``; ``prev`` (B,) is the code at pos - 1 (None at 0)."""
        t = state.pos
        if t >= self.num_tokens:
            raise IndexError(f"all {self.num_tokens} positions are done")
        if t == 0:
            x = self.start.expand(state.batch, -1)
        elif prev is None:
            raise ValueError(f"prev (the code at position {t - 1}) is required after position 0")
        else:
            x = self.tok_emb(prev)
        ctx = None if state.ctx is None else state.ctx[:, :, t]
        skip = 0
        for layer, queue in zip(self.layers, state.queues):
            x, s = layer.step(x, queue, ctx)
            skip = skip + s
        state.pos = t + 1
        _, conv1, _, conv2 = self.head
        return linear_step(conv2, F.relu(linear_step(conv1, F.relu(skip))))
