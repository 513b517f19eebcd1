"""Gated PixelCNN prior over 2-D code grids (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders"), with optional PixelSNAIL-style causal self-attention and fast cached generation
(Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models").

Architecture (no blind spot), C = ``channels``, k = ``kernel_size``:

* vertical stack: (k//2+1) x k convs over an input shifted down a row, so row i sees rows < i only;
* horizontal stack: 1 x (k//2+1) convs along the row, (i, j) sees (i, < j) in the first layer (mask 'A')
  and (i, <= j) in later ones (mask 'B'); it gets the vertical stack's pre-activations through a 1x1 conv;
* gated units tanh * sigmoid; a residual connection on the horizontal stack (not in the first layer, whose
  input at (i, j) is the code being predicted); a 1x1 skip from every layer, summed, to the head
  ReLU -> 1x1 -> ReLU -> 1x1 -> V logits;
* conditioning, in every gated layer of both stacks: a class embedding (a per-class bias) and upper-level
  codes (embedded, upsampled nearest to this grid, through a non-causal 3x3 conv: they are fully known);
* every ``attn_every`` layers, causal multi-head self-attention over raster order on the horizontal stream.
  After the first layer the horizontal feature at t depends on codes < t only, so attending to positions
  <= t is causal.

Cached generation (``start_state``/``step``) keeps, per layer:

* the last kh = k//2+1 input rows of the vertical conv; when a row starts, every layer's vertical output
  for the whole row (and its link to the horizontal stack, plus conditioning) is computed once from them;
* the horizontal conv's inputs for the current row, position-major so the inputs a position reads are one view;
  a step computes only position (i, j) of each layer, in about six kernels per layer (``ColumnSteps``);
* keys and values of every attention layer (like a transformer's KV cache).

Code stacks (``depth`` > 0, codes (B, H, W, depth)): the channels split into one group per stage, as PixelCNN
splits R, G and B (:mod:`stage2_prior.stacks`). The codes of a position enter side by side (group k = stage k's
embedding); the horizontal convs also read the column of their own position through a group mask (A in the first
layer, B after it), the 1x1 convs of the horizontal stream and of the head are masked B, attention runs per group
(each head belongs to one group and reads the groups up to its own, after a per-group LayerNorm), and the head
gives V logits per group. The vertical stack sees rows above only and needs no mask. So stage k at (i, j) sees
every stage before (i, j) and the stages < k at it. A cached step computes one stage of one position: the
position's column again, with the stages drawn so far.

Cost per token (multiply-adds, L layers, kw = k//2+1): L * (kw * C * 2C + C * 2C) for the horizontal
stack + the head, plus, amortized over the W tokens of a row, L * ((k//2+1) * k * C * 2C + 2C * 2C [+ C*4C
conditioning]) for the vertical stack, plus 4 C^2 + 2 t C per attention layer. A full forward costs all of
this for all H * W positions, so recomputing it per token is H * W times slower.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from harness.folders import PretrainedMixin
from stage2_prior.base import PriorConfig, PriorMixin, class_embedding
from stage2_prior.causal_conv import (VerticalConv, conditioning_map, gate, head_step, head_step_weights,
                                      horizontal_conv, pointwise, shift_down, step_matrix, upper_level_conditioning)
from stage2_prior.stacks import (GroupLayerNorm, MaskedConv2d, MaskedLinear, check_divisible, code_embedding,
                                 group_ids)


@dataclass
class GatedPixelCNNPriorConfig(PriorConfig):
    """``grid_shape`` and ``cond_grid_shape`` are 2-D, (H, W)."""

    channels: int = 128
    num_layers: int = 15
    kernel_size: int = 5  # odd: vertical convs are (k//2+1) x k, horizontal 1 x (k//2+1)
    head_channels: int = 256  # hidden width of the output head
    attn_every: int = 0  # > 0: a causal self-attention block after every attn_every-th layer (0 = none)
    attn_heads: int = 4

    def __post_init__(self):
        super().__post_init__()
        if len(self.grid_shape) != 2:
            raise ValueError(f"the PixelCNN prior models 2-D code grids (H, W), got grid_shape {self.grid_shape}: "
                             "use the wavenet prior for 1-D sequences or the transformer for any rank")
        if self.cond_vocab_size and (self.cond_grid_shape is None or len(self.cond_grid_shape) != 2):
            raise ValueError(f"cond_grid_shape must be a 2-D grid for a PixelCNN prior, got {self.cond_grid_shape}")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")
        if self.attn_every and self.channels % self.attn_heads:
            raise ValueError(f"channels {self.channels} must be divisible by attn_heads {self.attn_heads}")
        if self.depth:
            widths = {"channels": self.channels, "head_channels": self.head_channels}
            check_divisible({**widths, **({"attn_heads": self.attn_heads} if self.attn_every else {})}, self.depth,
                            "a PixelCNN prior")


class GatedLayer(nn.Module):
    def __init__(self, cfg: GatedPixelCNNPriorConfig, first: bool):
        super().__init__()
        c, k = cfg.channels, cfg.kernel_size
        self.first = first
        self.v_conv = VerticalConv(c, 2 * c, k)
        self.h_conv = horizontal_conv(c, 2 * c, k, "A" if first else "B", cfg.depth)
        self.link = nn.Conv2d(2 * c, 2 * c, 1)  # vertical pre-activations -> horizontal stack (rows above: no mask)
        self.out = pointwise(nn.Conv2d, [c], [c, c], cfg.depth)  # gated horizontal -> residual | skip
        self.ctx = nn.Conv2d(c, 4 * c, 1) if cfg.conditional else None  # conditioning -> vertical | horizontal

    def vertical(self, v_pre: torch.Tensor, ctx: torch.Tensor | None):
        """Vertical pre-activations (B, 2C, h, W) [+ conditioning] -> (vertical output, horizontal bias)."""
        if ctx is None:
            return gate(v_pre), self.link(v_pre)
        cv, ch = self.ctx(ctx).chunk(2, 1)
        v_pre = v_pre + cv
        return gate(v_pre), self.link(v_pre) + ch

    def forward(self, v, h, ctx):
        v_out, h_bias = self.vertical(self.v_conv(v), ctx)
        res, skip = self.out(gate(self.h_conv(h) + h_bias)).chunk(2, 1)
        return v_out, (res if self.first else h + res), skip


class CausalSelfAttention(nn.Module):
    """Pre-norm multi-head attention over raster positions <= t, with a residual connection."""

    def __init__(self, cfg: GatedPixelCNNPriorConfig):
        super().__init__()
        c, depth = cfg.channels, cfg.depth
        self.heads = cfg.attn_heads
        if not depth:
            self.norm = nn.LayerNorm(c)
            self.qkv = nn.Linear(c, 3 * c)
            self.proj = nn.Linear(c, c)
            return
        # stacks: head h belongs to group h // (heads / depth); its queries, keys and values read groups <= its own
        self.norm = GroupLayerNorm(c, depth)
        self.qkv = MaskedLinear(group_ids([c], depth), group_ids([c, c, c], depth), "B")
        self.proj = MaskedLinear(group_ids([c], depth), group_ids([c], depth), "B")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the same, every position attending to positions <= itself."""
        b, c, hh, ww = x.shape
        seq = rearrange(x, "b c h w -> b (h w) c")
        q, k, v = rearrange(self.qkv(self.norm(seq)), "b l (three n d) -> three b n l d", three=3, n=self.heads)
        out = self.proj(rearrange(F.scaled_dot_product_attention(q, k, v, is_causal=True), "b n l d -> b l (n d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=hh, w=ww)

    def step(self, x: torch.Tensor, cache: dict, t: int) -> torch.Tensor:
        """x (B, C) at position t; keys and values of positions < t come from the cache."""
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n d) -> three b n 1 d", three=3, n=self.heads)
        cache["k"][:, :, t : t + 1], cache["v"][:, :, t : t + 1] = k, v
        out = F.scaled_dot_product_attention(q, cache["k"][:, :, : t + 1], cache["v"][:, :, : t + 1])
        return x + self.proj(rearrange(out, "b n 1 d -> b (n d)"))


class ColumnSteps:
    """One gated layer's horizontal stream in a cached step: its weights as matrices for the few-row GEMMs of one
    position (masks applied) and its input row.

    The row is stored position-major, (B, kw + W, C) with kw zero columns on the left, so the kw inputs a position
    reads are one view of (B, kw * C) and a step runs one GEMM for the horizontal conv, none for copying."""

    def __init__(self, layer: GatedLayer, batch: int, width: int):
        c, kw = layer.h_conv.in_channels, layer.h_conv.width
        self.kw = kw
        self.conv, self.conv_bias = step_matrix(layer.h_conv), layer.h_conv.bias  # (kw * C, 2C), (2C,)
        out = step_matrix(layer.out)
        self.res, self.skip = out[:, :c].contiguous(), out[:, c:].contiguous()
        self.res_bias, self.skip_bias = layer.out.bias[:c], layer.out.bias[c:]
        self.row = self.conv.new_zeros(batch, kw + width, c)
        self.columns = list(self.row.unbind(1))[kw:]  # (B, C) views: column j's input
        first = 0 if layer.h_conv.mask == "A" else 1  # mask A reads j - kw .. j - 1, mask B j - kw + 1 .. j
        self.windows = [self.row[:, j + first : j + first + kw].flatten(1) for j in range(width)]
        self.pre = self.conv.new_empty(batch, 2 * c)
        self.pre_tanh = self.pre[:, :c]
        # per column of the current row: (B, 2C) conv bias + link + conditioning, contiguous for the GEMM
        self.bias_rows = self.conv.new_empty(width, batch, 2 * c)
        self.bias = list(self.bias_rows.unbind(0))

    def gated(self, j: int) -> torch.Tensor:
        """(B, C) gated output at column j of the current row."""
        torch.addmm(self.bias[j], self.windows[j], self.conv, out=self.pre)
        self.pre_tanh.tanh_()
        return F.glu(self.pre, 1)  # tanh(a) * sigmoid(b)


@dataclass
class PixelCNNState:
    """Sampling state; see the module docstring. ``pos`` is the next raster position to predict."""

    ctx: torch.Tensor | None  # (B, C, H, W) conditioning map (class + upper-level codes), (B, C, 1, 1) class only
    v_rows: list[torch.Tensor]  # per layer: last kh input rows of the vertical conv
    columns: list[ColumnSteps]  # per layer: the horizontal stream's weights, input row and per-column bias
    head: tuple[torch.Tensor, ...]  # (W1, b1, W2, b2) of the head's 1x1 convs, (in, out) matrices
    skip_bias: torch.Tensor  # (C,) the skip biases of all layers, summed
    attn: dict[int, dict] = field(default_factory=dict)  # layer index -> {"k", "v"} caches
    pos: int = 0


class GatedPixelCNNPrior(PriorMixin, PretrainedMixin, nn.Module):
    """Gated PixelCNN prior over 2-D code grids (see the module docstring)."""

    config_class = GatedPixelCNNPriorConfig
    model_type = "pixelcnn"
    legacy_model_types = ("pixelcnn_prior",)
    shape_agnostic = True  # no parameter depends on the grid size: train on crops, sample bigger

    def __init__(self, config: GatedPixelCNNPriorConfig):
        super().__init__()
        self.config = config
        c, n = config.channels, config.num_layers
        self.tok_emb = code_embedding(config.vocab_size, c, config.depth, summed=False)  # stacks: group k = stage k
        self.class_emb = class_embedding(config, c)
        self.cond_emb, self.cond_conv = upper_level_conditioning(config, c, nn.Conv2d)
        self.layers = nn.ModuleList(GatedLayer(config, first=i == 0) for i in range(n))
        # Attention after layer i (never after the last: its output would reach nothing).
        self.attn = nn.ModuleDict({str(i): CausalSelfAttention(config) for i in range(n - 1)
                                   if config.attn_every and (i + 1) % config.attn_every == 0})
        self.head = nn.Sequential(nn.ReLU(), pointwise(nn.Conv2d, [c], [config.head_channels], config.depth), nn.ReLU(),
                                  self._logits(config))

    @staticmethod
    def _logits(config: GatedPixelCNNPriorConfig) -> nn.Module:
        """The head's last 1x1 conv: V logits, or V per stage group (group k's features -> stage k's logits)."""
        if not config.depth:
            return nn.Conv2d(config.head_channels, config.vocab_size, 1)
        d, out = config.depth, torch.arange(config.depth).repeat_interleave(config.vocab_size)
        return MaskedConv2d(group_ids([config.head_channels], d), out, "B")

    def context(self, batch: int, class_labels=None, cond=None) -> torch.Tensor | None:
        """(B, C, H, W): class embedding + processed upper-level codes; (B, C, 1, 1) with a class only; None when
        unconditional."""
        return conditioning_map(self, batch, class_labels, cond)

    def forward(self, codes: torch.Tensor, class_labels=None, cond=None) -> torch.Tensor:
        """codes (B, H, W) -> logits (B, H, W, V); position (i, j) sees codes before it in raster order only.
        Stacks: codes (B, H, W, depth) -> logits (B, H, W, depth, V), stage k also seeing the stages < k at (i, j)."""
        self.check_inputs(codes, class_labels, cond)
        ctx = self.context(codes.shape[0], class_labels, cond)
        h = self.tok_emb(codes).permute(0, 3, 1, 2)  # (B, C, H, W)
        v, skip = shift_down(h), 0
        for i, layer in enumerate(self.layers):
            v, h, s = layer(v, h, ctx)
            skip = skip + s
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        logits = self.head(skip).permute(0, 2, 3, 1)
        return logits.unflatten(-1, (self.config.depth, -1)) if self.config.depth else logits

    # ---- incremental (cached) computation -----------------------------------------------------
    @torch.no_grad()
    def start_state(self, batch: int, class_labels=None, cond=None) -> PixelCNNState:
        self.check_inputs(None, class_labels, cond, batch=batch)
        cfg, w = self.config, self.config.grid_shape[1]
        head_dim = cfg.channels // cfg.attn_heads
        p = self.tok_emb.weight
        columns = [ColumnSteps(layer, batch, w) for layer in self.layers]
        return PixelCNNState(
            ctx=self.context(batch, class_labels, cond),
            v_rows=[layer.v_conv.start_rows(batch, w) for layer in self.layers],
            columns=columns,
            head=head_step_weights(self.head),
            skip_bias=sum(column.skip_bias for column in columns),
            attn={int(i): {"k": p.new_zeros(batch, cfg.attn_heads, self.num_positions, head_dim),
                           "v": p.new_zeros(batch, cfg.attn_heads, self.num_positions, head_dim)} for i in self.attn},
        )

    def _start_row(self, state: PixelCNNState, i: int) -> None:
        """Every layer's vertical output for row i (rows < i are known) and its bias on the horizontal stack."""
        first = state.columns[0]
        # the first layer's inputs on the row just finished = the codes of row i - 1, embedded (zeros above row 0)
        v = first.row[:, first.kw :].transpose(1, 2)  # (B, C, W)
        if i == 0:
            v = torch.zeros_like(v)
        ctx = state.ctx if state.ctx is None or state.ctx.shape[2] == 1 else state.ctx[:, :, i : i + 1]
        for n, layer in enumerate(self.layers):
            state.v_rows[n] = layer.v_conv.push_row(state.v_rows[n], v)
            v_out, h_bias = layer.vertical(layer.v_conv.row(state.v_rows[n]), ctx)
            v = v_out[:, :, 0]
            torch.add(h_bias[:, :, 0].permute(2, 0, 1), state.columns[n].conv_bias, out=state.columns[n].bias_rows)

    @torch.no_grad()
    def step(self, state: PixelCNNState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for code ``state.pos``; ``prev`` (B,) is the code before (None at 0). Stacks: codes in raster
        order of (position, stage), stages fastest."""
        t, width, depth = state.pos, self.config.grid_shape[1], self.config.depth
        if t >= self.num_tokens:
            raise IndexError(f"all {self.num_tokens} codes are done")
        if t > 0:
            if prev is None:
                raise ValueError(f"prev (the code at position {t - 1}) is required after position 0")
            self._write_input(state, t - 1, prev)
        position, stage = divmod(t, depth) if depth else (t, 0)
        i, j = divmod(position, width)
        if j == 0 and stage == 0:
            self._start_row(state, i)
        logits = self._column(state, position, j)
        state.pos = t + 1
        return logits.unflatten(1, (depth, -1))[:, stage] if depth else logits

    def _write_input(self, state: PixelCNNState, t: int, code: torch.Tensor) -> None:
        """Code ``t`` (B,) embedded into the first layer's input row (a stack's stage into its channel group)."""
        width, depth, first = self.config.grid_shape[1], self.config.depth, state.columns[0]
        if not depth:
            first.columns[t % width].copy_(self.tok_emb(code))
            return
        position, stage = divmod(t, depth)
        group = self.config.channels // depth
        first.columns[position % width][:, stage * group : (stage + 1) * group] = self.tok_emb.stage(code, stage)

    def _column(self, state: PixelCNNState, t: int, j: int) -> torch.Tensor:
        """Every layer of the horizontal stream at position t = (i, j) -> the head's logits (B, V, or depth * V).
        Each layer's output h goes straight into the next layer's input row; the last layer's reaches nothing."""
        columns = state.columns
        skip, h = None, None
        for n, column in enumerate(columns):
            gated = column.gated(j)
            if skip is None:
                skip = torch.addmm(state.skip_bias, gated, column.skip)
            else:
                skip.addmm_(gated, column.skip)
            if n + 1 == len(columns):
                break
            target = columns[n + 1].columns[j]
            if h is None:  # the first layer: no residual connection
                h = torch.addmm(column.res_bias, gated, column.res, out=target)
            else:
                h = torch.add(h, torch.addmm(column.res_bias, gated, column.res), out=target)
            if n in state.attn:
                h = target.copy_(self.attn[str(n)].step(h, state.attn[n], t))
        return head_step(state.head, skip)
