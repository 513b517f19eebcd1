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
far; a position's features are passed on to later positions at its last stage.

Cached generation (Fast WaveNet) keeps, per layer, the sums that the next (k - 1) d positions' pre-activations
have already received from earlier inputs (``LayerSteps``): each input is multiplied by all k taps once, when it
is computed. A token costs L * (k * C * 2C + C * (C + S)) multiply-adds (+ head, + L * C * 2C with conditioning
from upper-level codes) whatever the receptive field, in about six kernels per layer; a full forward costs that
for every position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.folders import PretrainedMixin
from stage2_prior.base import PriorConfig, PriorMixin, class_embedding
from stage2_prior.causal_conv import (CausalConv1d, StackCausalConv1d, conditioning_map, gate, head_step,
                                      head_step_weights, pointwise, step_matrix, upper_level_conditioning)
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

    def forward(self, x, ctx, same=None):
        """x (B, C, T) -> (x + residual, skip); ``same`` (B, C, T): stacks, first layer: the codes at each position
        itself, embedded."""
        pre = self.conv(x)
        if self.same is not None:
            pre = pre + self.same(same)
        if ctx is not None:
            pre = pre + self.ctx(ctx)
        res, skip = self.out(gate(pre)).split([x.shape[1], self.out.out_channels - x.shape[1]], dim=1)
        return x + res, skip


class LayerSteps:
    """One residual layer in a cached step: its weights as (in, out) matrices for the few-row GEMMs of one
    position (masks applied), and the sums its pre-activation receives ahead of time.

    When x(t), the layer's input at position t, is known, it is multiplied at once by every tap that will read
    it: the tap at t gives t's pre-activation, the tap at t - m d (m = 1 .. k-1) is added to the sum waiting for
    position t + m d. A step so reads no past inputs, only one waiting sum, and runs one GEMM per tap. ``slots``
    is a ring of (k - 1) d + 1 sums, slot p % size for position p.

    The residual biases are folded in: the running x is kept without them (x~ = x - c, c the sum of the residual
    biases of the layers below), and each tap's share of c is in the sums: ``fresh`` (bias, constant conditioning
    and W_now c: what a position has before any past tap arrives) and ``offsets`` (W_past c, which each past tap
    brings; the zero padding before the sequence brings none).
    """

    def __init__(self, layer: ResidualLayer, batch: int, ctx: torch.Tensor | None, offset: torch.Tensor):
        """ctx: (B, C) conditioning the same at every position, or None; ``offset`` (C,): c of this layer's input."""
        k, c = layer.conv.kernel_size[0], layer.conv.in_channels
        self.dilation, self.size = layer.conv.dilation[0], (k - 1) * layer.conv.dilation[0] + 1
        self.now = step_matrix(layer.conv, k - 1)
        self.past = [step_matrix(layer.conv, k - 1 - m) for m in range(1, k)]  # the taps at t - m d, m = 1 .. k-1
        self.offsets = [offset @ tap for tap in self.past]
        self.middle = list(zip(self.past[:-1], self.offsets[:-1]))  # k > 2: the taps between t and the furthest
        out = step_matrix(layer.out)
        self.res, self.skip = out[:, :c].contiguous(), out[:, c:].contiguous()
        self.res_bias, self.skip_bias = layer.out.bias[:c], layer.out.bias[c:]
        fresh = layer.conv.bias + offset @ self.now
        self.same = None if layer.same is None else step_matrix(layer.same)
        if layer.same is not None:
            fresh = fresh + layer.same.bias
        self.ctx = None  # (C, 2C): the conditioning's weight where it changes along the sequence
        if layer.ctx is not None:
            fresh = fresh + layer.ctx.bias
            if ctx is not None:
                fresh = fresh + ctx @ step_matrix(layer.ctx)
            else:
                self.ctx = step_matrix(layer.ctx)
        self.fresh = fresh.expand(batch, -1).contiguous()  # (B, 2C)
        self.far = self.fresh + self.offsets[-1]  # the furthest tap's sum starts from this
        self.slots = list(self.fresh.new_empty(self.size, *self.fresh.shape).unbind(0))
        self.pre = torch.empty_like(self.fresh)
        self.pre_tanh = self.pre[:, : self.pre.shape[1] // 2]

    def start(self, ctx_rows: torch.Tensor | None, length: int) -> None:
        """The sums of the first (k - 1) d positions, which no past tap reaches (the zero padding)."""
        for p in range(min(self.size - 1, length)):
            self.slots[p].copy_(self.fresh)
            if self.ctx is not None:
                self.slots[p].addmm_(ctx_rows[p], self.ctx)

    def pre_activation(self, x: torch.Tensor, t: int, same: torch.Tensor | None) -> torch.Tensor:
        """(B, 2C) at position t from x~(t) (B, C) and, stacks' first layer, the stages drawn at t (B, C)."""
        torch.addmm(self.slots[t % self.size], x, self.now, out=self.pre)
        if self.same is not None:
            self.pre.addmm_(same, self.same)
        return self.pre

    def send(self, x: torch.Tensor, t: int, ctx_rows: torch.Tensor | None) -> None:
        """x~(t) (B, C) into the sums of positions t + d, ..., t + (k - 1) d; the furthest one's sum starts here."""
        for m, (tap, offset) in enumerate(self.middle, start=1):
            self.slots[(t + m * self.dilation) % self.size].addmm_(x, tap).add_(offset)
        far = t + (self.size - 1)
        slot = torch.addmm(self.far, x, self.past[-1], out=self.slots[far % self.size])
        if self.ctx is not None and far < len(ctx_rows):
            slot.addmm_(ctx_rows[far], self.ctx)


@dataclass
class WaveNetState:
    layers: list[LayerSteps]  # per layer: prepared weights and the sums waiting for later positions
    head: tuple[torch.Tensor, ...]  # (W1, b1, W2, b2) of the head's 1x1 convs, (in, out) matrices
    skip_bias: torch.Tensor  # (S,) the skip biases of all layers, summed
    ctx_rows: torch.Tensor | None  # (T, B, C) conditioning that changes along the sequence (upper-level codes)
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
        """(B, C, T): class embedding + processed upper-level codes; (B, C, 1) with a class only; None when
        unconditional."""
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
    @torch.no_grad()
    def start_state(self, batch: int, class_labels=None, cond=None) -> WaveNetState:
        self.check_inputs(None, class_labels, cond, batch=batch)
        ctx = self.context(batch, class_labels, cond)  # (B, C, T), (B, C, 1) or None
        varying = ctx is not None and self.cond_emb is not None  # upper-level codes change along the sequence
        ctx_rows = ctx.permute(2, 0, 1).contiguous() if varying else None
        constant = ctx[:, :, 0] if ctx is not None and not varying else None
        layers, offset = [], self.start.new_zeros(self.config.channels)
        for layer in self.layers:
            layers.append(LayerSteps(layer, batch, constant, offset))
            layers[-1].start(ctx_rows, self.config.grid_shape[0])
            offset = offset + layers[-1].res_bias
        return WaveNetState(layers, head_step_weights(self.head), sum(plan.skip_bias for plan in layers), ctx_rows,
                            batch)

    @torch.no_grad()
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
        state.pos = t + 1
        return self._run_layers(state, x, t, None, final=True)

    def _run_layers(self, state: WaveNetState, x: torch.Tensor, t: int, same: torch.Tensor | None,
                    final: bool) -> torch.Tensor:
        """Every layer at position t from the first layer's input x (B, C) -> the head's logits (B, V or depth * V).
        ``final``: each layer's x~(t) is sent on to later positions (for a stack, at its last stage only: the
        earlier stages' x~(t) lack stages that later positions see)."""
        skip = None
        for plan in state.layers:
            pre = plan.pre_activation(x, t, same)
            if final:
                plan.send(x, t, state.ctx_rows)
            plan.pre_tanh.tanh_()
            gated = F.glu(pre, 1)  # tanh(a) * sigmoid(b)
            if skip is None:  # the first layer: new tensors (x may be the start vector or a stack's codes)
                skip, x = torch.addmm(state.skip_bias, gated, plan.skip), torch.addmm(x, gated, plan.res)
            else:
                skip.addmm_(gated, plan.skip)
                x.addmm_(gated, plan.res)
        return head_step(state.head, skip)

    def _step_stacks(self, state: WaveNetState, prev: torch.Tensor | None) -> torch.Tensor:
        depth, group = self.config.depth, self.config.channels // self.config.depth
        t, stage = divmod(state.pos, depth)
        if state.pos:  # prev: stage (stage - 1) of t, or the last stage of t - 1
            k = (stage - 1) % depth
            state.current[:, k * group : (k + 1) * group] = self.tok_emb.stage(prev, k)
        if stage == 0:  # a new position: its input is the one before, all stages (the start vector at 0)
            state.x_in = self.start.expand(state.batch, -1) if t == 0 else state.current
            state.current = self.start.new_zeros(state.batch, self.config.channels)
        state.pos += 1
        logits = self._run_layers(state, state.x_in, t, state.current, final=stage == depth - 1)
        return logits.unflatten(1, (depth, -1))[:, stage]
