"""GPT-style decoder prior over a code grid of any rank, in raster order, with a KV cache.

Position t's input is the code at t-1 (a learned start vector at t = 0) plus a positional embedding
of t made as the sum of one embedding per axis, so one class serves 1-D, 2-D and 3-D grids. Class
labels and upper-level codes (embedded, upsampled to this grid) are added to every position's input:
both are known before sampling starts, so causality is untouched.

With ``relative_bias``, every attention logit also gets a learned per-head bias for the offset between
query and key along each axis, (dt, dh, dw) for video (Shaw et al. 2018; T5; Swin's 2-D table). The same
pattern then costs the same anywhere in the grid: a head that looks "one frame back, same place" does so
at every position, which is what a digit moving across the frame needs, and what absolute embeddings
must learn separately at each position from data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from harness.folders import PretrainedMixin
from stage2_prior.base import PriorConfig, PriorMixin, class_embedding


BIAS_SCALE = 10.0  # relative attention bias = BIAS_SCALE * its parameter (see attention_bias)


@dataclass
class TransformerPriorConfig(PriorConfig):
    dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # on the input embeddings and each residual branch (not inside attention)
    relative_bias: bool = False  # learned per-head attention bias per (query - key) offset along each axis

    def __post_init__(self):
        super().__post_init__()
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")


class Attention(nn.Module):
    def __init__(self, cfg: TransformerPriorConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, cache: dict | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D). With a cache, x holds the next L positions and keys/values are appended.

        ``bias`` (heads, N, N): additive attention bias, causal mask included (-inf above the diagonal),
        for the whole grid; the rows and columns of the positions involved are taken from it.
        """
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        n = x.shape[1]
        if cache is None:
            # No attention dropout: on CPU it forces SDPA's slow math path (3x slower here).
            if bias is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, :n, :n].to(q.dtype))
        else:
            pos = cache["pos"]
            cache["k"][:, :, pos : pos + n], cache["v"][:, :, pos : pos + n] = k, v
            k, v = cache["k"][:, :, : pos + n], cache["v"][:, :, : pos + n]
            if bias is not None:
                mask = bias[:, pos : pos + n, : pos + n].to(q.dtype)
            else:  # single-position steps attend to everything cached; chunks need the causal mask
                mask = None if n == 1 else torch.ones(n, pos + n, dtype=torch.bool, device=x.device).tril(pos)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    def __init__(self, cfg: TransformerPriorConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, bias))
        return x + self.drop(self.mlp(self.ln2(x)))


@dataclass
class TransformerState:
    """Sampling state: per-layer KV caches and the next position to predict."""

    caches: list[dict]
    context: torch.Tensor  # (B, N, D) class + upper-level conditioning + positions, for every position
    bias: torch.Tensor | None = None  # (heads, N, N) relative attention bias with the causal mask
    pos: int = 0


class TransformerPrior(PriorMixin, PretrainedMixin, nn.Module):
    """GPT-style prior over a code grid of any rank (see the module docstring)."""

    config_class = TransformerPriorConfig
    model_type = "transformer"
    legacy_model_types = ("transformer_prior",)

    def __init__(self, config: TransformerPriorConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.start = nn.Parameter(torch.zeros(d))
        self.pos_emb = nn.ModuleList(nn.Embedding(n, d) for n in config.grid_shape)
        if config.relative_bias:  # one entry per offset combination, (2n - 1) offsets along an axis of n
            offsets = math.prod(2 * n - 1 for n in config.grid_shape)
            self.rel_bias = nn.Parameter(torch.zeros(config.num_heads, offsets))
            self.register_buffer("rel_index", _relative_index(config.grid_shape), persistent=False)
        self.class_emb = class_embedding(config, d)
        self.cond_emb = nn.Embedding(config.cond_vocab_size, d) if config.cond_vocab_size else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def positions(self) -> torch.Tensor:
        """(N, D): the sum of per-axis embeddings at every raster position."""
        grids = torch.meshgrid(*(torch.arange(n, device=self.start.device) for n in self.config.grid_shape),
                               indexing="ij")
        return sum(emb(g.flatten()) for emb, g in zip(self.pos_emb, grids))

    def attention_bias(self) -> torch.Tensor | None:
        """(heads, N, N): the learned bias for each (query, key) pair's offset, -inf where key > query."""
        if not self.config.relative_bias:
            return None
        n = self.num_tokens
        causal = torch.ones(n, n, dtype=torch.bool, device=self.rel_bias.device).tril()
        # Adam moves a parameter by about lr per step, and a useful bias is several logits: the table is
        # stored at 1 / BIAS_SCALE, which is an lr BIAS_SCALE times larger for it alone.
        return (self.rel_bias * BIAS_SCALE)[:, self.rel_index].masked_fill(~causal, float("-inf"))

    def context(self, batch: int, class_labels=None, cond=None) -> torch.Tensor:
        """(B, N, D): what each position's input gets besides the previous token."""
        ctx = self.positions()[None].expand(batch, -1, -1)
        if self.class_emb is not None:
            ctx = ctx + self.embed_class(class_labels)[:, None]
        if self.cond_emb is not None:
            up = F.interpolate(self.cond_emb(cond).movedim(-1, 1), size=tuple(self.config.grid_shape), mode="nearest")
            ctx = ctx + up.flatten(2).transpose(1, 2)
        return ctx

    def forward(self, codes: torch.Tensor, class_labels=None, cond=None) -> torch.Tensor:
        """codes (B, *grid) -> logits (B, *grid, V); position t sees codes before t only."""
        self.check_inputs(codes, class_labels, cond)
        b = codes.shape[0]
        prev = self.tok_emb(codes.flatten(1)[:, :-1])
        x = self.drop(torch.cat([self.start.expand(b, 1, -1), prev], dim=1) + self.context(b, class_labels, cond))
        bias = self.attention_bias()
        for block in self.blocks:
            x = block(x, bias=bias)
        return self.head(self.ln_f(x)).view(*codes.shape, -1)

    # ---- incremental (cached) computation -----------------------------------------------------
    def start_state(self, batch: int, class_labels=None, cond=None) -> TransformerState:
        self.check_inputs(None, class_labels, cond, batch=batch)
        cfg, n = self.config, self.num_tokens
        head_dim = cfg.dim // cfg.num_heads
        p = self.start
        caches = [{"k": p.new_zeros(batch, cfg.num_heads, n, head_dim),
                   "v": p.new_zeros(batch, cfg.num_heads, n, head_dim), "pos": 0} for _ in self.blocks]
        return TransformerState(caches, self.context(batch, class_labels, cond), self.attention_bias())

    def step(self, state: TransformerState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for position ``state.pos``; ``prev`` (B,) is the code at pos - 1 (None at 0)."""
        t = state.pos
        if t >= self.num_tokens:
            raise IndexError(f"all {self.num_tokens} positions are done")
        b = state.context.shape[0]
        x = self.start.expand(b, -1) if t == 0 else self.tok_emb(prev)
        x = (x + state.context[:, t])[:, None]
        for block, cache in zip(self.blocks, state.caches):
            cache["pos"] = t
            x = block(x, cache, state.bias)
        state.pos = t + 1
        return self.head(self.ln_f(x))[:, 0]


def _relative_index(grid_shape: tuple[int, ...]) -> torch.Tensor:
    """(N, N) long: for raster positions q and k, the index of their offset (q - k per axis) in a table of
    prod(2 n - 1) entries (mixed radix, offsets shifted to be >= 0)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid_shape), indexing="ij")).flatten(1)  # (A, N)
    diff = coords[:, :, None] - coords[:, None, :]  # (A, N, N) in (-n, n)
    index = torch.zeros(diff.shape[1:], dtype=torch.long)
    for axis, n in enumerate(grid_shape):
        index = index * (2 * n - 1) + diff[axis] + n - 1
    return index
