"""WaveNet-style prior over 1-D code sequences (audio tokens): dilated causal convolutions, gated units,
residual and skip connections, with Fast WaveNet cached generation (Paine et al. 2016).

Position t's input is the code at t - 1 (a learned start vector at t = 0), embedded; then ``num_cycles``
cycles of ``layers_per_cycle`` layers with dilations 1, 2, 4, ..., each a causal conv (output t sees inputs
t - (k-1) d ... t) -> gate tanh * sigmoid (+ conditioning) -> 1x1 to residual | skip. The summed skips go
through ReLU -> 1x1 -> ReLU -> 1x1 to V logits. Conditioning in every gated layer: a class embedding and
upper-level codes (embedded, upsampled nearest to this length, through a non-causal conv of width 3).
Receptive field: 1 + (k - 1) * sum(dilations) positions.

Code stacks (``depth`` > 0, codes (B, T, depth)): the channels split into one group per stage
(:mod:`stage2_prior.stacks`). Position t's input stays the codes at t - 1 (all their stages side by side, group
k = stage k); the first layer also reads the stages of t itself through a 1x1 conv masked A (group k sees the
stages < k), the later layers' convs read their own position through a mask B on that tap, the 1x1 convs to
residual | skip and the head are masked B, and the head gives V logits per group. So stage k at t sees every stage
before t and the stages < k at t. A cached step computes one stage: the position again, with the stages drawn so
far (each queue's newest entry is replaced, not pushed).

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
from stage2_prior.causal_conv import (CausalConv1d, ConvQueue, StackCausalConv1d, conditioning_map, gate,
                                      linear_step, pointwise, upper_level_conditioning)
from stage2_prior.stacks import MaskedConv1d, check_divisible, code_embedding, group_ids


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
        if self.depth:
            check_divisible({"channels": self.channels, "skip_channels": self.skip_channels,
                             "head_channels": self.head_channels}, self.depth, "a WaveNet prior")

    @property
    def dilations(self) -> list[int]:
        return [2**i for i in range(self.layers_per_cycle)] * self.num_cycles

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * sum(self.dilations)


class ResidualLayer(nn.Module):
    def __init__(self, cfg: WaveNetPriorConfig, dilation: int, first: bool = False):
        super().__init__()
        c, depth = cfg.channels, cfg.depth
        # stacks: the first layer's input at t holds position t - 1 (all of it may be seen); later layers' hold t
        if depth and not first:
            self.conv = StackCausalConv1d(c, 2 * c, cfg.kernel_size, dilation, depth)
        else:
            self.conv = CausalConv1d(c, 2 * c, cfg.kernel_size, dilation)
        self.out = pointwise(nn.Conv1d, [c], [c, cfg.skip_channels], depth)  # gated -> residual | skip
        self.ctx = nn.Conv1d(c, 2 * c, 1) if cfg.conditional else None
        # stacks, first layer: the stages drawn at t (mask A: group k sees the stages < k)
        self.same = MaskedConv1d(group_ids([c], depth), group_ids([c, c], depth), "A") if depth and first else None

    def finish(self, x, pre, ctx, step: bool):
        """Shared by both paths: pre-activation (+ conditioning) -> (x + residual, skip)."""
        if ctx is not None:
            pre = pre + (linear_step(self.ctx, ctx) if step else self.ctx(ctx))
        out = linear_step(self.out, gate(pre)) if step else self.out(gate(pre))
        res, skip = out.split([x.shape[1], out.shape[1] - x.shape[1]], dim=1)
        return x + res, skip

    def forward(self, x, ctx, same=None):
        """x (B, C, T); ``same`` (B, C, T): stacks, first layer: the codes at each position itself, embedded."""
        pre = self.conv(x)
        if self.same is not None:
            pre = pre + self.same(same)
        return self.finish(x, pre, ctx, step=False)

    def step(self, x, queue: ConvQueue, ctx, same=None, replace: bool = False):
        """x (B, C) at the next position (``replace``: the same position again, for a stack's next stage)."""
        pre = self.conv.step(x, queue, replace)
        if self.same is not None:
            pre = pre + linear_step(self.same, same)
        return self.finish(x, pre, ctx, step=True)


@dataclass
class WaveNetState:
    queues: list[ConvQueue]  # per layer: its conv's past inputs
    ctx: torch.Tensor | None  # (B, C, T) conditioning (class + upper-level codes)
    batch: int
    pos: int = 0  # the next code (stacks: position pos // depth, stage pos % depth)
    x_in: torch.Tensor | None = None  # stacks: (B, C) the first layer's input at the current position
    current: torch.Tensor | None = None  # stacks: (B, C) the stages drawn at the current position, embedded


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
        self.tok_emb = code_embedding(config.vocab_size, c, config.depth, summed=False)  # stacks: group k = stage k
        self.start = nn.Parameter(torch.zeros(c))
        self.class_emb = class_embedding(config, c)
        self.cond_emb, self.cond_conv = upper_level_conditioning(config, c, nn.Conv1d)
        self.layers = nn.ModuleList(ResidualLayer(config, d, first=i == 0) for i, d in enumerate(config.dilations))
        self.head = nn.Sequential(nn.ReLU(), pointwise(nn.Conv1d, [config.skip_channels], [config.head_channels],
                                                       config.depth), nn.ReLU(), self._logits(config))

    @staticmethod
    def _logits(config: WaveNetPriorConfig) -> nn.Module:
        """The head's last 1x1 conv: V logits, or V per stage group (group k's features -> stage k's logits)."""
        if not config.depth:
            return nn.Conv1d(config.head_channels, config.vocab_size, 1)
        d, out = config.depth, torch.arange(config.depth).repeat_interleave(config.vocab_size)
        return MaskedConv1d(group_ids([config.head_channels], d), out, "B")

    def context(self, batch: int, class_labels=None, cond=None) -> torch.Tensor | None:
        """(B, C, T): class embedding + processed upper-level codes, or None when unconditional."""
        return conditioning_map(self, batch, class_labels, cond)

    def forward(self, codes: torch.Tensor, class_labels=None, cond=None) -> torch.Tensor:
        """codes (B, T) -> logits (B, T, V); position t sees codes < t only. Stacks: codes (B, T, depth) -> logits
        (B, T, depth, V), stage k also seeing the stages < k at t."""
        self.check_inputs(codes, class_labels, cond)
        b = codes.shape[0]
        ctx = self.context(b, class_labels, cond)
        x = torch.cat([self.start.expand(b, 1, -1), self.tok_emb(codes[:, :-1])], dim=1).transpose(1, 2)
        same = self.tok_emb(codes).transpose(1, 2) if self.config.depth else None
        skip = 0
        for layer in self.layers:
            x, s = layer(x, ctx, same)
            skip = skip + s
        logits = self.head(skip).transpose(1, 2)
        return logits.unflatten(-1, (self.config.depth, -1)) if self.config.depth else logits

    # ---- incremental (cached) computation -----------------------------------------------------
    def start_state(self, batch: int, class_labels=None, cond=None) -> WaveNetState:
        self.check_inputs(None, class_labels, cond, batch=batch)
        return WaveNetState([layer.conv.start_queue(batch) for layer in self.layers],
                            self.context(batch, class_labels, cond), batch)

    def step(self, state: WaveNetState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for code ``state.pos``; ``prev`` (B,) is the code before (None at 0). Stacks: codes in raster
        order of (position, stage), stages fastest."""
        t = state.pos
        if t >= self.num_tokens:
            raise IndexError(f"all {self.num_tokens} codes are done")
        if t > 0 and prev is None:
            raise ValueError(f"prev (the code at position {t - 1}) is required after position 0")
        if self.config.depth:
            return self._step_stacks(state, prev)
        x = self.start.expand(state.batch, -1) if t == 0 else self.tok_emb(prev)
        ctx = None if state.ctx is None else state.ctx[:, :, t]
        skip = 0
        for layer, queue in zip(self.layers, state.queues):
            x, s = layer.step(x, queue, ctx)
            skip = skip + s
        state.pos = t + 1
        return self._head_step(skip)

    def _head_step(self, skip: torch.Tensor) -> torch.Tensor:
        _, conv1, _, conv2 = self.head
        return linear_step(conv2, F.relu(linear_step(conv1, F.relu(skip))))

    def _step_stacks(self, state: WaveNetState, prev: torch.Tensor | None) -> torch.Tensor:
        depth, group = self.config.depth, self.config.channels // self.config.depth
        t, stage = divmod(state.pos, depth)
        if state.pos:  # prev: stage (stage - 1) of t, or the last stage of t - 1
            k = (stage - 1) % depth
            state.current[:, k * group : (k + 1) * group] = self.tok_emb.stage(prev, k)
        if stage == 0:  # a new position: its input is the one before, all stages (the start vector at 0)
            state.x_in = self.start.expand(state.batch, -1) if t == 0 else state.current
            state.current = self.start.new_zeros(state.batch, self.config.channels)
        ctx = None if state.ctx is None else state.ctx[:, :, t]
        x, skip = state.x_in, 0
        for layer, queue in zip(self.layers, state.queues):
            x, s = layer.step(x, queue, ctx, same=state.current, replace=stage > 0)
            skip = skip + s
        state.pos += 1
        return self._head_step(skip).unflatten(1, (depth, -1))[:, stage]
